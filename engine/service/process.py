"""Process-wide settings a replica applies at start, before any thread runs."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1            # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 8 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def tune_malloc() -> bool:
    """Fixed glibc malloc thresholds: allocations up to 8 MiB from the heap, and up to 32 MiB of free heap
    kept. With glibc's dynamic thresholds the buffers an entry needs (several MiB each, freed at the end of
    the entry) sat at the top of a small heap, were trimmed on free and page-faulted back in by the next
    entry: bench_replica_path measured 88-98 minor faults per 1K transfers (19 before the ledger's index
    left the heap) and ``Ledger.events()`` at 144-160 ns a transfer instead of 52. Both must be set (either
    alone turns the dynamic thresholds off and is worse). Costs up to 32 MiB of free heap per arena.
    Returns whether it applied (glibc only)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        return libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    except (OSError, AttributeError):
        return False
