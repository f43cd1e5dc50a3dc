"""rcekd_train: training drivers for RCE-KD (MF, LightGCN, HSTU)."""
import os

# Before torch is imported (rcekd_kernels imports it). The drivers allocate large tensors afresh at every
# step (a LightGCN teacher's (30,400, 2000) propagation outputs and its embedding gradients, 243 MB
# each on CiteULike), and with 4 KB pages their first touch costs a page fault per page. With this
# variable, torch's CPU allocator asks Linux for transparent huge pages for blocks of 2 MB or more
# (madvise): the same numbers, fewer faults (docs/TRAINING.md, "The training loop"). Torch reads the
# variable at the process's first allocation of 2 MB or more: set THP_MEM_ALLOC_ENABLE=0 to keep 4 KB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# OpenMP threads that spin while waiting are very slow on a busy machine; libgomp reads this when torch loads it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rcekd_kernels._version import __version__  # noqa: E402,F401  (one version for the distribution)
