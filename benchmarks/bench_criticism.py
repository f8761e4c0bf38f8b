"""MMD-critic benchmarks: seconds and memory of :func:`trustvision.evaluate.criticism.mmd_critic` on
n = 1,000 / 10,000 / 50,000 feature vectors, and the paper's 1-nearest-prototype curve.

Two uses:

* ``benchmarks/run.py`` imports this module: it registers a throughput workload (feature vectors/s,
  counted as the runner's "images"): MMD-critic of 10,000 vectors of dimension 512 in 10 classes,
  10 prototypes and 5 criticisms per class.
* ``python benchmarks/bench_criticism.py [--device cpu|cuda|all] [--threads N] [--only speed|curve]
  [--sizes 1000,10000,50000] [--json FILE]`` prints tables:

  - ``speed``: seconds of ``mmd_critic`` (median-heuristic gamma, log-det criticisms, per-class
    kernel blocks) on seeded synthetic features (10 Gaussian classes, dimension 512, float32), for
    each size, on the CPU and on the GPU when one is present (``--device all``, the default).
    Memory: ``block MB`` is the theoretical size of the largest per-class kernel block the call holds
    (``n_c^2 x 4`` bytes when dense, ``block_size^2 x 4`` for a chunk of a larger class); on the CPU
    ``peak MB`` is the process's peak resident set size during the call minus its resident set size
    before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; where that is not possible,
    the growth of ``resource.getrusage`` max RSS, which misses peaks below an earlier one); on CUDA
    ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call. Target: 50,000
    vectors on the CPU in under a minute.
  - ``curve``: the paper's quantitative evaluation on scikit-learn digits pixels (1,000 training
    images, 797 test images, a fixed permutation): 1-nearest-prototype test accuracy vs prototypes
    per class for MMD-critic, random and k-medoids prototypes (mean +- std over 5 seeds).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import Workload, emitter, register, reset_hwm, rss_kb, sync  # noqa: E402

DIM, CLASSES, PROTOTYPES, CRITICISMS = 512, 10, 10, 5


def features(n: int, device, dim: int = DIM, classes: int = CLASSES, seed: int = 0):
    """Seeded synthetic features: class means ~ N(0, I), within-class noise N(0, I); balanced labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = torch.randn(classes, dim, generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)
    return x.to(device), y


def _run(x, y):
    from trustvision.evaluate.criticism import mmd_critic

    return mmd_critic(x, y, n_prototypes=PROTOTYPES, n_criticisms=CRITICISMS)


# -- runner workload -------------------------------------------------------------------------


@register("mmd-critic:n10000-d512-k10")
def _w_speed(device):
    x, y = features(10_000, device)
    return Workload(run=lambda: _run(x, y), images=10_000, warmup=1, min_seconds=1.0, max_runs=5)


# -- speed -----------------------------------------------------------------------------------


def measure(n: int, device: torch.device) -> dict:
    from trustvision.evaluate.criticism import BLOCK_SIZE

    x, y = features(n, device)
    n_c = n // CLASSES
    block_mb = (n_c * n_c if n_c <= BLOCK_SIZE else BLOCK_SIZE * BLOCK_SIZE) * 4 / 2**20
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        how = "cuda max_memory_allocated"
    else:
        hwm = reset_hwm() and rss_kb("VmRSS") is not None
        base = rss_kb("VmRSS") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "VmHWM - VmRSS" if hwm else "ru_maxrss delta"
    t0 = time.perf_counter()
    res = _run(x, y)
    sync(device)
    sec = time.perf_counter() - t0
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = rss_kb("VmHWM") if how == "VmHWM - VmRSS" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = max(peak - base, 0) / 1024
    return {"benchmark": f"mmd-critic:n{n}", "device": str(device), "n": n, "dim": DIM, "classes": CLASSES,
            "prototypes_per_class": PROTOTYPES, "criticisms_per_class": CRITICISMS, "seconds": sec,
            "vectors_per_s": n / sec, "block_mb": block_mb, "peak_mb": peak_mb, "memory": how,
            "gamma": res.gamma, "threads": torch.get_num_threads()}


def speed(devices, sizes, emit) -> None:
    for device in devices:
        _run(*features(500, device))  # warm-up (allocator, kernels)
        for n in sizes:
            emit(measure(n, device))


def print_speed(rows: list[dict]) -> None:
    print(f"\nMMD-critic: {DIM}-d features, {CLASSES} classes, {PROTOTYPES} prototypes + {CRITICISMS} criticisms "
          "per class (log-det), median-heuristic gamma")
    print(f"{'device':7} {'n':>7} {'threads':>7} {'seconds':>8} {'vectors/s':>10} {'block MB':>9} "
          f"{'peak MB':>8}  memory")
    for r in rows:
        if r["benchmark"].startswith("mmd-critic:n"):
            print(f"{r['device']:7} {r['n']:>7} {r['threads']:>7} {r['seconds']:>8.2f} {r['vectors_per_s']:>10.0f} "
                  f"{r['block_mb']:>9.2f} {r['peak_mb']:>8.1f}  {r['memory']}")


# -- the 1-nearest-prototype curve -----------------------------------------------------------


def curve(emit, ms=(1, 2, 5, 10), seeds=range(5)) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from trustvision.evaluate.criticism import prototype_curve

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    t0 = time.perf_counter()
    rows = prototype_curve(x[:1000], y[:1000], x[1000:], y[1000:], ms=ms, seeds=list(seeds))
    sec = time.perf_counter() - t0
    for r in rows:
        emit({"benchmark": f"prototype-curve:digits:{r['method']}", **r, "seconds_total": sec})


def print_curve(rows: list[dict]) -> None:
    rows = [r for r in rows if r["benchmark"].startswith("prototype-curve:")]
    if not rows:
        return
    ms = sorted({r["m"] for r in rows})
    print("\n1-nearest-prototype test accuracy on sklearn digits pixels (1000 train / 797 test), "
          "mean +- std over seeds")
    print(f"{'method':11} " + " ".join(f"{'m=' + str(m):>13}" for m in ms))
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["m"]: r for r in rows if r["method"] == method}
        print(f"{method:11} " + " ".join(f"{cells[m]['accuracy']:>7.3f} +-{cells[m]['accuracy_std']:.3f}" for m in ms))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, and cuda when available)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=["speed", "curve"], default=None)
    p.add_argument("--sizes", default="1000,10000,50000")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    out: list[dict] = []
    emit = emitter(out)
    if args.only in (None, "speed"):
        speed(devices, [int(s) for s in args.sizes.split(",") if s.strip()], emit)
        print_speed(out)
    if args.only in (None, "curve"):
        curve(emit)
        print_curve(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
