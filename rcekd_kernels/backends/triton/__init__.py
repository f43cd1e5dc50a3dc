"""Fused Triton backend of RCE-KD: the five ops of
:mod:`rcekd_kernels.backends.reference` as Triton kernels.

* :mod:`.selection`  ``select``: chunked top-R selection by bisection + per-row sets
* :mod:`.subset_ce`  ``subset_ce_fwd`` / ``subset_ce_bwd`` on gathered scores
* :mod:`.fused`      ``fused_fwd`` (select + gather + CE) / ``fused_bwd`` (dense gradient)
* :mod:`._common`    hash, Gumbel, order-preserving keys, bisection, knobs

Runs on CUDA tensors, and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported). Scores are read as
float32 / bfloat16 / float16 with float32 arithmetic; K, M, L <= 1024
(:data:`MAX_KM`). :func:`supports` says so for every call, so ``auto`` passes
float64 (gradcheck) or larger sets to the next backend and an explicit
``backend="triton"`` raises with the reason.
"""
from __future__ import annotations

import os
from typing import Optional

NAME = "triton"
DESCRIPTION = "fused Triton kernels, CUDA (CPU in the interpreter)"

#: score dtypes the kernels read (float32 arithmetic)
DTYPES = ("float32", "bfloat16", "float16")
#: largest K, M and L: one program holds a row's pool
MAX_KM = 1024
#: largest catalogue: item ids fit the low 32 bits of the kernels' composite keys
MAX_N = (1 << 32) - 2


def supports(call) -> Optional[str]:
    """None when the kernels run this call; else the reason (dtype, sizes)."""
    if call.op == "topm_dot":
        if str(call.dtype).replace("torch.", "") not in DTYPES:
            return f"its topm_dot reads float32, bfloat16 and float16 vectors, got {call.dtype}"
        if min(call.M, call.N) > MAX_KM:
            return f"its topm_dot keeps at most {MAX_KM} items per row, got min(M, N) = {min(call.M, call.N)}"
        if call.N >= 2**31:
            return f"its topm_dot supports N < 2**31 items, got N = {call.N}"
        return None
    bad = [d for d in call.dtypes if str(d).replace("torch.", "") not in DTYPES]
    if bad:
        return f"its kernels read float32, bfloat16 and float16 scores, got {bad[0]}"
    cfg = call.config
    if cfg is not None:
        for name in ("K", "M", "L"):
            v = getattr(cfg, name)
            if v > MAX_KM:
                return f"it supports K, M and L up to {MAX_KM} (one program holds a row's pool), got {name} = {v}"
    if call.N > MAX_N:
        return f"it supports at most {MAX_N} items per row, got N = {call.N}"
    return None


try:
    import triton  # noqa: F401

    from ._common import interpreting
    from .fused import fused_bwd, fused_fwd
    from .selection import select
    from .subset_ce import subset_ce_bwd, subset_ce_fwd
    from .topm import topm_dot

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # triton not installed: the registry reports why
    _IMPORT_ERROR = f"triton cannot be imported ({e})"

    def _missing(*args, **kwargs):
        raise RuntimeError(f"the triton backend is not available: {_IMPORT_ERROR}")

    select = subset_ce_fwd = subset_ce_bwd = fused_fwd = fused_bwd = topm_dot = _missing

__all__ = ["NAME", "DESCRIPTION", "available", "supports", "select", "subset_ce_fwd", "subset_ce_bwd",
           "fused_fwd", "fused_bwd", "topm_dot"]


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
