"""Declared check options and metrics, and the Python entry point ``trustvision.audit.run``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trustvision import audit
from trustvision.audit import Check, CheckResult, Metric, Option, register_check
from trustvision.audit.registry import resolve_check_options
from trustvision.cli import main
from trustvision.errors import TrustVisionError

SEEN: list[dict] = []


@register_check("test-options")
class _WithOptions(Check):
    default, order = False, 2000
    options = {
        "k": Option(int, 3, "how many", min=1, max=50),
        "scale": Option(float, 1.0, "a factor"),
        "names": Option(list, ["a", "b"], "some names", choices=("a", "b", "c")),
        "verbose": Option(bool, False, "print more", affects_results=False),
    }
    metrics = {
        "Top-k share": Metric("higher", "share of the top {k} classes in the probability mass."),
        "Spread ({name})": Metric("lower", "spread of class {name}.", group="spread"),
        "Folded": Metric(None, "a diagnostic.", fold_into="Top-k share", note_format="f = {:.1f}"),
    }

    def run(self, ctx):
        SEEN.append({"k": ctx.option("k"), "scale": ctx.option("scale"), "names": ctx.option("names"),
                     "verbose": ctx.option("verbose"), "n_bins": ctx.option("n_bins")})
        probs, _ = ctx.predict("test")
        share = float(probs.topk(min(ctx.option("k"), probs.shape[1]), 1).values.sum(1).mean())
        return CheckResult(data={"share": share}, notes={"Top-k share": "note here"},
                           metrics={"Top-k share": share * ctx.option("scale"), "Spread (a)": 0.1,
                                    "Spread (b)": 0.2, "Folded": 2.0})


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()


def test_option_parsing_and_validation():
    o = _WithOptions.options
    assert o["k"].parse("7", "t.k") == 7 and o["scale"].parse("0.5", "t.scale") == 0.5
    assert o["names"].parse("a, c", "t.names") == ["a", "c"] and o["verbose"].parse("yes", "t.v") is True
    for key, bad, words in [("k", "abc", "takes a int"), ("k", "0", ">= 1"), ("k", "51", "<= 50"),
                            ("k", 2.5, "takes a int"), ("scale", "nan", "takes a float"),
                            ("names", "a,z", "does not accept 'z'"), ("verbose", "maybe", "takes a bool")]:
        with pytest.raises(TrustVisionError, match=words):
            o[key].parse(bad, f"test-options.{key}")


def test_resolve_check_options_defaults_overrides_and_errors():
    cls = audit.get_check("test-options")
    got = resolve_check_options([cls], {"test-options.k": "5", "test-options": {"scale": 2}})
    assert got == {"test-options": {"k": 5, "scale": 2.0, "names": ["a", "b"], "verbose": False}}
    with pytest.raises(TrustVisionError, match="has no option 'kk'.*its options: k, names, scale, verbose"):
        resolve_check_options([cls], {"test-options.kk": 1})
    with pytest.raises(TrustVisionError, match="unknown check 'test-optons'.*did you mean 'test-options'"):
        resolve_check_options([cls], {"test-optons.k": 1})
    with pytest.raises(TrustVisionError, match="CHECK.KEY"):
        resolve_check_options([cls], {"k": 1})


def test_options_reach_the_check_and_the_fingerprint(tmp_path, tiny_model, toy_splits):
    res = audit.run({"t": tiny_model}, toy_splits, checks="test-options", out=tmp_path)
    assert SEEN == [{"k": 3, "scale": 1.0, "names": ["a", "b"], "verbose": False, "n_bins": 15}]
    rec = res.records("t")["test-options"]
    assert rec["options"] == {"k": 3, "scale": 1.0, "names": ["a", "b"], "verbose": False}
    # an option that does not affect results reuses the stored record; one that does recomputes
    audit.run({"t": tiny_model}, toy_splits, checks="test-options", out=tmp_path,
              options={"test-options.verbose": True})
    assert len(SEEN) == 1
    res = audit.run({"t": tiny_model}, toy_splits, checks="test-options", out=tmp_path,
                    options={"test-options.k": 1, "n_bins": 10})
    assert SEEN[-1]["k"] == 1 and SEEN[-1]["n_bins"] == 10 and len(SEEN) == 2
    assert res.metrics["t"]["Top-k share"] == pytest.approx(res.records()["test-options"]["data"]["share"])


def test_declared_metrics_are_stored_and_drive_the_report(tmp_path, tiny_model, toy_splits):
    from trustvision.report import summary_table

    res = audit.run({"t": tiny_model}, toy_splits, checks=["accuracy", "calibration", "test-options"],
                    out=tmp_path, options={"test-options.k": 2})
    r = json.loads((tmp_path / "results.json").read_text())
    meta = r["metrics"]
    assert meta["Accuracy"]["better"] == "higher" and meta["ECE"]["better"] == "lower"
    assert "15 equal-width bins" in meta["ECE"]["legend"]
    assert meta["Top-k share"]["legend"] == "share of the top 2 classes in the probability mass."
    assert meta["Spread (a)"]["wildcard"] == "a" and meta["Spread (b)"]["legend"] == "spread of class b."
    assert meta["Temperature"]["fold_into"] == "ECE after TS"
    spec = {c["name"]: c for c in r["checks"]}["test-options"]
    assert spec["options"]["k"] == 2 and spec["option_types"]["k"]["type"] == "int"
    assert spec["metrics"]["Top-k share"]["better"] == "higher"

    t = summary_table(r)
    headers = [c["header"] for c in t["columns"]]
    assert headers == ["Accuracy", "ECE", "ECE after TS", "Top-k share", "Spread (a)", "Spread (b)"]
    legend = dict(t["legend"])
    assert legend["Spread (a / b)"].startswith("↓ lower is better")  # one entry for the group
    assert legend["Top-k share"].endswith("A diagnostic.")  # the folded metric's legend is appended
    cells = t["rows"][0]["cells"]
    assert cells[headers.index("Top-k share")]["note"] == "f = 2.0, note here"
    assert cells[headers.index("ECE after TS")]["note"].startswith("T = ")
    html = (tmp_path / "report.html").read_text()
    assert "Spread (a / b)" in html and "note here" in html
    assert res.results["metrics"] == meta


def test_report_imports_no_layer():
    code = ("import sys, trustvision.report\n"
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['trustvision', 'audit'], ['trustvision', "
            "'evaluate'], ['trustvision', 'explain'], ['trustvision', 'models'], ['trustvision', 'data'])]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the Python entry point ------------------------------------------------------------------------

class _Plain(nn.Module):
    """A plain torch module (no trustvision base class) reading the class pixel of the toy data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.zero_()
            for k in range(3):
                self.lin.weight[k, k] = 4.0

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_run_accepts_a_plain_module_and_torch_datasets(tiny_model, toy_splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = toy_splits["test"].tensors()
    ref = audit.run({"t": tiny_model}, {"test": toy_splits["test"]}, checks="accuracy,calibration")
    expected = ref.metrics["t"]
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=7), (x, y)):
        res = audit.run(_Plain(), data, checks="accuracy,calibration")
        (name,) = res.model_names
        assert res.metrics[name] == pytest.approx(expected)
        assert res.results["datasets"][0]["classes"] == ["0", "1", "2"]
        assert res.out_dir is None and res.report_path is None
        png = res.figure(name, "calibration", "reliability")
        assert png.startswith(b"\x89PNG")
    assert list(tmp_path.iterdir()) == []  # nothing written without out


def test_run_with_out_writes_report_and_class_names(tiny_model, toy_splits, tmp_path):
    x, y = toy_splits["test"].tensors()
    res = audit.run(_Plain(), TensorDataset(x, y), checks="accuracy", out=tmp_path / "rep",
                    classes=["a", "b", "c"])
    assert (tmp_path / "rep" / "report.html").is_file() and res.results_path.is_file()
    assert res.records()["accuracy"]["data"]["classes"] == ["a", "b", "c"]
    assert res.figure(res.model_names[0], "accuracy", "confusion_matrix").startswith(b"\x89PNG")


def test_run_rejects_bad_input(tiny_model, toy_splits):
    x, y = toy_splits["test"].tensors()
    with pytest.raises(TrustVisionError, match=r"\[0, 1\]"):
        audit.run(_Plain(), TensorDataset(x * 255, y), checks="accuracy")
    with pytest.raises(TrustVisionError, match="unknown audit option 'explain_n'"):
        audit.run(tiny_model, toy_splits, checks="accuracy", options={"explain_n": 3})
    with pytest.raises(TrustVisionError, match="n_max"):
        audit.run(tiny_model, toy_splits, checks="accuracy", options={"n_max": 0})
    with pytest.raises(TrustVisionError, match="cannot audit a int"):
        audit.run(3, toy_splits, checks="accuracy")


# -- the command line ------------------------------------------------------------------------------

def test_cli_options_list_and_errors(tmp_path, capsys):
    assert main(["audit", "--list-checks"]) == 0
    out = capsys.readouterr().out
    assert "--option explanations.n=<int>" in out and "--option ood.sets=<list>" in out
    base = ["audit", "--model", "zoo:small-cnn-digits", "--out", str(tmp_path), "--no-progress", "--device", "cpu",
            "--checks", "accuracy"]
    for extra, words in [(["--option", "explanations.n=abc"], "takes a int"),
                         (["--option", "nope.k=1"], "unknown check 'nope'"),
                         (["--option", "accuracy.k=1"], "has no option 'k'"),
                         (["--option", "explanations"], "CHECK.KEY=VALUE")]:
        assert main(base + extra) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_cli_records_every_parameter(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["audit", "--model", "zoo:small-cnn-digits", "--out", str(out), "--no-progress", "--device", "cpu",
            "--checks", "accuracy,calibration", "--seed", "3", "--n-bins", "10", "--n-max", "50",
            "-O", "ood.n=20"]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    cmd = r["command"]
    for part in ("--model zoo:small-cnn-digits", "--data digits", f"--out {out}", "--checks accuracy,calibration",
                 "--seed 3", "--n-bins 10", "--n-max 50", "--option ood.n=20", "--device cpu", "--no-progress"):
        assert part in cmd, (part, cmd)
    assert r["seed"] == 3 and r["options"]["n_bins"] == 10
    assert r["models"][0]["checks"]["calibration"]["data"]["n_bins"] == 10


def test_rerun_with_fewer_checks_keeps_the_others(tmp_path, tiny_model, toy_splits):
    audit.run({"t": tiny_model}, toy_splits, checks="accuracy,calibration", out=tmp_path)
    res = audit.run({"t": tiny_model}, toy_splits, checks="accuracy", out=tmp_path)
    recs = res.records("t")
    assert list(recs) == ["accuracy", "calibration"] and recs["calibration"]["kept"] is True
    assert [c["name"] for c in res.results["checks"]] == ["accuracy", "calibration"]
    assert "ECE" in res.metrics["t"]
    assert "Calibration" in (tmp_path / "report.html").read_text()
    # a stored check no longer valid for these options is not kept
    res = audit.run({"t": tiny_model}, toy_splits, checks="accuracy", out=tmp_path, options={"n_bins": 5})
    assert list(res.records("t")) == ["accuracy"]


def test_conditions_flag_pathological_values(tmp_path, tiny_cls, toy_splits):
    weak = tiny_cls(strength=0.0)  # constant logits: chance accuracy, no calibration signal
    res = audit.run({"weak": weak}, toy_splits, checks="accuracy,calibration", out=tmp_path)
    flags = {(f["check"], f["name"]): f for f in res.results["flags"]}
    acc = flags[("accuracy", "accuracy above chance")]
    assert acc["metric"] == "Accuracy" and "near chance" in acc["reason"]
    conds = res.records("weak")["accuracy"]["conditions"]
    assert conds == [{"name": "accuracy above chance", "status": "warn", "reason": acc["reason"], "metric": "Accuracy"}]
    good = audit.run({"good": tiny_cls()}, toy_splits, checks="accuracy")
    assert good.results["flags"] == [] and good.records()["accuracy"]["conditions"][0]["status"] == "pass"
    html = (tmp_path / "report.html").read_text()
    assert "near chance" in html and 'class="num flag-warn"' in html


def test_exports_csv_and_notebook_html(tmp_path, tiny_model, toy_splits):
    import csv
    import io

    res = audit.run({"t": tiny_model}, toy_splits, checks="accuracy,calibration", out=tmp_path)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert [r["model"] for r in rows] == ["t"]
    assert float(rows[0]["Accuracy"]) == res.metrics["t"]["Accuracy"]  # full precision, not the 4 shown
    assert float(rows[0]["ECE"]) == res.metrics["t"]["ECE"]
    assert res.summary_csv() == (tmp_path / "summary.csv").read_text()
    html = res._repr_html_()
    assert "<table>" in html and f"{res.metrics['t']['Accuracy']:.4f}" in html and "ECE" in html
    assert float(rows[0]["Temperature"]) == res.metrics["t"]["Temperature"]  # folded in HTML, a column here
