"""Multi-process (DistributedDataParallel) support for :func:`trustvision.train.fit`.

There is one training loop: :func:`trustvision.train.fit` becomes data-parallel by itself when
the process was started by ``torchrun`` (``WORLD_SIZE > 1``) or a process group is already
initialised. For example, on 4 GPUs (or 4 CPU processes with ``--device cpu``, gloo backend)::

    torchrun --nproc_per_node 4 -m trustvision train --model ibinn-small --data digits \\
        --device cuda --epochs 40 --out runs/ibinn-ddp

(``-m trustvision.cli train`` works the same.)

This module holds the small helpers the loop uses: :func:`setup` joins the process group from
torchrun's environment (gloo on the CPU, nccl on CUDA; ``--device cuda`` becomes
``cuda:LOCAL_RANK``), :func:`shard_order` gives every rank its part of each epoch's permutation,
and :func:`rank` / :func:`world_size` / :func:`shutdown` for callers such as the CLI.
``python -m trustvision.train.distributed ARGS`` is an alias of ``trustvision train ARGS``; it
goes through :mod:`trustvision.__main__`, looked up at run time, since the training layer does not
import the command line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trustvision.errors import TrustVisionError

__all__ = ["DistInfo", "setup", "shard_order", "rank", "world_size", "is_launched", "shutdown", "main"]


@dataclass
class DistInfo:
    """This process's place in the job: ``rank``, ``world_size``, ``local_rank``, ``backend``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str


def is_launched() -> bool:
    """True when this process is one of several (torchrun's ``WORLD_SIZE > 1``, or a live group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size() -> int:
    """Number of processes of the job (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def setup(device: str | torch.device = "cpu") -> tuple[DistInfo | None, torch.device]:
    """Join the job's process group if this process is one of several; returns ``(info, device)``.

    Returns ``(None, device)`` for a single process. Otherwise initialises the default process
    group from torchrun's environment when it is not initialised yet (nccl for a CUDA ``device``,
    else gloo), maps ``"cuda"`` to ``cuda:LOCAL_RANK`` (and makes it the current CUDA device) and
    returns this rank's :class:`DistInfo` and device. The group stays up (a later ``fit`` call
    reuses it); :func:`shutdown` ends it.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if not is_launched():
        return None, dev
    if not dist.is_available():
        raise TrustVisionError("this torch build has no torch.distributed; run a single process")
    if dev.type not in ("cpu", "cuda"):
        raise TrustVisionError(f"multi-process training runs on cpu or cuda, not {dev.type}; "
                               "use --device cpu or --device cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrustVisionError("CUDA is not available on this machine; use --device cpu")
        if dev.index is None:
            if local >= torch.cuda.device_count():
                raise TrustVisionError(
                    f"process {local} of this node has no GPU ({torch.cuda.device_count()} CUDA "
                    f"devices); use torchrun --nproc_per_node {torch.cuda.device_count()}")
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
            raise TrustVisionError("WORLD_SIZE > 1 but no RANK/MASTER_ADDR in the environment; "
                                   "launch multi-process training with torchrun --nproc_per_node N")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", **kw)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))
    return info, dev


def shard_order(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's indices of an epoch's permutation ``order``, in the order it trains on them.

    ``batch_size`` is the global batch (a multiple of ``world_size``). Global batch ``s`` is
    ``order[s*B:(s+1)*B]``; rank ``r`` takes its ``r``-th equal part, so one step of all ranks
    together covers exactly global batch ``s`` (with averaged gradients this is the step a single
    process would take). ``order`` is first cut to a multiple of ``world_size`` and, when the
    last global batch would give each rank a single sample (which breaks BatchNorm), that batch
    is dropped. Batching the result by ``batch_size // world_size`` gives this rank's batches;
    every rank gets the same number of them. With ``world_size == 1`` this only drops a final
    batch of one.
    """
    n = len(order) - len(order) % world_size
    if n % batch_size == world_size and n > world_size:
        n -= world_size
    order = order[:n]
    full = n - n % batch_size
    local = batch_size // world_size
    head = order[:full].view(-1, world_size, local)[:, rank].reshape(-1)
    tail = order[full:]
    part = len(tail) // world_size
    return torch.cat([head, tail[rank * part:(rank + 1) * part]])


def shutdown() -> None:
    """Destroy the default process group if there is one (call once at the end of the program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m trustvision.train.distributed ARGS`` = ``trustvision train ARGS``."""
    import importlib

    entry = importlib.import_module("trustvision.__main__")  # the top layer, found at run time
    return entry.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
