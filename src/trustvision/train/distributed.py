"""Data-parallel training with DistributedDataParallel, launched by ``torchrun``.

Example (2 GPUs, or 2 CPU processes with the gloo backend)::

    torchrun --nproc_per_node 2 -m trustvision.train.distributed \\
        --model ibinn-small --data digits --epochs 40 --lr 2e-3 --out runs/ibinn-ddp

Every rank sees the same seeded permutation of the training set each epoch and trains on its
own shard (``order[rank::world_size]``, truncated so all ranks take the same number of steps);
``batch_size`` is the global batch, split evenly over the ranks. A model's own
``training_loss(x, y)`` runs inside the DDP wrapper, so its gradients are all-reduced too.
During training BatchNorm normalises with each rank's own batch statistics (as plain DDP does);
after the last epoch every rank re-estimates BatchNorm statistics on the full training set
(``after_training``), and rank 0's parameters and buffers are broadcast so every rank ends with
identical weights. Rank 0 saves a checkpoint after every epoch; a non-finite loss on any rank
stops all ranks with a one-line error naming the last good checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trustvision.errors import TrustVisionError

__all__ = ["DistInfo", "DistResult", "init_from_env", "fit_distributed", "main"]


@dataclass
class DistInfo:
    """This process's place in the job: ``rank``, ``world_size``, ``local_rank``, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: str


@dataclass
class DistResult:
    """Per-epoch mean training loss (over all ranks), final test accuracy and checkpoint path."""

    epochs: int
    world_size: int
    losses: list[float] = field(default_factory=list)
    test_accuracy: float | None = None
    checkpoint: str | None = None
    seconds: float = 0.0
    #: max |difference| of any parameter between ranks after training, before the final
    #: broadcast (0 when DDP kept the replicas in lock-step)
    param_divergence: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def init_from_env(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    ``backend`` defaults to nccl when CUDA is available, else gloo; ``device`` to
    ``cuda:LOCAL_RANK`` or ``cpu``. Without torchrun's variables this is a 1-process group.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = device or (f"cuda:{local}" if use_cuda else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


class _LossModule(nn.Module):
    """Routes DDP's forward through the model's ``training_loss`` (or cross-entropy)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        hook = getattr(self.model, "training_loss", None)
        if callable(hook):
            return hook(x, y)
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits


def _tensors(ds):
    if hasattr(ds, "tensors"):
        return ds.tensors()
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.as_tensor(ys)


def _sync_state(model: nn.Module) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def fit_distributed(model: nn.Module, train_set, *, epochs: int, lr: float, batch_size: int,
                    seed: int = 0, info: DistInfo | None = None, opt: str = "adam",
                    weight_decay: float = 0.0, grad_clip: float | None = None,
                    test_set=None, out: str | os.PathLike | None = None,
                    log: bool = True) -> DistResult:
    """Train ``model`` data-parallel across the ranks of the initialised process group.

    Same arguments as :func:`trustvision.train.fit` where they overlap (``batch_size`` is the
    global batch). Uses the model's ``param_groups`` / ``training_loss`` / ``after_training``
    hooks when present and a per-epoch cosine learning-rate decay.
    """
    info = info or init_from_env()
    world, rank, dev = info.world_size, info.rank, torch.device(info.device)
    if batch_size < world:
        raise TrustVisionError(f"batch size {batch_size} is smaller than the {world} processes; "
                               "raise --batch-size")
    local_bs = batch_size // world
    model.to(dev)
    _sync_state(model)  # identical start even if ranks were seeded differently
    ddp = DistributedDataParallel(_LossModule(model), device_ids=[dev.index] if dev.type == "cuda" else None)
    groups = model.param_groups(lr) if callable(getattr(model, "param_groups", None)) else [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    for g in groups:
        g["base_lr"] = g.get("lr", lr)
    if opt == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif opt in ("adam", "adamw"):
        cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=lr, weight_decay=weight_decay)
    else:
        raise TrustVisionError(f"unknown optimizer {opt!r}; use adam, adamw or sgd")
    x_all, y_all = _tensors(train_set)
    n = len(y_all)
    steps = (n // world) // local_bs or 1
    result = DistResult(epochs=epochs, world_size=world)
    out_dir = Path(out) if out is not None else None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        factor = 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)[: (n // world) * world]
        shard = order[rank::world]
        torch.manual_seed(seed * 100_003 + epoch * 1009 + rank)  # per-rank noise in the loss
        ddp.train()
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        for s in range(steps):
            idx = shard[s * local_bs: (s + 1) * local_bs]
            x, y = x_all[idx].to(dev), y_all[idx].to(dev)
            loss, _ = ddp(x, y)
            finite = torch.tensor([float(torch.isfinite(loss.detach()))], device=dev)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                where = f"; the last good checkpoint is {out_dir}" if out_dir and epoch else ""
                raise TrustVisionError(f"training diverged: the loss became non-finite in epoch "
                                       f"{epoch + 1} on some rank{where}; lower --lr or clip gradients")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            total += torch.tensor([float(loss.detach()) * len(y), len(y)], dtype=torch.float64,
                                  device=dev)
        dist.all_reduce(total)
        result.losses.append(float(total[0] / total[1]))
        if log and rank == 0:
            print(f"epoch {epoch + 1}/{epochs}  loss {result.losses[-1]:.4f}  "
                  f"({world} processes, {time.perf_counter() - t0:.1f}s)", flush=True)
        if out_dir is not None and rank == 0:
            _save(model, out_dir, train_set, result)
        dist.barrier()
    result.param_divergence = _divergence(model)
    hook = getattr(model, "after_training", None)
    if callable(hook):
        hook([(x_all[i: i + 256].to(dev), y_all[i: i + 256]) for i in range(0, n, 256)])
    _sync_state(model)
    model.eval()
    result.seconds = time.perf_counter() - t0
    if test_set is not None:
        xt, yt = _tensors(test_set)
        with torch.no_grad():
            pred = torch.cat([model(xt[i: i + 256].to(dev)).argmax(1).cpu() for i in range(0, len(yt), 256)])
        result.test_accuracy = float((pred == yt).float().mean())
    if out_dir is not None and rank == 0:
        result.checkpoint = str(_save(model, out_dir, train_set, result))
    dist.barrier()
    return result


def _divergence(model: nn.Module) -> float:
    worst = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        hi, lo = p.detach().clone(), p.detach().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        worst = torch.maximum(worst, (hi - lo).abs().max().double().cpu().view(1))
    return float(worst)


def _save(model: nn.Module, out_dir: Path, train_set, result: DistResult) -> Path:
    from trustvision import models

    metrics = {"test_accuracy": result.test_accuracy} if result.test_accuracy is not None else {}
    return models.save(model, out_dir, classes=list(getattr(train_set, "classes", []) or []) or None,
                       dataset=getattr(train_set, "name", None), metrics=metrics,
                       training={"world_size": result.world_size, "epochs_done": len(result.losses)})


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m trustvision.train.distributed --model M --data D [options]``."""
    p = argparse.ArgumentParser(description="Data-parallel training under torchrun.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--opt", default="adam")
    p.add_argument("--out", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        from trustvision import data
        from trustvision.train import build_model

        info = init_from_env(a.backend, a.device)
        train_set = data.load(a.data, split="train")
        test_set = data.load(a.data, split="test")
        kw = {} if a.beta is None else {"beta": a.beta}
        model = build_model(a.model, train_set, seed=a.seed, **kw)
        res = fit_distributed(model, train_set, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                              seed=a.seed, info=info, opt=a.opt, grad_clip=a.clip_grad,
                              test_set=test_set, out=a.out)
        if info.rank == 0:
            print(f"test accuracy {res.test_accuracy:.4f}; {res.seconds:.1f}s on {info.world_size} processes")
    except TrustVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
