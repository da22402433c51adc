"""Keep freed host memory in the process, so that a step's large tensors do not fault their pages in anew.

PyTorch's CPU allocator takes every tensor's memory from the C library's ``malloc`` and hands it back on
free. glibc serves a large block (a wide layer's weight gradient: megabytes) from fresh ``mmap`` pages, or
returns the free top of a heap to the kernel, so the same tensors of the next micro-batch fault every page
in again, and the kernel zeroes each one (``clear_page`` under the weight gradient's matrix multiply, in a
profile of the workers). An interleaved step of a 1536-wide MLP faulted about 8,000 pages in, about 400
with the memory kept.

:func:`keep_freed_memory` sets glibc's thresholds so that blocks up to :data:`MMAP_THRESHOLD_BYTES` come
from the heap and freed memory stays there for the next allocation. The cost is memory: a process keeps
its peak heap instead of shrinking after it.

:func:`resident_bytes` reads how much host memory the process holds; every worker reports it each step
(``worker<k>/host_memory_mib``), so memory that grows step after step shows in TensorBoard.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory", "resident_bytes"]

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit systems)."""
TRIM_THRESHOLD_BYTES = 2**31 - 1
"""A heap gives memory back to the kernel only when this much is free at its top."""
TOP_PAD_BYTES = 64 * 1024 * 1024
"""Free memory a heap keeps at its top: as large as a thread's heap, so glibc never unmaps one."""
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_TOP_PAD = -2


def keep_freed_memory() -> bool:
    """Make this process keep freed memory for reuse (see the module); ``False`` where the C library is
    not glibc (macOS, musl), which is left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )
    return all([bool(mallopt(option, value)) for option, value in settings])


def resident_bytes() -> int | None:
    """Host memory this process holds now (its resident set), or ``None`` where ``/proc`` does not say
    (not Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
