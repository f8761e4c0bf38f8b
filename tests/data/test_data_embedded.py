"""Embedded datasets: digits, faces, textures; the registry's errors."""

import numpy as np
import pytest
import torch

from trustvision import data
from trustvision.data.embedded import TEXTURE_SOURCES, stratified_split
from trustvision.errors import TrustVisionError


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_list_datasets_names_every_entry():
    names = data.list_datasets()
    for n in ["digits", "faces", "textures", "shortcut-digits", "mnist", "fashion-mnist",
              "cifar10", "cifar100", "svhn", "imagefolder:PATH"]:
        assert n in names


def test_unknown_name_and_bad_split_are_one_line_errors():
    with pytest.raises(TrustVisionError) as e:
        data.load("digitz")
    msg = _one_line(e)
    assert "'digits'" in msg and "trustvision data" in msg
    with pytest.raises(TrustVisionError) as e:
        data.load("digits", split="validation")
    assert "train, val, test" in _one_line(e)
    with pytest.raises(TrustVisionError):
        data.load("nosuchprefix:/tmp")


def test_stratified_split_is_disjoint_complete_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [20, 40, 8, 100])
    parts = stratified_split(labels, (0.6, 0.15, 0.25), seed=3)
    again = stratified_split(labels, (0.6, 0.15, 0.25), seed=3)
    other = stratified_split(labels, (0.6, 0.15, 0.25), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], other[0])
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    for c, n in enumerate([20, 40, 8, 100]):
        assert (labels[parts[0]] == c).sum() == round(0.6 * n)
        assert (labels[parts[1]] == c).sum() == round(0.75 * n) - round(0.6 * n)


def test_digits_values_shapes_and_splits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    sets = {s: data.load("digits", split=s) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [1078, 269, 450]
    assert sum(len(d) for d in sets.values()) == len(ref.target)
    ds = sets["test"]
    assert ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.image_size == (8, 8) and ds.num_channels == 1
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    # every image is a digit of sklearn's set, scaled by 1/16
    imgs, labels = ds.tensors()
    assert imgs.min() >= 0 and imgs.max() == 1.0
    ref_imgs = torch.tensor(ref.images / 16.0, dtype=torch.float32)
    idx = stratified_split(ref.target)[2]
    assert torch.equal(imgs[:, 0], ref_imgs[idx]) and labels.tolist() == ref.target[idx].tolist()
    # same split every call; splits disjoint; stratified
    assert torch.equal(data.load("digits", split="test").images, imgs)
    tr = sets["train"].labels
    assert torch.bincount(tr, minlength=10).min() >= 100
    assert torch.bincount(sets["test"].labels, minlength=10).min() >= 44


def test_faces_first_hundred_are_faces():
    from skimage.data import lfw_subset

    ref = lfw_subset()
    ds = data.load("faces", split="train")
    assert ds.classes == ["face", "non-face"] and ds.image_size == (25, 25) and ds.num_channels == 1
    sizes = [len(data.load("faces", split=s)) for s in ("train", "val", "test")]
    assert sizes == [120, 30, 50]
    idx = stratified_split(np.repeat([0, 1], 100))[0]
    imgs, labels = ds.tensors()
    assert torch.allclose(imgs[:, 0], torch.tensor(ref[idx], dtype=torch.float32))
    assert labels.tolist() == [0 if i < 100 else 1 for i in idx]
    assert torch.bincount(labels).tolist() == [60, 60]


def test_textures_shapes_classes_and_disjoint_bands():
    sets = {s: data.load("textures", split=s) for s in ("train", "val", "test")}
    ds = sets["train"]
    assert ds.num_channels == 3 and ds.image_size == (32, 32)
    assert ds.classes == list(TEXTURE_SOURCES) and len(ds.classes) >= 6
    counts = sum(torch.bincount(d.labels, minlength=8) for d in sets.values())
    assert counts.min() >= 300
    imgs, _ = ds.tensors()
    assert imgs.dtype == torch.float32 and 0 <= imgs.min() and imgs.max() <= 1
    # each class's patches lie inside their split's band; the bands do not overlap
    for c, cls in enumerate(ds.classes):
        rows = {}
        for s, d in sets.items():
            r0, r1 = d.bands[cls]
            ys = d.origins[d.labels == c, 0]
            assert ys.min() >= r0 and (ys + 32).max() <= r1
            rows[s] = set(range(int(ys.min()), int((ys + 32).max())))
        assert not rows["train"] & rows["test"]
        assert not rows["train"] & rows["val"] and not rows["val"] & rows["test"]


def test_textures_patches_are_cut_from_the_photos_and_cached():
    import skimage.data

    ds = data.load("textures", split="test")
    c = ds.classes.index("brick")
    i = int(torch.nonzero(ds.labels == c)[0])
    y, x = ds.origins[i].tolist()
    photo = torch.tensor(skimage.data.brick()[y : y + 32, x : x + 32], dtype=torch.float32) / 255
    assert torch.equal(ds[i][0][0], photo) and torch.equal(ds[i][0][2], photo)
    again = data.load("textures", split="test")
    assert torch.equal(again.images, ds.images) and again.images is not ds.images


@pytest.mark.slow
def test_textures_are_learnable_by_a_small_cnn():
    # one thread: deterministic and ~10 s of CPU (measured test accuracy 0.89)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        acc = _train_small_cnn_on_textures()
    finally:
        torch.set_num_threads(threads)
    assert acc >= 0.85, acc


def _train_small_cnn_on_textures() -> float:
    torch.manual_seed(0)
    tr, te = data.load("textures", "train"), data.load("textures", "test")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 8),
    )
    epochs = 12
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=epochs * 30)
    x, y = tr.tensors()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (net(te.images).argmax(1) == te.labels).float().mean().item()
