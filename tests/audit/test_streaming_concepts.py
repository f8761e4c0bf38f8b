"""Streaming (issue 16) for the ``concepts`` check and the XNN: a split that is not held in memory (an
image folder, or a dataset whose ``tensors()`` is made to fail) is read batch by batch through a
DataLoader; the XNN keeps only the activations, logits and labels, the check reads only the images it
shows, and the results equal those of the same images held in memory."""

from __future__ import annotations

import math

import pytest
import torch

from trustvision import audit, data, models
from trustvision.data._base import ImageDataset, TensorImageDataset
from trustvision.data.torchvision_sets import ImageFolderDataset

from _streaming_data import digits_folder, in_memory  # noqa: F401  (tests/audit/_streaming_data.py)
from trustvision.explain.xnn import XNN


def _no_stacking(self):
    raise AssertionError("a streamed split was stacked into one tensor")


_read_items = ImageDataset.tensors


def _only_a_sample(self):
    """The base ``tensors()`` (reads items through a DataLoader), allowed for the audit's compatibility
    probe (8 images) only."""
    if len(self) > 8:
        _no_stacking(self)
    return _read_items(self)


class Streamed(ImageDataset):
    """The items of an in-memory dataset read one by one (``tensors()`` fails), with its per-item
    ``marked`` / ``masks`` when it has them (as a planted-shortcut set)."""

    def __init__(self, parent: TensorImageDataset):
        self._parent = parent
        for k in ("name", "split", "classes", "image_size", "num_channels"):
            setattr(self, k, getattr(parent, k))
        self.labels = parent.labels
        for k in ("marked", "masks"):
            if getattr(parent, k, None) is not None:
                setattr(self, k, getattr(parent, k))

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, i: int):
        return self._parent.images[i], int(self._parent.labels[i])

    def tensors(self):
        _no_stacking(self)


@pytest.fixture(scope="module")
def folder(digits_folder):
    return digits_folder



def _assert_same(a, b, path="data"):
    """Equal structure; every number equal or within 1e-6."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert isinstance(b, (int, float)) and (a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)), \
            (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_xnn_fits_and_scores_a_streamed_dataset_as_its_tensors():
    net = models.load("zoo:small-cnn-digits").eval()
    ds = data.load("digits", split="train").subset(range(300))
    test = data.load("digits", split="test").subset(range(100))
    kw = {"epochs": 3, "seed": 2, "internal_batch_size": 64}
    ref = XNN(net, n_concepts=3).fit(ds.tensors()[0], **kw)
    got = XNN(net, n_concepts=3).fit(Streamed(ds), **kw, num_workers=0)
    sa, sb = ref.state_dict(), got.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical: same batch boundaries on the CPU
    assert got.training_config == ref.training_config
    # the streamed outputs keep z, the logits and the labels, nothing else
    z, logits, y = got.outputs(Streamed(test), 64)
    z0, l0 = ref.activations(test.tensors()[0], 64)
    assert torch.equal(z, z0) and torch.equal(logits, l0) and torch.equal(y, test.labels)
    x, labels = test.tensors()
    assert ref.metrics((x, labels), internal_batch_size=64) == got.metrics(Streamed(test), internal_batch_size=64)
    assert torch.equal(ref.features_of(x, 64), got.features_of(Streamed(test), 64, num_workers=1))
    ia, va = ref.top_activating(x, 4, 64)
    ib, vb = got.top_activating(Streamed(test), 4, 64)
    assert torch.equal(ia, ib) and torch.equal(va, vb)


def test_concepts_check_streams_an_image_folder(folder, monkeypatch):
    spec = f"imagefolder:{folder}"
    opts = {"concepts.epochs": 20, "concepts.top": 3, "concepts.explain_n": 2, "batch_size": 64}
    ref = audit.run({"cnn": "zoo:small-cnn-digits"}, in_memory(spec), checks=["concepts"], options=opts)
    assert ref.ok, ref.results["errors"]
    monkeypatch.setattr(ImageFolderDataset, "tensors", _no_stacking)
    monkeypatch.setattr(ImageDataset, "tensors", _only_a_sample)  # subsets of the folder too
    got = audit.run({"cnn": "zoo:small-cnn-digits"}, spec, checks=["concepts"], options=opts)
    assert got.ok, got.results["errors"]
    ra, rb = ref.records("cnn")["concepts"], got.records("cnn")["concepts"]
    assert ra["data"]["metrics"]["n"] == 120 and len(ra["data"]["top_activating"]["positions"]) == 5
    _assert_same(ra["data"], rb["data"])
    assert set(ra["figures"]) == set(rb["figures"]) and len(ra["figures"]) == 3
    assert got.metrics["cnn"]["XNN agreement"] == pytest.approx(ref.metrics["cnn"]["XNN agreement"], abs=1e-6)


def test_concepts_check_marker_alignment_streamed(monkeypatch):
    splits = {s: data.load("shortcut-digits", split=s, marker_fraction=0.5) for s in ("train", "val", "test")}
    opts = {"concepts.explain_n": 1, "concepts.top": 2, "concepts.epochs": 20, "n_max": 200, "batch_size": 64}
    ref = audit.run({"m": "zoo:small-cnn-shortcut-digits"}, splits, checks=["concepts"], options=opts)
    assert ref.ok, ref.results["errors"]
    monkeypatch.setattr(ImageDataset, "tensors", _only_a_sample)  # subsets of the streamed sets
    got = audit.run({"m": "zoo:small-cnn-shortcut-digits"}, {s: Streamed(d) for s, d in splits.items()},
                    checks=["concepts"], options=opts)
    assert got.ok, got.results["errors"]
    da, db = ref.records("m")["concepts"]["data"], got.records("m")["concepts"]["data"]
    assert da["marker"] is not None and len(da["marker"]) == 5
    # positions: both name the images by their index in the whole split (the audit's seeded subset
    # of the test split, seed 0), not by their place in the subset
    idx = torch.randperm(len(splits["test"]), generator=torch.Generator().manual_seed(2))[:200].sort().values
    pa, pb = da["top_activating"]["positions"], db["top_activating"]["positions"]
    assert pa == pb and set(p for row in pa for p in row) <= set(idx.tolist())
    assert max(p for row in pa for p in row) >= 200  # whole-split indices, not 0..199
    _assert_same(da, db)
