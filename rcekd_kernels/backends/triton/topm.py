"""Streaming top-M of a matrix product in Triton: ``topm_dot`` (the op of
:func:`rcekd_kernels.backends.reference.topm_dot`, same arguments and results).

For user vectors U (B, D) and item vectors V (N, D): each row's first M items of
s[b, j] = U[b] . V[j] in ranking order (larger score first, ties to the smaller item
id), items excluded for the row never taken, without ever writing the (B, N) scores.

Design: a streaming threshold with compaction of the survivors, exact by construction.

1. **Sweep** (``_sweep_kernel``, grid = (user blocks of BLOCK_B rows, item splits)).
   A program walks the item tiles of its split in ascending order. Per tile:
   ``tl.dot`` of the (BLOCK_B, D) user block with the (D, BLOCK_N) item tile
   (float32 accumulation; ``input_precision="ieee"`` for float32 inputs, so no TF32),
   the order-preserving uint32 image ``hi`` of each score, and the survivors
   ``hi > thr[row]``, where ``thr[row]`` is the image of the row's M-th best eligible
   score so far (-1 = take everything while fewer than M are known). Items reach a
   row in ascending id, so an item whose score equals the threshold loses the tie to
   the threshold's item: the strict test is exact. The survivors' composite keys
   ``hi << 32 | (2**32 - 1 - item)`` (unique; larger = earlier in ranking order) are
   appended, compacted by a cumsum, to the row's candidate buffer of CAP keys in
   global memory (CAP >= M + BLOCK_N, a power of two). Before a tile would overflow a
   row's buffer, that row is cut back (``_cut_row``): its keys are loaded, the
   excluded items removed (binary search of each key's item in the row's sorted list
   of in-shard excluded ids), sorted (``tl.sort``), the first M kept and the threshold
   raised to the M-th. Excluded items therefore never count towards the threshold,
   and after a cut the buffer holds at most M keys, so a whole tile always fits. At
   the end of its split a program cuts every row once more: each (split, row) then
   holds its at most M best eligible keys, sorted.
2. **Merge** (``_merge_kernel``, grid = B): a row's n_splits lists are loaded into
   one block, sorted, and the first M written out as ids and scores (the score is the
   inverse of the order-preserving image; empty places are id -1, score -inf).

The result is the unique top-M of the row's keys, whatever the tile sizes and the
number of splits (given the scores as ``tl.dot`` computes them). No bound from a
sample is needed, so there is no overflow fallback: the cut is the fallback, and the
common case after the first tiles is a tile with no survivor at all, which costs the
dot product, one comparison per score and one block-wide maximum.

Memory: the candidate buffers, n_splits * B * CAP int64 (4 MB per 1024 rows and
split at M = 200, BLOCK_N = 64), the sorted exclusion lists (O(nnz)) and the outputs.

Runs on CUDA tensors, and on CPU tensors in Triton's interpreter. float32 / bfloat16 /
float16 vectors (float32 arithmetic); float64 goes to the reference backend. M (or N,
when smaller) up to :data:`MAX_M`; N < 2**31.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import spec
from ._common import composite, interpreting, key_hi, key_item, ord_key

Tensor = torch.Tensor

#: Largest min(M, N) the kernels accept (a row's list lives in one program).
MAX_M = 1024
#: Largest number of lanes of the merge (n_splits * block(M)).
MAX_MERGE = 8192
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _top_keep(k, M):
    """Mask of the at most M largest nonzero keys of each row of the uint64 block k (R, W)
    (nonzero keys unique within a row), and the number of nonzero keys of each row: a
    bisection over the 64 bits finds the smallest prefix with exactly M keys at or above it."""
    nz = k != 0
    n_ok = tl.sum(nz.to(tl.int32), 1)
    big = n_ok > M
    prefix = tl.zeros(n_ok.shape, dtype=tl.uint64)
    n_ge = n_ok
    go = big
    bit = tl.full((), 1, tl.uint64) << 63
    while (bit != 0) & (tl.max(go.to(tl.int32), 0) > 0):
        cand = prefix | bit
        c = tl.sum((k >= cand[:, None]).to(tl.int32), 1)
        up = go & (c >= M)
        prefix = tl.where(up, cand, prefix)
        n_ge = tl.where(up, c, n_ge)
        go = big & (n_ge != M)
        bit = bit >> 1
    keep = nz & ((big == 0)[:, None] | (k >= prefix[:, None]))
    return keep, n_ok


@triton.jit
def _cut_rows(buf_ptr, cnt_ptr, thr_ptr, sidx, rows, active, exo_ptr, exi_ptr, log_e, M,
              HAS_EX: tl.constexpr, CAP: tl.constexpr):
    """Cut the candidate buffers of the states ``sidx`` (rows ``rows``; (R,) int64, only where
    ``active``) back to their at most M best eligible keys (unsorted), and raise each
    threshold to the image of the M-th key when the row has M eligible keys."""
    lanes = tl.arange(0, CAP)[None, :]
    cnt = tl.load(cnt_ptr + sidx, mask=active, other=0)
    ptrs = buf_ptr + sidx[:, None] * CAP + lanes
    k = tl.load(ptrs, mask=active[:, None] & (lanes < cnt[:, None]), other=0).to(tl.uint64, bitcast=True)
    if HAS_EX:  # drop the excluded items: lower bound of each item in the row's sorted excluded ids
        item = key_item(k)
        zero = tl.zeros(k.shape, dtype=tl.int64)
        e_hi = zero + tl.load(exo_ptr + rows + 1, mask=active, other=0)[:, None]
        lo = zero + tl.load(exo_ptr + rows, mask=active, other=0)[:, None]
        hi = e_hi
        for _ in range(log_e):
            act = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(exi_ptr + mid, mask=act, other=0)
            lo = tl.where(act & (v < item), mid + 1, lo)
            hi = tl.where(act & (v >= item), mid, hi)
        found = lo < e_hi
        v = tl.load(exi_ptr + lo, mask=found, other=-1)
        k = tl.where(found & (v == item), 0, k)
    keep, n_ok = _top_keep(k, M)
    n_keep = tl.sum(keep.to(tl.int32), 1)
    h_min = tl.min(tl.where(keep, key_hi(k), tl.full((), 0xFFFFFFFF, tl.uint32)), 1)
    pos = tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.debug_barrier()  # every lane is loaded before the buffer is compacted in place
    tl.store(buf_ptr + sidx[:, None] * CAP + pos, k.to(tl.int64, bitcast=True), mask=active[:, None] & keep)
    old = tl.load(thr_ptr + sidx, mask=active, other=-1)
    tl.store(thr_ptr + sidx, tl.where(n_ok >= M, h_min.to(tl.int64), old), mask=active)
    tl.store(cnt_ptr + sidx, n_keep, mask=active)


@triton.jit(do_not_specialize=["u_s0", "u_s1", "v_s0", "v_s1", "B", "N", "D", "log_e", "M",
                              "tiles_per_split", "n_tiles"])
def _sweep_kernel(u_ptr, u_s0, u_s1, v_ptr, v_s0, v_s1, B, N, D,
                  buf_ptr, cnt_ptr, thr_ptr, exo_ptr, exi_ptr, log_e, M, tiles_per_split, n_tiles,
                  HAS_EX: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, CAP: tl.constexpr, CUT_ROWS: tl.constexpr, UPCAST: tl.constexpr = False):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    lb = tl.arange(0, BLOCK_B)
    lg = tl.arange(0, CUT_ROWS)
    rows = pid * BLOCK_B + lb
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    s_base = split.to(tl.int64) * B
    sidx = s_base + rows64  # this (split, row)'s state
    ln = tl.arange(0, BLOCK_N)
    ld = tl.arange(0, BLOCK_D)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        cols = t * BLOCK_N + ln
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + ld
            d_ok = dd < D
            a = tl.load(u_ptr + rows64[:, None] * u_s0 + dd[None, :] * u_s1,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(v_ptr + cols64[None, :] * v_s0 + dd[:, None] * v_s1,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot of bfloat16 blocks is wrong (Triton 3.6); float32 is exact here
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        hi = ord_key(acc)
        thr = tl.load(thr_ptr + sidx, mask=row_ok, other=0)
        ok = row_ok[:, None] & col_ok[None, :]
        surv = ok & (hi.to(tl.int64) > thr[:, None])
        n = tl.sum(surv.to(tl.int32), 1)
        if tl.max(n, 0) > 0:
            cnt = tl.load(cnt_ptr + sidx, mask=row_ok, other=0)
            need = (row_ok & (cnt + n > CAP)).to(tl.int32)
            if tl.max(need, 0) > 0:  # some rows would overflow: cut them back first
                for r0 in range(0, BLOCK_B, CUT_ROWS):
                    g_need = tl.sum(tl.where(lb[None, :] == (r0 + lg)[:, None], need[None, :], 0), 1) > 0
                    if tl.max(g_need.to(tl.int32), 0) > 0:
                        g_rows = (pid * BLOCK_B + r0 + lg).to(tl.int64)
                        _cut_rows(buf_ptr, cnt_ptr, thr_ptr, s_base + g_rows, g_rows, g_need, exo_ptr, exi_ptr,
                                  log_e, M, HAS_EX, CAP)
                tl.debug_barrier()
                thr = tl.load(thr_ptr + sidx, mask=row_ok, other=0)
                cnt = tl.load(cnt_ptr + sidx, mask=row_ok, other=0)
                surv = ok & (hi.to(tl.int64) > thr[:, None])
                n = tl.sum(surv.to(tl.int32), 1)
            pos = cnt[:, None] + tl.cumsum(surv.to(tl.int32), 1) - 1
            key = composite(hi, cols64[None, :])
            tl.store(buf_ptr + sidx[:, None] * CAP + pos, key.to(tl.int64, bitcast=True), mask=surv)
            tl.store(cnt_ptr + sidx, cnt + n, mask=row_ok)
            tl.debug_barrier()
    for r0 in range(0, BLOCK_B, CUT_ROWS):  # every (split, row) ends with its at most M best eligible keys
        g_rows = (pid * BLOCK_B + r0 + lg).to(tl.int64)
        _cut_rows(buf_ptr, cnt_ptr, thr_ptr, s_base + g_rows, g_rows, g_rows < B, exo_ptr, exi_ptr, log_e, M,
                  HAS_EX, CAP)


@triton.jit(do_not_specialize=["B", "M", "n_splits"])
def _merge_kernel(buf_ptr, cnt_ptr, out_ptr, B, M, n_splits,
                  CAP: tl.constexpr, MP: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr):
    """The M best keys of each row over its n_splits lists, compacted (unsorted) into out (B, M)."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < B
    lanes = tl.arange(0, LANES)
    s = lanes // MP
    slot = lanes - s * MP
    ld_ok = row_ok[:, None] & (s < n_splits)[None, :]
    sidx = s.to(tl.int64)[None, :] * B + row[:, None]
    cnt = tl.load(cnt_ptr + sidx, mask=ld_ok, other=0)
    k = tl.load(buf_ptr + sidx * CAP + slot[None, :], mask=ld_ok & (slot[None, :] < cnt), other=0)
    k = k.to(tl.uint64, bitcast=True)
    keep, _n = _top_keep(k, M)
    pos = tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(out_ptr + row[:, None] * M + pos, k.to(tl.int64, bitcast=True), mask=row_ok[:, None] & keep)


# ----------------------------------------------------------------------------- launcher
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def launch_blocks(dtype: torch.dtype, D: int) -> Tuple[int, int, int, int]:
    """Default (BLOCK_B, BLOCK_N, BLOCK_D, num_warps): tiles that compile for sm_90 without
    register spills (tests/test_topm_dot.py checks it). float32 uses the exact FMA dot (no TF32),
    whose operands take more registers than the tensor-core dot of 16-bit inputs."""
    if dtype == torch.float32:
        return 32, 64, min(_pow2(D), 16), 8
    return 64, 64, min(_pow2(D), 32), 8


def exclusion_lists(B: int, N: int, exclude_offsets: Optional[Tensor], exclude_ids: Optional[Tensor],
                    item_offset: int, device) -> Tuple[Tensor, Tensor, int]:
    """CSR of the in-shard excluded local ids of each row, each row's sorted:
    (offsets (B + 1,) int64, ids int64, steps of a binary search over the longest row)."""
    if exclude_offsets is None:
        z = torch.zeros(1, dtype=torch.int64, device=device)
        return z, z, 0
    rows, cols = spec.exclusion_pairs(B, N, exclude_offsets, exclude_ids, item_offset)
    rows, cols = rows.to(device), cols.to(device)
    order = torch.argsort(rows * (N + 1) + cols)  # by row, then by id
    ids = cols[order].contiguous()
    counts = torch.bincount(rows, minlength=B) if rows.numel() else torch.zeros(B, dtype=torch.int64,
                                                                                  device=device)
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    longest = int(counts.max()) if B > 0 and counts.numel() else 0
    if ids.numel() == 0:
        ids = torch.zeros(1, dtype=torch.int64, device=device)
    return offsets, ids, int(longest).bit_length()


def topm_dot(user_vecs: Tensor, item_vecs: Tensor, M: int, exclude_offsets: Optional[Tensor] = None,
             exclude_ids: Optional[Tensor] = None, item_offset: int = 0, *, block_b: Optional[int] = None,
             block_n: Optional[int] = None, splits: Optional[int] = None, cut_rows: Optional[int] = None,
             merge_rows: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Each row's first M items of user_vecs @ item_vecs.T in ranking order (see the module
    docstring and :func:`rcekd_kernels.backends.reference.topm_dot`). ``block_b``, ``block_n``
    (powers of two >= 16), ``splits``, ``cut_rows`` (rows cut back together) and ``merge_rows``
    (rows per merge program) override the launch configuration; the result does not depend on them."""
    # (the arguments are checked by rcekd_kernels._checks.check_topm; dtypes and sizes by supports())
    M, item_offset = int(M), int(item_offset)
    B, D = user_vecs.shape
    N = item_vecs.shape[0]
    Me = min(M, N)
    dev = user_vecs.device
    ids = torch.full((B, M), -1, dtype=torch.int64, device=dev)
    scores = torch.full((B, M), float("-inf"), dtype=torch.float32, device=dev)
    if B == 0 or Me == 0:
        return ids, scores
    BB, BN, BD, warps = launch_blocks(user_vecs.dtype, D)
    BB = _pow2(block_b or (16 if interpreting() else BB))
    BN = _pow2(block_n or BN)
    MP = _pow2(Me)
    CAP = triton.next_power_of_2(MP + BN)
    n_tiles = triton.cdiv(N, BN)
    n_bb = triton.cdiv(B, BB)
    if splits is None:
        want = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        splits = max(1, min(n_tiles, triton.cdiv(want, n_bb)))
    splits = max(1, min(int(splits), n_tiles, MAX_MERGE // MP))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)  # no empty split
    # the interpreter pays per operation, not per lane: there, whole blocks are cut and merged at once
    CR = min(BB, triton.next_power_of_2(cut_rows or (BB if interpreting() else 1)))
    MR = triton.next_power_of_2(merge_rows or (16 if interpreting() else 4))
    exo, exi, log_e = exclusion_lists(B, N, exclude_offsets, exclude_ids, item_offset, dev)
    buf = torch.empty((splits, B, CAP), dtype=torch.int64, device=dev)
    cnt = torch.zeros((splits, B), dtype=torch.int32, device=dev)
    thr = torch.full((splits, B), -1, dtype=torch.int64, device=dev)
    u, v = user_vecs, item_vecs
    _sweep_kernel[(n_bb, splits)](
        u, u.stride(0), u.stride(1), v, v.stride(0), v.stride(1), B, N, D,
        buf, cnt, thr, exo, exi, log_e, Me, per, n_tiles,
        HAS_EX=exclude_offsets is not None, IEEE=user_vecs.dtype == torch.float32,
        BLOCK_B=BB, BLOCK_N=BN, BLOCK_D=BD, CAP=CAP, CUT_ROWS=CR,
        UPCAST=interpreting() and user_vecs.dtype == torch.bfloat16, num_warps=warps)
    keys = torch.zeros((B, Me), dtype=torch.int64, device=dev)
    _merge_kernel[(triton.cdiv(B, MR),)](buf, cnt, keys, B, Me, splits, CAP=CAP, MP=MP,
                                         LANES=triton.next_power_of_2(splits * MP), ROWS=MR, num_warps=4)
    out_ids, out_sc = decode_keys(keys)
    ids[:, :Me] = torch.where(out_ids >= 0, out_ids + item_offset, out_ids)
    scores[:, :Me] = out_sc
    return ids, scores


def decode_keys(keys: Tensor) -> Tuple[Tensor, Tensor]:
    """(B, W) composite keys (uint64 bit patterns in int64; 0 = empty) -> local ids and float32
    scores in ranking order (torch.sort of the keys as unsigned numbers, descending)."""
    order = torch.sort(keys ^ (-2**63), dim=1, descending=True).values  # flip the sign bit: signed order
    k = order ^ (-2**63)
    valid = k != 0
    item = 0xFFFFFFFF - (k & 0xFFFFFFFF)
    h = (k >> 32) & 0xFFFFFFFF
    bits = torch.where(h >= 2**31, h - 2**31, 0xFFFFFFFF - h)  # the inverse of ord_key
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    score = bits.view(torch.float32)
    return (torch.where(valid, item, torch.full_like(item, -1)),
            torch.where(valid, score, torch.full_like(score, float("-inf"))))
