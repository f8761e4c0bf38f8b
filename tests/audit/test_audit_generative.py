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
