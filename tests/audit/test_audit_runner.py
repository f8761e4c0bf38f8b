"""The audit runner: resume, invalidation, error handling, results.json schema."""

import json

import pytest
import torch

from trustvision.audit import (
    SCHEMA_VERSION,
    Check,
    CheckResult,
    default_checks,
    get_check,
    list_checks,
    register_check,
    run_audit,
)
from trustvision.errors import TrustVisionError
from trustvision.evaluate import expected_calibration_error, top1_accuracy

BUILTIN = ["accuracy", "calibration"]
CALLS: dict[str, int] = {}
STATE = {"interrupt": True}


def _count(name):
    CALLS[name] = CALLS.get(name, 0) + 1


@register_check("test-first")
class _First(Check):
    default, order = False, 1000

    def run(self, ctx):
        _count("test-first")
        probs, labels = ctx.predict("test")
        return CheckResult(data={"n": len(labels)}, metrics={"First": 1.0})


@register_check("test-interrupt")
class _Interrupt(Check):
    default, order = False, 1001

    def run(self, ctx):
        _count("test-interrupt")
        if STATE["interrupt"]:
            raise KeyboardInterrupt
        return CheckResult(data={"ok": True})


@register_check("test-last")
class _Last(Check):
    default, order = False, 1002

    def run(self, ctx):
        _count("test-last")
        return CheckResult(data={"ok": True})


@register_check("test-fails")
class _Fails(Check):
    default, order = False, 1003

    def run(self, ctx):
        raise ValueError("broken on purpose")


@register_check("test-not-applicable")
class _NotApplicable(Check):
    default, order = False, 1004

    def applies_to(self, ctx):
        return False

    def run(self, ctx):  # pragma: no cover - never called
        raise AssertionError


@register_check("test-compare")
class _Compare(Check):
    default, order, uses_compare = False, 1005, True

    def run(self, ctx):
        _count("test-compare")
        p, y = ctx.predict("test")
        q, _ = ctx.predict("test", compare=True)
        return CheckResult(data={"agreement": float((p.argmax(1) == q.argmax(1)).float().mean())})


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    STATE["interrupt"] = True


def test_registry_lists_builtin_checks_in_order():
    assert list_checks()[:2] == ["accuracy", "calibration"]
    assert default_checks() == [n for n in list_checks() if get_check(n).default]
    assert "test-first" not in default_checks()
    with pytest.raises(TrustVisionError, match="--list-checks"):
        get_check("acuracy")


def test_builtin_results_equal_direct_computation(tmp_path, tiny_model, toy_splits):
    res = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=BUILTIN, progress=False)
    assert res.ok and res.n_computed == 2
    x, y = toy_splits["test"].tensors()
    with torch.no_grad():
        logits = tiny_model(x)
    m = res.results["models"][0]
    acc = m["checks"]["accuracy"]["data"]["accuracy"]
    assert acc == pytest.approx(top1_accuracy(logits, y))
    assert 0.5 < acc < 1.0
    cal = m["checks"]["calibration"]["data"]
    assert cal["n_bins"] == 15
    assert cal["before"]["ece"] == pytest.approx(expected_calibration_error(torch.softmax(logits, 1), y), abs=1e-6)
    t = cal["temperature"]
    assert cal["after_temperature_scaling"]["ece"] == pytest.approx(
        expected_calibration_error(torch.softmax(logits / t, 1), y), abs=1e-6)
    assert m["metrics"] == {"Accuracy": acc, "ECE": cal["before"]["ece"],
                            "ECE after TS": cal["after_temperature_scaling"]["ece"], "Temperature": t}
    assert sum(m["checks"]["accuracy"]["data"]["support"]) == len(y)


def test_results_json_schema(tmp_path, tiny_model, toy_splits):
    run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=BUILTIN, progress=False,
              command="trustvision audit x")
    text = (tmp_path / "results.json").read_text()
    r = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert r["schema_version"] == SCHEMA_VERSION == 1
    for key in ("trustvision_version", "created", "command", "options", "checks", "datasets", "models",
                "errors", "status", "seed", "device"):
        assert key in r
    assert r["command"] == "trustvision audit x" and r["status"] == "ok" and r["errors"] == []
    assert r["options"]["n_bins"] == 15
    assert [c["name"] for c in r["checks"]] == ["accuracy", "calibration"]
    (ds,) = r["datasets"]
    assert ds["name"] == "toy" and ds["classes"] == ["a", "b", "c"] and ds["splits"]["test"] == 60
    (m,) = r["models"]
    assert m["name"] == "tiny" and m["architecture"] == "tiny-linear" and len(m["fingerprint"]) == 64
    rec = m["checks"]["calibration"]
    assert rec["status"] == "ok" and rec["figures"] == {"reliability": rec["figures"]["reliability"]}
    assert (tmp_path / rec["figures"]["reliability"]).read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "report.html").is_file()


def test_rerun_reuses_finished_checks(tmp_path, tiny_model, toy_splits):
    checks = ["accuracy", "test-first", "test-last"]
    STATE["interrupt"] = False
    first = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=checks, progress=False)
    assert first.n_computed == 3 and CALLS == {"test-first": 1, "test-last": 1}
    again = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=checks, progress=False)
    assert again.n_computed == 0 and again.n_cached == 3 and CALLS == {"test-first": 1, "test-last": 1}
    assert again.results["models"][0]["checks"]["accuracy"]["data"] == \
        first.results["models"][0]["checks"]["accuracy"]["data"]

    # deleting one check's file recomputes that check only
    (tmp_path / "checks" / "tiny" / "test-last.json").unlink()
    third = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=checks, progress=False)
    assert third.n_computed == 1 and CALLS == {"test-first": 1, "test-last": 2}


def test_interrupted_audit_resumes_without_recomputing(tmp_path, tiny_model, toy_splits):
    checks = ["test-first", "test-interrupt", "test-last"]
    with pytest.raises(KeyboardInterrupt):
        run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=checks, progress=False)
    assert CALLS == {"test-first": 1, "test-interrupt": 1}
    assert (tmp_path / "checks" / "tiny" / "test-first.json").is_file()
    assert not (tmp_path / "checks" / "tiny" / "test-interrupt.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))

    STATE["interrupt"] = False
    res = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks=checks, progress=False)
    assert CALLS == {"test-first": 1, "test-interrupt": 2, "test-last": 1}
    assert res.n_cached == 1 and res.n_computed == 2 and res.ok


def test_changed_options_or_weights_invalidate(tmp_path, tiny_model, toy_splits):
    run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks="test-first", progress=False)
    run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks="test-first", progress=False)
    assert CALLS["test-first"] == 1
    # the batch size changes results in the last digits (batched float arithmetic): it invalidates
    run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks="test-first", progress=False,
              options={"batch_size": 7})
    assert CALLS["test-first"] == 2
    run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks="test-first", progress=False,
              options={"n_max": 30})
    assert CALLS["test-first"] == 3
    with torch.no_grad():
        tiny_model.lin.bias[1] += 0.5
    res = run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks="test-first", progress=False,
                    options={"n_max": 30})
    assert CALLS["test-first"] == 4
    assert res.results["models"][0]["checks"]["test-first"]["data"]["n"] == 30


def test_failing_check_is_recorded_and_audit_goes_on(tmp_path, tiny_model, toy_splits):
    res = run_audit({"tiny": tiny_model}, toy_splits, tmp_path,
                    checks=["accuracy", "test-fails", "test-not-applicable", "test-last"], progress=False)
    assert not res.ok and res.n_errors == 1
    checks = res.results["models"][0]["checks"]
    assert checks["accuracy"]["status"] == "ok" and checks["test-last"]["status"] == "ok"
    assert checks["test-fails"]["status"] == "error"
    assert checks["test-fails"]["error"] == "ValueError: broken on purpose"
    assert "Traceback" in checks["test-fails"]["traceback"]
    assert checks["test-not-applicable"]["status"] == "skipped"
    assert res.results["status"] == "errors"
    assert res.results["errors"] == [{"model": "tiny", "check": "test-fails", "error": "ValueError: broken on purpose"}]
    html = (tmp_path / "report.html").read_text()
    assert "broken on purpose" in html
    # errors are not cached: the failing check is retried on the next run
    assert not (tmp_path / "checks" / "tiny" / "test-fails.json").exists()


def test_compare_model_and_several_models(tmp_path, tiny_model, toy_splits, tiny_cls):
    other = tiny_cls(strength=0.5)
    models = [("tiny", tiny_model), ("weak", other)]
    res = run_audit(models, toy_splits, tmp_path, checks=["accuracy", "test-compare"], compare=tiny_model,
                    progress=False)
    assert [m["key"] for m in res.results["models"]] == ["tiny", "weak"]
    agree = {m["name"]: m["checks"]["test-compare"]["data"]["agreement"] for m in res.results["models"]}
    assert agree["tiny"] == 1.0  # a model always agrees with itself
    assert CALLS["test-compare"] == 2
    # a different comparison model invalidates only the checks that use it
    res = run_audit(models, toy_splits, tmp_path, checks=["accuracy", "test-compare"], compare=other,
                    progress=False)
    assert CALLS["test-compare"] == 4 and res.n_cached == 2
    assert {m["name"]: m["checks"]["test-compare"]["data"]["agreement"] for m in res.results["models"]}["weak"] == 1.0


def test_unknown_check_and_incompatible_data(tmp_path, tiny_model, toy_splits, tiny_cls):
    with pytest.raises(TrustVisionError, match="did you mean 'calibration'"):
        run_audit({"tiny": tiny_model}, toy_splits, tmp_path, checks="calibraton", progress=False)
    with pytest.raises(TrustVisionError, match="labels"):
        run_audit({"two": tiny_cls(num_classes=2)}, toy_splits, tmp_path, checks=BUILTIN, progress=False)  # labels 0..2


def test_generic_dataset_path_matches_tensor_path(tmp_path, tiny_model, toy_splits):
    from trustvision.data._base import ImageDataset

    class Plain(ImageDataset):  # no tensors(): goes through a DataLoader
        def __init__(self, base):
            self.base, self.name, self.split = base, base.name, base.split
            self.classes, self.image_size, self.num_channels = base.classes, base.image_size, base.num_channels

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return self.base[i]

    plain = {s: Plain(d) for s, d in toy_splits.items()}
    opts = {"n_max": 40, "batch_size": 16}
    a = run_audit({"t": tiny_model}, toy_splits, tmp_path / "a", checks=BUILTIN, options=opts, progress=False,
                  render=False)
    b = run_audit({"t": tiny_model}, plain, tmp_path / "b", checks=BUILTIN, options=opts, progress=False,
                  render=False)
    da = a.results["models"][0]["checks"]["accuracy"]["data"]
    db = b.results["models"][0]["checks"]["accuracy"]["data"]
    assert da["n"] == db["n"] == 40 and da == db
    ca = a.results["models"][0]["checks"]["calibration"]["data"]
    cb = b.results["models"][0]["checks"]["calibration"]["data"]
    assert ca["temperature"] == pytest.approx(cb["temperature"]) and ca["n_fit"] == 40


def test_calibration_without_validation_split_fits_on_half_of_test(tmp_path, tiny_model, toy_splits):
    res = run_audit({"t": tiny_model}, {"test": toy_splits["test"]}, tmp_path, checks=BUILTIN, progress=False,
                    render=False)
    assert res.ok
    cal = res.results["models"][0]["checks"]["calibration"]["data"]
    assert cal["temperature_fit_split"].startswith("first half of test")
    assert cal["n_fit"] == 30 and cal["n"] == 30
    assert res.results["datasets"][0]["splits"] == {"test": 60}
