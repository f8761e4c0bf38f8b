"""torchvision-layout datasets read from small files written in each real on-disk format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from trustvision import data
from trustvision.data.torchvision_sets import default_root
from trustvision.errors import TrustVisionError


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _labels(n: int, k: int = 10) -> np.ndarray:
    return np.arange(n) % k


def _write_mnist(root, folder="MNIST", n_train=200, n_test=30, gz=False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = 255
        imgs[:, 0, 1] = 0
        labels = _labels(n)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)):
            blob = _idx(arr)
            if gz:
                (raw / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (raw / stem).write_bytes(blob)
        out[prefix] = (imgs, labels)
    return out


@pytest.mark.parametrize("name,folder,gz", [("mnist", "MNIST", False), ("fashion-mnist", "FashionMNIST", True)])
def test_mnist_family_round_trip_and_splits(tmp_path, name, folder, gz):
    arrays = _write_mnist(tmp_path, folder, gz=gz)
    tr = data.load(name, "train", root=tmp_path)
    va = data.load(name, "val", root=str(tmp_path))
    te = data.load(name, "test", root=tmp_path)
    assert (len(tr), len(va), len(te)) == (180, 20, 30)
    assert tr.num_channels == 1 and tr.image_size == (28, 28) and len(tr.classes) == 10
    if name == "fashion-mnist":
        assert tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot"
    # disjoint, complete, stratified (2 of 20 per class in val)
    ti, vi = set(tr.indices.tolist()), set(va.indices.tolist())
    assert not ti & vi and len(ti | vi) == 200
    assert torch.bincount(va.labels, minlength=10).tolist() == [2] * 10
    # exact values
    x, y = te[7]
    imgs, labels = arrays["t10k"]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert x[0, 0, 0] == 1.0 and x[0, 0, 1] == 0.0 and y == labels[7] == 7
    assert torch.equal(x[0], torch.tensor(imgs[7], dtype=torch.float32) / 255)
    j = int(tr.indices[3])
    assert torch.equal(tr[3][0][0] * 255, torch.tensor(arrays["train"][0][j], dtype=torch.float32))
    assert tr[3][1] == arrays["train"][1][j]
    # deterministic
    assert torch.equal(data.load(name, "val", root=tmp_path).indices, va.indices)


def test_missing_files_name_the_fix(tmp_path):
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"):
        with pytest.raises(TrustVisionError) as e:
            data.load(name, "train", root=tmp_path)
        msg = str(e.value)
        assert msg == (  # names no option a command lacks (issue #9): commands in backticks
            f"{name} not found under {tmp_path}; fetch it once with `trustvision train --data {name} --download` "
            "(download=True in Python), or point --data-dir (root= in Python) at a folder that holds it"
        )


def test_default_root_uses_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTVISION_DATA", str(tmp_path / "d"))
    assert default_root() == tmp_path / "d"
    monkeypatch.delenv("TRUSTVISION_DATA")
    assert str(default_root()).endswith(".cache/trustvision/data")
    monkeypatch.setenv("TRUSTVISION_DATA", str(tmp_path))
    with pytest.raises(TrustVisionError, match=f"under {tmp_path};"):
        data.load("mnist")


def test_corrupt_idx_names_the_file(tmp_path):
    _write_mnist(tmp_path)
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(TrustVisionError) as e:
        data.load("mnist", "train", root=tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    bad.write_bytes(b"\x08\x03garbage")
    with pytest.raises(TrustVisionError, match="bad magic"):
        data.load("mnist", "train", root=tmp_path)


def _pickle(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def test_cifar10_round_trip(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    batches = []
    for i in range(1, 6):
        d = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        batches.append(d)
        _pickle(base / f"data_batch_{i}", {"data": d, "labels": list(_labels(20)), "batch_label": "x"})
    test = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
    test[4, 0] = 255  # red channel, pixel (0, 0)
    test[4, 1024 + 33] = 0  # green channel, pixel (1, 1)
    _pickle(base / "test_batch", {"data": test, "labels": [3] * 10})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 20})
    tr, va, te = (data.load("cifar10", s, root=tmp_path) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (90, 10, 10)
    assert tr.classes == names and tr.num_channels == 3 and tr.image_size == (32, 32)
    x, y = te[4]
    assert x.shape == (3, 32, 32) and x[0, 0, 0] == 1.0 and x[1, 1, 1] == 0.0 and y == 3
    assert torch.equal(x * 255, torch.tensor(test[4].reshape(3, 32, 32), dtype=torch.float32))
    assert torch.bincount(va.labels).tolist() == [1] * 10
    assert not set(tr.indices.tolist()) & set(va.indices.tolist())
    j = int(va.indices[0])  # index into the concatenated 5 batches
    ref = np.concatenate(batches)[j].reshape(3, 32, 32)
    assert torch.equal(va[0][0] * 255, torch.tensor(ref, dtype=torch.float32))


def test_cifar100_round_trip_and_corrupt_pickle(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    d = np.zeros((1000, 3072), dtype=np.uint8)
    d[:, 5] = 255
    fine = list(np.arange(1000) % 100)
    _pickle(base / "train", {"data": d, "fine_labels": fine, "coarse_labels": [0] * 1000}, 5)
    _pickle(base / "test", {"data": d[:50], "fine_labels": fine[:50], "coarse_labels": [0] * 50})
    names = [f"c{i}" for i in range(100)]
    _pickle(base / "meta", {"fine_label_names": names, "coarse_label_names": ["a"] * 20})
    tr = data.load("cifar100", "train", root=tmp_path)
    te = data.load("cifar100", "test", root=tmp_path)
    assert len(tr) == 900 and len(data.load("cifar100", "val", root=tmp_path)) == 100
    assert tr.classes == names and te[42][1] == 42 and te[42][0][0, 0, 5] == 1.0
    (base / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(TrustVisionError) as e:
        data.load("cifar100", "test", root=tmp_path)
    assert str(base / "test") in str(e.value)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        _pickle(base / f, {"data": Evil(), "labels": []})
    with pytest.raises(TrustVisionError, match="refusing to load .*print"):
        data.load("cifar10", "test", root=tmp_path)


def test_svhn_mat_round_trip(tmp_path):
    import scipy.io

    rng = np.random.default_rng(2)
    for split, n in (("train", 100), ("test", 20)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[2, 3, 1, :] = 255  # row 2, column 3, green
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # labels 1..10, 10 means digit 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "test":
            ref_x, ref_y = x, y
    tr, va, te = (data.load("svhn", s, root=tmp_path) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (90, 10, 20)
    assert tr.classes == [str(i) for i in range(10)] and te.num_channels == 3
    x0, y0 = te[0]
    assert y0 == 1 and te[9][1] == 0  # label 10 -> class "0"
    assert x0[1, 2, 3] == 1.0
    assert torch.equal(x0 * 255, torch.tensor(ref_x[..., 0].transpose(2, 0, 1), dtype=torch.float32))
    assert sorted(te.labels.tolist()) == sorted((ref_y.ravel() % 10).tolist())
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB junk")
    with pytest.raises(TrustVisionError) as e:
        data.load("svhn", "test", root=tmp_path)
    assert "test_32x32.mat" in str(e.value)


def _png(path, value, size=(6, 5), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    arr = np.full((h, w) if mode == "L" else (h, w, 3), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_imagefolder_flat_class_folders(tmp_path):
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(20):
            _png(tmp_path / cls / f"{i:02d}.png", 255 if cls == "cat" else 10 * i)
    name = f"imagefolder:{tmp_path}"
    sets = {s: data.load(name, s) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [24, 6, 10]
    ds = sets["train"]
    assert ds.classes == ["cat", "dog"] and ds.num_channels == 1 and ds.image_size == (6, 5)
    files = [set(map(str, d.files)) for d in sets.values()]
    assert not files[0] & files[1] and not files[0] & files[2] and not files[1] & files[2]
    for x, y in (ds[i] for i in range(len(ds))):
        assert x.shape == (1, 6, 5) and x.dtype == torch.float32
        if y == 0:
            assert torch.all(x == 1.0)
    assert [str(f) for f in data.load(name, "test").files] == [str(f) for f in sets["test"].files]
    assert ds.name == name


def test_imagefolder_split_folders_rgb_and_resize(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(10):
                _png(tmp_path / split / cls / f"{i}.png", 128, size=(8, 8), mode="RGB")
    _png(tmp_path / "train" / "a" / "big.png", 255, size=(16, 16), mode="RGB")
    tr = data.load(f"imagefolder:{tmp_path}", "train")
    va = data.load(f"imagefolder:{tmp_path}", "val")
    te = data.load(f"imagefolder:{tmp_path}", "test", image_size=4)
    assert (len(tr), len(va), len(te)) == (19, 2, 20)
    assert tr.num_channels == 3 and te.image_size == (4, 4)
    assert te[0][0].shape == (3, 4, 4) and torch.allclose(te[0][0], torch.full((3, 4, 4), 128 / 255))
    big = [i for i, f in enumerate(tr.files + va.files) if f.name == "big.png"]
    assert big
    ds = tr if big[0] < len(tr) else va
    x, _ = ds[big[0] % len(tr) if ds is tr else big[0] - len(tr)]
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.ones(3, 8, 8))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(TrustVisionError, match="does not exist"):
        data.load(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(TrustVisionError, match="no class folders with images"):
        data.load(f"imagefolder:{tmp_path / 'empty'}")
    bad = tmp_path / "bad" / "cls" / "x.png"
    bad.parent.mkdir(parents=True)
    for i in range(5):
        bad.with_name(f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(TrustVisionError) as e:
        ds = data.load(f"imagefolder:{tmp_path / 'bad'}")
        ds[0]
    assert "cannot read image" in str(e.value) and ".png" in str(e.value)
    assert "\n" not in str(e.value)
