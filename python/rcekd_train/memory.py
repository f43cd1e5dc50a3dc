"""How the drivers' processes get memory from Linux.

A training step allocates the same large tensors afresh every time (a LightGCN teacher at dim 2000 on
CiteULike: its (30,400, 2000) propagation outputs and embedding gradients, 243 MB each). glibc's malloc
maps every block above 32 MB from the kernel and unmaps it when freed, so each step faults all those
pages in again and the kernel zeroes them: 225,000 minor faults and 0.46 s of system time in a 2.5 s
step (benchmarks/bench_memory.py). Two settings remove
most of it, the numbers unchanged:

* ``THP_MEM_ALLOC_ENABLE=1`` (set when ``rcekd_train`` is imported, unless set): torch's CPU allocator
  asks for transparent huge pages for blocks of 2 MB or more, 512 times fewer faults;
* :func:`keep_freed_memory` (called by the ``rcekd`` command): glibc serves every block from its heap
  and never gives freed memory back, so the next step reuses the same pages without a fault. The
  process keeps the memory of its peak (what it needs anyway at every step).
"""
from __future__ import annotations

import ctypes
import os
import sys

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: set to 0 to keep glibc's defaults
ENV = "RCEKD_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Makes glibc's malloc take every block from the heap (``M_MMAP_MAX`` 0) and keep freed memory
    (``M_TRIM_THRESHOLD`` -1: no trimming). Does nothing, and returns False, where ``$RCEKD_KEEP_FREED_MEMORY``
    is ``0``, off Linux, or without glibc; True once applied."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
