"""The ``criticism`` audit check: MMD-critic galleries per predicted / true class, the mistake
review (most confident first, nearest prototypes of the right classes), the 1-nearest-prototype
table, and the bias probe on planted ground truth: the shortcut-digits model's criticisms are
enriched for unmarked images and its first prototypes carry the marker, while the model trained
on clean digits passes on the same images."""

from __future__ import annotations

import json

import pytest
import torch

from trustvision import audit, data, models
from trustvision.audit.checks.criticism import class_criticism
from trustvision.cli import main
from trustvision.errors import TrustVisionError
from trustvision.report.schema import validate_results


@pytest.fixture(scope="module")
def mixed_splits():
    """shortcut-digits with the marker on 80% of every split's images (the test split included)."""
    return {s: data.load("shortcut-digits", split=s, marker_fraction=0.8) for s in ("train", "val", "test")}


def test_the_check_runs_by_default_and_is_listed():
    assert "criticism" in audit.list_checks() and "criticism" in audit.default_checks()


def test_bias_probe_flags_the_shortcut_model_and_passes_the_clean_one(tmp_path, mixed_splits):
    res = audit.run({"shortcut": "zoo:small-cnn-shortcut-digits", "clean": "zoo:small-cnn-digits"}, mixed_splits,
                    checks=["criticism"], options={"criticism.by": "predicted,true", "criticism.curve": "1,5"},
                    out=tmp_path)
    assert res.ok, res.results["errors"]
    short, clean = res.records("shortcut")["criticism"], res.records("clean")["criticism"]
    p = short["data"]["bias_probe"]
    # 50 criticisms (5 per true class); the base rate of unmarked images is 20%
    assert p["n_criticisms"] == 50 and p["base_unmarked_rate"] == pytest.approx(0.2, abs=0.01)
    assert p["criticism_enrichment"] >= 1.8 and p["p_value"] < 1e-3
    assert p["first_prototype_marked_rate"] == 1.0  # what each class looks like to it carries the marker
    assert short["conditions"][0]["status"] == "warn"
    assert "enriched for images without the planted marker" in short["conditions"][0]["reason"]
    q = clean["data"]["bias_probe"]
    assert q["criticism_enrichment"] < 1.5 and clean["conditions"][0]["status"] == "pass"
    assert res.metrics["shortcut"]["Criticism enrichment (unmarked)"] == pytest.approx(p["criticism_enrichment"])
    # per class ratio = rate / base rate, from the numbers in the table
    for c, r in p["criticisms"].items():
        if r["ratio"] is not None:
            assert r["ratio"] == pytest.approx(r["rate"] / r["base_rate"])
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    html = (tmp_path / "report.html").read_text()
    assert "Model criticism and mistakes" in html and "Bias probe: the planted marker" in html


def test_galleries_mistakes_and_prototype_table_on_clean_digits():
    res = audit.run({"cnn": "zoo:small-cnn-digits"}, "digits", checks=["criticism"],
                    options={"criticism.mistakes": 4, "criticism.by": "predicted,true", "criticism.curve": "1,2"})
    assert res.ok, res.results["errors"]
    rec = res.records("cnn")["criticism"]
    d = rec["data"]
    test = data.load("digits", split="test")
    x, y = test.tensors()
    model = models.load("zoo:small-cnn-digits").eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    conf, pred = probs.max(1)
    # classes of the predicted gallery: prototypes and criticisms are images predicted as that class
    for c, g in d["classes"]["predicted"].items():
        assert len(g["prototypes"]) == min(5, g["n"])
        assert all(int(pred[i]) == int(c) for i in g["prototypes"] + g["criticisms"])
        assert not set(g["prototypes"]) & set(g["criticisms"])
    for c, g in d["classes"]["true"].items():
        assert all(int(y[i]) == int(c) for i in g["prototypes"] + g["criticisms"])
    # the mistakes: really misclassified, most confident first, the nearest prototypes of the right classes
    wrong = (pred != y).nonzero().flatten()
    assert d["n_mistakes"] == len(wrong)
    ms = d["mistakes"]
    assert len(ms) == min(4, len(wrong))
    confs = [m["top3"][0][1] for m in ms]
    assert confs == sorted(confs, reverse=True)
    assert confs[0] == pytest.approx(float(conf[wrong].max()), abs=1e-6)
    for m in ms:
        i = m["index"]
        assert int(y[i]) == m["true"] and int(pred[i]) == m["predicted"] != m["true"]
        assert set(m["near_predicted"]) <= set(d["classes"]["predicted"][str(m["predicted"])]["prototypes"])
        assert all(int(pred[p]) == m["predicted"] for p in m["near_predicted"])
    assert set(rec["figures"]) == {"classes_predicted", "classes_true", "mistakes"}
    assert d["method"] == "saliency" and d["bias_probe"] is None  # no planted attribute in digits
    rows = rec["tables"]["1-nearest-prototype classifier"]["rows"]
    assert [r[0] for r in rows] == [1, 2] and all(0 <= v <= 1 for r in rows for v in r[1:])
    assert d["prototypes_per_class_evaluated"] == 2  # the evaluated size nearest to the 5 prototypes
    assert d["prototype_accuracy"]["mmd-critic"] == rows[1][1] and "1-nearest-prototype accuracy" in rec["summary"]


def test_pixel_space_gives_the_prototypes_of_the_raw_pixels(tiny_model, toy_splits):
    """space=pixels: MMD-critic on the raw pixels (the paper's USPS setting; it also lets models
    without penultimate features have the check): the prototypes are those of the pixels."""
    from trustvision.audit.checks.criticism import CriticismCheck
    from trustvision.evaluate.criticism import median_gamma

    opts = {"criticism.space": "pixels", "criticism.curve": "", "criticism.method": "none"}
    res = audit.run({"t": tiny_model}, toy_splits, checks=["criticism"], options=opts)
    rec = res.records("t")["criticism"]
    assert rec["status"] == "ok", rec
    d = rec["data"]
    x, y = toy_splits["test"].tensors()
    with torch.no_grad():
        pred = tiny_model(x).argmax(1)
    f = x.flatten(1).double().float()
    ref = class_criticism(f, pred, 5, 5, median_gamma(f, pred))
    assert d["space"] == "pixels" and {int(c): g["prototypes"] for c, g in d["classes"]["predicted"].items()} == \
        {c: g["prototypes"] for c, g in ref.items()}
    assert CriticismCheck.options["space"].default == "features"


def test_small_classes_get_what_they_have():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, 3, generator=g)
    labels = torch.tensor([0] * 9 + [1] * 2 + [2])
    out = class_criticism(f, labels, n_prototypes=3, n_criticisms=4, gamma=0.5)
    assert [len(out[c]["prototypes"]) for c in (0, 1, 2)] == [3, 2, 1]
    assert [len(out[c]["criticisms"]) for c in (0, 1, 2)] == [4, 0, 0]
    assert all(int(labels[i]) == c for c in out for i in out[c]["prototypes"] + out[c]["criticisms"])


def test_bad_split_is_one_line(tiny_model, toy_splits):
    splits = {k: v for k, v in toy_splits.items() if k != "val"}
    res = audit.run({"t": tiny_model}, splits, checks=["criticism"], options={"criticism.split": "val"})
    err = res.records("t")["criticism"]
    assert err["status"] == "error" and "no 'val' split" in err["error"] and "\n" not in err["error"]
    with pytest.raises(TrustVisionError, match="criticism.split"):
        audit.run({"t": tiny_model}, toy_splits, checks=["criticism"], options={"criticism.split": "holdout"})


def test_cli_runs_the_check(tmp_path, capsys):
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--checks", "criticism",
               "-O", "criticism.curve=", "-O", "criticism.method=none", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["status"] == "ok"
    assert "Confident mistakes" in rec["metrics"]
