"""Sharding per-image work over Ray actors (``trustvision audit --ray auto|ADDRESS``).

A :class:`RayPool` starts ``workers`` actors that each load the audited model once from its
checkpoint path or ``zoo:NAME`` (never through Ray's object store) and explain chunks of images
with a registered method (the ``explanations`` check) or attack them (the ``adversarial`` check's
FGSM / PGD sweeps; PGD's random start is seeded per image, so sharding does not change it;
AutoAttack, whose randomness follows the batch, runs in the driver). :meth:`RayPool.attribute_chunks` hands the chunks out round-robin and
returns the results in chunk order, so the merged result is the single-process one: every method
explains each image independently of its batch, its randomness derived from (seed, the image)
and never from a worker's state, so on the CPU the results are bit-identical.

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
    """One actor: the model loaded once; explains chunks of images."""

    def __init__(self, source: str, device: str, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))
        from trustvision import models

        self.device = device
        self.model = models.load(source).to(device).eval()

    def ping(self) -> int:
        import os

        return os.getpid()

    def attack(self, name: str, images, labels, kw: dict) -> torch.Tensor:
        from trustvision.evaluate.adversarial import attack

        x = torch.from_numpy(images.copy()).to(self.device)
        y = torch.from_numpy(labels.copy()).to(self.device)
        return attack(self.model, x, y, name, **kw).detach().cpu()

    def attribute(self, method: str, images, targets, kw: dict) -> tuple[Any, Any]:
        import warnings

        from trustvision import explain

        cls = explain.get(method)
        explainer = cls(self.model)
        x = torch.from_numpy(images.copy()).to(self.device)  # Ray's arrays are read-only views
        t = torch.from_numpy(targets.copy()).to(self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = explainer.attribute(x, target=t, **kw)
        if isinstance(out, tuple) and cls.kind == "heatmap":
            out = out[0]
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu()
        return out, getattr(explainer, "last_info", None)


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
    """``workers`` Ray actors holding the model of ``source`` (a checkpoint path or zoo:NAME).

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

    def attribute_chunks(self, method: str, chunks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         kw: dict) -> Iterator[tuple[Any, Any]]:
        """``(output, last_info)`` of each chunk ``(images, targets)``, in chunk order, computed
        by the actors round-robin (all chunks are submitted at once)."""
        ray = require_ray()
        refs = [self.actors[i % len(self.actors)].attribute.remote(
                    method, x.detach().cpu().numpy(), t.detach().cpu().numpy(), kw)
                for i, (x, t) in enumerate(chunks)]
        for ref in refs:
            yield ray.get(ref)

    def attack_chunks(self, name: str, chunks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      kw: dict) -> Iterator[torch.Tensor]:
        """Adversarial images of attack ``name`` for each chunk ``(images, labels)``, in order."""
        ray = require_ray()
        refs = [self.actors[i % len(self.actors)].attack.remote(name, x.detach().cpu().numpy(),
                                                                 y.detach().cpu().numpy(), kw)
                for i, (x, y) in enumerate(chunks)]
        for ref in refs:
            yield ray.get(ref)

    def executor(self) -> Callable:
        """``executor(task, chunks, kw)``: what :func:`trustvision.explain.explain_images` (task = a
        method name) and :func:`trustvision.evaluate.adversarial.robust_accuracy` (task =
        ``"attack:NAME"``) take as ``executor``."""
        def run(task: str, chunks, kw: dict):
            if task.startswith("attack:"):
                return self.attack_chunks(task.split(":", 1)[1], chunks, kw)
            return self.attribute_chunks(task, chunks, kw)

        return run

    def close(self) -> None:
        ray = require_ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
