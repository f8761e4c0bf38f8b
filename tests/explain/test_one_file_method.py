"""Adding a heatmap method is one file: it appears in ``list_methods()``, in ``trustvision explain
--method NAME``, in the audit's ``explanations`` check (by default) and in the report, with no
edit anywhere else."""

import importlib
import json
import sys
import textwrap

import pytest
import torch

from trustvision import explain

PLUGIN = textwrap.dedent('''
    """A toy heatmap method: closeness to the image centre (it ignores the model)."""

    import torch

    from trustvision.explain import Explainer


    class CentrePrior(Explainer):
        """Heatmap = closeness to the image centre, to the power ``power``."""

        name, title, kind, in_audit = "centre-prior", "Centre prior", "heatmap", True

        def attribute(self, inputs, target=None, *, seed=0, internal_batch_size=None, power=1.0):
            n, _, h, w = inputs.shape
            r = torch.linspace(-1, 1, h).view(h, 1) ** 2 + torch.linspace(-1, 1, w).view(1, w) ** 2
            heat = (2 - r).clamp_min(0) ** power
            return heat.to(inputs).expand(n, 1, h, w).clone()
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "tv_centre_prior.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("tv_centre_prior")
    try:
        yield module.CentrePrior
    finally:
        explain.unregister_method("centre-prior")
        sys.modules.pop("tv_centre_prior", None)
        assert "centre-prior" not in explain.list_methods(kind=None)


def test_the_new_method_is_registered(plugin):
    assert "centre-prior" in explain.list_methods(kind="heatmap")
    assert explain.get("centre-prior") is plugin
    assert explain.method_info("centre-prior")["keywords"] == {"seed": 0, "internal_batch_size": None, "power": 1.0}
    heat = explain.attribute(torch.nn.Identity(), torch.rand(2, 1, 5, 5), method="centre-prior")
    assert heat.shape == (2, 1, 5, 5) and int(heat[0, 0].argmax()) == 12


def test_the_command_line_accepts_it(plugin, tmp_path, capsys):
    from trustvision.cli import main

    out = tmp_path / "out"
    args = ["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "centre-prior",
            "--n", "2", "--out", str(out)]
    assert main(args + ["--method-kw", "power=2"]) == 0, capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["method"] == "centre-prior" and len(scores["images"]) == 2
    assert "deletion_auc" in scores["images"][0] and len(list((out / "overlays").glob("*.png"))) == 2
    capsys.readouterr()
    assert main(args + ["--method-kw", "gamma=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: centre-prior has no keyword 'gamma'") and err.count("\n") == 1


def test_the_audit_runs_it_by_default(plugin, tiny_model, toy_splits):
    from trustvision.audit.checks.explanations import ExplanationsCheck, default_methods
    from trustvision.audit.context import AuditContext

    assert default_methods()[-1] == "centre-prior"  # after the built-in ones (order 100 > 40)
    assert "centre-prior" in ExplanationsCheck.options["methods"].resolved_default()
    ctx = AuditContext(model=tiny_model, model_name="t", datasets=toy_splits,
                       check_options={"n": 2, "iterations": 1, "sag_n": 0})
    res = ExplanationsCheck().run(ctx)
    assert "centre-prior" in res.data["methods"]
    assert [r[0] for r in res.tables["faithfulness"]["rows"]][-1] == "Centre prior"  # the method title


def test_the_report_shows_it(plugin, tiny_model, toy_splits, tmp_path):
    from trustvision.audit import run_audit

    res = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=["explanations"], progress=False,
                    options={"explanations.n": 2, "explanations.iterations": 1, "explanations.sag_n": 0})
    assert res.ok, res.results["errors"]
    assert "centre-prior" in res.results["models"][0]["checks"]["explanations"]["data"]["methods"]
    assert "centre-prior" in (tmp_path / "report.html").read_text(encoding="utf-8")
