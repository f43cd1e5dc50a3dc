"""rcekd_train: training drivers for RCE-KD (MF, LightGCN, HSTU)."""
from rcekd_kernels._version import __version__  # noqa: F401  (one version for the distribution)
