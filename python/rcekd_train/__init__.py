"""rcekd_train: training drivers for RCE-KD (MF, LightGCN, HSTU)."""
import os

# Before torch is imported (rcekd_kernels imports it): torch's CPU allocator asks Linux for transparent
# huge pages for blocks of 2 MB or more (madvise), far fewer page faults for the large tensors a step
# allocates afresh (rcekd_train/memory.py; the same numbers). Torch reads the variable at the process's
# first allocation of 2 MB or more: set THP_MEM_ALLOC_ENABLE=0 to keep 4 KB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# OpenMP threads that spin while waiting are very slow on a busy machine; libgomp reads this when torch loads it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rcekd_kernels._version import __version__  # noqa: E402,F401  (one version for the distribution)
