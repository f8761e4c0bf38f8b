"""The ``ood`` and ``generative`` audit checks on a briefly trained IB-INN and its FF twin."""

from __future__ import annotations

import json

import pytest
import torch

from trustvision import data, models
from trustvision.audit import run_audit


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    tr = data.load("digits", "train")
    x, y = tr.tensors()
    gc = models.create("ibinn-small", num_classes=10, in_chans=1, image_size=8, widths=(8, 8, 8),
                       fc_width=32)
    ff = models.create("ibinn-small-ff", num_classes=10, in_chans=1, image_size=8,
                       widths=(8, 8, 8), fc_width=32)
    for net in (gc, ff):
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        net.train()
        for step in range(60):
            idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
            if hasattr(net, "training_loss"):
                loss, _ = net.training_loss(x[idx], y[idx])
            else:
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
    return gc, ff


def test_generative_audit_with_twin(tmp_path, trained):
    gc, ff = trained
    res = run_audit({"gc": gc}, "digits", tmp_path, checks=["ood", "generative"], compare=ff,
                    options={"n_max": 120, "ood.n": 60, "generative.ood_n": 60}, progress=False)
    out = json.loads((tmp_path / "results.json").read_text())
    (m,) = out["models"]
    ood = m["checks"]["ood"]
    assert ood["status"] == "ok", ood
    rows = ood["data"]["rows"]
    dets = {r["detector"] for r in rows}
    assert {"log_px", "typicality", "complexity", "max-softmax", "max-softmax (compare)"} <= dets
    assert {r["ood_set"] for r in rows} == {"faces", "textures", "uniform", "gaussian", "rotated",
                                             "inverted"}
    assert all(0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["fpr_at_95_tpr"] <= 1.0 for r in rows)
    assert "positive" in ood["data"]["convention"]
    # even a briefly trained flow separates uniform noise from digits by typicality
    uni = next(r for r in rows if r["detector"] == "typicality" and r["ood_set"] == "uniform")
    assert uni["auroc"] > 0.9
    gen = m["checks"]["generative"]
    assert gen["status"] == "ok", gen
    d = gen["data"]
    assert 0 < d["bits_per_dim_mean"] < 16
    assert d["compare"]["accuracy"] > 0.3 and "ece_15" in d["compare"]
    assert len(d["counterfactuals"]["target"]) == 4
    assert res.report_path.exists()
    html = res.report_path.read_text()
    assert "feed-forward twin" in html


def test_generative_check_skips_feed_forward(tmp_path, trained):
    _, ff = trained
    run_audit({"ff": ff}, "digits", tmp_path, checks=["generative"], options={"n_max": 50},
              progress=False)
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["models"][0]["checks"]["generative"]["status"] == "skipped"


def test_cli_audit_zoo_gc_against_its_twin(tmp_path, capsys):
    from trustvision.cli import main

    names = {e["name"] for e in models.list_zoo()}
    if not {"zoo:ibinn-small-digits", "zoo:ibinn-small-ff-digits"} <= names:
        pytest.skip("generative zoo not built (python scripts/build_zoo_generative.py)")
    code = main(["audit", "--model", "zoo:ibinn-small-digits", "--compare", "zoo:ibinn-small-ff-digits",
                 "--checks", "generative", "--n-max", "150", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    out = json.loads((tmp_path / "results.json").read_text())
    d = out["models"][0]["checks"]["generative"]["data"]
    assert d["model"]["accuracy"] >= 0.95 and d["compare"]["accuracy"] >= 0.95
    typ = {r["ood_set"]: r["auroc"] for r in d["ood"]["rows"] if r["detector"] == "typicality"}
    assert typ["uniform"] >= 0.95 and typ["faces"] >= 0.95


def test_generative_check_places_the_model_on_the_measured_tradeoff():
    """The zoo GC (beta 1) on the digits curve shipped with the check: its own accuracy, ECE and
    best generative AUROC at beta 1, next to the curve's value there (3 seeds)."""
    import math
    import sys
    from pathlib import Path

    from trustvision import audit
    from trustvision.audit.checks.generative import TRADEOFF_DIR, tradeoff_curve

    r = audit.run({"gc": "zoo:ibinn-small-digits"}, "digits", checks=["accuracy", "calibration", "generative"],
                  options={"generative.ood_n": 200})
    assert r.ok, r.results["errors"]
    rec = r.records("gc")["generative"]
    t = rec["data"]["tradeoff"]
    assert t["dataset"] == "digits" and t["point"]["beta"] == 1.0 and "tradeoff" in rec["figures"]
    assert t["point"]["test_accuracy"] == pytest.approx(r.metrics["gc"]["Accuracy"], abs=1e-6)
    assert t["point"]["ece_15"] == pytest.approx(r.metrics["gc"]["ECE"], abs=1e-6)
    curve = t["curve"]
    assert curve == tradeoff_curve("digits") and len(curve["seeds"]) >= 3
    betas = [p["beta"] for p in curve["points"]]
    assert betas == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, None]  # the twin last
    at1 = curve["points"][2]
    table = next(v for k, v in rec["tables"].items() if k.startswith("This model on the beta trade-off"))
    assert table["rows"][0] == ["test accuracy", t["point"]["test_accuracy"], at1["test_accuracy"]["mean"]]
    assert abs(t["point"]["test_accuracy"] - at1["test_accuracy"]["mean"]) < 0.01  # the zoo model is on its curve
    faces = t["point"]["ood"]["faces"]
    assert faces["detector"] in ("log_px", "typicality") and faces["auroc"] > 0.95
    # the curve is what gc_tradeoff.curve writes from the benchmark's summary
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gc_tradeoff

    assert set(curve) == set(gc_tradeoff.curve([], "digits", [0])) and (TRADEOFF_DIR / "digits.json").is_file()
    assert all(math.isfinite(p["ece_15"]["mean"]) for p in curve["points"])


def test_generative_check_without_a_curve(tmp_path, trained):
    """A GC trained on a data set without a measured curve: no figure, the point is still recorded."""
    gc, _ = trained
    from trustvision import audit

    res = audit.run({"gc": gc}, "digits", checks=["generative"], options={"generative.ood_n": 100})
    rec = res.records("gc")["generative"]
    assert rec["data"]["tradeoff"]["curve"] is None and "tradeoff" not in rec["figures"]
    assert rec["data"]["tradeoff"]["point"]["beta"] == pytest.approx(float(gc.beta))
