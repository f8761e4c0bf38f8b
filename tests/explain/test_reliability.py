"""Unreliable heatmaps are said so everywhere: the sample helper (reasons per image, constant
heatmaps left out of the faithfulness means), ``trustvision explain`` (scores.json and the printed
warning) and the audit's ``explanations`` check (data, summary, metrics)."""

import json
import math

import pytest
import torch

from trustvision import data, explain, models
from trustvision.data import TensorImageDataset
from trustvision.evaluate.faithfulness import deletion_insertion
from trustvision.explain.sample import faithfulness_summary


@pytest.fixture(scope="module")
def blind_model(tmp_path_factory):
    """A small-cnn on digits with every weight zero: uniform logits whatever the input (p = 0.1),
    so every heatmap is constant and every image has a low confidence."""
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    net.eval()
    path = models.save(net, tmp_path_factory.mktemp("blind") / "ckpt", classes=[str(i) for i in range(10)],
                       dataset="digits")
    return net, path


def test_faithfulness_summary_leaves_constant_heatmaps_out():
    s = faithfulness_summary([0.2, 0.4, 0.9], [0.8, 0.6, 0.5], [False, False, True])
    assert s["deletion_mean"] == pytest.approx(0.3) and s["insertion_mean"] == pytest.approx(0.7)
    assert s["deletion_std"] == pytest.approx(0.1) and s["n"] == 2 and s["n_excluded"] == 1
    assert s["deletion_mean_all"] == pytest.approx(0.5)
    none = faithfulness_summary([0.2], [0.8], [True])
    assert math.isnan(none["deletion_mean"]) and math.isnan(none["insertion_std"]) and none["n_excluded"] == 1


@pytest.mark.parametrize("method", ["igos", "saliency"])
def test_explain_images_flags_constant_heatmaps_and_excludes_them(blind_model, method):
    net, _ = blind_model
    x, y = data.load("digits", split="test").tensors()
    ds = TensorImageDataset(x[:3], y[:3], [str(i) for i in range(10)], "digits", "test")
    kw = {"iterations": 2, "ig_steps": 2} if method == "igos" else {}
    res = explain.explain_sample(net, ds, method, 3, method_kw=kw, faithfulness=deletion_insertion)
    assert res.constant == [True, True, True] and res.unreliable == [True, True, True]
    assert all(any(r.startswith("heatmap is constant") for r in rs) for rs in res.reasons)
    assert all(any(r.startswith("low confidence (p = 0.10") for r in rs) for rs in res.reasons)
    assert res.faithfulness["n_excluded"] == 3 and math.isnan(res.faithfulness["deletion_mean"])
    assert res.faithfulness["baseline_keeps_class"] == 3  # (a blind model sees its class on any baseline)
    assert len(res.deletion_auc) == 3  # the per-image numbers are kept
    rows = res.rows()
    assert rows[0]["unreliable"] is True and rows[0]["constant_heatmap"] is True and rows[0]["reasons"]
    json.dumps(rows)


def test_cli_explain_writes_reasons_and_warns(blind_model, tmp_path, capsys):
    from trustvision.cli import main

    _, path = blind_model
    out = tmp_path / "out"
    code = main(["explain", "--model", str(path), "--data", "digits", "--method", "igos", "--n", "2",
                 "--iterations", "2", "--method-kw", "ig_steps=2", "--out", str(out)])
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["unreliable"] == 2
    assert all(r["unreliable"] and r["reasons"] for r in scores["images"])
    assert scores["summary"]["n_excluded"] == 2 and scores["summary"]["deletion_mean"] is None
    assert scores["warning"].startswith("2 of 2 I-GOS heatmaps are unreliable: 2 constant heatmaps")
    assert "2 low confidence" in scores["warning"]
    printed = capsys.readouterr().out
    assert f"warning: {scores['warning']}" in printed and "deletion AUC nan" in printed


def test_audit_check_says_which_heatmaps_are_unreliable(blind_model):
    from trustvision.audit.context import AuditContext
    from trustvision.audit.registry import get_check

    net, _ = blind_model
    splits = {s: data.load("digits", split=s) for s in ("train", "val", "test")}
    ctx = AuditContext(model=net, model_name="blind", datasets=splits,
                       check_options={"n": 2, "sag_n": 0, "iterations": 2, "methods": ["igos", "saliency"]})
    res = get_check("explanations")().run(ctx)
    m = res.data["methods"]["igos"]
    assert m["unreliable"] == [True, True] and m["n_unreliable"] == 2 and m["n_excluded"] == 2
    assert all(any(r.startswith("heatmap is constant") for r in rs) for rs in m["reasons"])
    assert "unreliable heatmaps: I-GOS 2 of 2 (2 constant heatmaps" in res.summary
    assert "constant heatmaps left out of the deletion/insertion means: I-GOS 2, Saliency 2" in res.summary
    # no meaningful mean: no headline metric for I-GOS (the report shows a dash)
    assert "Deletion AUC (I-GOS)" not in res.metrics
    json.dumps(res.data)
