"""The fused dense loss: ``fused_fwd`` (select + gather + subset CE from (B, N) rows)
and ``fused_bwd`` (the dense (B, N) gradient).

fused_fwd runs phase 1 of :mod:`.selection`, then ``_fused_rows_kernel``: per row,
the sets (``selection.row_sets``), then s and t gathered at [QS | A | QT] and the
loss, in the same program (no B x N temporary).

fused_bwd zero-fills the (B, N) output in s.dtype and scatters, one program per
row, the pre-combined gradient at the 2K + L gathered ids: an item in both QS and
A gets dL1 + dL2 (summed in float32, rounded once), QT columns outside U get
nothing. Membership of A items in QS (and of QS items in A) is found by comparing
the ids against tiles of the other list, so each output element is written by
exactly one lane (no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from . import selection as _select
from .subset_ce import ce_one, ce_two, soft_diff


@triton.jit(do_not_specialize=["s_s0", "s_s1", "t_s0", "t_s1", "ex_s0", "ex_s1", "tq_s0", "tq_s1", "W", "N", "K",
                              "M", "L", "has_ex", "qt_given", "paper"])
def _fused_rows_kernel(s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, ex_ptr, ex_s0, ex_s1, pool_ptr, tq_ptr, tq_s0, tq_s1,
                       k2_ptr, scr_ptr, mark_ptr, idx_ptr, W, q2_ptr, loss_ptr, stats_ptr, N, K, M, L, T_hi, T_lo, tau,
                       beta, K_f, has_ex, qt_given, paper, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       LOG_M: tl.constexpr):
    row64 = tl.program_id(0).to(tl.int64)
    p_item, qt, sq, a_item, q2, n_q1, n_qa = _select.row_sets(
        row64, s_ptr, s_s0, s_s1, ex_ptr, ex_s0, ex_s1, pool_ptr, tq_ptr, tq_s0, tq_s1, k2_ptr, scr_ptr, mark_ptr,
        N, K, M, L, T_hi, T_lo, has_ex, qt_given, paper, BLOCK_K, BLOCK_M, LOG_M)
    _select.store_sets(row64, idx_ptr, W, q2_ptr, p_item, qt, a_item, q2, K, L, BLOCK_K, BLOCK_M)
    lm = tl.arange(0, BLOCK_M)
    kv = tl.arange(0, BLOCK_K) < K
    s_row = s_ptr + row64 * s_s0
    t_row = t_ptr + row64 * t_s0
    qs_m = lm < K
    a_m = lm < L
    a_g = tl.where(a_m, a_item, 0)
    xs = C.load_f32(s_row + p_item * s_s1, qs_m) / tau
    ys = C.load_f32(t_row + p_item * t_s1, qs_m) / tau
    xa = C.load_f32(s_row + a_g * s_s1, a_m) / tau
    ya = C.load_f32(t_row + a_g * t_s1, a_m) / tau
    xq = sq / tau
    yq = C.load_f32(t_row + qt * t_s1, kv) / tau
    l1, _mx1, _sx1, _my1, _sy1 = ce_one(xs, ys, qs_m)
    l2, _mx2, _sx2, _my2, _sy2 = ce_two(xa, ya, a_m, xq, yq, q2)
    n = tl.where(paper != 0, n_q1, n_qa)
    gamma = tl.exp(tl.math.div_rn(-(beta * n.to(tl.float32)), K_f))
    tl.store(loss_ptr + row64, (1.0 - gamma) * l1 + gamma * l2)
    st = stats_ptr + row64 * 5
    tl.store(st, l1)
    tl.store(st + 1, l2)
    tl.store(st + 2, gamma)
    tl.store(st + 3, n_q1.to(tl.float32))
    tl.store(st + 4, n_qa.to(tl.float32))


def fused_fwd(s, t, teacher_topk, exclude, row_ids, cfg, seed):
    """Loss rows, stats (B, 5) = (L1, L2, gamma, |Q1|, |QT & A|), idx = [QS | A | QT]
    (B, 2K + L) and q2_mask (B, K)."""
    kw, idx, q2 = _select.prepare(s, t, teacher_topk, exclude, row_ids, cfg, seed)
    B = s.shape[0]
    loss = torch.empty((B,), dtype=torch.float32, device=s.device)
    stats = torch.empty((B, 5), dtype=torch.float32, device=s.device)
    _fused_rows_kernel[(B,)](t_ptr=t, t_s0=t.stride(0), t_s1=t.stride(1), loss_ptr=loss, stats_ptr=stats,
                             tau=float(cfg.tau), beta=float(cfg.beta), K_f=float(cfg.K), **kw)
    return loss, stats, idx, q2


@triton.jit
def _member(q, ids_ptr, n, stride, TILE: tl.constexpr):
    """1 for each lane of q (int64 ids, -2 on masked lanes) found among the n ids at
    ids_ptr[j * stride], else 0 (int32)."""
    found = tl.zeros(q.shape, dtype=tl.int32)
    for j0 in range(0, n, TILE):
        jj = j0 + tl.arange(0, TILE)
        tile = tl.load(ids_ptr + jj.to(tl.int64) * stride, mask=jj < n, other=-1)
        hit = (q[:, None] == tile[None, :]).to(tl.int32)
        found = tl.maximum(found, tl.max(hit, 1))
    return found


@triton.jit(do_not_specialize=["gr_s0", "s_s0", "s_s1", "t_s0", "t_s1", "i_s0", "i_s1", "q2_s0", "q2_s1",
                              "gam_s0", "N", "K", "L"])
def _fused_bwd_kernel(gr_ptr, gr_s0, s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, idx_ptr, i_s0, i_s1,
                      q2_ptr, q2_s0, q2_s1, gam_ptr, gam_s0, out_ptr, N, K, L, tau,
                      BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lk = tl.arange(0, BLOCK_K)
    ll = tl.arange(0, BLOCK_L)
    kv = lk < K
    lv = ll < L
    irow = idx_ptr + row * i_s0
    qs = tl.load(irow + lk.to(tl.int64) * i_s1, mask=kv, other=-2)
    a = tl.load(irow + (K + ll).to(tl.int64) * i_s1, mask=lv, other=-2)
    qt = tl.load(irow + (K + L + lk).to(tl.int64) * i_s1, mask=kv, other=-2)
    mq = kv & (tl.load(q2_ptr + row * q2_s0 + lk * q2_s1, mask=kv, other=0) != 0)
    # ids outside [0, N) (only in a direct call with a made-up idx) read item 0 and get no gradient:
    # nothing is read or written outside the rows
    ok_qs = (qs >= 0) & (qs < N)
    ok_a = (a >= 0) & (a < N)
    ok_qt = (qt >= 0) & (qt < N)
    s_row = s_ptr + row * s_s0
    t_row = t_ptr + row * t_s0
    qs_r = tl.where(ok_qs, qs, 0)
    a_r = tl.where(ok_a, a, 0)
    qt_r = tl.where(ok_qt, qt, 0)
    xs = C.load_f32(s_row + qs_r * s_s1, kv) / tau
    ys = C.load_f32(t_row + qs_r * t_s1, kv) / tau
    xa = C.load_f32(s_row + a_r * s_s1, lv) / tau
    ya = C.load_f32(t_row + a_r * t_s1, lv) / tau
    xq = C.load_f32(s_row + qt_r * s_s1, mq) / tau
    yq = C.load_f32(t_row + qt_r * t_s1, mq) / tau
    _l1, mx1, sx1, my1, sy1 = ce_one(xs, ys, kv)
    _l2, mx2, sx2, my2, sy2 = ce_two(xa, ya, lv, xq, yq, mq)
    gamma = tl.load(gam_ptr + row * gam_s0).to(tl.float32)
    w = tl.load(gr_ptr + row * gr_s0).to(tl.float32) / tau
    c1 = (1.0 - gamma) * w
    c2 = gamma * w
    a_in_qs = _member(a, irow, K, i_s1, TILE) != 0
    qs_in_a = _member(qs, irow + K * i_s1, L, i_s1, TILE) != 0
    d_qs = soft_diff(xs, ys, kv, mx1, sx1, my1, sy1, c1)
    d_a = soft_diff(xa, ya, lv, mx2, sx2, my2, sy2, c2) + soft_diff(xa, ya, lv & a_in_qs, mx1, sx1, my1, sy1, c1)
    d_qt = soft_diff(xq, yq, mq, mx2, sx2, my2, sy2, c2)
    o_row = out_ptr + row * N
    tl.store(o_row + qs_r, d_qs, mask=kv & ok_qs & (qs_in_a == 0))
    tl.store(o_row + a_r, d_a, mask=lv & ok_a)
    tl.store(o_row + qt_r, d_qt, mask=mq & ok_qt)


def fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, cfg):
    """Dense gradient (B, N) in the dtype of s: zero except at the gathered ids."""
    K, L, tau = cfg.K, cfg.L, cfg.tau
    B, N = s.shape
    out = torch.zeros((B, N), dtype=s.dtype, device=s.device)
    q2 = C.as_u8(q2_mask)
    BK, BL = C.block(K), C.block(L)
    _fused_bwd_kernel[(B,)](
        gr_ptr=grad_rows, gr_s0=grad_rows.stride(0), s_ptr=s, s_s0=s.stride(0), s_s1=s.stride(1), t_ptr=t,
        t_s0=t.stride(0), t_s1=t.stride(1), idx_ptr=idx, i_s0=idx.stride(0), i_s1=idx.stride(1), q2_ptr=q2,
        q2_s0=q2.stride(0), q2_s1=q2.stride(1), gam_ptr=gamma, gam_s0=gamma.stride(0), out_ptr=out, N=N, K=K, L=L,
        tau=float(tau), BLOCK_K=BK, BLOCK_L=BL, TILE=32, num_warps=C.warps_for(2 * (BK + BL)))
    return out
