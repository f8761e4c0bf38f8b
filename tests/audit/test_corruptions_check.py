"""The ``corruptions`` audit check end to end on tiny models, through ``trustvision.audit.run`` and
the CLI: results validate, the report renders, the numbers agree with
``evaluate.corruptions.corruption_accuracy`` on the same sample, the condition fires on a model
that corruptions break, bad options are one-line errors; it is opt-in."""

import json

import pytest
import torch

from trustvision import audit
from trustvision.cli import main
from trustvision.evaluate.corruptions import corruption_accuracy
from trustvision.report.schema import validate_results

SMALL = {"corruptions.n": 30, "corruptions.severities": "1,3,5",
         "corruptions.types": ["gaussian-noise", "glass-blur", "fog", "contrast", "jpeg-compression"]}


def test_the_check_is_opt_in():
    assert "corruptions" in audit.list_checks()
    assert "corruptions" not in audit.default_checks()


def test_end_to_end_on_a_tiny_model(tmp_path, tiny_model, toy_splits):
    res = audit.run({"tiny": tiny_model}, toy_splits, checks=["corruptions"], options=SMALL, out=tmp_path)
    assert res.ok, res.results["errors"]
    rec = res.records("tiny")["corruptions"]
    d = rec["data"]
    types = ["gaussian-noise", "glass-blur", "fog", "contrast", "jpeg-compression"]
    assert d["corruptions"] == types and d["severities"] == [1, 3, 5] and d["n"] == 30
    assert d["image_size"] == [4, 4] and d["chance"] == pytest.approx(1 / 3)
    # the same numbers as the Python entry point on the same seeded sample (the audit's seed + 600)
    x, y = toy_splits["test"].tensors()
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(600))[:30].sort().values
    ref = corruption_accuracy(tiny_model, (x[idx], y[idx]), severities=(1, 3, 5), corruptions=types)
    assert d["accuracy"] == ref.accuracy and d["mean_accuracy"] == pytest.approx(ref.mean_accuracy)
    assert d["ece"] == pytest.approx(ref.ece) and d["clean_accuracy"] == pytest.approx(ref.clean_accuracy)
    assert res.metrics["tiny"]["Corruption accuracy"] == pytest.approx(ref.mean_accuracy)
    assert res.metrics["tiny"]["Corruption ECE"] == pytest.approx(sum(ref.ece) / 3)
    assert set(rec["figures"]) == {"accuracy_heatmap", "examples"} and all(rec["captions"].values())
    table = rec["tables"]["Accuracy under corruption"]
    assert table["columns"] == ["corruption", "severity 1", "severity 3", "severity 5", "mean"]
    assert [r[0] for r in table["rows"]] == types + ["mean over types"]
    assert table["rows"][-1][-1] == pytest.approx(ref.mean_accuracy)
    assert {c["name"] for c in rec["conditions"]} == {"corruptions cost less than half of the accuracy above chance",
                                                      "calibration holds under corruption"}
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    html = (tmp_path / "report.html").read_text()
    assert "Common corruptions" in html and "Accuracy under corruption" in html


class Memoriser(torch.nn.Module):
    """Knows the label of every test image exactly; any other input gets class 0 (p = 0.99)."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x.flatten(1), y

    def forward(self, x):
        d = torch.cdist(x.flatten(1).double(), self.x.double())
        hit = d.min(1).values < 1e-6
        label = torch.where(hit, self.y[d.argmin(1)], torch.zeros_like(hit, dtype=torch.long))
        return torch.nn.functional.one_hot(label, 3).float() * 5.0


def test_the_conditions_warn_when_corruptions_break_the_model(toy_splits):
    x, y = toy_splits["test"].tensors()
    opts = {"corruptions.n": 0, "corruptions.types": ["gaussian-noise", "impulse-noise"],
            "corruptions.severities": "2,4"}
    res = audit.run({"m": Memoriser(x, y)}, toy_splits, checks="corruptions", options=opts)
    assert res.ok, res.results["errors"]
    rec = res.records()["corruptions"]
    d = rec["data"]
    frac0 = float((y == 0).double().mean())
    assert d["n"] == 60 and d["clean_accuracy"] == 1.0
    # gaussian noise changes every image; impulse noise leaves some 4x4 images untouched
    assert d["accuracy"]["gaussian-noise"] == pytest.approx([frac0, frac0])
    assert d["mean_accuracy"] < 1 - 0.5 * (1 - 1 / 3)
    cond = {c["name"]: c for c in rec["conditions"]}
    assert cond["corruptions cost less than half of the accuracy above chance"]["status"] == "warn"
    assert "more than half of the way" in cond["corruptions cost less than half of the accuracy above chance"]["reason"]
    assert cond["calibration holds under corruption"]["status"] == "warn"
    validate_results(res.results)


def test_the_conditions_pass_when_the_prediction_is_invariant(tiny_model, toy_splits):
    # the tiny linear model takes the argmax of pixels (0, k); contrast is an increasing affine map
    # of the pixels, so every prediction (hence the accuracy) is unchanged
    res = audit.run({"t": tiny_model}, toy_splits, checks="corruptions",
                    options={"corruptions.n": 0, "corruptions.types": ["contrast"], "corruptions.severities": "1,5"})
    d = res.records()["corruptions"]["data"]
    assert d["accuracy"]["contrast"] == [d["clean_accuracy"]] * 2
    assert [c["status"] for c in res.records()["corruptions"]["conditions"]][0] == "pass"


def test_bad_options_are_one_line_errors(tiny_model, toy_splits):
    with pytest.raises(Exception) as e:
        audit.run({"t": tiny_model}, toy_splits, checks="corruptions", options={"corruptions.types": "fogg"})
    assert "fogg" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Exception) as e:
        audit.run({"t": tiny_model}, toy_splits, checks="corruptions", options={"corruptions.severities": "0,6"})
    assert "does not accept" in str(e.value) and "\n" not in str(e.value)


def test_cli_runs_the_check(tmp_path):
    out = tmp_path / "rep"
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--out", str(out),
               "--checks", "corruptions", "--no-progress", "-O", "corruptions.n=20",
               "-O", "corruptions.types=fog,pixelate,motion-blur", "-O", "corruptions.severities=1,5"])
    assert rc == 0
    r = validate_results(json.loads((out / "results.json").read_text()))
    rec = r["models"][0]["checks"]["corruptions"]
    assert rec["status"] == "ok" and rec["data"]["severities"] == [1, 5] and rec["data"]["n"] == 20
    assert 0 <= rec["data"]["mean_accuracy"] <= 1 and (out / "report.html").is_file()
