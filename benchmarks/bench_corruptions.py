"""Corruption benchmarks: images/s of every corruption type (trustvision.evaluate.corruptions) at
32 x 32 and 224 x 224 (target: none slower than 200 images/s at 32 x 32 on one CPU thread).

Two uses:

* ``benchmarks/run.py`` imports this module: it registers throughput workloads (images/s) for the
  runner's table: all 15 types in turn on 256 images of 32 x 32 at severity 3, and glass blur (the
  usual offender) alone.
* ``python benchmarks/bench_corruptions.py [--device cpu] [--threads 1] [--sizes 32,224]
  [--batch32 256] [--batch224 16] [--json out.json]`` prints a table: per type and size, the
  images/s of ``corrupt`` averaged over severities 1..5 (best of ``--repeats`` passes; inputs are
  smooth seeded 3-channel images; the per-image seeding from the images' bytes is included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import Workload, register, sync, emitter  # noqa: E402

TARGET_32 = 200.0


def _images(n: int, size: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bicubic",
                                          align_corners=False)
    return (low + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1).to(device)


# -- runner workloads ------------------------------------------------------------------------


@register("corruptions:all-15:32px:b256")
def _w_all(device):
    from trustvision.evaluate.corruptions import corrupt, list_corruptions

    x, names = _images(256, 32, device), list_corruptions()
    return Workload(run=lambda: [corrupt(x, n, 3) for n in names], images=256 * len(names), warmup=1,
                    min_seconds=1.0, max_runs=10)


@register("corruptions:glass-blur:32px:b256")
def _w_glass(device):
    from trustvision.evaluate.corruptions import corrupt

    x = _images(256, 32, device)
    return Workload(run=lambda: corrupt(x, "glass-blur", 5), images=256, warmup=1, min_seconds=0.5, max_runs=50)


# -- table -----------------------------------------------------------------------------------


def speed(device, sizes, batches, repeats: int, emit) -> None:
    from trustvision.evaluate.corruptions import corrupt, list_corruptions

    for size in sizes:
        x = _images(batches[size], size, device)
        for name in list_corruptions():
            corrupt(x[:2], name, 1)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                for s in range(1, 6):
                    corrupt(x, name, s)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            emit({"benchmark": f"corruption:{name}:{size}px", "corruption": name, "size": size,
                  "batch": int(x.shape[0]), "images_per_s": 5 * x.shape[0] / best, "threads": torch.get_num_threads(),
                  "device": str(device)})


def print_speed(rows: list[dict]) -> None:
    sizes = sorted({r["size"] for r in rows})
    names = list(dict.fromkeys(r["corruption"] for r in rows))
    by = {(r["corruption"], r["size"]): r["images_per_s"] for r in rows}
    threads = rows[0]["threads"] if rows else "?"
    print(f"\nCorruption throughput, images/s (mean over severities 1-5; {threads} thread(s), {rows[0]['device']})")
    print(f"{'corruption':18} " + " ".join(f"{str(s) + ' px':>10}" for s in sizes))
    for n in names:
        cells = []
        for s in sizes:
            v = by.get((n, s))
            flag = "*" if s == 32 and v is not None and v < TARGET_32 else " "
            cells.append(f"{v:>9.0f}{flag}" if v is not None else f"{'':>10}")
        print(f"{n:18} " + " ".join(cells))
    if 32 in sizes:
        slow = [n for n in names if by.get((n, 32), TARGET_32) < TARGET_32]
        print(f"target >= {TARGET_32:.0f} images/s at 32 px: " + ("met by every type" if not slow else
                                                                 "missed by " + ", ".join(slow) + " (*)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="32,224", help="image sides, comma-separated")
    p.add_argument("--batch32", type=int, default=256, help="images per call at sides up to 64 px")
    p.add_argument("--batch224", type=int, default=16, help="images per call at larger sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    batches = {s: args.batch32 if s <= 64 else args.batch224 for s in sizes}
    out: list[dict] = []
    emit = emitter(out)

    speed(torch.device(args.device), sizes, batches, args.repeats, emit)
    print_speed(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
