"""Issue #9 (data): ``imagefolder:PATH`` has one policy for every split -- a file that cannot be
read is refused in one line naming it, whichever split it falls in; every split has one image
size; fewer than 2 classes, empty class folders and folders without images are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trustvision import data, models
from trustvision.errors import TrustVisionError

SPLITS = ("train", "val", "test")


def _png(path, value=128, size=(8, 8), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    arr = np.full((h, w) if mode == "L" else (h, w, 3), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def _flat(root, classes=("a", "b"), n=10, size=(8, 8)):
    for c, cls in enumerate(classes):
        for i in range(n):
            _png(root / cls / f"{i:02d}.png", 40 + 100 * c, size)
    return f"imagefolder:{root}"


def _split_layout(root, splits=SPLITS, classes=("a", "b"), n=6, size=(8, 8)):
    for s in splits:
        for c, cls in enumerate(classes):
            for i in range(n):
                _png(root / s / cls / f"{i}.png", 40 + 100 * c, size)
    return f"imagefolder:{root}"


def _one_line(fn, *words):
    with pytest.raises(TrustVisionError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 500, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _truncated_png(path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


CORRUPTIONS = {
    "garbage": lambda p: p.write_bytes(b"not an image at all"),
    "empty-file": lambda p: p.write_bytes(b""),
    "truncated-png": _truncated_png,
    "png-header-only": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"),
}


@pytest.mark.parametrize("bad_split", SPLITS)
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_image_is_refused_in_every_split(tmp_path, bad_split, kind):
    """The same corrupt file stops loading *every* split: no split silently skips it."""
    name = _split_layout(tmp_path)
    bad = tmp_path / bad_split / "b" / "3.png"
    CORRUPTIONS[kind](bad)
    for split in SPLITS:
        _one_line(lambda: data.load(name, split), "cannot read image", str(bad), "fix or remove it")


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_image_in_flat_layout_is_refused_for_all_splits(tmp_path, kind):
    name = _flat(tmp_path)
    bad = tmp_path / "a" / "05.png"
    CORRUPTIONS[kind](bad)
    for split in SPLITS:
        _one_line(lambda: data.load(name, split), "cannot read image", str(bad))


def test_audit_calibration_on_corrupt_val_image_exits_2_naming_it(tmp_path, capsys):
    """The issue's case: calibration used to fit on half the test split, the file never named."""
    from trustvision.cli import main

    name = _split_layout(tmp_path / "imgs", n=4)
    bad = tmp_path / "imgs" / "val" / "a" / "1.png"
    bad.write_bytes(b"broken")
    torch.manual_seed(0)
    ck = models.save(models.create("small-cnn", 2, 1, 8, widths=(4, 8)), tmp_path / "ck",
                     classes=["a", "b"])
    code = main(["audit", "--model", str(ck), "--data", name, "--checks", "calibration", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(bad) in err


def test_train_cli_on_corrupt_val_image_exits_2_naming_it(tmp_path, capsys):
    from trustvision.cli import main

    name = _flat(tmp_path / "imgs", n=8)
    bad = tmp_path / "imgs" / "b" / "07.png"
    bad.write_bytes(b"broken")
    code = main(["train", "--data", name, "--model", "small-cnn", "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(bad) in err, err


def test_every_split_has_the_first_training_images_size(tmp_path):
    """Mixed sizes: resized to the first training image's size, in every split (also when the
    test folder's first image is bigger), unless image_size= is given."""
    name = _split_layout(tmp_path, size=(8, 8))
    _png(tmp_path / "test" / "a" / "0.png", 200, size=(20, 12))  # first test image, other size
    _png(tmp_path / "val" / "b" / "9.png", 200, size=(5, 30))
    _png(tmp_path / "train" / "b" / "big.png", 255, size=(16, 16))
    sets = {s: data.load(name, s) for s in SPLITS}
    assert {s: d.image_size for s, d in sets.items()} == {s: (8, 8) for s in SPLITS}
    for d in sets.values():
        x, _ = d.tensors()
        assert x.shape[1:] == (1, 8, 8)
    first_test = sets["test"].files.index(tmp_path / "test" / "a" / "0.png")
    assert torch.allclose(sets["test"][first_test][0], torch.full((1, 8, 8), 200 / 255), atol=1 / 255)
    sized = {s: data.load(name, s, image_size=(6, 4)) for s in SPLITS}
    assert all(d.image_size == (6, 4) and d[0][0].shape == (1, 6, 4) for d in sized.values())


def test_channels_follow_the_first_training_image(tmp_path):
    name = _split_layout(tmp_path)
    _png(tmp_path / "test" / "a" / "0.png", 10, mode="RGB")  # an RGB image among grey ones
    te = data.load(name, "test")
    assert te.num_channels == 1 and te[0][0].shape == (1, 8, 8)
    assert data.load(name, "test", channels=3)[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_fewer_than_two_classes_is_refused(tmp_path, layout):
    if layout == "flat":
        name = _flat(tmp_path, classes=("only",))
        where = tmp_path
    else:
        name = _split_layout(tmp_path, classes=("only",))
        where = tmp_path / "train"
    for split in SPLITS:
        _one_line(lambda: data.load(name, split), str(where), "only one class folder (only)",
                  "at least 2 classes")


@pytest.mark.parametrize("layout", ["flat", "splits-train", "splits-test"])
def test_empty_class_folder_is_refused(tmp_path, layout):
    if layout == "flat":
        name = _flat(tmp_path)
        empty = tmp_path / "c"
    else:
        name = _split_layout(tmp_path)
        empty = tmp_path / ("train" if layout == "splits-train" else "test") / "b"
        for f in empty.iterdir():
            f.unlink()
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("no images here")
    for split in SPLITS:
        _one_line(lambda: data.load(name, split), f"class folder {empty} has no images",
                  "add images to it or remove it")


@pytest.mark.parametrize("setup", ["no-subfolders", "only-text-files", "empty-folder", "hidden-only"])
def test_folder_without_images_is_refused(tmp_path, setup):
    if setup == "no-subfolders":
        _png(tmp_path / "loose.png")
    elif setup == "only-text-files":
        for cls in ("a", "b"):
            (tmp_path / cls).mkdir()
            (tmp_path / cls / "x.txt").write_text("x")
    elif setup == "hidden-only":
        _png(tmp_path / "a" / ".hidden.png")
        _png(tmp_path / ".cache" / "b" / "x.png")
    _one_line(lambda: data.load(f"imagefolder:{tmp_path}", "train"), "no class folders with images")


def test_non_image_and_hidden_files_are_ignored(tmp_path):
    name = _flat(tmp_path)
    junk = {
        "a/readme.txt": b"hello", "a/labels.csv": b"1,2", "b/.DS_Store": b"\x00\x01",
        "b/._01.png": b"AppleDouble junk", "a/.thumbs/0.png": b"junk", "b/model.pt": b"\x80\x02",
        "a/noext": b"junk",
    }
    for rel, blob in junk.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(blob)
    (tmp_path / ".git" / "objects").mkdir(parents=True)  # a hidden folder is not a class
    sets = [data.load(name, s) for s in SPLITS]
    assert sets[0].classes == ["a", "b"]
    assert sum(len(d) for d in sets) == 20
    assert all(f.suffix == ".png" and not f.name.startswith(".") for d in sets for f in d.files)


@pytest.mark.parametrize("kw,words", [
    ({"image_size": 0}, ["image_size must be"]),
    ({"image_size": (8,)}, ["image_size must be"]),
    ({"image_size": "8"}, ["image_size must be"]),
    ({"image_size": (8, 100000)}, ["image_size must be"]),
    ({"channels": 2}, ["channels must be 1 or 3"]),
    ({"val_fraction": 1.5}, ["val_fraction"]),
])
def test_bad_loader_options(tmp_path, kw, words):
    name = _flat(tmp_path)
    _one_line(lambda: data.load(name, "train", **kw), *words)


def test_each_file_is_verified_once_across_splits(tmp_path, monkeypatch):
    from trustvision.data import torchvision_sets as tvs

    name = _flat(tmp_path / "cached")
    tvs._probe_cached.cache_clear()
    for s in SPLITS:
        data.load(name, s)
    info = tvs._probe_cached.cache_info()
    assert info.currsize == 20 and info.misses == 20
