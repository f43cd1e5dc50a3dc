"""Fused Triton backend of RCE-KD: the five ops of
:mod:`rcekd_kernels.backends.reference` as Triton kernels.

* :mod:`.selection`  ``select``: chunked top-R selection by bisection + per-row sets
* :mod:`.subset_ce`  ``subset_ce_fwd`` / ``subset_ce_bwd`` on gathered scores
* :mod:`.fused`      ``fused_fwd`` (select + gather + CE) / ``fused_bwd`` (dense gradient)
* :mod:`._common`    hash, Gumbel, order-preserving keys, bisection, knobs

Runs on CUDA tensors, and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported). Scores are read as
float32 / bfloat16 / float16 with float32 arithmetic; float64 inputs (gradcheck)
go to the reference backend. K, M, L <= 1024 (``_common.MAX_KM``).
"""
from __future__ import annotations

import os
from typing import Optional

NAME = "triton"

try:
    import triton  # noqa: F401

    from ._common import interpreting
    from .fused import fused_bwd, fused_fwd
    from .selection import select
    from .subset_ce import subset_ce_bwd, subset_ce_fwd

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # triton not installed: the registry reports why
    _IMPORT_ERROR = f"triton cannot be imported ({e})"

    def _missing(*args, **kwargs):
        raise RuntimeError(f"the triton backend is not available: {_IMPORT_ERROR}")

    select = subset_ce_fwd = subset_ce_bwd = fused_fwd = fused_bwd = _missing

__all__ = ["NAME", "available", "select", "subset_ce_fwd", "subset_ce_bwd", "fused_fwd", "fused_bwd"]


def available(device_type: str) -> Optional[str]:
    """None when this backend runs on ``device_type``; otherwise the reason it does not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                    "before triton is imported")
        if not interpreting():
            return ("TRITON_INTERPRET=1 was set after triton built the kernels; set it before "
                    "triton is imported")
        return None
    return f"Triton kernels run on cuda (or cpu in the interpreter), not on {device_type}"
