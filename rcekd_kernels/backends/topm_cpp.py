"""The compiled CPU backend of ``topm_dot``: ``torch.ops.rcekd_C.topm_dot`` (csrc/cpu/topm_cpu.cpp).

:func:`topm_dot` has the signature and results of
:func:`rcekd_kernels.backends.reference.topm_dot`: the same argument checks (ValueError /
TypeError), then the op. float16 / bfloat16 vectors are converted to float32 (the compute
dtype) first; the op itself takes float32 or float64 CPU tensors and checks every argument
again (RuntimeError), so a direct call is memory-safe too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import native, reference

Tensor = torch.Tensor

NAME = "cpp"


def available(device_type: str) -> Optional[str]:
    """None when this backend runs on ``device_type``; otherwise the reason it does not."""
    ops = native.ops()
    if ops is None:
        return native.load_error()
    if not hasattr(ops, "topm_dot"):
        return "the compiled extension was built without topm_dot (rebuild it: pip install --no-build-isolation -e .)"
    if device_type != "cpu":
        return f"the 'cpp' topm_dot runs on cpu tensors only, not {device_type}"
    return None


def topm_dot(user_vecs: Tensor, item_vecs: Tensor, M: int, exclude_offsets: Optional[Tensor] = None,
             exclude_ids: Optional[Tensor] = None, item_offset: int = 0, *, block_users: int = 0,
             tile_items: int = 0) -> Tuple[Tensor, Tensor]:
    """Each row's first M items of user_vecs @ item_vecs.T in ranking order (see the reference).
    ``block_users`` / ``tile_items`` (0: the defaults, 128 users and 512 float32 / 256 float64 items)
    set the blocking; the result does not depend on them (given the scores as computed)."""
    reference.topm_check(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset)
    why = available(user_vecs.device.type)
    if why is not None:
        raise RuntimeError(f"the cpp topm_dot is not available: {why}")
    if user_vecs.dtype in (torch.float16, torch.bfloat16):
        user_vecs, item_vecs = user_vecs.float(), item_vecs.float()
    ids, scores = native.ops().topm_dot(user_vecs, item_vecs, int(M), exclude_offsets, exclude_ids,
                                        int(item_offset), int(block_users), int(tile_items))
    return ids, scores
