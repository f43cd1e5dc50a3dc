"""rcekd_train: training drivers for RCE-KD (MF, LightGCN, HSTU)."""
__version__ = "0.1.0"
