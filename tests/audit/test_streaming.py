"""Streaming (issue 16, first part): the accuracy, calibration, ood and criticism checks read an image folder
batch by batch (its images are never stacked into one tensor: ``tensors()`` is made to fail), and
give the same numbers as the same images held in memory."""

from __future__ import annotations

import pytest
import torch

from trustvision import audit, data
from trustvision.data.torchvision_sets import ImageFolderDataset

from _streaming_data import digits_folder, in_memory  # noqa: F401  (tests/audit/_streaming_data.py)


@pytest.fixture(scope="module")
def folder(digits_folder):
    return digits_folder



CHECKS = ["accuracy", "calibration", "ood", "criticism"]
OPTS = {"ood.n": 60, "ood.sets": "uniform,faces,inverted"}


def test_folder_is_streamed_and_equals_the_in_memory_run(folder, monkeypatch):
    spec = f"imagefolder:{folder}"
    ref = audit.run({"cnn": "zoo:small-cnn-digits"}, in_memory(spec), checks=CHECKS, options=OPTS)
    assert ref.ok, ref.results["errors"]

    def no_stacking(self):
        raise AssertionError("a streamed split was stacked into one tensor")

    monkeypatch.setattr(ImageFolderDataset, "tensors", no_stacking)
    got = audit.run({"cnn": "zoo:small-cnn-digits"}, spec, checks=CHECKS, options=OPTS)
    assert got.ok, got.results["errors"]
    a, b = ref.metrics["cnn"], got.metrics["cnn"]
    assert set(a) == set(b) and a["Accuracy"] > 0.9
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
    ra, rb = ref.records("cnn")["ood"]["data"], got.records("cnn")["ood"]["data"]
    rows_a = {(r["detector"], r["ood_set"]): r["auroc"] for r in ra["rows"]}
    rows_b = {(r["detector"], r["ood_set"]): r["auroc"] for r in rb["rows"]}
    assert rows_a.keys() == rows_b.keys() and len(rows_a) >= 12
    bad = {k: (v, rows_b[k]) for k, v in rows_a.items() if abs(rows_b[k] - v) > 1e-6}
    assert not bad, bad
    ca, cb = ref.records("cnn")["criticism"]["data"], got.records("cnn")["criticism"]["data"]
    assert ca["classes"] == cb["classes"] and ca["mistakes"] == cb["mistakes"]
    assert ca["prototype_curve"] == cb["prototype_curve"]


def test_split_labels_without_decoding(folder, monkeypatch):
    from trustvision.evaluate.ood import split_labels

    ds = data.load(f"imagefolder:{folder}", split="train")
    monkeypatch.setattr(ImageFolderDataset, "__getitem__", lambda self, i: (_ for _ in ()).throw(AssertionError))
    y = split_labels(ds)
    assert torch.equal(y, ds.labels) and torch.equal(split_labels(ds.subset([3, 1])), ds.labels[[3, 1]])


def test_num_workers_decodes_in_worker_processes_with_the_same_results(folder, tmp_path, monkeypatch):
    """``num_workers`` (``--num-workers``): the streamed splits are decoded by DataLoader worker
    processes; the records are the same as without, and the option is not part of the
    fingerprints (a rerun with another value reuses every check)."""
    import os

    spec = f"imagefolder:{folder}"
    checks = ["accuracy", "calibration", "ood"]
    base = audit.run({"cnn": "zoo:small-cnn-digits"}, spec, checks=checks, options=OPTS)
    pids = tmp_path / "pids"
    original = ImageFolderDataset.__getitem__

    def recording(self, i):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, i)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", recording)
    out = tmp_path / "out"
    got = audit.run({"cnn": "zoo:small-cnn-digits"}, spec, checks=checks, options={**OPTS, "num_workers": 2}, out=out)
    assert got.ok, got.results["errors"]
    reads = pids.read_text().split()
    by_workers = [p for p in reads if p != str(os.getpid())]  # the seeded OOD sample is read here
    assert len(set(by_workers)) >= 2 and len(by_workers) >= 300 + 120  # each split's pass: 2 workers
    for check in checks:
        assert got.records("cnn")[check]["data"] == base.records("cnn")[check]["data"], check
    again = audit.run({"cnn": "zoo:small-cnn-digits"}, spec, checks=checks, options={**OPTS, "num_workers": 0}, out=out)
    assert again.n_cached == len(checks) and again.n_computed == 0
    with pytest.raises(Exception, match="num_workers must be an integer"):
        audit.run({"cnn": "zoo:small-cnn-digits"}, spec, checks=checks, options={"num_workers": -1})
