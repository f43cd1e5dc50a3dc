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
2. per row (:func:`row_sets`, a jit function run by ``_select_rows_kernel`` here
   and by ``fused._fused_rows_kernel``; grid B): sort the M pool keys (tl.sort,
   M <= 1024) -> student order; QT (sorted teacher keys or the given ids); the
   pool position of each QT item by binary search of its student key in the
   sorted pool keys; the integer counts by a suffix cumsum of marks at those
   positions; the Gumbel keys c / T + g(seed, row, item); the top-L sample by a
   sort of the composite (key image, item) values; membership of QT in A;
   q2_mask and the counts. The fused kernel then gathers s and t at
   [QS | A | QT] and computes the loss in the same program.

Kernels are launched by keyword (:func:`prepare` builds the shared arguments).

Per-row scratch in global memory: (B, BLOCK_M) int64 + (B, BLOCK_M) int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import rng
from . import _common as C
from ._common import OFFICIAL_CAP, composite, gumbel, key_hi, key_item, ord_key, sampling_key, take_top


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
        x = C.load_f32(src_ptr + row64 * src_s0 + cols * src_s1, inb)
        valid = inb
        if HAS_EX:
            e = tl.load(ex_ptr + row64 * ex_s0 + cols * ex_s1, mask=inb, other=1)
            valid = valid & (e == 0)
        hi = tl.where(valid, ord_key(x), 0)
        # an excluded item keeps its id under the smallest score image (it ranks below every other
        # item, by id: only a row with fewer than M eligible items, under validate=False, takes
        # one); 0 only for the lanes past the row's end
        key = tl.where(inb, composite(hi, cols), 0)
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
        src_ptr=x, src_s0=x.stride(0), src_s1=x.stride(1), ex_ptr=ex, ex_s0=ex.stride(0), ex_s1=ex.stride(1),
        out_ptr=out, n_in=N, n_chunks=n_chunks, R=R, KEYS=False, HAS_EX=exclude is not None, LOW=low, CH=CH,
        RADIX=radix, num_warps=warps)
    while n_chunks > 1:  # merge: the top-R of the union of the chunks' top-Rs
        src, n_in = out, n_chunks * R
        n_chunks = triton.cdiv(n_in, CH)
        out = torch.empty((B, n_chunks * R), dtype=torch.int64, device=x.device)
        # (no mask in KEYS mode: ex_ptr is the unread dummy)
        _chunk_top_kernel[(B * n_chunks,)](
            src_ptr=src, src_s0=n_in, src_s1=1, ex_ptr=C.dummy_u8(x.device), ex_s0=0, ex_s1=0, out_ptr=out,
            n_in=n_in, n_chunks=n_chunks, R=R, KEYS=True, HAS_EX=False, LOW=low, CH=CH, RADIX=radix,
            num_warps=warps)
    return out


# ----------------------------------------------------------------------------- phase 2
@triton.jit
def row_sets(row64, s_ptr, s_s0, s_s1, ex_ptr, ex_s0, ex_s1, pool_ptr, tq_ptr, tq_s0, tq_s1, k2_ptr,
             scr_ptr, mark_ptr, N, K, M, L, T_hi, T_lo, has_ex, qt_given, paper,
             BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, LOG_M: tl.constexpr):
    """The sets of one row from its pool keys (phase 1) and QT (keys or given ids).

    Returns (p_item: the pool in student order (BLOCK_M lanes), qt (BLOCK_K), sq: the
    student scores of QT, a_item: the pool by decreasing sampling key (the first L are A),
    q2: QT items in Q2 and not sampled, n_q1 = |Q1|, n_qa = |QT & A|)."""
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
        # given ids are checked when validate=True; otherwise one outside [0, N) is clamped into
        # it, so that nothing is read or written outside the rows (that row's loss is unspecified)
        qt = tl.load(tq_ptr + row64 * tq_s0 + lk * tq_s1, mask=kv, other=0)
        qt = tl.minimum(tl.maximum(qt, 0), N - 1)
    else:
        tk = tl.load(tq_ptr + row64 * tq_s0 + lk, mask=kv, other=0).to(tl.uint64, bitcast=True)
        tk = tl.sort(tk, descending=True)
        qt = key_item(tk)
    qt = tl.where(kv, qt, 0)

    # ---- student key of each QT item; its pool position by binary search
    sq = C.load_f32(s_row + qt * s_s1, kv)
    kq = composite(ord_key(sq), qt)
    if has_ex != 0:
        eq = tl.load(ex_ptr + row64 * ex_s0 + qt * ex_s1, mask=kv, other=0)
        kq = tl.where(eq != 0, composite(tl.zeros_like(ord_key(sq)), qt), kq)  # as in phase 1
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
    c = tl.where(paper != 0, n_out + suffix - mk, tl.minimum(suffix, OFFICIAL_CAP))

    # ---- Gumbel-top-L sample
    k2 = tl.load(k2_ptr + row64).to(tl.uint32)
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
    return p_item, qt, sq, a_item, q2, n_q1, n_qa


@triton.jit
def store_sets(row64, idx_ptr, W, q2_ptr, p_item, qt, a_item, q2, K, L,
               BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """Writes a row's [QS | A | QT] into idx (B, W) and its q2_mask (B, K)."""
    lm = tl.arange(0, BLOCK_M)
    lk = tl.arange(0, BLOCK_K)
    irow = idx_ptr + row64 * W
    tl.store(irow + lm, p_item, mask=lm < K)
    tl.store(irow + K + lm, a_item, mask=lm < L)
    tl.store(irow + K + L + lk, qt, mask=lk < K)
    tl.store(q2_ptr + row64 * K + lk, q2.to(tl.uint8), mask=lk < K)


@triton.jit(do_not_specialize=["s_s0", "s_s1", "ex_s0", "ex_s1", "tq_s0", "tq_s1", "W", "N", "K", "M", "L",
                              "has_ex", "qt_given", "paper"])
def _select_rows_kernel(s_ptr, s_s0, s_s1, ex_ptr, ex_s0, ex_s1, pool_ptr, tq_ptr, tq_s0, tq_s1, k2_ptr,
                        scr_ptr, mark_ptr, idx_ptr, W, q2_ptr, counts_ptr, N, K, M, L, T_hi, T_lo, has_ex, qt_given,
                        paper, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, LOG_M: tl.constexpr):
    row64 = tl.program_id(0).to(tl.int64)
    p_item, qt, _sq, a_item, q2, n_q1, n_qa = row_sets(
        row64, s_ptr, s_s0, s_s1, ex_ptr, ex_s0, ex_s1, pool_ptr, tq_ptr, tq_s0, tq_s1, k2_ptr, scr_ptr, mark_ptr,
        N, K, M, L, T_hi, T_lo, has_ex, qt_given, paper, BLOCK_K, BLOCK_M, LOG_M)
    store_sets(row64, idx_ptr, W, q2_ptr, p_item, qt, a_item, q2, K, L, BLOCK_K, BLOCK_M)
    tl.store(counts_ptr + row64 * 2, n_q1.to(tl.int64))
    tl.store(counts_ptr + row64 * 2 + 1, n_qa.to(tl.int64))


def prepare(s, t, teacher_topk, exclude, row_ids, cfg, seed):
    """Phase 1 and the arguments of a phase-2 kernel shared by select and fused_fwd: a dict of
    keyword arguments (tensors, strides, sizes, flags, block sizes) and the outputs idx, q2_mask."""
    B, N = s.shape
    K, M, L = cfg.K, cfg.m, cfg.L
    dev = s.device
    pool = top_keys(s, exclude, M)
    if teacher_topk is None:
        tq, tq_s = top_keys(t, exclude, K), None
    else:
        tq, tq_s = teacher_topk, (teacher_topk.stride(0), teacher_topk.stride(1))
    BM, BK = C.block(M), C.block(K)
    ex = C.dummy_u8(dev) if exclude is None else C.as_u8(exclude)
    idx = torch.empty((B, 2 * K + L), dtype=torch.int64, device=dev)
    q2 = torch.empty((B, K), dtype=torch.bool, device=dev)
    T_hi, T_lo = C.split_f64(cfg.T)
    kw = dict(s_ptr=s, s_s0=s.stride(0), s_s1=s.stride(1), ex_ptr=ex, ex_s0=ex.stride(0), ex_s1=ex.stride(1),
              pool_ptr=pool, tq_ptr=tq, tq_s0=tq.stride(0) if tq_s is None else tq_s[0],
              tq_s1=1 if tq_s is None else tq_s[1], k2_ptr=rng.row_keys(seed, row_ids),
              scr_ptr=torch.empty((B, BM), dtype=torch.int64, device=dev),
              mark_ptr=torch.empty((B, BM), dtype=torch.int32, device=dev),
              idx_ptr=idx, W=2 * K + L, q2_ptr=C.as_u8(q2), N=N, K=K, M=M, L=L, T_hi=T_hi, T_lo=T_lo,
              has_ex=int(exclude is not None), qt_given=int(teacher_topk is not None), paper=int(cfg.mode == "paper"),
              BLOCK_K=BK, BLOCK_M=BM, LOG_M=BM.bit_length(), num_warps=C.warps_for(4 * BM))
    return kw, idx, q2


def select(s, t, teacher_topk, exclude, row_ids, cfg, seed):
    """The sets of each row: (idx = [QS | A | QT], q2_mask, counts)."""
    kw, idx, q2 = prepare(s, t, teacher_topk, exclude, row_ids, cfg, seed)
    counts = torch.empty((s.shape[0], 2), dtype=torch.int64, device=s.device)
    _select_rows_kernel[(s.shape[0],)](counts_ptr=counts, **kw)
    return idx, q2, counts
