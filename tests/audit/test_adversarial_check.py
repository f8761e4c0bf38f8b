"""The ``adversarial`` audit check end to end: on the tiny linear toy model and a small-cnn through
``trustvision.audit.run`` (results validate, the report renders), on a briefly trained IB-INN
(log p(x) detection AUROC), through the CLI; it is opt-in and its condition warns."""

from __future__ import annotations

import json

import pytest
import torch

from trustvision import audit, data, models
from trustvision.cli import main
from trustvision.errors import TrustVisionError
from trustvision.report.schema import validate_results

SMALL = {"adversarial.n": 24, "adversarial.explain_n": 3, "adversarial.pairs": 2, "adversarial.iterations": 2,
         "adversarial.bisection": 4, "adversarial.steps": 4}


def test_the_check_is_opt_in_and_listed():
    assert "adversarial" in audit.list_checks()
    assert "adversarial" not in audit.default_checks()


def test_end_to_end_on_a_small_cnn(tmp_path):
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval()
    res = audit.run({"cnn": net}, "digits", checks=["adversarial"], options={**SMALL, "n_max": 80}, out=tmp_path)
    assert res.ok, res.results["errors"]
    rec = res.records("cnn")["adversarial"]
    d = rec["data"]
    assert d["n"] == 24 and d["image_size"] == [8, 8] and set(d["attacks"]) == {"fgsm", "pgd-linf", "pgd-l2"}
    lin = d["attacks"]["pgd-linf"]
    assert lin["eps"] == pytest.approx([0, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255])  # the 8 x 8 sweep
    for r in d["attacks"].values():
        assert r["accuracy"][0] == d["clean_accuracy"] and all(0 <= a <= r["accuracy"][0] for a in r["accuracy"])
    assert set(d["minimal_eps"]) == {"linf", "l2"} and len(d["minimal_eps"]["linf"]["eps"]) == 24
    assert set(d["heatmap_change"]) == {"Saliency", "Integrated gradients", "I-GOS"}
    assert all(len(v["spearman"]) == 3 for v in d["heatmap_change"].values())
    assert d["detection"] is None  # not a generative classifier
    assert set(rec["figures"]) == {"robust_accuracy", "pairs"} and all(rec["captions"].values())
    tables = {"Robust accuracy", "Minimal flipping radius", "Heatmaps of clean vs adversarial images"}
    assert tables <= set(rec["tables"])
    m = res.metrics["cnn"]
    assert m["Robust accuracy (PGD-Linf)"] == lin["accuracy"][4]  # headline 32/255 at 8 x 8
    assert {"Robust accuracy (PGD-L2)", "Median minimal eps (Linf)", "Heatmap rank correlation"} <= set(m)
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    html = (tmp_path / "report.html").read_text()
    assert "Adversarial robustness" in html and "Minimal flipping radius" in html


def test_condition_warns_when_the_smallest_radius_flips_most_predictions(tiny_model, toy_splits):
    opts = {**SMALL, "adversarial.eps_linf": "0,0.4", "adversarial.eps_l2": "0,3", "adversarial.explain_n": 0,
            "adversarial.minimal_eps": False, "adversarial.attacks": "pgd-linf,pgd-l2"}
    res = audit.run({"t": tiny_model}, toy_splits, checks="adversarial", options=opts)
    assert res.ok, res.results["errors"]
    rec = res.records()["adversarial"]
    assert rec["data"]["attacks"]["pgd-linf"]["eps"] == [0.0, 0.4]
    (cond,) = rec["conditions"]
    assert cond["status"] == "warn" and "PGD-Linf at eps 102/255: 0%" in cond["reason"]
    assert set(rec["figures"]) == {"robust_accuracy"}
    validate_results(res.results)
    # a gentle radius passes
    res = audit.run({"t": tiny_model}, toy_splits, checks="adversarial",
                    options={**opts, "adversarial.eps_linf": "0,1/255", "adversarial.eps_l2": "0,0.001"})
    assert res.records()["adversarial"]["conditions"][0]["status"] == "pass"


def test_autoattack_option_is_at_most_pgd_and_named_in_the_metrics(tiny_model, toy_splits):
    pytest.importorskip("pyautoattack")
    opts = {**SMALL, "adversarial.n": 12, "adversarial.eps_linf": "0,0.4", "adversarial.explain_n": 0,
            "adversarial.minimal_eps": False, "adversarial.attacks": "pgd-linf,autoattack"}
    res = audit.run({"t": tiny_model}, toy_splits, checks="adversarial", options=opts)
    assert res.ok, res.results["errors"]
    d = res.records()["adversarial"]["data"]["attacks"]
    assert d["autoattack"]["eps"] == [0.0, 0.4] and d["autoattack"]["norm"] == "linf"
    assert d["autoattack"]["accuracy"][0] == d["pgd-linf"]["accuracy"][0]
    assert all(a <= p for a, p in zip(d["autoattack"]["accuracy"], d["pgd-linf"]["accuracy"]))
    rows = res.records()["adversarial"]["tables"]["Robust accuracy"]["rows"]
    assert any(r[0] == "AutoAttack-Linf" for r in rows)


def test_bad_eps_option_is_one_line(tiny_model, toy_splits):
    res = audit.run({"t": tiny_model}, toy_splits, checks="adversarial",
                    options={**SMALL, "adversarial.eps_linf": "0,eight"})
    assert not res.ok
    assert "adversarial.eps_linf" in json.dumps(res.results["errors"])
    with pytest.raises(TrustVisionError):
        audit.run({"t": tiny_model}, toy_splits, checks="adversarial", options={"adversarial.attacks": "cw"})


@pytest.fixture(scope="module")
def tiny_ibinn():
    torch.manual_seed(0)
    x, y = data.load("digits", "train").tensors()
    gc = models.create("ibinn-small", num_classes=10, in_chans=1, image_size=8, widths=(8, 8, 8), fc_width=32)
    opt = torch.optim.Adam(gc.parameters(), 3e-3)
    gc.train()
    for step in range(40):
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        loss, _ = gc.training_loss(x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gc.eval()


def test_generative_classifier_gets_the_likelihood_detection(tiny_ibinn):
    opts = {**SMALL, "n_max": 60, "adversarial.methods": "saliency", "adversarial.minimal_eps": False}
    res = audit.run({"gc": tiny_ibinn}, "digits", checks=["adversarial"], options=opts)
    assert res.ok, res.results["errors"]
    rec = res.records()["adversarial"]
    det = rec["data"]["detection"]
    assert det["n_clean"] == 24 and det["n_adversarial"] > 0
    assert 0 <= det["auroc_log_px"] <= 1 and 0 <= det["auroc_typicality"] <= 1
    assert res.metrics["gc"]["Adversarial detection AUROC (log p(x))"] == det["auroc_log_px"]
    assert "Detecting adversarial images by likelihood" in rec["tables"]
    validate_results(res.results)


def test_cli_runs_the_check(tmp_path):
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval()
    ckpt = models.save(net, tmp_path / "zoo" / "small-cnn-digits", classes=[str(i) for i in range(10)],
                       dataset="digits")
    out = tmp_path / "report"
    args = ["audit", "--model", str(ckpt), "--data", "digits", "--checks", "adversarial", "--no-progress",
            "--out", str(out), "--n-max", "40"] + [a for k, v in SMALL.items() for a in ("-O", f"{k}={v}")]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["models"][0]["checks"]["adversarial"]["status"] == "ok"
    validate_results(r)
