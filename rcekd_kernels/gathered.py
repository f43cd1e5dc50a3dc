"""Scores of given items: ``out[b, w] = <user_vecs[b], item_vecs[idx[b, w]]>``.

The per-epoch protocol of RCE-KD scores, in every training step, only the 2K + L
items ``Selection.indices`` of each user. With ``index_select`` + ``bmm`` that
makes a (B, W, D) tensor of gathered item vectors and, in the backward, a
(B, W, D) gradient scattered back with ``index_add``: most of the cost of a KD
step of a small model on a CPU. ``gathered_dot`` computes the same values and
gradients without either (C++ kernel of the compiled extension on the CPU,
deterministic for any number of threads); elsewhere (CUDA tensors, no extension)
it runs the torch formulation, which is its oracle in the tests.

It is the custom op ``rcekd::gathered_dot`` (with a fake implementation and
autograd), so ``torch.compile`` traces it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .backends import native

BACKENDS = ("auto", "reference", "cpp")


def _torch_fwd(u: Tensor, v: Tensor, idx: Tensor) -> Tensor:
    B, W = idx.shape
    gathered = v.index_select(0, idx.reshape(-1)).view(B, W, v.shape[1])
    return torch.bmm(gathered, u.unsqueeze(-1)).squeeze(-1)


def _torch_bwd(g: Tensor, u: Tensor, v: Tensor, idx: Tensor):
    B, W = idx.shape
    g = g.to(u.dtype)
    gathered = v.index_select(0, idx.reshape(-1)).view(B, W, v.shape[1])
    gu = torch.bmm(g.unsqueeze(1), gathered).squeeze(1)
    contrib = (g.unsqueeze(-1) * u.unsqueeze(1)).reshape(B * W, u.shape[1])
    gv = torch.zeros_like(v).index_add_(0, idx.reshape(-1), contrib)
    return gu, gv


def _use_cpp(backend: str, u: Tensor) -> bool:
    ok = (u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64) and native.load_error() is None
          and hasattr(native.ops(), "gathered_dot"))
    if backend == "cpp" and not ok:
        why = native.load_error() or "the extension has no gathered_dot (rebuild it) or the tensors are not " \
                                     "float32/float64 on the CPU"
        raise RuntimeError(f"gathered_dot: backend 'cpp' is not available: {why}")
    return ok and backend in ("auto", "cpp")


@torch.library.custom_op("rcekd::gathered_dot", mutates_args=())
def _gathered_dot(user_vecs: Tensor, item_vecs: Tensor, idx: Tensor, backend: str) -> Tensor:
    if _use_cpp(backend, user_vecs):
        return native.ops().gathered_dot(user_vecs, item_vecs, idx)
    return _torch_fwd(user_vecs, item_vecs, idx)


@_gathered_dot.register_fake
def _(user_vecs, item_vecs, idx, backend):
    return user_vecs.new_empty(idx.shape)


@torch.library.custom_op("rcekd::gathered_dot_bwd", mutates_args=())
def _gathered_dot_bwd(grad: Tensor, user_vecs: Tensor, item_vecs: Tensor, idx: Tensor,
                      backend: str) -> tuple[Tensor, Tensor]:
    if _use_cpp(backend, user_vecs):
        return native.ops().gathered_dot_bwd(grad, user_vecs, item_vecs, idx)
    return _torch_bwd(grad, user_vecs, item_vecs, idx)


@_gathered_dot_bwd.register_fake
def _(grad, user_vecs, item_vecs, idx, backend):
    return torch.empty_like(user_vecs), torch.empty_like(item_vecs)


def _setup(ctx, inputs, output):
    u, v, idx, backend = inputs
    ctx.save_for_backward(u, v, idx)
    ctx.backend = backend


def _backward(ctx, grad):
    u, v, idx = ctx.saved_tensors
    gu, gv = _gathered_dot_bwd(grad.contiguous(), u, v, idx, ctx.backend)
    return (gu if ctx.needs_input_grad[0] else None), (gv if ctx.needs_input_grad[1] else None), None, None


_gathered_dot.register_autograd(_backward, setup_context=_setup)


def gathered_dot(user_vecs: Tensor, item_vecs: Tensor, idx: Tensor, *, backend: Optional[str] = None,
                 validate: bool = True) -> Tensor:
    """``out[b, w] = <user_vecs[b], item_vecs[idx[b, w]]>``: (B, D), (N, D), int64 (B, W) -> (B, W),
    differentiable in ``user_vecs`` and ``item_vecs``.

    ``backend``: ``auto`` (default: the C++ kernel for float32/float64 CPU tensors when the
    extension is built, else torch), ``reference`` (torch: index_select + bmm) or ``cpp``.
    ``validate`` reads ``idx`` once to check that the ids lie in [0, N) (a host synchronisation
    on a GPU); pass False in a loop whose ids are known to be valid (e.g. from ``select``).
    """
    backend = backend or "auto"
    _checks.check_choice("backend", backend, BACKENDS)
    _checks.check_gathered_dot(user_vecs, item_vecs, idx, validate=validate)
    return _gathered_dot(user_vecs, item_vecs, idx, backend)
