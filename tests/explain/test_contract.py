"""The explainer contract: every registered method declares what it is, accepts the shared
keywords, refuses unknown ones and models it cannot serve in one line; the shared sample helper."""

import pytest
import torch
from torch import nn

from trustvision import explain, models
from trustvision.errors import TrustVisionError
from trustvision.explain import KINDS, REQUIREMENTS, Explainer


@pytest.fixture(scope="module")
def generative():
    return models.create("ibinn-small", num_classes=3, in_chans=1, image_size=8, widths=(8, 8, 8),
                         fc_width=16).eval()


def _model_for(cls, tiny_cnn, generative):
    return generative if "generative" in cls.requires else tiny_cnn


@pytest.mark.parametrize("name", explain.list_methods(kind=None))
def test_every_method_declares_the_contract(name):
    cls = explain.get(name)
    assert issubclass(cls, Explainer) and cls.name == name
    assert isinstance(cls.title, str) and cls.title
    assert cls.kind in KINDS
    assert isinstance(cls.requires, tuple) and set(cls.requires) <= set(REQUIREMENTS)
    assert isinstance(cls.in_audit, bool)
    assert cls.keywords()[:2] == ("seed", "internal_batch_size")
    info = explain.method_info(name)
    assert {k: info[k] for k in ("name", "title", "kind", "requires", "in_audit")} == {
        "name": name, "title": cls.title, "kind": cls.kind, "requires": cls.requires, "in_audit": cls.in_audit}


def test_kinds_and_titles():
    assert explain.list_methods() == explain.list_methods(kind="heatmap")
    assert explain.list_methods(kind="graph") == ["sag"]
    assert {explain.get(m).title for m in ("igos", "igos++", "rise", "gradcam")} == {
        "I-GOS", "iGOS++", "RISE", "Grad-CAM"}
    with pytest.raises(TrustVisionError, match="unknown kind"):
        explain.list_methods(kind="heatmaps")


@pytest.mark.parametrize("name", explain.list_methods(kind=None))
def test_unknown_keyword_is_a_one_line_error(name, tiny_cnn, generative):
    cls = explain.get(name)
    net = _model_for(cls, tiny_cnn, generative)
    with pytest.raises(TrustVisionError) as err:
        cls(net).attribute(torch.rand(2, 1, 8, 8), target=0, no_such_keyword=1)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name} has no keyword 'no_such_keyword'")
    assert "its keywords are seed, internal_batch_size" in msg


@pytest.mark.parametrize("name", explain.list_methods(kind=None))
def test_an_empty_batch_is_a_one_line_error(name, tiny_cnn, generative):
    # (each method used to fail its own way: torch.cat of nothing, an index out of range, a
    # division by zero)
    cls = explain.get(name)
    net = _model_for(cls, tiny_cnn, generative)
    with pytest.raises(TrustVisionError) as err:
        cls(net).attribute(torch.rand(0, 1, 8, 8))
    msg = str(err.value)
    if name == "xnn":  # (an unfitted XNN refuses first, in one line, before it looks at the inputs)
        assert "\n" not in msg and msg.startswith("xnn needs a")
    else:
        assert msg == "inputs is an empty batch, shape (0, 1, 8, 8): there is no image to use"


def test_captum_adapters_no_longer_swallow_keywords(tiny_cnn):
    for name in ("saliency", "gradcam", "integrated-gradients", "occlusion"):
        with pytest.raises(TrustVisionError, match="iterations"):
            explain.get(name)(tiny_cnn).attribute(torch.rand(1, 1, 8, 8), iterations=3)
    # seed is accepted (and unused: these methods are deterministic)
    a = explain.get("saliency")(tiny_cnn).attribute(torch.ones(1, 1, 8, 8), seed=1)
    b = explain.get("saliency")(tiny_cnn).attribute(torch.ones(1, 1, 8, 8), seed=2)
    assert torch.equal(a, b)


def test_internal_batch_size_does_not_change_the_answer(tiny_cnn):
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("saliency", "gradcam"):
        whole = explain.get(name)(tiny_cnn).attribute(x, target=1)
        parts = explain.get(name)(tiny_cnn).attribute(x, target=1, internal_batch_size=2)
        torch.testing.assert_close(whole, parts, atol=1e-6, rtol=0)


def test_requirements_refuse_models_in_one_line(generative):
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    gradcam, lr = explain.get("gradcam"), explain.get("likelihood-ratio")
    reason = gradcam.unmet_requirement(linear)
    assert reason.startswith("gradcam needs a convolutional network (no Conv2d layer found); use ")
    assert "saliency" in reason and "rise" in reason and "gradcam, " not in reason
    with pytest.raises(TrustVisionError, match="convolutional") as err:
        gradcam(linear)
    assert "\n" not in str(err.value)
    ff = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8)
    assert gradcam.unmet_requirement(ff) is None
    assert lr.unmet_requirement(ff).startswith("likelihood-ratio needs a generative classifier")
    with pytest.raises(TrustVisionError, match="needs a generative classifier") as err:
        explain.attribute(ff, torch.rand(2, 1, 8, 8), method="likelihood-ratio")
    assert "\n" not in str(err.value)
    assert lr.unmet_requirement(generative) is None
    # with an explicit layer Grad-CAM needs no Conv2d of its own
    assert gradcam(linear, layer=linear[1]).layer is linear[1]


def test_audit_skips_methods_the_model_cannot_serve(tiny_model, toy_splits):
    from trustvision.audit.context import AuditContext
    from trustvision.audit.registry import get_check

    ctx = AuditContext(model=tiny_model, model_name="t", datasets=toy_splits,
                       check_options={"n": 2, "sag_n": 0, "methods": ["gradcam", "likelihood-ratio", "saliency"]})
    res = get_check("explanations")().run(ctx)
    assert list(res.data["methods"]) == ["saliency"]
    skipped = res.data["skipped"]
    assert set(skipped) == {"gradcam", "likelihood-ratio"}
    assert "needs a convolutional network" in skipped["gradcam"]
    assert "needs a generative classifier" in skipped["likelihood-ratio"]
    assert "skipped: gradcam, likelihood-ratio" in res.summary


def test_audit_option_declarations():
    from trustvision.audit.checks.explanations import ExplanationsCheck, default_methods

    opts = ExplanationsCheck.options
    assert list(opts) == ["n", "methods", "iterations", "sag_n", "sag_grid"]
    assert (opts["n"].default, opts["iterations"].default, opts["sag_n"].default, opts["sag_grid"].default) == (
        8, 15, 2, 0)
    assert default_methods()[:7] == ["igos", "igos++", "saliency", "integrated-gradients", "gradcam",
                                     "occlusion", "rise"]
    assert opts["methods"].resolved_default() == default_methods() and "likelihood-ratio" not in default_methods()
    with pytest.raises(TrustVisionError, match=r"does not accept 'igos\+'"):
        opts["methods"].parse("igos,igos+", "explanations.methods")
    assert set(ExplanationsCheck.metrics) == {"Insertion AUC ({method})", "Deletion AUC ({method})"}
    info = ExplanationsCheck.metric_info("Insertion AUC (iGOS++)")
    assert info["better"] == "higher" and "iGOS++ heatmap" in info["legend"]


def test_sag_is_a_graph_method(tiny_cnn):
    sag = explain.get("sag")
    assert sag is explain.SAG and sag.kind == "graph" and "sag" not in explain.list_methods()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    results = sag(tiny_cnn, grid=4).attribute(x, target=[0, 1])
    assert [r.target for r in results] == [0, 1] and all(r.grid == (4, 4) for r in results)
    # explain() is the one-image alias; the automatic grid is 4 x 4 on 8 x 8 images
    one = explain.SAG(tiny_cnn).explain(x[1], target=1)
    assert one.grid == (4, 4) and one.roots == results[1].roots
    assert explain.SAG(tiny_cnn, grid=7).grid == (7, 7)
    assert set(results[0].summary()) == {"roots", "diverse_roots", "forward_passes"}


def test_a_class_breaking_the_contract_is_refused():
    with pytest.raises(TypeError, match="Explainer contract"):
        class _NoSeed(Explainer, register=False):  # noqa: F841
            def attribute(self, inputs, target=None, *, window=3):
                return inputs
    with pytest.raises(TypeError, match="kind"):
        class _BadKind(Explainer):  # noqa: F841
            name, kind = "bad-kind", "pixels"
    with pytest.raises(TypeError, match="requires unknown"):
        class _BadReq(Explainer):  # noqa: F841
            name, requires = "bad-req", ("quantum",)
    assert "bad-kind" not in explain.list_methods(kind=None)


@pytest.mark.filterwarnings("ignore::trustvision.explain.ExplanationWarning")
def test_sample_helper(tiny_cnn):
    from trustvision.data import TensorImageDataset
    from trustvision.data._base import random_subset
    from trustvision.evaluate.faithfulness import deletion_insertion

    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.rand(20, 1, 8, 8, generator=g), torch.arange(20) % 3, ["a", "b", "c"], "toy",
                            "test")
    res = explain.explain_sample(tiny_cnn, ds, "igos", 4, seed=3, sample_seed=9, target="label",
                                 method_kw={"iterations": 2, "ig_steps": 2},
                                 faithfulness=deletion_insertion)
    x, y, idx = random_subset(ds, 4, torch.Generator().manual_seed(9))
    assert torch.equal(res.indices, idx) and torch.equal(res.images, x) and torch.equal(res.labels, y)
    assert torch.equal(res.sample.targets, y)
    heat = explain.IGOS(tiny_cnn).attribute(x, target=y, seed=3, iterations=2, ig_steps=2)
    assert torch.equal(res.heatmaps, heat)
    fi = deletion_insertion(tiny_cnn, x, heat, target=y)
    assert res.deletion_auc == fi.deletion_auc
    # no constant heatmap here: the means are over every image, as the metric's own summary
    assert res.faithfulness["n_excluded"] == 0 and {k: res.faithfulness[k] for k in fi.summary()} == fi.summary()
    rows = res.rows()
    assert len(rows) == 4 and {"index", "label", "target_probability", "deletion_auc", "unreliable"} <= set(rows[0])
    assert res.unreliable is not None and res.seconds > 0
    # graph methods keep their results; unknown keywords are refused before anything runs
    sag = explain.explain_images(tiny_cnn, res.sample.take(1), "sag", method_kw={"grid": 2})
    assert sag.heatmaps is None and len(sag.results) == 1 and "roots" in sag.rows()[0]
    with pytest.raises(TrustVisionError, match="igos has no keyword 'grid'"):
        explain.explain_sample(tiny_cnn, ds, "igos", 2, method_kw={"grid": 2})
    with pytest.raises(TrustVisionError, match="target must be"):
        explain.draw_sample(tiny_cnn, ds, 2, target="true")
