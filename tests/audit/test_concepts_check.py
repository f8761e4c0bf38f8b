"""The ``concepts`` audit check (XNN) and ``trustvision explain --method xnn``: the fit is the
library's (same seed, same metrics), 5 x-features rebuild the digits model's decision on >= 95% of
the test images, the ablation and top-activating tables are consistent, one x-feature is too few
(the condition warns), the planted marker gets its alignment table, and the command line fits,
saves and reuses an XNN."""

from __future__ import annotations

import json

import pytest
import torch

from trustvision import audit, data, models
from trustvision.audit.checks.concepts import SEED_OFFSET
from trustvision.cli import main
from trustvision.explain.xnn import XNN
from trustvision.report.schema import validate_results


def test_the_check_is_opt_in_and_listed():
    assert "concepts" in audit.list_checks() and "concepts" not in audit.default_checks()


def test_digits_five_concepts_are_faithful_and_equal_the_library_fit(tmp_path):
    res = audit.run({"cnn": "zoo:small-cnn-digits"}, "digits", checks=["concepts"],
                    options={"concepts.explain_n": 2, "concepts.top": 3}, out=tmp_path)
    assert res.ok, res.results["errors"]
    rec = res.records("cnn")["concepts"]
    d = rec["data"]
    m = d["metrics"]
    assert d["n_concepts"] == 5 and m["agreement"] >= 0.95  # the target on digits
    assert res.metrics["cnn"]["XNN agreement"] == m["agreement"]
    assert rec["conditions"][0]["status"] == "pass"
    # the same fit as the library's with the check's seed
    net = models.load("zoo:small-cnn-digits").eval()
    xnn = XNN(net, n_concepts=5).fit(data.load("digits", split="train"), seed=SEED_OFFSET)
    x, y = data.load("digits", split="test").tensors()
    ref = xnn.metrics((x, y))
    assert m["agreement"] == pytest.approx(ref.agreement) and m["ablation"] == pytest.approx(ref.ablation)
    # top-activating images: largest values first, equal to the XNN's own values
    e = xnn.features_of(x)
    for l, (pos, vals) in enumerate(zip(d["top_activating"]["positions"], d["top_activating"]["values"])):
        assert vals == sorted(vals, reverse=True) and len(pos) == 3
        assert vals == pytest.approx(e[pos, l].tolist(), rel=1e-5)
        assert vals[0] == pytest.approx(float(e[:, l].max()), rel=1e-5)
    rows = rec["tables"]["Accuracy with one x-feature removed"]["rows"]
    assert [r[0] for r in rows] == [f"x{i}" for i in range(1, 6)]
    assert all(r[2] == pytest.approx(m["accuracy"] - r[1]) for r in rows)
    assert {"concepts"} | {k for k in rec["figures"] if k.startswith("image_")} == set(rec["figures"])
    assert len(rec["figures"]) == 3 and d["marker"] is None
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    assert "Concept explanations (XNN)" in (tmp_path / "report.html").read_text()


def test_one_concept_is_too_few_and_the_condition_warns():
    res = audit.run({"cnn": "zoo:small-cnn-digits"}, "digits", checks=["concepts"],
                    options={"concepts.n_concepts": 1, "concepts.explain_n": 0, "concepts.top": 2,
                             "concepts.epochs": 40})
    rec = res.records("cnn")["concepts"]
    assert rec["data"]["metrics"]["agreement"] < 0.9
    assert rec["conditions"][0]["status"] == "warn" and "try more" in rec["conditions"][0]["reason"]


def test_planted_marker_gets_the_alignment_table():
    splits = {s: data.load("shortcut-digits", split=s, marker_fraction=0.5) for s in ("train", "val", "test")}
    res = audit.run({"m": "zoo:small-cnn-shortcut-digits"}, splits, checks=["concepts"],
                    options={"concepts.explain_n": 0, "concepts.top": 2, "n_max": 200})
    rec = res.records("m")["concepts"]
    marker = rec["data"]["marker"]
    assert [r["concept"] for r in marker] == [1, 2, 3, 4, 5]
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["marker_mass"] <= 1 for r in marker)
    assert "x-features vs the planted marker" in rec["tables"] and "Planted marker" in rec["summary"]


def test_cli_explain_xnn_fits_saves_and_reuses(tmp_path, capsys):
    out = tmp_path / "a"
    rc = main(["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "xnn", "--concepts", "3",
               "--n", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "scores.json").read_text())
    assert s["kind"] == "concepts" and s["method_kw"]["n_concepts"] == 3 and s["n"] == 3
    assert (out / "xnn-model" / "config.json").is_file() and (out / "xnn" / "top_activating.png").is_file()
    assert 0.5 < s["xnn_metrics"]["agreement"] <= 1 and len(s["xnn_top_activating"]["indices"]) == 3
    first = sorted((out / "xnn").glob("*.json"))
    assert len(first) == 3 and all(len(json.loads(f.read_text())["values"]) == 3 for f in first)
    err = capsys.readouterr().err
    assert "xnn fit: 150/150 epochs" in err and err.count("xnn fit:") <= 6  # a few lines, not one per epoch
    # the saved XNN, given back, gives the same explanations
    out2 = tmp_path / "b"
    rc = main(["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "xnn", "--n", "3",
               "--method-kw", f"xnn={out / 'xnn-model'}", "--out", str(out2), "--no-progress"])
    assert rc == 0
    for f in first:
        a, b = json.loads(f.read_text()), json.loads((out2 / "xnn" / f.name).read_text())
        assert a["values"] == pytest.approx(b["values"]) and a["contributions"] == pytest.approx(b["contributions"])
    assert not (out2 / "xnn-model").exists()


def test_cli_explain_xnn_bad_saved_folder_is_one_line(tmp_path, capsys):
    rc = main(["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "xnn",
               "--method-kw", f"xnn={tmp_path / 'missing'}", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
