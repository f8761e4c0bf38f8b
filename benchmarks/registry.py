"""The benchmark registry: a name -> function returning a :class:`Workload`.

Add a benchmark by creating ``benchmarks/bench_<topic>.py`` with::

    from registry import Workload, register

    @register("my-method:small-cnn-digits")
    def my_method(device):
        ...  # set up (load model, data) -- not timed
        return Workload(run=lambda: step(), images=256)

``run()`` processes ``images`` images once; the runner warms it up, times repeated calls and
measures the peak memory the calls need beyond what the set-up already holds.

Helpers shared by the ``bench_*`` modules: :func:`sync` (wait for the device before reading a
clock), :func:`zoo_names`, :func:`zoo_workload` (a zoo model with a seeded random batch) and
:func:`training_run` (one optimiser step), :class:`CallRecorder` and :func:`replay_seconds` (the
bare model replaying the very calls a run made: the model's own limit for that run),
:func:`best_seconds` (the best of n timed calls) and :func:`paired` (a run and its limit timed back
to back in alternating rounds).
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Workload", "register", "BENCHMARKS", "sync", "emitter", "zoo_names", "zoo_workload", "training_run",
           "rss_kb", "reset_hwm"]


@dataclass
class Workload:
    """One timed unit of work: ``run()`` handles ``images`` images."""

    run: Callable[[], object]
    images: int
    warmup: int = 2
    min_seconds: float = 1.0
    max_runs: int = 200


#: name -> function(device: torch.device) -> Workload | None (None: skipped, e.g. zoo not built)
BENCHMARKS: dict[str, Callable[[torch.device], Workload | None]] = {}


def register(name: str):
    def deco(fn):
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = fn
        return fn

    return deco


def emitter(out: list) -> Callable[[dict], None]:
    """A function that appends a result row to ``out`` and prints it as one JSON line (the
    ``bench_*`` scripts' raw output, before their tables)."""
    import json

    def emit(row: dict) -> None:
        out.append(row)
        print(json.dumps(row), flush=True)

    return emit


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU), so a clock read is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zoo_names() -> list[str]:
    """The zoo entries that are built (without the ``zoo:`` prefix); [] when there are none."""
    try:
        from trustvision.models.checkpoint import list_zoo

        return [e["name"].split(":", 1)[1] for e in list_zoo()]
    except Exception:  # zoo not built or models not importable
        return []


def zoo_workload(name: str, batch: int, train: bool, make_run: Callable[..., Callable[[], object]]):
    """A benchmark function for zoo model ``name``: loads it on the device (train or eval mode),
    draws a seeded random batch ``x`` (batch, C, H, W) in [0, 1] with labels ``y``, and times
    ``make_run(model, x, y)``; skipped (None) when the entry is not built."""

    def bench(device: torch.device) -> Workload | None:
        if name not in zoo_names():
            return None
        from trustvision import models

        model = models.load(f"zoo:{name}").to(device).train(train)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, model.in_chans, *model.image_size, generator=g).to(device)
        y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
        return Workload(run=make_run(model, x, y), images=batch)

    return bench


def training_run(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """``run()`` for one training step: ``loss_fn()``, zero the gradients, backward, ``opt.step()``."""

    def run() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def rss_kb(field: str) -> int | None:
    """A memory field of /proc/self/status in KB (``VmRSS``, ``VmHWM``), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class CallRecorder(torch.nn.Module):
    """The model, recording every call it is given: its rows (``rows``), the number of calls per
    (rows, whether a gradient flows back) (``shapes``) and, while they fit ``keep_bytes``,
    ``calls``: a copy of the input and whether a gradient flows back to it (None once a call did
    not fit: no replay; ``keep_bytes=0`` keeps no copy). The model's ``norm_mean`` / ``norm_std`` are passed on
    (SIS's "mean" mask reads them)."""

    def __init__(self, net: torch.nn.Module, keep_bytes: int = 4 << 30):
        super().__init__()
        self.net, self.keep_bytes = net, keep_bytes
        for k in ("norm_mean", "norm_std"):
            if isinstance(getattr(net, k, None), torch.Tensor):
                setattr(self, k, getattr(net, k))
        self.clear()

    def clear(self) -> None:
        self.rows: list[int] = []
        self.shapes: collections.Counter = collections.Counter()
        self.calls: list[tuple[torch.Tensor, bool]] | None = []
        self.left = self.keep_bytes

    def forward(self, x: torch.Tensor):
        self.rows.append(x.shape[0])
        grad = torch.is_grad_enabled() and x.requires_grad
        self.shapes[(x.shape[0], grad)] += 1
        size = x.numel() * x.element_size()
        if self.calls is not None and size <= self.left:
            self.calls.append((x.detach().clone(), grad))
            self.left -= size
        else:
            self.calls = None
        return self.net(x)


def replay_seconds(net: torch.nn.Module, calls, device, repeat: int = 3, warm: bool = True) -> float | None:
    """Best of ``repeat`` replays of recorded ``calls`` on the bare model (the same inputs, batch
    shapes and order): a forward, or where the run needed a gradient a forward+backward of a class
    probability w.r.t. the input. None without calls. ``warm``: one untimed replay first."""
    if not calls:
        return None

    def run():
        for z, grad in calls:
            if grad:
                zz = z.detach().requires_grad_(True)
                torch.autograd.grad(torch.softmax(net(zz), 1)[:, 0].sum(), zz)
            else:
                with torch.no_grad():
                    net(z)

    return best_seconds(run, device, repeat, warm)


def best_seconds(fn, device: torch.device, repeat: int = 3, warm: bool = True) -> float:
    """The best of ``repeat`` timed calls of ``fn`` (the device synchronised around each);
    ``warm``: one untimed call first."""
    if warm:
        fn()
        sync(device)
    best = math.inf
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def paired(run, limit, device, rounds: int = 21, budget: float = 6.0) -> tuple[float, float, float, int]:
    """``run`` and its ``limit`` timed back to back in rounds (at most ``rounds``, fewer once
    ``budget`` seconds have passed; ``limit`` returns its seconds; the two alternate which goes
    first).
    Returns the best run, the best limit, the median of the rounds' limit / run ratios (a
    neighbour's load on a shared machine changes over seconds and hits both sides of a round
    alike) and the number of rounds."""
    runs, limits, start = [], [], time.perf_counter()

    def timed_run() -> float:
        return best_seconds(run, device, repeat=1, warm=False)

    while len(runs) < rounds and (not runs or time.perf_counter() - start < budget):
        if len(runs) % 2:  # the limit first in every other round: neither side always runs second
            limits.append(limit())
            runs.append(timed_run())
        else:
            runs.append(timed_run())
            limits.append(limit())
    ratios = [lim / r for lim, r in zip(limits, runs)]
    return min(runs), min(limits), statistics.median(ratios), len(runs)
