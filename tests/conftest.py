"""Test configuration.

Triton kernels run on CPU tensors only in Triton's interpreter, which must be
switched on before triton is first imported: on a machine without CUDA we set
TRITON_INTERPRET=1 here, before anything imports torch or triton.
"""
import os

if os.environ.get("RCEKD_TEST_NO_INTERPRET") != "1":
    try:
        import ctypes.util

        _has_cuda = ctypes.util.find_library("cuda") is not None
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
