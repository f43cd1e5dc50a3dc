"""The sets of RCE-KD from dense score rows: ``select`` (and the selection part of
``fused_fwd``).

Two phases, no sort of a row and no temporary of size B x N:

1. top-R candidates of each chunk (``_chunk_top_kernel``, grid B * n_chunks):
   a program loads CH items of a row, maps each score to the order-preserving
   uint32 image of its float32 value (excluded items -> 0), finds the R-th largest
   image by bisection over its bits (at most 32 steps for float32; 16 for bfloat16,
   19 for float16, whose low bits are constant; it stops as soon as exactly R
   items lie at or above the prefix found so far), takes the items above it and
   the ties at it in index order (a cumsum), and writes their composite keys
   ``image << 32 | (2**32 - 1 - item)`` compacted (cumsum slots) to a buffer
   (B, n_chunks * R). A row's true top-R is a subset of the union of its chunks'
   top-Rs, and the buffer stays in item order, so the same kernel (KEYS mode) is
   run again on the buffer until one chunk remains: (B, R) keys per row.
   Done for the student (R = M) and, when QT is not given, the teacher (R = K).
2. per row (``_rows_kernel``, grid B): sort the M pool keys (tl.sort, M <= 1024)
   -> student order; QT (sorted teacher keys or the given ids); the pool position
   of each QT item by binary search of its student key in the sorted pool keys;
   the integer counts by a suffix cumsum of marks at those positions; the Gumbel
   keys c / T + g(seed, row, item); the top-L sample by a sort of the composite
   (key image, item) values; membership of QT in A; q2_mask and the counts.
   With FUSED, the same program gathers s and t at [QS | A | QT] and computes
   the loss (see subset_ce.ce_one / ce_two).

Per-row scratch in global memory: (B, BLOCK_M) int64 + (B, BLOCK_M) int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import rng
from . import _common as C
from ._common import composite, gumbel, key_hi, key_item, ord_key, sampling_key, take_top
from .subset_ce import ce_one, ce_two


# ----------------------------------------------------------------------------- phase 1
@triton.jit(do_not_specialize=["src_s0", "ex_s0", "n_in", "n_chunks", "R"])
def _chunk_top_kernel(src_ptr, src_s0, src_s1, ex_ptr, ex_s0, ex_s1, out_ptr, n_in, n_chunks, R,
                      KEYS: tl.constexpr, HAS_EX: tl.constexpr, LOW: tl.constexpr, CH: tl.constexpr,
                      RADIX: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // n_chunks
    chunk = pid - row * n_chunks
    row64 = row.to(tl.int64)
    cols = chunk.to(tl.int64) * CH + tl.arange(0, CH)
    inb = cols < n_in
    if KEYS:
        # a candidate buffer: composite keys in item order, 0 = placeholder
        key = tl.load(src_ptr + row64 * src_s0 + cols, mask=inb, other=0).to(tl.uint64, bitcast=True)
        hi = key_hi(key)
    else:
        x = tl.load(src_ptr + row64 * src_s0 + cols * src_s1, mask=inb, other=0.0).to(tl.float32)
        valid = inb
        if HAS_EX:
            e = tl.load(ex_ptr + row64 * ex_s0 + cols * ex_s1, mask=inb, other=1)
            valid = valid & (e == 0)
        hi = tl.where(valid, ord_key(x), 0)
        key = tl.where(valid, composite(hi, cols), 0)
    take = take_top(hi >> LOW, R, 32 - LOW, RADIX)
    slot = tl.cumsum(take.to(tl.int32), 0) - 1
    dst = out_ptr + row64 * n_chunks * R + chunk * R
    tl.store(dst + slot, key.to(tl.int64, bitcast=True), mask=take)


def top_keys(x: torch.Tensor, exclude, R: int) -> torch.Tensor:
    """Composite keys of the top-R items of each row of x (B, N), unsorted: int64 (B, R)."""
    B, N = x.shape
    CH = C.chunk_size(R)
    low = C.low_bits(x.dtype)
    n_chunks = triton.cdiv(N, CH)
    out = torch.empty((B, n_chunks * R), dtype=torch.int64, device=x.device)
    ex = C.dummy_u8(x.device) if exclude is None else C.as_u8(exclude)
    warps = C.warps_for(CH)
    radix = C.select_algo() == "radix"
    _chunk_top_kernel[(B * n_chunks,)](
        x, x.stride(0), x.stride(1), ex, ex.stride(0), ex.stride(1), out, N, n_chunks, R,
        KEYS=False, HAS_EX=exclude is not None, LOW=low, CH=CH,
        RADIX=radix, num_warps=warps)
    while n_chunks > 1:  # merge: the top-R of the union of the chunks' top-Rs
        src, n_in = out, n_chunks * R
        n_chunks = triton.cdiv(n_in, CH)
        out = torch.empty((B, n_chunks * R), dtype=torch.int64, device=x.device)
        _chunk_top_kernel[(B * n_chunks,)](
            src, n_in, 1, src, 0, 0, out, n_in, n_chunks, R,
            KEYS=True, HAS_EX=False, LOW=low, CH=CH, RADIX=radix,
            num_warps=warps)
    return out


# ----------------------------------------------------------------------------- phase 2
@triton.jit(do_not_specialize=["s_s0", "s_s1", "t_s0", "t_s1", "ex_s0", "ex_s1", "tq_s0", "tq_s1", "qs_s0",
                              "a_s0", "qt_s0", "K", "M", "L", "has_ex", "qt_given", "paper"],
            do_not_specialize_on_alignment=["a_ptr", "qt_ptr"])
def _rows_kernel(s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, ex_ptr, ex_s0, ex_s1,
                 pool_ptr, tq_ptr, tq_s0, tq_s1, k2_ptr, scr_ptr, mark_ptr,
                 qs_ptr, qs_s0, a_ptr, a_s0, qt_ptr, qt_s0, q2_ptr, counts_ptr, loss_ptr, stats_ptr,
                 K, M, L, T_hi, T_lo, tau, beta, K_f, has_ex, qt_given, paper, FUSED: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 LOG_M: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    lk = tl.arange(0, BLOCK_K)
    mv = lm < M
    kv = lk < K
    s_row = s_ptr + row64 * s_s0

    # ---- the pool in student order
    pk = tl.load(pool_ptr + row64 * M + lm, mask=mv, other=0).to(tl.uint64, bitcast=True)
    pk = tl.sort(pk, descending=True)
    p_item = tl.where(mv, key_item(pk), 0)

    # ---- QT in teacher order
    if qt_given != 0:
        qt = tl.load(tq_ptr + row64 * tq_s0 + lk * tq_s1, mask=kv, other=0)
    else:
        tk = tl.load(tq_ptr + row64 * tq_s0 + lk, mask=kv, other=0).to(tl.uint64, bitcast=True)
        tk = tl.sort(tk, descending=True)
        qt = key_item(tk)
    qt = tl.where(kv, qt, 0)

    # ---- student key of each QT item; its pool position by binary search
    sq = tl.load(s_row + qt * s_s1, mask=kv, other=0.0).to(tl.float32)
    kq = composite(ord_key(sq), qt)
    if has_ex != 0:
        eq = tl.load(ex_ptr + row64 * ex_s0 + qt * ex_s1, mask=kv, other=0)
        kq = tl.where(eq != 0, 0, kq)
    scr = scr_ptr + row64 * BLOCK_M
    mark = mark_ptr + row64 * BLOCK_M
    tl.store(scr + lm, pk.to(tl.int64, bitcast=True))
    tl.store(mark + lm, tl.zeros([BLOCK_M], dtype=tl.int32))
    tl.debug_barrier()
    lo = tl.zeros([BLOCK_K], dtype=tl.int32)
    hi = tl.zeros([BLOCK_K], dtype=tl.int32) + M
    for _ in range(LOG_M):
        act = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(scr + mid, mask=act, other=0).to(tl.uint64, bitcast=True)
        lo = tl.where(act & (v > kq), mid + 1, lo)
        hi = tl.where(act & (v <= kq), mid, hi)
    pos = lo  # number of pool keys above: the position when in the pool, else M
    in_pool = kv & (pos < M)

    # ---- integer counts c of the pool positions (suffix counts of marks)
    marked = in_pool & ((pos >= K) | (paper == 0))  # paper: Q2 items only; official: all of QT
    tl.store(mark + pos, tl.full([BLOCK_K], 1, dtype=tl.int32), mask=marked)
    tl.debug_barrier()
    mk = tl.load(mark + lm)
    suffix = tl.cumsum(mk, 0, reverse=True)
    n_out = tl.sum((kv & (pos >= M)).to(tl.int32), 0)
    c = tl.where(paper != 0, n_out + suffix - mk, tl.minimum(suffix, 50))

    # ---- Gumbel-top-L sample
    k2 = tl.load(k2_ptr + row).to(tl.uint32)
    key = sampling_key(c, T_hi, T_lo, gumbel(k2, p_item))
    sk = tl.where(mv, composite(ord_key(key), p_item), 0)
    tl.store(scr + lm, sk.to(tl.int64, bitcast=True))
    ss = tl.sort(sk, descending=True)
    thr = tl.max(tl.where(lm == L - 1, ss, 0), 0)
    a_item = key_item(ss)
    tl.debug_barrier()
    skq = tl.load(scr + pos, mask=in_pool, other=0).to(tl.uint64, bitcast=True)
    in_a = in_pool & (skq >= thr)
    q2 = kv & (pos >= K) & (in_a == 0)
    n_q1 = tl.sum((kv & (pos < K)).to(tl.int32), 0)
    n_qa = tl.sum(in_a.to(tl.int32), 0)

    # ---- outputs
    tl.store(qs_ptr + row64 * qs_s0 + lm, p_item, mask=lm < K)
    tl.store(a_ptr + row64 * a_s0 + lm, a_item, mask=lm < L)
    tl.store(qt_ptr + row64 * qt_s0 + lk, qt, mask=kv)
    tl.store(q2_ptr + row64 * K + lk, q2.to(tl.uint8), mask=kv)
    if FUSED:
        t_row = t_ptr + row64 * t_s0
        qs_m = lm < K
        a_m = lm < L
        a_g = tl.where(a_m, a_item, 0)
        xs = tl.load(s_row + p_item * s_s1, mask=qs_m, other=0.0).to(tl.float32) / tau
        ys = tl.load(t_row + p_item * t_s1, mask=qs_m, other=0.0).to(tl.float32) / tau
        xa = tl.load(s_row + a_g * s_s1, mask=a_m, other=0.0).to(tl.float32) / tau
        ya = tl.load(t_row + a_g * t_s1, mask=a_m, other=0.0).to(tl.float32) / tau
        xq = sq / tau
        yq = tl.load(t_row + qt * t_s1, mask=kv, other=0.0).to(tl.float32) / tau
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
    else:
        tl.store(counts_ptr + row64 * 2, n_q1.to(tl.int64))
        tl.store(counts_ptr + row64 * 2 + 1, n_qa.to(tl.int64))


def run(s, t, teacher_topk, exclude, row_ids, cfg, seed, *, fused=False):
    """Launches the selection. ``fused`` computes the loss too and returns fused_fwd's
    outputs; otherwise select's outputs."""
    B, N = s.shape
    K, M, L, T, mode = cfg.K, cfg.m, cfg.L, cfg.T, cfg.mode
    dev = s.device
    pool = top_keys(s, exclude, M)
    if teacher_topk is None:
        tq = top_keys(t, exclude, K)
        tq_s = (tq.stride(0), 1)
    else:
        tq = teacher_topk
        tq_s = (tq.stride(0), tq.stride(1))
    BM, BK = C.block(M), C.block(K)
    scr = torch.empty((B, BM), dtype=torch.int64, device=dev)
    mark = torch.empty((B, BM), dtype=torch.int32, device=dev)
    k2 = rng.row_keys(seed, row_ids)
    q2 = torch.empty((B, K), dtype=torch.bool, device=dev)
    ex = C.dummy_u8(dev) if exclude is None else C.as_u8(exclude)
    tt = t if fused else s  # t is read only by the fused loss
    W = 2 * K + L
    idx = torch.empty((B, W), dtype=torch.int64, device=dev)
    outs = (idx, W, idx[:, K:], W, idx[:, K + L:], W)
    tau, beta = cfg.tau, cfg.beta
    if not fused:
        counts = torch.empty((B, 2), dtype=torch.int64, device=dev)
        loss = stats = counts
    else:
        loss = torch.empty((B,), dtype=torch.float32, device=dev)
        stats = torch.empty((B, 5), dtype=torch.float32, device=dev)
        counts = loss
    _rows_kernel[(B,)](
        s, s.stride(0), s.stride(1), tt, tt.stride(0), tt.stride(1), ex, ex.stride(0), ex.stride(1),
        pool, tq, tq_s[0], tq_s[1], k2, scr, mark, *outs, C.as_u8(q2), counts, loss, stats,
        K, M, L, *C.split_f64(T), float(tau), float(beta), float(K),
        int(exclude is not None), int(teacher_topk is not None), int(mode == "paper"),
        FUSED=fused, BLOCK_K=BK, BLOCK_M=BM,
        LOG_M=BM.bit_length(), num_warps=C.warps_for(4 * BM))
    if not fused:
        return idx, q2, counts
    return loss, stats, idx, q2


def select(s, t, teacher_topk, exclude, row_ids, cfg, seed):
    """The sets of each row: (idx = [QS | A | QT], q2_mask, counts)."""
    return run(s, t, teacher_topk, exclude, row_ids, cfg, seed)
