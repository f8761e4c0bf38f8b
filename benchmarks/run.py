"""Run the trustvision benchmarks and print a table (benchmark, images/s, peak memory MB).

Usage:
    python benchmarks/run.py [--device cpu|cuda] [--only SUBSTRING] [--threads N] [--json FILE]

Every ``benchmarks/bench_*.py`` module registers its benchmarks (see ``registry.py``). Each
benchmark runs in a fresh subprocess: its set-up (loading the model, making inputs) is not timed;
then the workload is warmed up and called repeatedly for at least ``min_seconds`` in five
chunks; images/s is that of the fastest chunk (robust to other load on a shared machine).

Peak memory is the extra memory the workload needs beyond what the set-up holds: on CPU the
process's peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; else
``resource.getrusage`` max RSS) minus the RSS before the run; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))


def _discover() -> dict:
    from registry import BENCHMARKS

    for path in sorted(HERE.glob("bench_*.py")):
        importlib.import_module(path.stem)
    return BENCHMARKS


def measure(name: str, device_name: str) -> dict:
    """Run benchmark ``name`` in this process; returns images/s and peak memory (MB)."""
    import torch

    from registry import reset_hwm, rss_kb, sync

    benches = _discover()
    device = torch.device(device_name)
    work = benches[name](device)
    if work is None:
        return {"benchmark": name, "skipped": True}
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = rss_kb("VmRSS")
        hwm_ok = reset_hwm()
        if not hwm_ok or base is None:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(work.warmup):
        work.run()
    sync(device)
    # Time ``chunks`` chunks of repeated calls; report the best chunk (least disturbed by other
    # processes on a shared machine) and the total number of calls.
    chunks, rates, runs, total_seconds = 5, [], 0, 0.0
    for _ in range(chunks):
        n, t0 = 0, time.perf_counter()
        while True:
            work.run()
            n += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= work.min_seconds / chunks or n >= max(work.max_runs // chunks, 1):
                break
        rates.append(n * work.images / elapsed)
        runs += n
        total_seconds += elapsed
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = rss_kb("VmHWM") if hwm_ok else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = max(peak - base, 0) / 1024
    return {"benchmark": name, "images_per_s": max(rates), "peak_mb": peak_mb, "runs": runs,
            "seconds": total_seconds}


def machine(device_name: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device_name.startswith("cuda"):
        desc += f", {torch.cuda.get_device_name(torch.device(device_name))}"
    return desc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="trustvision benchmarks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", action="append", help="run benchmarks whose name contains this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args.device)))
        return 0

    names = sorted(_discover())
    if args.only:
        names = [n for n in names if any(s in n for s in args.only)]
    if not names:
        print("no benchmarks selected (is the zoo built? run `python scripts/build_zoo.py`)")
        return 1
    rows = []
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr.strip()}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if not row.get("skipped"):
            rows.append(row)
            print(f"{name}: {row['images_per_s']:,.1f} images/s, {row['peak_mb']:.1f} MB", file=sys.stderr,
                  flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"trustvision benchmarks, device {args.device}")
    table.add_column("benchmark")
    table.add_column("images/s", justify="right")
    table.add_column("peak memory MB", justify="right")
    for r in rows:
        table.add_row(r["benchmark"], f"{r['images_per_s']:,.0f}", f"{r['peak_mb']:.1f}")
    console = Console(width=120)
    console.print(table)
    console.print(f"machine: {machine(args.device)}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "machine": machine(args.device),
                                         "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
