"""The C allocator's settings for CPU runs (glibc's malloc on Linux).

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults a freed block
of a few MB or more goes back to the kernel (an ``munmap``, or a trim of the heap's top), and
the next tensor of that size is handed fresh pages that the kernel zeroes on first touch: a
minor page fault per 4 KiB. A ResNet-18 at 224 px frees and re-allocates its activations on
every pass, so on the CPU the kernel's page zeroing took 2-20% of an I-GOS / iGOS++ run
(``getrusage``'s system time), varying with the heap's state from one call to the next, and
more for a batch (bigger tensors) than for one image (BENCHMARKS.md, "The allocator").

:func:`tune_cpu_allocator` serves blocks up to 256 MiB from the heap (a glibc that refuses
that much: 32 MiB, its old cap) and lets up to 1 GiB of freed memory stay mapped, so a run
re-uses its own pages; memory that was in use at a peak stays with the process until it is
re-used or the process ends. The ``trustvision`` command
applies it at start (``TRUSTVISION_MALLOC_TUNING=0`` turns it off); a Python program calls it
itself. Elsewhere (not glibc: macOS, Windows, musl, or jemalloc / tcmalloc preloaded) it does
nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # (a ResNet-18 224 px activation of a 32-row chunk: 103 MB)
_MMAP_THRESHOLD_OLD_GLIBC = 32 << 20  # (older glibc refuses more: HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30

def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # (glibc only: musl has no such symbol)
    except (OSError, AttributeError):
        return None
    # a preloaded jemalloc / tcmalloc replaces malloc: mallopt would set glibc's unused arena
    if any(k in os.environ.get("LD_PRELOAD", "") for k in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    return libc


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed memory for re-use instead of returning it to the kernel (see the module
    docstring); True if glibc took both settings. Safe to call more than once."""
    if not (0 < int(mmap_threshold) < 2**31 and 0 < int(trim_threshold) < 2**31):
        raise ValueError("the thresholds are bytes in (0, 2**31)")
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    if not ok and mmap_threshold > _MMAP_THRESHOLD_OLD_GLIBC:
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_OLD_GLIBC))
    return ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
