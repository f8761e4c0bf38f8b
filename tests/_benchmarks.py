"""Loading a script of ``benchmarks/`` (not a package) as a module in the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str, name: str):
    """``benchmarks/<script>`` imported as module ``name`` (``benchmarks/`` goes on sys.path first,
    for the scripts' own ``registry`` import)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
