"""The version of rcekd_kernels: the one source (setup.py reads it from here)."""
__version__ = "0.2.0"
