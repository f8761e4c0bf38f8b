"""tune_cpu_allocator: freed CPU memory is re-used, not handed back to the kernel and faulted in
again (glibc), a no-op elsewhere, and applied by the ``trustvision`` command."""

import subprocess
import sys
import textwrap

import pytest

from trustvision._utils import allocator

GLIBC = allocator._glibc() is not None

# 300 tensors of 100 KB (each below glibc's first mmap threshold: on the heap), freed together:
# with glibc's defaults the heap's free top (30 MB) is above its trim threshold, so it goes back
# to the kernel and the next round's pages are zeroed and faulted in again
CHURN = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "tuned":
        from trustvision import tune_cpu_allocator
        assert tune_cpu_allocator()
    def churn():
        ts = [torch.empty(25_000).fill_(1.0) for _ in range(300)]
        del ts
    churn()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_allocator_reuses_freed_pages():
    pages_per_round = 300 * 25_000 * 4 // 4096  # 7,324
    # glibc's defaults: the freed heap is trimmed and faulted in again, round after round (on
    # most runs: where the process's own small blocks land decides whether the top is free; the
    # most of three runs)
    default = max(_faults("default") for _ in range(3))
    tuned = _faults("tuned")
    assert default > 1.5 * pages_per_round, default
    # tuned: the first round's pages are re-used (a few hundred faults of Python's own objects)
    assert tuned < pages_per_round / 4, tuned
    assert default > 10 * tuned


def test_no_op_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.tune_cpu_allocator() is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.tune_cpu_allocator() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_glibc_takes_the_settings():
    assert allocator.tune_cpu_allocator() is True


@pytest.mark.parametrize("env, calls", [(None, 1), ("1", 1), ("0", 0)])
def test_the_command_applies_it_unless_turned_off(monkeypatch, env, calls):
    from trustvision import cli

    seen = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: seen.append(1) or True)
    if env is None:
        monkeypatch.delenv("TRUSTVISION_MALLOC_TUNING", raising=False)
    else:
        monkeypatch.setenv("TRUSTVISION_MALLOC_TUNING", env)
    assert cli.main(["--version"]) == 0
    assert len(seen) == calls
