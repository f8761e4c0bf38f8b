"""The edges hold (issue #9): every bad input gives one ``error:`` line and exit 2, never a
traceback, a hang or a silent result. Each case is a row of a table, bounded in time."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch

from _edge import assert_user_error, run_cli
from trustvision import models
from trustvision.cli import command, main

AUDIT = ["audit", "--model", "zoo:small-cnn-digits", "--checks", "accuracy", "--no-progress", "--device", "cpu"]
EXPLAIN = ["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "saliency", "--n", "1",
           "--device", "cpu"]
TRAIN = ["train", "--data", "digits", "--model", "small-cnn", "--epochs", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture
def paths(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {"t": str(tmp_path), "file": str(afile), "under": str(afile / "sub"), "long": str(tmp_path / ("a" * 300)),
            "out": str(tmp_path / "out")}


# (id, argv builder, words the error line must contain)
USAGE = [
    ("no-arguments", lambda p: [], ["missing command"]),
    ("unknown-command", lambda p: ["frobnicate"], ["no such command 'frobnicate'"]),
    ("n-max-not-int", lambda p: AUDIT + ["--n-max", "abc", "--out", p["out"]], ["--n-max"]),
    ("n-max-zero", lambda p: AUDIT + ["--n-max", "0", "--out", p["out"]], ["--n-max", "greater than or equal to 1"]),
    ("train-without-data", lambda p: ["train"], ["missing --data"]),
    ("train-bogus-option", lambda p: ["train", "--data", "digits", "--bogus"], ["no such option: --bogus"]),
    ("n-bins-huge", lambda p: AUDIT + ["--n-bins", "100000", "--out", p["out"]], ["--n-bins", "1000"]),
    ("seed-negative", lambda p: AUDIT + ["--seed", "-1", "--out", p["out"]], ["--seed"]),
    ("seed-huge", lambda p: AUDIT + ["--seed", str(2 ** 70), "--out", p["out"]], ["--seed"]),
    ("train-batch-negative", lambda p: TRAIN + ["-b", "-4", "--out", p["out"]], ["--batch-size"]),
    ("explain-n-zero", lambda p: EXPLAIN + ["--n", "0", "--out", p["out"]], ["--n must be at least 1"]),
    ("audit-batch-float", lambda p: AUDIT + ["-b", "2.5", "--out", p["out"]], ["--batch-size"]),
]
BAD_VALUES = [
    ("device-meta", lambda p: AUDIT + ["--device", "meta", "--out", p["out"]], ["meta"]),
    ("device-unknown", lambda p: EXPLAIN + ["--device", "tpu9", "--out", p["out"]], ["tpu9"]),
    ("device-train-meta", lambda p: TRAIN + ["--device", "meta", "--out", p["out"]], ["meta"]),
    ("out-is-file", lambda p: AUDIT + ["--out", p["file"]], ["is a file"]),
    ("out-under-file", lambda p: AUDIT + ["--out", p["under"]], ["lies under the file"]),
    ("out-empty", lambda p: AUDIT + ["--out", ""], ["--out is empty"]),
    ("out-long-name", lambda p: AUDIT + ["--out", p["long"]], ["255 bytes"]),
    ("out-unwritable", lambda p: AUDIT + ["--out", "/proc/trustvision-nope/x"], ["cannot write to --out"]),
    ("explain-out-file", lambda p: EXPLAIN + ["--out", p["file"]], ["is a file"]),
    ("train-out-file", lambda p: TRAIN + ["--out", p["file"]], ["is a file"]),
    ("train-out-empty", lambda p: TRAIN + ["--out", ""], ["--out is empty"]),
    ("model-empty", lambda p: ["audit", "--model", "", "--out", p["out"], "--no-progress"], ["--model is empty"]),
    ("model-comma-only", lambda p: ["audit", "--model", ",", "--out", p["out"], "--no-progress"], ["--model is empty"]),
    ("checks-empty", lambda p: AUDIT[:3] + ["--checks", "", "--out", p["out"], "--no-progress"], ["no checks"]),
    ("option-bad-type", lambda p: AUDIT + ["-O", "ood.n=many", "--out", p["out"]], ["ood.n"]),
    ("option-unknown-key", lambda p: AUDIT + ["-O", "ood.bogus=1", "--out", p["out"]], ["no option 'bogus'"]),
    ("report-missing", lambda p: ["report", p["t"] + "/nothing"], ["not found"]),
    ("report-file", lambda p: ["report", p["file"]], ["is a file"]),
    ("data-empty", lambda p: AUDIT + ["--data", "", "--out", p["out"]], ["unknown dataset"]),
    ("null-byte-model", lambda p: ["audit", "--model", "a\x00b", "--out", p["out"], "--no-progress"], []),
]


@pytest.mark.parametrize("build,words", [c[1:] for c in USAGE + BAD_VALUES], ids=[c[0] for c in USAGE + BAD_VALUES])
def test_bad_input_is_one_line_exit_2(build, words, paths, capsys):
    status, _, err = run_cli(build(paths), capsys)
    assert_user_error(status, err, *words)


def test_usage_errors_print_the_usage_line(capsys):
    status, _, err = run_cli(["audit", "--n-max", "abc"], capsys)
    assert_user_error(status, err)
    assert err.splitlines()[0] == "Usage: trustvision audit [OPTIONS]"


def test_version(capsys):
    import trustvision

    status, out, _ = run_cli(["--version"], capsys)
    assert status == 0 and out.strip() == f"trustvision {trustvision.__version__}"


def _commands():
    root = command()
    return root, dict(root.commands)


@pytest.mark.parametrize("name", ["audit", "train", "explain", "report", "zoo", "data"])
def test_help_has_no_python_type_metavars(name, capsys):
    status, out, _ = run_cli([name, "--help"], capsys)
    assert status == 0
    assert "<bool>" not in out and "<list[str]>" not in out and "list[" not in out, out


def test_one_device_default_on_every_command():
    _, cmds = _commands()
    defaults = {n: p.default for n, c in cmds.items() for p in c.params if p.name == "device"}
    assert set(defaults) == {"audit", "train", "explain"} and set(defaults.values()) == {"auto"}


def test_error_hints_name_only_options_of_that_command(paths, capsys):
    """A message that suggests a --flag must suggest one the command has."""
    root, cmds = _commands()
    cases = [(["audit", "--model", "zoo:small-cnn-digits", "--data", "mnist", "--data-dir", paths["t"],
               "--no-progress", "--out", paths["out"]], "audit"),
             (["explain", "--model", "zoo:small-cnn-digits", "--data", "cifar10", "--data-dir", paths["t"],
               "--out", paths["out"]], "explain"),
             (["train", "--data", "svhn", "--data-dir", paths["t"], "--out", paths["out"]], "train")]
    for argv, name in cases:
        status, _, err = run_cli(argv, capsys)
        line = assert_user_error(status, err)
        flags = set(re.findall(r"(?<![\w`])--[a-z][a-z-]+", re.sub(r"`[^`]*`", "", line)))
        own = {o for p in cmds[name].params for o in getattr(p, "opts", [])}
        assert flags <= own, (name, flags - own, line)


def test_internal_errors_are_one_line_exit_1(monkeypatch, capsys):
    import trustvision.audit

    def boom(*a, **k):
        raise RuntimeError("unexpected\nsecond line")

    monkeypatch.setattr(trustvision.audit, "run", boom)
    status, _, err = run_cli(["audit", "--checks", "accuracy", "--no-progress", "--out", "/tmp/tv-internal"], capsys)
    assert status == 1 and len(err.strip().splitlines()) == 1 and "internal error" in err and "Traceback" not in err
    monkeypatch.setenv("TRUSTVISION_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["audit", "--checks", "accuracy", "--no-progress", "--out", "/tmp/tv-internal"])


# -- non-finite weights and outputs -----------------------------------------------------------------

def test_nan_outputs_fail_the_check_with_a_reason(tmp_path, tiny_model, toy_splits):
    from trustvision import audit

    with torch.no_grad():
        tiny_model.lin.bias[0] = float("nan")
    res = audit.run({"t": tiny_model}, toy_splits, checks="accuracy,calibration")
    recs = res.records("t")
    for name in ("accuracy", "calibration"):
        assert recs[name]["status"] == "error"
        assert "NaN or infinite" in recs[name]["error"]
    assert res.n_errors == 2


# -- the results store ---------------------------------------------------------------------------

def test_stale_temp_files_are_removed_and_all_split_sizes_recorded(tmp_path, tiny_model, toy_splits):
    from trustvision import audit

    audit.run({"t": tiny_model}, toy_splits, checks="accuracy", out=tmp_path)
    # a process killed between writing and renaming (pid 2**22 + 1 does not run here) ...
    stale = tmp_path / "checks" / "t" / f".accuracy.json.{2 ** 22 + 1}.0123abcd.tmp"
    stale.write_text("{")
    res = audit.run({"t": tiny_model}, toy_splits, checks="accuracy", out=tmp_path)
    assert not stale.exists() and res.n_cached == 1
    # ... and a rerun that reuses every check still records every split's size
    assert res.results["datasets"][0]["splits"] == {"train": 60, "val": 60, "test": 60}


# -- tampered results.json -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    from trustvision import audit

    out = tmp_path_factory.mktemp("audited")
    audit.run("zoo:small-cnn-digits", "digits", checks="accuracy,calibration", out=out, options={"n_max": 60})
    return out


def _set(obj, path, value):
    *head, last = path
    for k in head:
        obj = obj[k]
    if value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


_DELETE = object()
TAMPER = [
    ("models-not-list", ["models"], {"a": 1}, "models must be a list"),
    ("models-missing", ["models"], _DELETE, "not a trustvision results file"),
    ("model-not-object", ["models", 0], 5, "models[0] must be an object"),
    ("key-missing", ["models", 0, "key"], _DELETE, "models[0].key must be a string"),
    ("key-path", ["models", 0, "key"], "../../etc", "file-name-safe"),
    ("name-number", ["models", 0, "name"], 7, "models[0].name must be a string"),
    ("metrics-list", ["models", 0, "metrics"], [1], "models[0].metrics must be an object"),
    ("metric-string", ["models", 0, "metrics", "Accuracy"], "high", "must be a number"),
    ("checks-list", ["models", 0, "checks"], [], "must be an object"),
    ("status-bogus", ["models", 0, "checks", "accuracy", "status"], "fine", "status must be one of"),
    ("figures-list", ["models", 0, "checks", "accuracy", "figures"], ["x"], "figures must be an object"),
    ("figure-absolute", ["models", 0, "checks", "accuracy", "figures", "confusion_matrix"], "/etc/passwd",
     "outside the audit folder"),
    ("figure-dotdot", ["models", 0, "checks", "accuracy", "figures", "confusion_matrix"], "../../x.png",
     "outside the audit folder"),
    ("figure-number", ["models", 0, "checks", "accuracy", "figures", "confusion_matrix"], 3, "must be a string"),
    ("tables-string", ["models", 0, "checks", "accuracy", "tables"], "t", "tables must be an object"),
    ("table-rows-dict", ["models", 0, "checks", "accuracy", "tables", "Per-class accuracy", "rows"], {"a": 1},
     "rows must be a list"),
    ("table-cell-object", ["models", 0, "checks", "accuracy", "tables", "Per-class accuracy", "rows", 0], [{"x": 1}],
     "must be a number, a string or null"),
    ("summary-number", ["models", 0, "checks", "accuracy", "summary"], 3, "summary must be a string"),
    ("schema-string", ["schema_version"], "one", "schema_version must be an integer"),
    ("options-list", ["options"], [1], "options must be an object"),
    ("option-object", ["options", "n_bins"], {"x": 1}, "must be a number, a string or null"),
    ("datasets-object", ["datasets"], {}, "datasets must be a list"),
    ("image-size-strings", ["datasets", 0, "image_size"], ["8", "8"], "must be an integer"),
    ("splits-list", ["datasets", 0, "splits"], [1], "splits must be an object"),
    ("errors-object", ["errors"], {}, "errors must be a list"),
    ("metric-meta-better", ["metrics", "Accuracy", "better"], "up", "better must be"),
    ("metric-meta-format", ["metrics", "Temperature", "note_format"], "{0.__class__}", "note_format"),
    ("metrics-meta-list", ["metrics"], [], "metrics must be an object"),
    ("command-list", ["command"], ["x"], "command must be a string"),
    ("seed-float", ["seed"], 1.5, "seed must be an integer"),
    ("infinite-metric", ["models", 0, "metrics", "Accuracy"], float("inf"), "must be a number"),
]


@pytest.mark.parametrize("path,value,words", [c[1:] for c in TAMPER], ids=[c[0] for c in TAMPER])
def test_report_on_tampered_results_is_one_line(path, value, words, audited, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(audited, folder)
    r = json.loads((folder / "results.json").read_text())
    _set(r, path, copy.deepcopy(value) if value is not _DELETE else value)
    (folder / "results.json").write_text(json.dumps(r))
    status, _, err = run_cli(["report", str(folder)], capsys)
    assert_user_error(status, err, words)


@pytest.mark.parametrize("text,words", [
    ('{"schema_version": 1, "models": [], "options": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ('{"schema_version": 1, "models": [', "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    ("[]", "not a trustvision results file"),
])
def test_report_on_broken_json_is_one_line(text, words, tmp_path, capsys):
    (tmp_path / "results.json").write_bytes(text.encode("latin-1"))
    status, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert_user_error(status, err, words)


def test_report_refuses_a_figure_symlink_leaving_the_folder(audited, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(audited, folder)
    r = json.loads((folder / "results.json").read_text())
    rel = r["models"][0]["checks"]["accuracy"]["figures"]["confusion_matrix"]
    secret = tmp_path / "secret.png"
    shutil.copy(folder / rel, secret)
    (folder / rel).unlink()
    os.symlink(secret, folder / rel)
    status, _, err = run_cli(["report", str(folder)], capsys)
    assert_user_error(status, err, "outside the audit folder")


def test_untampered_results_render(audited, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(audited, folder)
    status, out, _ = run_cli(["report", str(folder)], capsys)
    assert status == 0 and (folder / "report.html").is_file()


def test_models_fixture_is_untouched():
    assert models.load("zoo:small-cnn-digits").num_classes == 10


# -- train --resume reuses the stored settings --------------------------------------------------

def test_resume_reuses_stored_settings_and_refuses_another_run(tmp_path, capsys):
    from safetensors.torch import load_file

    run = str(tmp_path / "run")
    base = ["train", "--out", run, "--no-progress", "--device", "cpu"]
    status, _, err = run_cli(base + ["--data", "digits", "--model", "small-cnn", "--epochs", "1", "--lr", "3e-3",
                                     "-b", "32", "--model-kw", "dropout=0.1"], capsys, seconds=300)
    assert status == 0, err
    first = load_file(f"{run}/model.safetensors")
    # the README's form: only some options again; lr, batch size and model kwargs come from the run
    status, out, err = run_cli(base + ["--data", "digits", "--model", "small-cnn", "--resume"], capsys, seconds=300)
    assert status == 0, err
    again = load_file(f"{run}/model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)  # nothing left to train: same weights
    settings = json.loads((tmp_path / "run" / "train_settings.json").read_text())["settings"]
    assert settings["lr"] == 3e-3 and settings["batch_size"] == 32 and settings["model_kwargs"] == {"dropout": 0.1}
    for extra, words in [(["--data", "faces"], "'digits', not 'faces'"),
                         (["--model", "resnet20"], "--model"),
                         (["--model-kw", "dropout=0.3"], "--model-kw")]:
        status, _, err = run_cli(base + ["--resume"] + extra, capsys, seconds=300)
        assert_user_error(status, err, words)
    status, _, err = run_cli(["train", "--resume", "--no-progress"], capsys)
    assert_user_error(status, err, "--data")
