"""Subset cross-entropies on gathered scores: ``subset_ce_fwd`` and ``subset_ce_bwd``.

Gathered scores (B, 2K + L) are laid out [QS (K) | A (L) | QT (K)]; ``q2_mask``
(B, K) marks the QT columns that belong to U = A + (Q2 \\ A). One program per row:

    L1 = CE(softmax(t/tau), log_softmax(s/tau)) over QS
    L2 = the same over A and the masked QT columns
    loss = (1 - gamma) L1 + gamma L2

with max subtraction (log-sum-exp) and float32 arithmetic. The jit helpers
``ce_one`` / ``ce_two`` / ``soft_diff`` are shared with the fused kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def ce_one(x, y, m):
    """-sum_m softmax(y) log softmax(x) over the lanes m (x, y already divided by tau).

    Returns (ce, mx, sx, my, sy): the maxima and the sums of exp(. - max)."""
    mx = tl.max(tl.where(m, x, float("-inf")), 0)
    my = tl.max(tl.where(m, y, float("-inf")), 0)
    sx = tl.sum(tl.where(m, tl.exp(x - mx), 0.0), 0)
    ey = tl.where(m, tl.exp(y - my), 0.0)
    sy = tl.sum(ey, 0)
    lsx = tl.log(sx)
    ce = -tl.sum(tl.where(m, ey * (x - mx - lsx), 0.0), 0) / sy
    return ce, mx, sx, my, sy


@triton.jit
def ce_two(xa, ya, ma, xb, yb, mb):
    """``ce_one`` over the union of the lanes ma of (xa, ya) and mb of (xb, yb)."""
    mx = tl.maximum(tl.max(tl.where(ma, xa, float("-inf")), 0), tl.max(tl.where(mb, xb, float("-inf")), 0))
    my = tl.maximum(tl.max(tl.where(ma, ya, float("-inf")), 0), tl.max(tl.where(mb, yb, float("-inf")), 0))
    sx = tl.sum(tl.where(ma, tl.exp(xa - mx), 0.0), 0) + tl.sum(tl.where(mb, tl.exp(xb - mx), 0.0), 0)
    ea = tl.where(ma, tl.exp(ya - my), 0.0)
    eb = tl.where(mb, tl.exp(yb - my), 0.0)
    sy = tl.sum(ea, 0) + tl.sum(eb, 0)
    lsx = tl.log(sx)
    acc = tl.sum(tl.where(ma, ea * (xa - mx - lsx), 0.0), 0) + tl.sum(tl.where(mb, eb * (xb - mx - lsx), 0.0), 0)
    return -acc / sy, mx, sx, my, sy


@triton.jit
def soft_diff(x, y, m, mx, sx, my, sy, coef):
    """(softmax(x) - softmax(y)) * coef on the lanes m (0 elsewhere)."""
    return tl.where(m, (tl.exp(x - mx) / sx - tl.exp(y - my) / sy) * coef, 0.0)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _gathered_ce(row, s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, q2_ptr, q2_s0, q2_s1, K, L, tau,
                 BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """One row of gathered scores / tau and both cross-entropies with their softmax statistics."""
    lk = tl.arange(0, BLOCK_K)
    ll = tl.arange(0, BLOCK_L)
    kv = lk < K
    lv = ll < L
    c_qs = lk.to(tl.int64)
    c_a = (K + ll).to(tl.int64)
    c_qt = (K + L + lk).to(tl.int64)
    srow = s_ptr + row * s_s0
    trow = t_ptr + row * t_s0
    xs = C.load_f32(srow + c_qs * s_s1, kv) / tau
    ys = C.load_f32(trow + c_qs * t_s1, kv) / tau
    xa = C.load_f32(srow + c_a * s_s1, lv) / tau
    ya = C.load_f32(trow + c_a * t_s1, lv) / tau
    xq = C.load_f32(srow + c_qt * s_s1, kv) / tau
    yq = C.load_f32(trow + c_qt * t_s1, kv) / tau
    mq = kv & (tl.load(q2_ptr + row * q2_s0 + c_qs * q2_s1, mask=kv, other=0) != 0)
    l1, mx1, sx1, my1, sy1 = ce_one(xs, ys, kv)
    l2, mx2, sx2, my2, sy2 = ce_two(xa, ya, lv, xq, yq, mq)
    return (xs, ys, xa, ya, xq, yq, kv, lv, mq, c_qs, c_a, c_qt, l1, mx1, sx1, my1, sy1, l2, mx2, sx2, my2, sy2)


@triton.jit(do_not_specialize=["s_s0", "s_s1", "t_s0", "t_s1", "q2_s0", "q2_s1", "gam_s0", "K", "L"])
def _subset_fwd_kernel(s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, q2_ptr, q2_s0, q2_s1, gam_ptr, gam_s0,
                       loss_ptr, parts_ptr, K, L, tau, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = _gathered_ce(row, s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, q2_ptr, q2_s0, q2_s1, K, L, tau, BLOCK_K, BLOCK_L)
    l1 = r[12]
    l2 = r[17]
    gamma = tl.load(gam_ptr + row * gam_s0).to(tl.float32)
    tl.store(loss_ptr + row, (1.0 - gamma) * l1 + gamma * l2)
    tl.store(parts_ptr + row * 2, l1)
    tl.store(parts_ptr + row * 2 + 1, l2)


@triton.jit(do_not_specialize=["s_s0", "s_s1", "t_s0", "t_s1", "q2_s0", "q2_s1", "gam_s0", "gr_s0", "K", "L"])
def _subset_bwd_kernel(s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, q2_ptr, q2_s0, q2_s1, gam_ptr, gam_s0,
                       gr_ptr, gr_s0, grad_ptr, K, L, tau, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    (xs, ys, xa, ya, xq, yq, kv, lv, mq, c_qs, c_a, c_qt, _l1, mx1, sx1, my1, sy1, _l2, mx2, sx2, my2,
     sy2) = _gathered_ce(row, s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, q2_ptr, q2_s0, q2_s1, K, L, tau,
                         BLOCK_K, BLOCK_L)
    gamma = tl.load(gam_ptr + row * gam_s0).to(tl.float32)
    w = tl.load(gr_ptr + row * gr_s0).to(tl.float32) / tau
    grow = grad_ptr + row * (2 * K + L)
    tl.store(grow + c_qs, soft_diff(xs, ys, kv, mx1, sx1, my1, sy1, (1.0 - gamma) * w), mask=kv)
    tl.store(grow + c_a, soft_diff(xa, ya, lv, mx2, sx2, my2, sy2, gamma * w), mask=lv)
    tl.store(grow + c_qt, soft_diff(xq, yq, mq, mx2, sx2, my2, sy2, gamma * w), mask=kv)


# ----------------------------------------------------------------------------- launchers
def _args(s_g, t_g, q2_mask, gamma, cfg):
    """The keyword arguments shared by the forward and backward kernels."""
    q2 = C.as_u8(q2_mask)
    BK, BL = C.block(cfg.K), C.block(cfg.L)
    return dict(s_ptr=s_g, s_s0=s_g.stride(0), s_s1=s_g.stride(1), t_ptr=t_g, t_s0=t_g.stride(0),
                t_s1=t_g.stride(1), q2_ptr=q2, q2_s0=q2.stride(0), q2_s1=q2.stride(1), gam_ptr=gamma,
                gam_s0=gamma.stride(0), K=cfg.K, L=cfg.L, tau=float(cfg.tau), BLOCK_K=BK, BLOCK_L=BL,
                num_warps=C.warps_for(BK + BL))


def subset_ce_fwd(s_g, t_g, q2_mask, gamma, cfg):
    """Per-row loss on gathered scores [QS | A | QT] and (L1, L2) per row (float32)."""
    B = s_g.shape[0]
    loss = torch.empty((B,), dtype=torch.float32, device=s_g.device)
    parts = torch.empty((B, 2), dtype=torch.float32, device=s_g.device)
    _subset_fwd_kernel[(B,)](loss_ptr=loss, parts_ptr=parts, **_args(s_g, t_g, q2_mask, gamma, cfg))
    return loss, parts


def subset_ce_bwd(grad_rows, s_g, t_g, q2_mask, gamma, cfg):
    """d(sum_r grad_rows[r] * loss[r]) / d s_g, float32 (B, 2K + L)."""
    B = s_g.shape[0]
    grad = torch.empty((B, cfg.width), dtype=torch.float32, device=s_g.device)
    _subset_bwd_kernel[(B,)](gr_ptr=grad_rows, gr_s0=grad_rows.stride(0), grad_ptr=grad,
                             **_args(s_g, t_g, q2_mask, gamma, cfg))
    return grad
