"""The benchmark runner measures throughput and peak memory of a registered workload."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from _benchmarks import BENCH, load_benchmark  # tests/_benchmarks.py


def _load_runner():
    return load_benchmark("run.py", "tv_bench_run")


def test_measure_known_throughput(monkeypatch):
    runner = _load_runner()
    from registry import BENCHMARKS, Workload

    def sleepy(device):
        return Workload(run=lambda: time.sleep(0.01), images=10, warmup=1, min_seconds=0.2)

    monkeypatch.setitem(BENCHMARKS, "test:sleep", sleepy)
    monkeypatch.setattr(runner, "_discover", lambda: BENCHMARKS)
    r = runner.measure("test:sleep", "cpu")
    assert 300 < r["images_per_s"] <= 1000  # 10 images per >= 10 ms


# Peak memory is measured in a fresh process, as the runner does for every benchmark: in a
# long-lived process (this test session) freed pages are reused and the high-water mark moves less.
_ALLOC_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import importlib.util
spec = importlib.util.spec_from_file_location("tv_bench_run", {run!r})
runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)
from registry import BENCHMARKS, Workload
keep = []
BENCHMARKS["test:alloc"] = lambda device: Workload(  # holds 64 MB at its peak
    run=lambda: keep.append(torch.ones(16 * 2**20).add_(1).sum()), images=1, warmup=0,
    min_seconds=0.0, max_runs=5)
runner._discover = lambda: BENCHMARKS
print(json.dumps(runner.measure("test:alloc", "cpu")))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_measure_known_peak_memory_in_a_fresh_process():
    import json
    import subprocess

    code = _ALLOC_SCRIPT.format(bench=str(BENCH), run=str(BENCH / "run.py"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 60 <= r["peak_mb"] < 200
