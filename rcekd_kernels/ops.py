"""The ``torch.library`` custom ops of RCE-KD: schemas, fake impls, autograd.

Five ops, the same five that every backend implements (see
:mod:`rcekd_kernels.backends`)::

    rcekd::select         (dense rows) -> sets                        no gradient
    rcekd::subset_ce_fwd  (gathered scores, sets) -> loss rows       autograd -> subset_ce_bwd
    rcekd::subset_ce_bwd
    rcekd::fused_fwd      (dense rows) -> loss rows, stats, sets     autograd -> fused_bwd
    rcekd::fused_bwd

Each real implementation checks its arguments (:mod:`rcekd_kernels._checks`,
data checks only when ``validate``), handles the empty batch, then hands the
work to the backend named by ``backend`` ("auto" or a name) for the tensors'
device. Because the ops are opaque to ``torch.compile`` and have fake
implementations, a function that calls the loss compiles with ``fullgraph=True``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks
from .backends import resolve

Tensor = torch.Tensor

N_STATS = 5  # L1, L2, gamma, |Q1|, |QT & A|


def _cdtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- select
def _select_meta(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed, validate):
    _checks.check_dense(s, t, teacher_topk, exclude, row_ids, K=K, M=M, L=L, T=T, beta=0.0,
                        mode=mode, seed=seed, validate=validate, need_teacher_scores=False)
    B = s.shape[0]
    i64 = dict(dtype=torch.int64, device=s.device)
    return (s.new_empty((B, K), **i64), s.new_empty((B, L), **i64), s.new_empty((B, K), **i64),
            s.new_empty((B, K), dtype=torch.bool), s.new_empty((B, 2), **i64))


@torch.library.custom_op("rcekd::select", mutates_args=())
def select(s: Tensor, t: Optional[Tensor], teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
           row_ids: Tensor, K: int, M: int, L: int, T: float, mode: str, seed: int, backend: str,
           validate: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    empty = _select_meta(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed, validate)
    if s.shape[0] == 0:
        return empty
    return resolve(backend, s.device).select(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed)


@select.register_fake
def _(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed, backend, validate):
    return _select_meta(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed, False)


# ---------------------------------------------------------------------- subset CE
def _subset_meta(s_g, t_g, q2_mask, gamma, K, L, tau):
    _checks.check_gathered(s_g, t_g, q2_mask, gamma, K=K, L=L, tau=tau)
    B = s_g.shape[0]
    dt = _cdtype(s_g)
    return s_g.new_empty((B,), dtype=dt), s_g.new_empty((B, 2), dtype=dt)


@torch.library.custom_op("rcekd::subset_ce_fwd", mutates_args=())
def subset_ce_fwd(s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor, K: int, L: int, tau: float,
                  backend: str) -> Tuple[Tensor, Tensor]:
    empty = _subset_meta(s_g, t_g, q2_mask, gamma, K, L, tau)
    if s_g.shape[0] == 0:
        return empty
    return resolve(backend, s_g.device).subset_ce_fwd(s_g, t_g, q2_mask, gamma, K, L, tau)


@subset_ce_fwd.register_fake
def _(s_g, t_g, q2_mask, gamma, K, L, tau, backend):
    return _subset_meta(s_g, t_g, q2_mask, gamma, K, L, tau)


@torch.library.custom_op("rcekd::subset_ce_bwd", mutates_args=())
def subset_ce_bwd(grad_rows: Tensor, s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor, K: int,
                  L: int, tau: float, backend: str) -> Tensor:
    if s_g.shape[0] == 0:
        return torch.zeros_like(s_g)
    g = resolve(backend, s_g.device).subset_ce_bwd(grad_rows, s_g, t_g, q2_mask, gamma, K, L, tau)
    return g.to(s_g.dtype)


@subset_ce_bwd.register_fake
def _(grad_rows, s_g, t_g, q2_mask, gamma, K, L, tau, backend):
    return torch.empty_like(s_g)


def _subset_setup(ctx, inputs, output):
    s_g, t_g, q2_mask, gamma, K, L, tau, backend = inputs
    ctx.save_for_backward(s_g, t_g, q2_mask, gamma)
    ctx.hp = (K, L, tau, backend)


def _subset_backward(ctx, grad_loss, grad_parts):
    s_g, t_g, q2_mask, gamma = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = subset_ce_bwd(grad_loss, s_g, t_g, q2_mask, gamma, *ctx.hp)
    return grad, None, None, None, None, None, None, None


subset_ce_fwd.register_autograd(_subset_backward, setup_context=_subset_setup)


# --------------------------------------------------------------------- fused dense
def _fused_meta(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta, mode, seed, validate):
    _checks.check_dense(s, t, teacher_topk, exclude, row_ids, K=K, M=M, L=L, tau=tau, T=T, beta=beta,
                        mode=mode, seed=seed, validate=validate, need_teacher_scores=True)
    B = s.shape[0]
    dt = _cdtype(s)
    return (s.new_empty((B,), dtype=dt), s.new_empty((B, N_STATS), dtype=torch.float32),
            s.new_empty((B, 2 * K + L), dtype=torch.int64), s.new_empty((B, K), dtype=torch.bool))


@torch.library.custom_op("rcekd::fused_fwd", mutates_args=())
def fused_fwd(s: Tensor, t: Tensor, teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
              row_ids: Tensor, K: int, M: int, L: int, tau: float, T: float, beta: float, mode: str,
              seed: int, backend: str, validate: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    empty = _fused_meta(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta, mode, seed, validate)
    if s.shape[0] == 0:
        return empty
    return resolve(backend, s.device).fused_fwd(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T,
                                                beta, mode, seed)


@fused_fwd.register_fake
def _(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta, mode, seed, backend, validate):
    return _fused_meta(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta, mode, seed, False)


@torch.library.custom_op("rcekd::fused_bwd", mutates_args=())
def fused_bwd(grad_rows: Tensor, s: Tensor, t: Tensor, idx: Tensor, q2_mask: Tensor, gamma: Tensor,
              K: int, L: int, tau: float, backend: str) -> Tensor:
    if s.shape[0] == 0:
        return torch.zeros_like(s)
    return resolve(backend, s.device).fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, K, L, tau)


@fused_bwd.register_fake
def _(grad_rows, s, t, idx, q2_mask, gamma, K, L, tau, backend):
    return torch.empty_like(s)


def _fused_setup(ctx, inputs, output):
    s, t, _topk, _exclude, _rows, K, _M, L, tau, _T, _beta, _mode, _seed, backend, _validate = inputs
    _loss, stats, idx, q2_mask = output
    ctx.save_for_backward(s, t, idx, q2_mask, stats)
    ctx.hp = (K, L, tau, backend)


def fused_backward(ctx, grad_loss, *unused):
    """Backward of ``fused_fwd`` (shared by the op's autograd and RCEKDFunction)."""
    s, t, idx, q2_mask, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = fused_bwd(grad_loss, s, t, idx, q2_mask, stats[:, 2].contiguous(), *ctx.hp)
    return (grad,) + (None,) * 14


fused_fwd.register_autograd(fused_backward, setup_context=_fused_setup)
