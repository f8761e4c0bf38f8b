"""DDP training under torchrun: 2 CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"

WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from trustvision import data, models
    from trustvision.data import TensorImageDataset
    from trustvision.train.distributed import fit_distributed, init_from_env

    torch.set_num_threads(1)
    out = sys.argv[1]
    info = init_from_env(backend="gloo", device="cpu")
    full = data.load("digits", split="train")
    x, y = full.tensors()
    ds = TensorImageDataset(x[:96], y[:96], full.classes, "digits", "train")
    torch.manual_seed(100 + info.rank)  # different init per rank: DDP must align them
    net = models.create("ibinn-small", num_classes=10, in_chans=1, image_size=8,
                        widths=(8, 8, 8), fc_width=16, learn_weights=True)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    res = fit_distributed(net, ds, epochs=2, lr=1e-2, batch_size=32, seed=0, info=info,
                          grad_clip=8.0, test_set=ds, out=out + "/ckpt", log=False)
    torch.save(net.state_dict(), f"{out}/rank{info.rank}.pt")
    changed = max(float((net.state_dict()[k].float() - v.float()).abs().max()) for k, v in init.items())
    json.dump({**res.to_dict(), "changed": changed}, open(f"{out}/rank{info.rank}.json", "w"))
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_end_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == 2 and len(r0["losses"]) == 2
    assert r0["param_divergence"] == 0.0 and r1["param_divergence"] == 0.0  # lock-step, not just synced at the end
    assert r0["changed"] > 1e-3  # it trained
    assert r0["losses"] == r1["losses"] and r0["test_accuracy"] == r1["test_accuracy"]
    assert (tmp_path / "ckpt" / "config.json").exists()
    from trustvision import models

    back = models.load(tmp_path / "ckpt")
    assert torch.equal(back.state_dict()["gmm.mu"], a["gmm.mu"])


@pytest.mark.slow
def test_torchrun_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "trustvision.train.distributed",
           "--model", "ibinn-small", "--data", "digits", "--epochs", "2", "--lr", "3e-3",
           "--beta", "2", "--clip-grad", "8", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("test accuracy"))
    assert float(line.split()[2].rstrip(";")) > 0.5 and "2 processes" in line
    from trustvision import models

    net = models.load(tmp_path / "run")
    assert net.beta == 2.0 and net.tv_config["metrics"]["test_accuracy"] > 0.5
