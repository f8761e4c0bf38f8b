"""Ray sharding benchmark (issue 16): the ``explanations`` check on 64 digits test images in one
process and with 1 and 2 Ray workers (a local cluster of ``--cpus`` CPUs), and Ray's per-task
overhead.

``python benchmarks/bench_ray.py [--cpus 2] [--n 64] [--json F]`` prints, per setting, the check's
seconds and the speed-up over the single process (the pool's start-up, which loads the model in
each worker, is timed separately), whether the results equal the single-process ones, and the
round-trip time of an empty task to a worker actor (median of 200, ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import emitter  # noqa: E402


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if "second" not in k}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import ray
    import torch

    from trustvision import audit
    from trustvision.audit import distributed

    torch.set_num_threads(1)
    opts = {"explanations.n": a.n, "explanations.sag_n": 0}
    rows: list[dict] = []
    emit = emitter(rows)
    t0 = time.perf_counter()
    ref = audit.run("zoo:small-cnn-digits", "digits", checks=["explanations"], options=opts)
    base = time.perf_counter() - t0
    emit({"benchmark": "ray:explanations", "workers": 0, "seconds": base, "speedup": 1.0, "equal": True})
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    for w in (1, 2):
        t0 = time.perf_counter()
        pool = distributed.RayPool("zoo:small-cnn-digits", workers=w)
        start = time.perf_counter() - t0
        pool.close()
        t0 = time.perf_counter()
        res = audit.run("zoo:small-cnn-digits", "digits", checks=["explanations"], options=opts, ray="auto",
                        ray_workers=w)
        sec = time.perf_counter() - t0
        same = _strip(res.records()["explanations"]["data"]) == _strip(ref.records()["explanations"]["data"])
        emit({"benchmark": "ray:explanations", "workers": w, "seconds": sec, "pool_start_seconds": start,
              "speedup": base / sec, "equal": same})
    pool = distributed.RayPool("zoo:small-cnn-digits", workers=1)
    actor = pool.actors[0]
    ray.get(actor.ping.remote())
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        ray.get(actor.ping.remote())
        times.append((time.perf_counter() - t0) * 1e3)
    overhead = statistics.median(times)
    pool.close()
    ray.shutdown()
    emit({"benchmark": "ray:task-overhead", "ms": overhead})
    print(f"\nexplanations check, {a.n} digits images (every default heatmap method), local Ray cluster of "
          f"{a.cpus} CPUs, 1 torch thread per process")
    print(f"{'workers':>8} {'seconds':>8} {'speed-up':>8} {'pool start s':>12} {'equal':>6}")
    for r in rows[:-1]:
        print(f"{r['workers'] or 'none':>8} {r['seconds']:>8.1f} {r['speedup']:>8.2f} "
              f"{r.get('pool_start_seconds', 0):>12.1f} {str(r['equal']):>6}")
    print(f"per-task overhead (empty task round trip, median of 200): {overhead:.2f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
