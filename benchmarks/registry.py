"""The benchmark registry: a name -> function returning a :class:`Workload`.

Add a benchmark by creating ``benchmarks/bench_<topic>.py`` with::

    from registry import Workload, register

    @register("my-method:small-cnn-digits")
    def my_method(device):
        ...  # set up (load model, data) -- not timed
        return Workload(run=lambda: step(), images=256)

``run()`` processes ``images`` images once; the runner warms it up, times repeated calls and
measures the peak memory the calls need beyond what the set-up already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Workload", "register", "BENCHMARKS"]


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
