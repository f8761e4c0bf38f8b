"""`trustvision train --model ibinn-small --data digits --beta B` through the ordinary command."""

from __future__ import annotations

import json
import math

import torch

from trustvision import models
from trustvision.cli import main

BASE = ["train", "--data", "digits", "--model", "ibinn-small", "--lr", "0.003", "-b", "64",
        "--no-progress", "--model-kw", "widths=8,8,8", "--model-kw", "fc_width=32", "--clip-grad", "8"]


def test_train_ibinn_with_beta_writes_loadable_generative_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(BASE + ["--epochs", "2", "--beta", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_accuracy"] > 0.5  # chance is 0.1
    net = models.load(str(out))
    assert net.tv_config["architecture"] == "ibinn-small" and net.beta == 2.0
    assert net.tv_config["kwargs"]["beta"] == 2.0
    x = torch.rand(2, 1, 8, 8)
    assert torch.isfinite(net.bits_per_dim(x)).all()


def test_beta_inf_is_accepted_and_stored(tmp_path):
    out = tmp_path / "ce"
    assert main(BASE + ["--epochs", "1", "--beta", "inf", "--out", str(out)]) == 0
    net = models.load(str(out))
    assert math.isinf(net.beta)


def test_beta_on_feed_forward_model_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--data", "digits", "--model", "small-cnn", "--beta", "1", "--epochs", "1",
                 "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --beta applies to generative classifiers") and "\n" not in err
    code = main(BASE + ["--beta", "-1", "--epochs", "1", "--out", str(tmp_path / "y")])
    assert code == 2 and "--beta must be >= 0" in capsys.readouterr().err


def test_nan_loss_stops_with_one_line_and_keeps_last_good_state(tmp_path, capsys, monkeypatch):
    from trustvision.models.generative import IBINN
    from trustvision.train.loop import STATE_FILE

    calls = {"n": 0}
    original = IBINN.training_loss

    def flaky(self, x, y):
        loss, logits = original(self, x, y)
        calls["n"] += 1
        if calls["n"] > 20:  # digits: 17 steps per epoch -> diverges in epoch 2
            loss = loss * float("nan")
        return loss, logits

    monkeypatch.setattr(IBINN, "training_loss", flaky)
    out = tmp_path / "nan"
    assert main(BASE + ["--epochs", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training diverged") and "epoch 2" in err and "\n" not in err
    state = torch.load(out / STATE_FILE, weights_only=False)
    assert state["epoch"] == 1  # the last good epoch is kept
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
