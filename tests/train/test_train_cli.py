"""`trustvision train` end to end on digits, resume through the CLI, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from trustvision import data, models
from trustvision.cli import main
from trustvision.train import evaluate_accuracy

BASE = ["train", "--data", "digits", "--model", "small-cnn", "--lr", "0.01", "-b", "64", "--no-progress",
        "--model-kw", "widths=8,16", "--model-kw", "dropout=0.1"]


def test_train_one_epoch_writes_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(BASE + ["--epochs", "1", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert f"test accuracy {results['test_accuracy']:.4f}" in stdout
    net = models.load(str(out))
    assert net.tv_config["kwargs"] == {"widths": [8, 16], "dropout": 0.1}
    assert net.tv_config["dataset"] == "digits" and len(net.classes) == 10
    metrics = net.tv_config["metrics"]
    assert set(metrics) == {"test_accuracy", "val_accuracy"}
    # the stored figure is what the saved model really scores
    assert evaluate_accuracy(net, data.load("digits", split="test")) == pytest.approx(metrics["test_accuracy"])
    assert metrics["test_accuracy"] > 0.3  # well above chance (0.1) after one epoch


def test_cli_resume_matches_uninterrupted_run(tmp_path, capsys):
    extra = ["--input-dropout", "0.8", "--augment", "shift:1", "--seed", "3"]
    assert main(BASE + extra + ["--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(BASE + extra + ["--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(BASE + extra + ["--epochs", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(BASE + extra + ["--epochs", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = models.load(str(tmp_path / "a")).state_dict(), models.load(str(tmp_path / "b")).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["test_accuracy"] == rb["test_accuracy"] and rb["resumed_from_epoch"] == 1


def test_cli_ensemble(tmp_path):
    out = tmp_path / "ens"
    assert main(BASE + ["--epochs", "1", "--ensemble", "2", "--out", str(out)]) == 0
    net = models.load(str(out))
    assert net.tv_config["architecture"] == "ensemble" and len(net.members) == 2
    assert not torch.equal(net.members[0].fc.weight, net.members[1].fc.weight)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "digitz"], "unknown dataset 'digitz' (did you mean 'digits'?)"),
        (["--data", "digits", "--model", "small-cn"], "unknown model 'small-cn' (did you mean 'small-cnn'?)"),
        (["--data", "digits", "--input-dropout", "0"], "input dropout keep probability 0.0 is outside (0, 1]"),
        (["--data", "digits", "--input-dropout", "1.2"], "outside (0, 1]"),
        (["--data", "digits", "--epochs", "0"], "epochs must be a whole number >= 1, got 0 (--epochs)"),
        (["--data", "digits", "--lr", "0"], "(--lr)"),
        (["--data", "digits", "-b", "0"], "(--batch-size)"),
        (["--data", "digits", "--opt", "lion"], "unknown optimizer 'lion'"),
        (["--data", "digits", "--ensemble", "0"], "--ensemble"),
        (["--data", "digits", "--model-kw", "widths"], "--model-kw expects KEY=VALUE"),
        (["--data", "digits", "--model-kw", "colour=red"], "--model-kw"),
        (["--data", "digits", "--augment", "rotate"], "unknown augmentation 'rotate'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    code = main(["train", *args, "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cli_cuda_missing(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "use --device cpu" in capsys.readouterr().err
