"""The spec's own math, in one neutral place (docs/LOSS.md).

Used by the public API, every Python backend and the training drivers; the C++
and CUDA kernels mirror these definitions in ``csrc/spec.h``.

* :func:`default_m` -- the default pool size M = 2K;
* :data:`OFFICIAL_CAP` -- the cap of the counts in ``mode="official"``;
* :func:`ranked_topk` -- the spec's ranking order (larger score first, ties to the
  smaller item id, excluded items never taken);
* :func:`pool_counts` -- the integer counts of the pool positions (both modes);
* :func:`gamma_from_counts` -- the weight gamma of L2;
* :func:`exclusion_pairs` -- a sparse (CSR) exclusion as the (row, item) pairs of one shard.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["OFFICIAL_CAP", "default_m", "compute_dtype", "ranked_topk", "pool_counts", "gamma_from_counts",
           "exclusion_pairs"]

#: ``mode="official"``: a pool item's count is capped at this value (the authors' code).
OFFICIAL_CAP = 50


def default_m(K: int) -> int:
    """The default pool size for top lists of K items: M = 2K."""
    return 2 * K


def compute_dtype(x: Tensor) -> torch.dtype:
    """The arithmetic dtype for scores of x's dtype: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ranked_topk(x: Tensor, k: int, exclude: Optional[Tensor] = None) -> Tensor:
    """The first k items of each row of ``x`` (B, N) in ranking order: larger score first,
    ties to the smaller index, excluded items never taken. Returns int64 (B, k).

    ``torch.topk`` gives the largest values but breaks ties arbitrarily. Taking k + 1 of
    them tells each row whether its ties at the k-th value (the threshold) reach past the
    k-th place: where the (k+1)-th value is below the threshold, topk's k items are the
    only possible choice; in the other rows (few, unless scores tie a lot) the items
    strictly above the threshold are taken, then the ties at it in index order (a pass
    over those rows alone). The k chosen items are then ordered by a stable sort of them
    by index, then by score (which keeps index order among equal scores).
    """
    B, N = x.shape
    x = x.to(compute_dtype(x))
    if exclude is not None:
        x = x.masked_fill(exclude, float("-inf"))
    vals, idx = torch.topk(x, min(k + 1, N), dim=1, sorted=True)
    thr = vals[:, k - 1:k]
    idx = idx[:, :k]
    if k < N:
        straddle = ~(vals[:, k] < thr[:, 0])  # a tie at the threshold outside the first k (or NaN)
        if bool(straddle.any()):
            rows = straddle.nonzero().squeeze(1)
            xr, tr = x[rows], thr[rows]
            at = xr == tr
            need = k - (xr > tr).sum(dim=1, keepdim=True)
            take = (xr > tr) | (at & (torch.cumsum(at, dim=1) <= need))
            idx = idx.clone()
            idx[rows] = take.nonzero()[:, 1].view(rows.shape[0], k)  # ascending index within each row
    idx = torch.sort(idx, dim=1).values
    order = torch.sort(x.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def pool_counts(pos_t: Tensor, K: int, M: int, mode: str) -> Tensor:
    """Integer counts c (B, M) of the pool positions, from the pool positions of the
    teacher's top-K (``pos_t`` (B, K), M where outside the pool).

    paper: the number of Q2 items ranked below the position (Q2 items outside the pool
    count as below every pool item); official: min(OFFICIAL_CAP, the number of QT items
    inside the pool at or below the position).
    """
    B = pos_t.shape[0]
    if mode == "paper":
        marked = (pos_t >= K) & (pos_t < M)  # Q2 items inside the pool
    else:
        marked = pos_t < M  # all of QT inside the pool
    ind = torch.zeros(B, M + 1, dtype=torch.int64, device=pos_t.device)
    ind.scatter_add_(1, torch.where(marked, pos_t, M), torch.ones_like(pos_t))
    ind = ind[:, :M]
    suffix = ind.flip(1).cumsum(1).flip(1)  # inclusive: marked items at positions >= p
    if mode == "paper":
        n_outside = (pos_t >= M).sum(dim=1, keepdim=True)
        return n_outside + suffix - ind  # strictly below p, plus Q2 items outside the pool
    return suffix.clamp_max(OFFICIAL_CAP)


def gamma_from_counts(counts: Tensor, beta: float, K: int, mode: str) -> Tensor:
    """gamma = exp(-beta * n / K) in float32, n = |Q1| (paper) or |QT & A| (official);
    ``counts`` (B, 2) = (|Q1|, |QT & A|)."""
    n = counts[:, 0 if mode == "paper" else 1].to(torch.float32)
    return torch.exp(-(beta * n) / K)


def exclusion_pairs(B: int, N: int, exclude_offsets: Optional[Tensor], exclude_ids: Optional[Tensor],
                    item_offset: int) -> Tuple[Tensor, Tensor]:
    """The (row, local item) pairs of the in-shard excluded items of a CSR exclusion (row b
    excludes the global ids ``exclude_ids[exclude_offsets[b]:exclude_offsets[b + 1]]``), sorted by
    local item (duplicates kept, ids outside [item_offset, item_offset + N) dropped): two int64 (n,)."""
    if exclude_offsets is None or exclude_ids is None:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e
    dev = exclude_ids.device
    lo, hi = int(exclude_offsets[0]), int(exclude_offsets[-1])
    counts = exclude_offsets[1:] - exclude_offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(B, device=dev), counts)
    cols = exclude_ids[lo:hi] - item_offset
    keep = (cols >= 0) & (cols < N)
    rows, cols = rows[keep], cols[keep]
    order = torch.argsort(cols, stable=True)
    return rows[order], cols[order]
