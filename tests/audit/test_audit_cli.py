"""`trustvision audit` end to end on a tiny checkpoint and the embedded digits data."""

import json

import pytest
import torch

from trustvision import data, models
from trustvision.cli import main
from trustvision.evaluate import top1_accuracy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval()
    zoo = tmp_path_factory.mktemp("zoo")
    return models.save(net, zoo / "small-cnn-digits", classes=[str(i) for i in range(10)], dataset="digits")


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_audit_end_to_end_matches_direct_accuracy(tmp_path, ckpt, capsys):
    out = tmp_path / "rep"
    args = ["audit", "--model", str(ckpt), "--data", "digits", "--out", str(out), "--no-progress", "--device", "cpu",
            "--checks", "accuracy,calibration"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in stdout and "ran 2 checks, reused 0, 0 failed" in stdout
    r = json.loads((out / "results.json").read_text())
    x, y = data.load("digits", split="test").tensors()
    with torch.no_grad():
        expected = top1_accuracy(models.load(ckpt)(x), y)
    (m,) = r["models"]
    assert m["checks"]["accuracy"]["data"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert m["checks"]["accuracy"]["data"]["n"] == len(y)
    assert r["datasets"][0]["name"] == "digits" and r["command"].startswith("trustvision audit --model")
    assert "ECE" in m["metrics"] and "ECE after TS" in m["metrics"]

    assert main(args) == 0  # resume: nothing recomputed
    assert "ran 0 checks, reused 2, 0 failed" in capsys.readouterr().out


def test_default_audit_uses_digits_zoo_models(tmp_path, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("TRUSTVISION_ZOO", str(ckpt.parent))
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "--no-progress", "--n-max", "100", "--checks", "accuracy"]) == 0
    assert "report: trustvision-report/report.html" in capsys.readouterr().out
    r = json.loads((tmp_path / "trustvision-report" / "results.json").read_text())
    assert [m["name"] for m in r["models"]] == ["zoo:small-cnn-digits"]
    assert r["models"][0]["checks"]["accuracy"]["data"]["n"] == 100


def test_unknown_check_is_one_line(tmp_path, ckpt, capsys):
    assert main(["audit", "--model", str(ckpt), "--data", "digits", "--out", str(tmp_path), "--checks",
                 "accuracy,calibraton"]) == 2
    line = _one_error_line(capsys)
    assert "calibraton" in line and "trustvision audit --list-checks" in line


def test_missing_model_file_is_one_line(tmp_path, capsys):
    assert main(["audit", "--model", str(tmp_path / "nope"), "--data", "digits", "--out", str(tmp_path)]) == 2
    assert "nope" in _one_error_line(capsys)


def test_incompatible_data_is_one_line(tmp_path, ckpt, capsys):
    assert main(["audit", "--model", str(ckpt), "--data", "cifar10", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys)


def test_failing_check_exit_code_1(tmp_path, ckpt, monkeypatch, capsys):
    from trustvision.audit.checks.calibration import CalibrationCheck

    def boom(self, ctx):
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(CalibrationCheck, "run", boom)
    out = tmp_path / "rep"
    assert main(["audit", "--model", str(ckpt), "--data", "digits", "--out", str(out), "--no-progress",
                 "--checks", "accuracy,calibration"]) == 1
    assert "1 check(s) failed" in capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "errors" and r["models"][0]["checks"]["accuracy"]["status"] == "ok"
    assert "calibration exploded" in (out / "report.html").read_text()


def test_list_checks(capsys):
    assert main(["audit", "--list-checks"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[:2] == ["accuracy", "calibration"]


def test_compare_and_comma_separated_models(tmp_path, ckpt, capsys):
    out = tmp_path / "rep"
    assert main(["audit", "--model", f"{ckpt},{ckpt}", "--compare", str(ckpt), "--out", str(out), "--no-progress",
                 "--checks", "accuracy", "--n-max", "50"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert len(r["models"]) == 1 and r["models"][0]["compare"] == str(ckpt)  # duplicates collapse
    assert r["datasets"][0]["name"] == "digits"  # taken from the checkpoint's config
