"""The ``overinterpretation`` audit check end to end on a tiny small-cnn (4x4 toy images), through
``trustvision.audit.run`` and the CLI; the report renders; an interrupted check resumes without
recomputing finished images; it is opt-in."""

import json

import pytest
import torch

from trustvision import audit, models
from trustvision.cli import main
from trustvision.explain import sis as sis_mod
from trustvision.report.schema import validate_results
from trustvision.train import fit

SMALL = {"overinterpretation.n": 24, "overinterpretation.train_n": 40, "overinterpretation.epochs": 2,
         "overinterpretation.ensemble": 2, "overinterpretation.gallery": 4}


def _root_conftest():
    """tests/conftest.py by path (``import conftest`` finds whichever conftest was imported first)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_tv_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_cnn():
    splits = _root_conftest().make_splits()
    net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=4)
    fit(net, splits["train"], epochs=8, lr=1e-2, batch_size=16, progress=False)
    return net.eval(), splits


def test_the_check_is_opt_in():
    assert "overinterpretation" in audit.list_checks()
    assert "overinterpretation" not in audit.default_checks()


def test_end_to_end_on_a_tiny_model(tmp_path, tiny_cnn):
    net, splits = tiny_cnn
    res = audit.run({"tiny": net}, splits, checks=["overinterpretation"], options=SMALL, out=tmp_path)
    assert res.ok, res.results["errors"]
    rec = res.records("tiny")["overinterpretation"]
    d = rec["data"]
    assert d["method"] == "exact" and d["mask"] == "training-set mean pixel"
    assert d["fill"][0] == pytest.approx(float(splits["train"].tensors()[0].mean()), abs=1e-5)
    assert len(d["indices"]) == 24 and [r["fraction"] for r in d["subsets"]] == [0.05, 0.1, 0.2]
    assert d["subsets"][0]["pixels"] == 1  # round(0.05 * 16) -> at least one pixel
    assert d["retrain"]["n_train"] == 40 and d["border"]["width"] == 1 and d["border"]["pixels"] == 12
    assert [r["model"] for r in d["remedies"]] == ["plain", "ensemble of 2", "input dropout (keep 0.8)"]
    assert set(rec["figures"]) >= {"sis_sizes", "subset_accuracy"} and all(rec["captions"].values())
    assert {"SIS sizes", "Accuracy on pixel subsets", "Border test", "Remedies"} <= set(rec["tables"])
    assert {c["name"] for c in rec["conditions"]} >= {"tiny pixel subsets do not classify"}
    assert "Subset accuracy (BS)" in res.metrics["tiny"] and "Retrained on subsets" in res.metrics["tiny"]
    # the report renders and its results validate
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    html = (tmp_path / "report.html").read_text()
    assert "Overinterpretation" in html and "Remedies" in html


def test_a_model_without_a_registered_architecture_skips_the_training_parts(tiny_model, toy_splits):
    res = audit.run({"t": tiny_model}, toy_splits, checks="overinterpretation", options=SMALL)
    assert res.ok, res.results["errors"]
    d = res.records()["overinterpretation"]["data"]
    assert d["retrain"] is None and set(d["skipped"]) == {"retrain", "border", "remedies"}
    assert "not a registered model" in d["skipped"]["retrain"]
    validate_results(res.results)


def test_an_interrupted_check_resumes_without_recomputing_finished_images(tmp_path, tiny_cnn, monkeypatch):
    net, splits = tiny_cnn
    opts = {"overinterpretation.n": 40, "overinterpretation.retrain": False, "overinterpretation.border": False,
            "overinterpretation.remedies": False}
    computed: list[int] = []
    real = sis_mod.SIS._backselect
    state = {"fail_after": 1}

    def flaky(self, xs, t, excluded=None):
        if state["fail_after"] is not None and len(computed) >= state["fail_after"]:
            raise RuntimeError("interrupted")
        computed.append(xs.shape[0])
        return real(self, xs, t, excluded)

    monkeypatch.setattr(sis_mod.SIS, "_backselect", flaky)
    first = audit.run({"tiny": net}, splits, checks="overinterpretation", options=opts, out=tmp_path)
    assert first.n_errors == 1 and computed == [16]  # one chunk of 16 images finished, then the crash
    state["fail_after"] = None
    second = audit.run({"tiny": net}, splits, checks="overinterpretation", options=opts, out=tmp_path)
    assert second.ok and computed == [16, 16, 8]  # only the 24 unfinished images
    # a third run reuses the stored record: nothing at all is recomputed
    audit.run({"tiny": net}, splits, checks="overinterpretation", options=opts, out=tmp_path)
    assert computed == [16, 16, 8]
    # against an uninterrupted run into a fresh folder: the same numbers
    fresh = audit.run({"tiny": net}, splits, checks="overinterpretation", options=opts)
    a, b = second.records()["overinterpretation"]["data"], fresh.records()["overinterpretation"]["data"]
    assert a["subsets"] == b["subsets"] and a["sis"] == b["sis"]


def test_cli_runs_the_check(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--out", str(out),
               "--checks", "overinterpretation", "--no-progress",
               "-O", "overinterpretation.n=6", "-O", "overinterpretation.retrain=false",
               "-O", "overinterpretation.border=false", "-O", "overinterpretation.remedies=false",
               "-O", "overinterpretation.fractions=0.05,0.2"])
    assert rc == 0
    r = validate_results(json.loads((out / "results.json").read_text()))
    rec = r["models"][0]["checks"]["overinterpretation"]
    assert rec["status"] == "ok" and [x["fraction"] for x in rec["data"]["subsets"]] == [0.05, 0.2]
    assert (out / "report.html").is_file()


def test_bad_fractions_are_a_one_line_error(tiny_model, toy_splits):
    res = audit.run({"t": tiny_model}, toy_splits, checks="overinterpretation",
                    options={"overinterpretation.fractions": "0.05,2"})
    assert res.n_errors == 1
    err = res.results["errors"][0]["error"]
    assert "fractions in (0, 1]" in err and "\n" not in err
