"""The results store: atomic writes, fingerprints, JSON conversion."""

import json
import math
import os

import numpy as np
import pytest
import torch

from trustvision.audit.store import (
    ResultStore,
    atomic_write_bytes,
    atomic_write_json,
    fingerprint,
    model_fingerprint,
    safe_key,
    to_jsonable,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind


def test_atomic_write_bytes_creates_parents_and_readable_file(tmp_path):
    p = atomic_write_bytes(tmp_path / "a" / "b" / "x.bin", b"abc")
    assert p.read_bytes() == b"abc"
    assert p.stat().st_mode & 0o044  # group/other can read (not a 0600 temp-file mode)


def test_to_jsonable_converts_tensors_numpy_and_nan():
    obj = {"t": torch.tensor([1.5, float("nan")]), "n": np.float32(0.25), "a": np.arange(3), "tup": (1, 2),
           "i": np.int64(7), "inf": math.inf}
    out = to_jsonable(obj)
    assert out == {"t": [1.5, None], "n": 0.25, "a": [0, 1, 2], "tup": [1, 2], "i": 7, "inf": None}
    json.dumps(out, allow_nan=False)
    with pytest.raises(TypeError):
        to_jsonable({"x": object()})


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_model_fingerprint_tracks_weights(tiny_model):
    fp = model_fingerprint(tiny_model)
    assert fp == model_fingerprint(tiny_model)
    with torch.no_grad():
        tiny_model.lin.bias[0] += 1e-3
    assert model_fingerprint(tiny_model) != fp


def test_safe_key():
    assert safe_key("zoo:small-cnn-digits") == "zoo-small-cnn-digits"
    assert safe_key("<script>alert(1)</script>") == "script-alert-1-script"
    assert safe_key("../../etc") == "etc"


def test_store_roundtrip_fingerprint_and_figures(tmp_path):
    store = ResultStore(tmp_path)
    rec = store.save("m", "accuracy", "a" * 64, {"status": "ok", "data": {"accuracy": 0.5}}, {"cm": PNG})
    assert rec["figures"] == {"cm": f"checks/m/accuracy-{'a' * 12}/cm.png"}
    assert (tmp_path / rec["figures"]["cm"]).read_bytes() == PNG
    assert store.load("m", "accuracy", "a" * 64)["data"] == {"accuracy": 0.5}
    assert store.load("m", "accuracy", "b" * 64) is None  # other options/model -> recompute
    assert store.load("m", "calibration", "a" * 64) is None

    # a new fingerprint replaces the record and removes the old figure folder
    store.save("m", "accuracy", "b" * 64, {"status": "ok", "data": {"accuracy": 0.7}}, {"cm": PNG})
    assert not (tmp_path / f"checks/m/accuracy-{'a' * 12}").exists()
    assert store.load("m", "accuracy", "b" * 64)["data"]["accuracy"] == 0.7


def test_store_rejects_corrupt_or_incomplete_records(tmp_path):
    store = ResultStore(tmp_path)
    rec = store.save("m", "c", "f" * 64, {"status": "ok", "data": {}}, {"fig": PNG})
    (tmp_path / rec["figures"]["fig"]).unlink()
    assert store.load("m", "c", "f" * 64) is None  # missing figure
    store.record_path("m", "c").write_text("{not json")
    assert store.load("m", "c", "f" * 64) is None
