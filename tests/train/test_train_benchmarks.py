"""The benchmark runner measures throughput and peak memory of a registered workload."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_runner():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("tv_bench_run", BENCH / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measure_known_throughput_and_memory(monkeypatch):
    runner = _load_runner()
    from registry import BENCHMARKS, Workload

    keep = []

    def sleepy(device):
        return Workload(run=lambda: time.sleep(0.01), images=10, warmup=1, min_seconds=0.2)

    def hungry(device):  # holds 64 MB at its peak
        return Workload(run=lambda: keep.append(torch.ones(16 * 2**20).add_(1).sum()), images=1,
                        warmup=0, min_seconds=0.0, max_runs=5)

    monkeypatch.setitem(BENCHMARKS, "test:sleep", sleepy)
    monkeypatch.setitem(BENCHMARKS, "test:alloc", hungry)
    monkeypatch.setattr(runner, "_discover", lambda: BENCHMARKS)
    r = runner.measure("test:sleep", "cpu")
    assert 300 < r["images_per_s"] <= 1000  # 10 images per >= 10 ms
    r = runner.measure("test:alloc", "cpu")
    if Path("/proc/self/clear_refs").exists():
        assert r["peak_mb"] >= 60
