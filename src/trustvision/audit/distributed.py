"""Sharding per-image work over Ray actors (``trustvision audit --ray auto|ADDRESS``).

A :class:`RayPool` starts ``workers`` actors that each load the audited model once from its
checkpoint path or ``zoo:NAME`` (never through Ray's object store). The work that goes to them
is units of :mod:`trustvision._utils.parallel` (:meth:`RayPool.map`): chunks of images explained
by a registered method (the ``explanations`` check's heatmaps and SAGs, through
:func:`trustvision.explain.explain_chunk`), the ``adversarial`` check's FGSM / PGD
sweeps (one batch at one eps), the ``corruptions`` check (one batch under one corruption and
severity), the ``overinterpretation`` check's SIS / BGSIS backward selections (one chunk of
images) and the ``concepts`` check's XNN heatmaps. Every unit's randomness is derived from (seed,
the image) and never from a worker's state (PGD's random start is seeded per image; corruptions
per image index; AutoAttack, whose randomness follows the batch, runs in the driver), and the
results are merged in order, so the merged result is the single-process one: bit-identical on
the CPU.

Fault tolerance: the actors are created with ``max_restarts=-1`` and ``max_task_retries=-1``, so
an actor that dies (``ray.kill``, a lost node) is restarted, loads the model again and its
unfinished chunk is retried.

Pitfalls handled (reference notes, section 8): batches arrive as read-only zero-copy numpy arrays,
copied before torch touches them; each actor asks for ``num_cpus=1`` (and ``gpus_per_worker``), and
the pool never starts more actors than the cluster has CPUs for, so actors cannot take every CPU
and hang the driver; the only constructor arguments are strings (the model source, the device).

Ray is an optional extra: ``pip install "trustvision[ray]"``; without it ``--ray`` is a one-line
error.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from trustvision.errors import TrustVisionError

__all__ = ["RayPool", "connect", "require_ray"]


def require_ray():
    try:
        import ray
    except ImportError:
        raise TrustVisionError('--ray needs Ray: pip install "trustvision[ray]"') from None
    return ray


class _Worker:
    """One actor: the model loaded once; runs units of work on it."""

    def __init__(self, source: str, device: str, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))
        from trustvision import models

        self.device = device
        self.model = models.load(source).to(device).eval()

    def call(self, fn: Callable, args: tuple, kw: dict) -> Any:
        """``fn(model, *args, **kw)`` (a unit of :mod:`trustvision._utils.parallel`): array
        arguments become tensors on this actor's device (copied: Ray's arrays are read-only), and
        tensors in the result come back on the CPU."""
        return _to_cpu(fn(self.model, *_from_wire(args, self.device), **kw))

    def ping(self) -> int:
        import os

        return os.getpid()

def _to_wire(args: tuple) -> tuple:
    return tuple(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a for a in args)


def _from_wire(args: tuple, device: str) -> tuple:
    import numpy as np

    return tuple(torch.from_numpy(a.copy()).to(device) if isinstance(a, np.ndarray) else a for a in args)


def _to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, (list, tuple)):
        return type(out)(_to_cpu(v) for v in out)
    if isinstance(out, dict):
        return {k: _to_cpu(v) for k, v in out.items()}
    return out


def connect(address: str = "auto", workers: int | None = None, gpus_per_worker: float = 0.0,
            sources: Sequence[str] = ()) -> int:
    """Join (or start) the Ray cluster and check what the pools will ask of it: every model has a
    source a worker can load, and the cluster has a CPU per worker (and the GPUs). Returns the
    number of workers a pool will start. One-line errors for what the user can fix."""
    ray = require_ray()
    for s in sources:
        if not s:
            raise TrustVisionError("--ray needs models given as a checkpoint path or zoo:NAME (each worker loads "
                                   "the model itself); save the model with trustvision.models.save first")
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False}
        try:
            ray.init(**({} if address in (None, "", "auto") else {"address": address}), **kw)
        except Exception as exc:  # a wrong address, a cluster that is down
            raise TrustVisionError(f"cannot connect to the Ray cluster at {address!r} "
                                   f"({' '.join(str(exc).split())[:160]}); check --ray") from None
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
    n = int(workers) if workers else max(1, cpus)
    if n > cpus:
        raise TrustVisionError(f"--ray-workers {n} is more than the cluster's {cpus} CPUs (each worker takes "
                               "one); lower it")
    if gpus_per_worker and n * float(gpus_per_worker) > gpus:
        raise TrustVisionError(f"--ray-gpus-per-worker {gpus_per_worker} x {n} workers is more than the cluster's "
                               f"{gpus:g} GPUs; lower one of them")
    return n


class RayPool:
    """``workers`` Ray actors holding the model of ``source`` (a checkpoint path or zoo:NAME). The
    pool is what the checks take as ``executor``: its :meth:`map` runs their units
    (:func:`trustvision._utils.parallel.run_units`, :func:`trustvision.explain.explain_images`).

    Args:
        source: what :func:`trustvision.models.load` takes.
        address: "auto" (join the cluster of ``RAY_ADDRESS`` or start a local one) or an address.
        workers: actors (default: one per CPU of the cluster, at least 1).
        gpus_per_worker: GPUs per actor (0: CPU actors); the actors then run on ``cuda``.
        threads: torch threads per actor.
    """

    def __init__(self, source: str, address: str = "auto", workers: int | None = None,
                 gpus_per_worker: float = 0.0, threads: int = 1) -> None:
        ray = require_ray()
        n = connect(address, workers, gpus_per_worker, [source])
        device = "cuda" if gpus_per_worker else "cpu"
        remote = ray.remote(num_cpus=1, num_gpus=float(gpus_per_worker), max_restarts=-1,
                            max_task_retries=-1)(_Worker)
        self.source = source
        self.actors = [remote.remote(source, device, threads) for _ in range(n)]
        ray.get([a.ping.remote() for a in self.actors])  # fail here, not mid-check, if a model cannot load

    @property
    def workers(self) -> int:
        return len(self.actors)

    def map(self, fn: Callable, calls: Sequence[tuple[tuple, dict]]) -> Iterator[Any]:
        """``fn(model, *args, **kw)`` for every ``(args, kw)`` of ``calls``, on the actors
        round-robin (all submitted at once), yielded in order (``fn``: a module-level function,
        which Ray sends by reference)."""
        ray = require_ray()
        refs = [self.actors[i % len(self.actors)].call.remote(fn, _to_wire(tuple(args)), dict(kw))
                for i, (args, kw) in enumerate(calls)]
        for ref in refs:
            yield ray.get(ref)

    def close(self) -> None:
        ray = require_ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
