"""DDP through the one training loop: `torchrun -m trustvision.cli train` on 2 CPU processes (gloo).

Checked: both ranks end with bit-identical weights (and ran in lock-step), rank 0's checkpoint
loads and holds those weights, each rank trained on its own disjoint half of every global batch of
the epoch's seeded permutation, only rank 0 prints and writes, and -- for a model without
BatchNorm or input noise -- 2 processes with global batch B give the weights of 1 process with
batch B.
"""

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

from trustvision.train.distributed import shard_order

SRC = Path(__file__).resolve().parents[2] / "src"

# Runs `trustvision train` through cli.main, recording (test-only wrappers) the index order each
# rank trains on and its final weights.
WORKER = textwrap.dedent(
    """
    import json, sys, torch
    import trustvision.train.loop as loop
    import trustvision.train.recipe as recipe
    from trustvision import cli

    dump = sys.argv[1]
    orders = []
    real_iter, real_fit = loop.iter_batches, recipe.fit

    def iter_batches(dataset, batch_size, device="cpu", order=None):
        if order is not None:
            orders.append({"batch_size": batch_size, "order": order.tolist()})
        return real_iter(dataset, batch_size, device, order)

    def fit(model, *args, **kw):
        res = real_fit(model, *args, **kw)
        rank = torch.distributed.get_rank()
        torch.save(model.state_dict(), f"{dump}/rank{rank}.pt")
        json.dump({"orders": orders, "extra": res.extra, "test_accuracy": res.test_accuracy,
                   "losses": [h.train_loss for h in res.history]}, open(f"{dump}/rank{rank}.json", "w"))
        return res

    loop.iter_batches, recipe.fit = iter_batches, fit
    sys.exit(cli.main(sys.argv[2:]))
    """
)

# A NaN on rank 1 only (its weights poisoned after epoch 1) must stop both ranks with the message.
NAN_WORKER = textwrap.dedent(
    """
    import sys, torch
    from trustvision import data, models
    from trustvision.errors import TrustVisionError
    from trustvision.train import fit

    torch.set_num_threads(1)
    ds = data.load("digits", split="train")
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8, widths=(4, 8))

    def poison(stats):
        if stats.epoch == 1 and torch.distributed.get_rank() == 1:
            with torch.no_grad():
                net.fc.weight.fill_(float("nan"))

    try:
        fit(net, ds, epochs=3, lr=0.01, batch_size=128, out=sys.argv[1], progress=False,
            on_epoch_end=poison)
    except TrustVisionError as exc:
        # one write per line (message and newline together), so the ranks' lines never interleave
        print(f"rank {torch.distributed.get_rank()}: {exc}\\n", end="", flush=True)
    torch.distributed.destroy_process_group()
    """
)

TRAIN = ["train", "--model", "ibinn-small", "--data", "digits", "--epochs", "1", "--lr", "3e-3",
         "-b", "64", "--seed", "3", "--clip-grad", "8", "--model-kw", "widths=8,8,8",
         "--model-kw", "fc_width=16", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("n, batch, world", [(1078, 64, 2), (100, 8, 4), (37, 9, 3), (33, 16, 2), (17, 4, 1)])
def test_shard_order_splits_every_global_batch(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard_order(order, batch, r, world) for r in range(world)]
    local = batch // world
    batches = [list(s.split(local)) for s in shards]
    assert len({len(b) for b in batches}) == 1  # every rank takes the same number of steps
    together = torch.cat([torch.cat([b[s] for b in batches]) for s in range(len(batches[0]))])
    used = len(together)
    assert torch.equal(together, order[:used])  # step s of all ranks = global batch s, in order
    assert used > n - world - batch // 2 and all(len(b[-1]) > 1 or local == 1 for b in batches)
    if world == 1:  # the single-process rule: only a final batch of one is dropped
        assert used == (n - 1 if n % batch == 1 else n)


@pytest.mark.slow
def test_torchrun_cli_ranks_identical_and_disjoint_halves(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    proc = _torchrun([str(tmp_path / "worker.py"), str(tmp_path), *TRAIN, "--out", "run"], tmp_path)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)  # BatchNorm buffers too
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["extra"]["distributed"] == {"world_size": 2, "backend": "gloo", "param_divergence": 0.0}
    assert r1["extra"] == r0["extra"]  # lock-step during training, not only synced at the end
    assert r0["losses"] == r1["losses"] and r0["test_accuracy"] == r1["test_accuracy"] > 0.5

    # each rank trained on its half of every global batch of the seeded permutation of epoch 0
    (o0,), (o1,) = r0["orders"], r1["orders"]
    assert o0["batch_size"] == o1["batch_size"] == 32
    s0, s1 = o0["order"], o1["order"]
    assert len(s0) == len(s1) == 539 and not set(s0) & set(s1) and set(s0) | set(s1) == set(range(1078))
    from trustvision.train.loop import _epoch_generator

    perm = torch.randperm(1078, generator=_epoch_generator(3, 0)).tolist()
    for s in range(0, 1078 // 64 + 1):
        assert perm[64 * s:64 * (s + 1)] == s0[32 * s:32 * (s + 1)] + s1[32 * s:32 * (s + 1)]

    # only rank 0 prints and writes; its checkpoint loads and holds the common weights
    assert sum(ln.startswith("test accuracy") for ln in proc.stdout.splitlines()) == 1
    from trustvision import models

    back = models.load(tmp_path / "run")
    state = back.state_dict()
    assert all(torch.equal(state[k], a[k]) for k in a)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["config"]["world_size"] == 2 and res["test_accuracy"] == r0["test_accuracy"]
    assert back.tv_config["metrics"]["test_accuracy"] == r0["test_accuracy"]
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.slow
def test_torchrun_module_entry_matches_single_process(tmp_path):
    """`torchrun -m trustvision.cli train` = `trustvision train` in one process (up to rounding)."""
    det = ["--model-kw", "batchnorm=false", "--model-kw", "noise=0", "--model-kw", "dequantize=0"]
    _torchrun(["-m", "trustvision.cli", *TRAIN, *det, "--out", "ddp"], tmp_path)
    from trustvision import models
    from trustvision.cli import _parse_model_kw
    from trustvision.train import build_model, train_by_name

    kw = _parse_model_kw(["widths=8,8,8", "fc_width=16", "batchnorm=false", "noise=0", "dequantize=0"])
    single, res = train_by_name("digits", "ibinn-small", epochs=1, lr=3e-3, batch_size=64, seed=3,
                                grad_clip=8.0, model_kwargs=kw, progress=False)
    ddp = models.load(tmp_path / "ddp")
    init = build_model("ibinn-small", _digits(), seed=3, **kw).state_dict()
    worst = moved = 0.0
    for k, v in single.state_dict().items():
        worst = max(worst, float((ddp.state_dict()[k] - v).abs().max()))
        moved = max(moved, float((init[k] - v).abs().max()))
    assert moved > 1e-2 and worst < 1e-4, (moved, worst)
    saved = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert saved["history"][0]["train_loss"] == pytest.approx(res.history[0].train_loss, rel=1e-4)
    assert saved["test_accuracy"] == pytest.approx(res.test_accuracy, abs=2 / 450)


def _digits():
    from trustvision import data

    return data.load("digits", split="train")


def test_launch_errors_are_one_line(monkeypatch):
    from trustvision.errors import TrustVisionError
    from trustvision.train import fit, train_by_name

    from _train_toy import TinyNet, halves

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(TrustVisionError, match=r"launch multi-process training with torchrun"):
        fit(TinyNet(), halves(16), epochs=1, lr=0.01, batch_size=8, progress=False)
    with pytest.raises(TrustVisionError, match=r"--ensemble .* without torchrun"):
        train_by_name("digits", "small-cnn", epochs=1, lr=0.01, batch_size=8, ensemble=2, progress=False)
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_nan_on_one_rank_stops_all_and_keeps_last_good_checkpoint(tmp_path):
    (tmp_path / "nan_worker.py").write_text(NAN_WORKER)
    proc = _torchrun([str(tmp_path / "nan_worker.py"), str(tmp_path / "run")], tmp_path)
    lines = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("rank "))
    assert len(lines) == 2 and lines[0][len("rank 0"):] == lines[1][len("rank 1"):]
    assert "diverged" in lines[0] and "in epoch 2 (step 1)" in lines[0] and "after epoch 1" in lines[0]
    assert str(tmp_path / "run" / "model.safetensors") in lines[0]
    from trustvision import models

    kept = models.load(tmp_path / "run")
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and kept.tv_config["diverged_in_epoch"] == 2
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in state["model"].items())
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_module_alias_is_the_train_command(capsys):
    from trustvision.train import distributed

    assert distributed.main(["--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out
    assert distributed.main(["--data", "digits", "--epochs", "0"]) == 2  # the CLI's one-line errors
    assert "error: epochs must be a whole number >= 1" in capsys.readouterr().err
