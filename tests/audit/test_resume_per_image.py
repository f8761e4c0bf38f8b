"""Per-image work is stored as it goes (issue 16): a check interrupted mid-way resumes from its
scratch store and recomputes only the chunks that had not finished, with the results of an
uninterrupted run."""

from __future__ import annotations

import functools

import pytest

from trustvision import audit, explain

MODEL = {"cnn": "zoo:small-cnn-digits"}


@pytest.fixture(autouse=True)
def _fixed_chunks(monkeypatch):
    """I-GOS picks its internal chunk (AutoChunk) and how many line-search trials one forward
    scores (``_cheap_rows``) from measured pass times; a loaded machine may pick others, which
    batches the model's rows differently and spends another number of passes (recorded in SAG's
    graphs). Fixed choices make the runs comparable record for record."""
    from trustvision._utils import images

    original = images.AutoChunk.__init__

    def init(self, fixed=None, **kw):
        original(self, fixed or 64, **kw)

    monkeypatch.setattr(images.AutoChunk, "__init__", init)
    from trustvision.explain import igos

    monkeypatch.setattr(igos._MaskExplainer, "_cheap_rows", lambda self, x, autocast=False: 16)


OPTS = {"explanations.n": 8, "explanations.methods": "saliency,igos", "explanations.iterations": 3,
        "explanations.sag_n": 2, "explanations.sag_grid": 4}


def _counting(monkeypatch, cls, fail_after=None):
    calls = {"n": 0}
    original = cls.attribute

    @functools.wraps(original)  # the contract reads the keywords from the signature
    def attribute(self, *a, **k):
        calls["n"] += 1
        if fail_after is not None and calls["n"] > fail_after:
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(cls, attribute.__name__, attribute)
    return calls


def _faithfulness(result):
    d = result.records("cnn")["explanations"]["data"]
    sags = [{k: v for k, v in g.items() if k != "seconds"} for g in d["sag"]]  # all but the timing
    return {m: (v["deletion_auc"], v["insertion_auc"], v["reasons"]) for m, v in d["methods"].items()}, sags


def test_interrupted_explanations_resume_from_the_finished_chunks(tmp_path, monkeypatch):
    ref = audit.run(MODEL, "digits", checks=["explanations"], options=OPTS)
    assert ref.ok, ref.results["errors"]
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        _counting(mp, explain.IGOS, fail_after=2)  # 8 images in chunks of 2: the third chunk crashes
        crashed = audit.run(MODEL, "digits", checks=["explanations"], options=OPTS, out=out)
    assert not crashed.ok and "simulated crash" in str(crashed.results["errors"])
    igos = _counting(monkeypatch, explain.IGOS)
    sag = _counting(monkeypatch, explain.SAG)
    resumed = audit.run(MODEL, "digits", checks=["explanations"], options=OPTS, out=out)
    assert resumed.ok, resumed.results["errors"]
    # only the 2 unfinished I-GOS chunks, and the 2 SAGs (never reached; each orders its patches by
    # an I-GOS heatmap: 2 more I-GOS calls)
    assert igos["n"] == 2 + 2 and sag["n"] == 2
    assert _faithfulness(resumed) == _faithfulness(ref)
    # a third run of the check (its record deleted) reads every chunk back: nothing is recomputed
    for p in (out / "checks").rglob("explanations.json"):
        p.unlink()
    igos["n"] = sag["n"] = 0
    again = audit.run(MODEL, "digits", checks=["explanations"], options=OPTS, out=out)
    assert again.ok and igos["n"] == 0 and sag["n"] == 0
    assert _faithfulness(again) == _faithfulness(resumed)  # read back: the very same numbers


def test_cache_keys_name_the_settings(monkeypatch):
    """Another iteration count (or another model) is other work: nothing is reused."""
    from trustvision import data, models
    from trustvision.audit.store import ScratchStore

    model = models.load("zoo:small-cnn-digits").eval()
    sample = explain.draw_sample(model, data.load("digits", split="test"), 4)
    store = ScratchStore()
    a = explain.explain_images(model, sample, "igos", method_kw={"iterations": 2}, cache=store)
    assert len(store) == 4  # one entry per chunk (a quarter of the images each)
    calls = _counting(monkeypatch, explain.IGOS)
    b = explain.explain_images(model, sample, "igos", method_kw={"iterations": 2}, cache=store)
    assert calls["n"] == 0 and b.heatmaps.equal(a.heatmaps) and b.reasons == a.reasons
    c = explain.explain_images(model, sample, "igos", method_kw={"iterations": 3}, cache=store)
    assert calls["n"] == 4 and len(store) == 8 and not c.heatmaps.equal(a.heatmaps)
    other = models.load("zoo:small-cnn-shortcut-digits").eval()
    explain.explain_images(other, sample, "igos", method_kw={"iterations": 2}, cache=store)
    assert calls["n"] == 8
    with pytest.raises(Exception):
        explain.explain_images(model, sample, "igos", method_kw={"nope": 1}, cache=store)


@pytest.mark.parametrize("check, module, fn, opts, units", [
    ("corruptions", "trustvision.evaluate.corruptions", "_corrupt_predict",
     {"corruptions.n": 40, "corruptions.types": "gaussian-noise,fog", "corruptions.severities": "1,3", "batch_size": 16},
     2 * 2 * 3),  # types x severities x batches (40 images in batches of 16)
    ("adversarial", "trustvision.evaluate.adversarial", "_attack_correct",
     {"adversarial.n": 24, "adversarial.steps": 2, "adversarial.minimal_eps": False, "adversarial.explain_n": 0,
      "adversarial.attacks": "fgsm,pgd-linf", "adversarial.eps_linf": "0,0.05,0.1", "batch_size": 8},
     2 * 2 * 3),  # attacks x nonzero eps x batches
])
def test_interrupted_units_resume(tmp_path, monkeypatch, check, module, fn, opts, units):
    import importlib

    mod = importlib.import_module(module)
    original = getattr(mod, fn)
    calls = {"n": 0, "fail_after": 5}

    def counting(*a, **k):
        calls["n"] += 1
        if calls["fail_after"] is not None and calls["n"] > calls["fail_after"]:
            raise RuntimeError("simulated crash")
        return original(*a, **k)

    monkeypatch.setattr(mod, fn, counting)
    calls["fail_after"] = None
    ref = audit.run(MODEL, "digits", checks=[check], options=opts)
    assert ref.ok and calls["n"] == units, (ref.results["errors"], calls)
    out = tmp_path / "out"
    calls.update(n=0, fail_after=5)
    crashed = audit.run(MODEL, "digits", checks=[check], options=opts, out=out)
    assert not crashed.ok
    calls.update(n=0, fail_after=None)
    resumed = audit.run(MODEL, "digits", checks=[check], options=opts, out=out)
    assert resumed.ok and calls["n"] == units - 5  # the 5 finished units are read back
    a, b = ref.records("cnn")[check]["data"], resumed.records("cnn")[check]["data"]
    assert a == b
