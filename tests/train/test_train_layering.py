"""trustvision.train imports only data, models, _utils, errors and itself; the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_models_layering import imported_modules  # noqa: E402


def test_train_imports_only_earlier_layers():
    allowed = ("_utils", "errors", "data", "models", "train")
    # the one exception: `python -m trustvision.train.distributed` hands over to the command line,
    # looked up by name at run time (importlib), never imported by the training code itself
    run_time = {("distributed.py", "trustvision.__main__")}
    for name, mods in imported_modules("train").items():
        bad = {m for m in mods if m.split(".")[1] not in allowed and (name, m) not in run_time}
        assert not bad, (name, bad)
    assert "trustvision.cli" not in imported_modules("train")["distributed.py"]


def _run(*args):
    env = dict(os.environ, COLUMNS="120", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_python_dash_m_trustvision():
    proc = _run("trustvision", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "audit" in proc.stdout
    proc = _run("trustvision", "train", "--data", "digits", "--epochs", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: epochs must be a whole number")


def test_train_distributed_module_is_the_train_command():
    proc = _run("trustvision.train.distributed", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--batch-size" in proc.stdout


def test_fit_is_split_into_helpers():
    from trustvision.train import loop

    for helper in ("_train_one_epoch", "_save_state", "_resume"):
        assert callable(getattr(loop, helper))


@pytest.mark.slow
def test_torchrun_dash_m_trustvision_train(tmp_path):
    """`torchrun -m trustvision train` (via trustvision/__main__.py) trains data-parallel."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), "-m", "trustvision", "train", "--model", "small-cnn", "--data", "digits",
           "--epochs", "1", "-b", "64", "--device", "cpu", "--no-progress", "--out", "run"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = json.loads((tmp_path / "run" / "results.json").read_text())["extra"]
    assert extra["distributed"]["world_size"] == 2 and extra["distributed"]["param_divergence"] == 0
