"""Pure-PyTorch reference backend: the spec, vectorised over rows.

This is the CPU fallback, the test oracle of the fast backends, and the
definition every other backend must reproduce. It implements the five ops that
every backend implements, under the same names and signatures:

``select``         the sets of one batch of dense score rows
``subset_ce_fwd``  the loss of each row on gathered scores
``subset_ce_bwd``  its gradient with respect to the gathered student scores
``fused_fwd``      ``select`` + gather + ``subset_ce_fwd`` on dense rows
``fused_bwd``      the dense (B, N) gradient of ``fused_fwd``

Arithmetic is float32 for float16 / bfloat16 / float32 inputs and float64 for
float64 inputs (used by gradcheck). Sampling keys are float32, from float64
Gumbel numbers (see :mod:`rcekd_kernels.rng`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import rng

Tensor = torch.Tensor

NAME = "reference"


def available(device_type: str) -> Optional[str]:
    """None when this backend runs on ``device_type``; otherwise the reason it does not."""
    return None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ranked_topk(x: Tensor, k: int, exclude: Optional[Tensor]) -> Tensor:
    """The first k items of each row in ranking order: larger score first, ties to
    the smaller index, excluded items never taken. Returns int64 (B, k).

    ``torch.topk`` gives the k-th largest value but breaks ties arbitrarily, so the
    items strictly above that threshold are all taken and the ties at the
    threshold are taken in index order; the k chosen items are then ordered by a
    stable sort (which keeps index order among equal scores).
    """
    B, N = x.shape
    x = x.to(_compute_dtype(x))
    if exclude is not None:
        x = x.masked_fill(exclude, float("-inf"))
    thr = torch.topk(x, k, dim=1, sorted=True).values[:, -1:]
    above = x > thr
    at = x == thr
    need = k - above.sum(dim=1, keepdim=True)
    if bool((at.sum(dim=1, keepdim=True) == need).all()):
        take = above | at  # no row has more ties at its threshold than it needs
    else:
        take = above | (at & (torch.cumsum(at, dim=1) <= need))
    idx = take.nonzero()[:, 1].view(B, k)  # ascending item index within each row
    order = torch.sort(x.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def _positions(pool: Tensor, items: Tensor) -> Tensor:
    """Position of each of ``items`` (B, X) in ``pool`` (B, P), or P when absent."""
    P = pool.shape[1]
    srt, perm = torch.sort(pool, dim=1)
    loc = torch.searchsorted(srt, items.contiguous()).clamp_max(P - 1)
    found = srt.gather(1, loc) == items
    return torch.where(found, perm.gather(1, loc), torch.full_like(items, P))


def _isin_rows(items: Tensor, pool: Tensor) -> Tensor:
    return _positions(pool, items) < pool.shape[1]


def pool_counts(pos_t: Tensor, K: int, M: int, mode: str) -> Tensor:
    """Integer counts c (B, M) of the pool positions, from the pool positions of
    the teacher's top-K (``pos_t``, M where outside the pool)."""
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
    return suffix.clamp_max(50)


def gamma_from_counts(counts: Tensor, beta: float, K: int, mode: str) -> Tensor:
    """gamma = exp(-beta * n / K), n = |Q1| (paper) or |QT and A| (official), float32."""
    n = counts[:, 0 if mode == "paper" else 1].to(torch.float32)
    return torch.exp(-(beta * n) / K)


def select(s: Tensor, t: Optional[Tensor], teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
           row_ids: Tensor, K: int, M: int, L: int, T: float, mode: str, seed: int
           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sets of each row.

    Returns ``(student_topk (B,K), sampled (B,L), teacher_topk (B,K), q2_mask (B,K),
    counts (B,2))``: ``student_topk`` in student order, ``sampled`` by decreasing
    Gumbel key, ``q2_mask[r, i]`` true when teacher item i is in Q2 and not
    sampled (so U = sampled + masked teacher items), ``counts = (|Q1|, |QT & A|)``.
    """
    B = s.shape[0]
    pool = ranked_topk(s, M, exclude)  # (B, M), student order
    qt = ranked_topk(t, K, exclude) if teacher_topk is None else teacher_topk.clone()
    pos_t = _positions(pool, qt)  # (B, K): pool position, M when outside
    c = pool_counts(pos_t, K, M, mode)
    key = rng.sampling_keys(c, T, seed, row_ids, pool)
    # ties of the key go to the smaller item id: sort the pool by id first, then stably by key
    by_id, perm = torch.sort(pool, dim=1)
    order = torch.sort(key.gather(1, perm), dim=1, descending=True, stable=True).indices[:, :L]
    sampled = by_id.gather(1, order)
    in_a = _isin_rows(qt, sampled)
    q2_mask = (pos_t >= K) & ~in_a
    counts = torch.stack([(pos_t < K).sum(dim=1), in_a.sum(dim=1)], dim=1)
    return pool[:, :K].contiguous(), sampled, qt, q2_mask, counts


def _subset_softmaxes(s_g: Tensor, t_g: Tensor, q2_mask: Tensor, K: int, tau: float):
    dt = _compute_dtype(s_g)
    x = s_g.to(dt) / tau
    y = t_g.to(dt) / tau
    B = x.shape[0]
    in_u = torch.cat([torch.ones(B, x.shape[1] - 2 * K, dtype=torch.bool, device=x.device), q2_mask], 1)
    xs, ys = x[:, :K], y[:, :K]
    xu = x[:, K:].masked_fill(~in_u, float("-inf"))
    yu = y[:, K:].masked_fill(~in_u, float("-inf"))
    return xs, ys, xu, yu, in_u


def subset_ce_fwd(s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor, K: int, L: int, tau: float
                  ) -> Tuple[Tensor, Tensor]:
    """Per-row loss on gathered scores [QS (K) | A (L) | QT (K)] and (L1, L2) per row."""
    xs, ys, xu, yu, in_u = _subset_softmaxes(s_g, t_g, q2_mask, K, tau)
    l1 = -(torch.softmax(ys, 1) * torch.log_softmax(xs, 1)).sum(1)
    l2 = -torch.where(in_u, torch.softmax(yu, 1) * torch.log_softmax(xu, 1), 0.0).sum(1)
    g = gamma.to(l1.dtype)
    loss = (1 - g) * l1 + g * l2
    return loss, torch.stack([l1, l2], dim=1)


def subset_ce_bwd(grad_rows: Tensor, s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor,
                  K: int, L: int, tau: float) -> Tensor:
    """d(sum_r grad_rows[r] * loss[r]) / d s_g, in the compute dtype (B, 2K + L)."""
    xs, ys, xu, yu, in_u = _subset_softmaxes(s_g, t_g, q2_mask, K, tau)
    dt = xs.dtype
    g = gamma.to(dt).unsqueeze(1)
    w = grad_rows.to(dt).unsqueeze(1) / tau
    d1 = (torch.softmax(xs, 1) - torch.softmax(ys, 1)) * ((1 - g) * w)
    d2 = torch.where(in_u, torch.softmax(xu, 1) - torch.softmax(yu, 1), 0.0) * (g * w)
    return torch.cat([d1, d2], dim=1)


def fused_fwd(s: Tensor, t: Tensor, teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
              row_ids: Tensor, K: int, M: int, L: int, tau: float, T: float, beta: float, mode: str,
              seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss rows, stats (B, 5) = (L1, L2, gamma, |Q1|, |QT & A|), the gathered ids
    idx = [QS | A | QT] (B, 2K + L) and q2_mask (B, K)."""
    qs, a, qt, q2_mask, counts = select(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed)
    idx = torch.cat([qs, a, qt], dim=1)
    gamma = gamma_from_counts(counts, beta, K, mode)
    loss, parts = subset_ce_fwd(s.gather(1, idx), t.gather(1, idx), q2_mask, gamma, K, L, tau)
    stats = torch.cat([parts.to(torch.float32), gamma.unsqueeze(1), counts.to(torch.float32)], dim=1)
    return loss, stats, idx, q2_mask


def fused_bwd(grad_rows: Tensor, s: Tensor, t: Tensor, idx: Tensor, q2_mask: Tensor, gamma: Tensor,
              K: int, L: int, tau: float) -> Tensor:
    """Dense gradient (B, N) in the dtype of s: zero except at the gathered ids."""
    g = subset_ce_bwd(grad_rows, s.gather(1, idx), t.gather(1, idx), q2_mask, gamma, K, L, tau)
    out = torch.zeros(s.shape, dtype=g.dtype, device=s.device)
    out.scatter_add_(1, idx, g)  # QS and A may share items: their parts add up
    return out.to(s.dtype)


# ----------------------------------------------------------------------------- topm_dot
# Streaming top-M of a matrix product (issue 12, item 1). The same function, under the
# same name and signature, exists in every backend (see tests/test_topm_dot.py).

#: Items per tile of the reference's topm_dot (its memory is O(B * (M + TOPM_TILE))).
TOPM_TILE = 4096


def _as_int(v) -> Optional[int]:
    """v as a Python int when it is an integer (not a bool, not a float), else None."""
    import operator

    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def topm_check(user_vecs: Tensor, item_vecs: Tensor, M: int, exclude_offsets: Optional[Tensor],
               exclude_ids: Optional[Tensor], item_offset: int) -> None:
    """ValueError / TypeError for arguments topm_dot does not accept (every backend)."""
    for name, x in (("user_vecs", user_vecs), ("item_vecs", item_vecs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"topm_dot: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"topm_dot: {name} must be 2-D, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"topm_dot: {name} must have a floating dtype, got {x.dtype}")
    if user_vecs.dtype != item_vecs.dtype:
        raise TypeError(f"topm_dot: user_vecs ({user_vecs.dtype}) and item_vecs ({item_vecs.dtype}) "
                        f"must have one dtype")
    if user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"topm_dot: user_vecs has D = {user_vecs.shape[1]} but item_vecs has "
                         f"D = {item_vecs.shape[1]}")
    if user_vecs.device != item_vecs.device:
        raise ValueError(f"topm_dot: user_vecs ({user_vecs.device}) and item_vecs ({item_vecs.device}) "
                         f"must be on one device")
    if _as_int(M) is None or M < 1:
        raise ValueError(f"topm_dot: M must be an integer >= 1, got {M!r}")
    if _as_int(item_offset) is None or item_offset < 0:
        raise ValueError(f"topm_dot: item_offset must be an integer >= 0, got {item_offset!r}")
    if item_offset + item_vecs.shape[0] > 2**63 - 1:
        raise ValueError("topm_dot: item_offset + N must fit int64")
    if (exclude_offsets is None) != (exclude_ids is None):
        raise ValueError("topm_dot: exclude_offsets and exclude_ids must be given together")
    if exclude_offsets is None:
        return
    B = user_vecs.shape[0]
    for name, x in (("exclude_offsets", exclude_offsets), ("exclude_ids", exclude_ids)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 1:
            raise TypeError(f"topm_dot: {name} must be a 1-D int64 tensor")
        if x.device != user_vecs.device:
            raise ValueError(f"topm_dot: {name} ({x.device}) must be on the device of user_vecs "
                             f"({user_vecs.device})")
    if exclude_offsets.shape[0] != B + 1:
        raise ValueError(f"topm_dot: exclude_offsets must have shape (B + 1,) = ({B + 1},), "
                         f"got {tuple(exclude_offsets.shape)}")
    nnz = exclude_ids.shape[0]
    if int(exclude_offsets[0]) < 0 or int(exclude_offsets[-1]) > nnz:
        raise ValueError(f"topm_dot: exclude_offsets must lie in [0, len(exclude_ids)] = [0, {nnz}], "
                         f"got first {int(exclude_offsets[0])}, last {int(exclude_offsets[-1])}")
    if bool((exclude_offsets[1:] < exclude_offsets[:-1]).any()):
        raise ValueError("topm_dot: exclude_offsets must be non-decreasing")


def topm_exclusion_pairs(B: int, N: int, exclude_offsets: Optional[Tensor], exclude_ids: Optional[Tensor],
                         item_offset: int) -> Tuple[Tensor, Tensor]:
    """The (row, local item) pairs of the in-shard excluded items, sorted by local item
    (duplicates kept, ids outside [item_offset, item_offset + N) dropped): two int64 (n,)."""
    if exclude_offsets is None:
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


def _rank_order(score: Tensor, ids: Tensor, ok: Tensor) -> Tensor:
    """Column order of each row under the ranking order: eligible entries first, then larger
    score, then smaller id (three stable sorts, the least significant key first)."""
    o = torch.argsort(ids, dim=1, stable=True)
    o = o.gather(1, torch.argsort(score.gather(1, o), dim=1, descending=True, stable=True))
    return o.gather(1, torch.argsort(ok.gather(1, o).to(torch.int8), dim=1, descending=True, stable=True))


def topm_dot(user_vecs: Tensor, item_vecs: Tensor, M: int, exclude_offsets: Optional[Tensor] = None,
             exclude_ids: Optional[Tensor] = None, item_offset: int = 0, *, tile: Optional[int] = None
             ) -> Tuple[Tensor, Tensor]:
    """Each row's first M items under the ranking order of s[b, j] = user_vecs[b] . item_vecs[j]
    (larger score first, ties to the smaller id, items excluded for the row never taken).

    Returns ``(ids (B, M) int64, scores (B, M))``: global ids ``item_offset + j`` in ranking
    order, scores in the compute dtype (float32 for float16 / bfloat16 / float32, float64 for
    float64; -0.0 is returned as +0.0). A row with fewer than M eligible items ends with
    id -1 and score -inf. The exclusion is CSR: row b excludes the global ids
    ``exclude_ids[exclude_offsets[b]:exclude_offsets[b + 1]]`` (any order, duplicates allowed,
    ids outside this shard ignored).

    Tile by tile over the items (``tile``, default :data:`TOPM_TILE`): the tile's scores
    ``U @ V[tile].T``, then the running list of M candidates is merged with the tile's items
    that can still enter it, by a sort under the ranking order. An item of the tile can enter
    only if its score is above the row's current M-th best score: every candidate has a
    smaller id, so an equal score loses the tie. Memory O(B * (M + tile)); the (B, N) scores
    are never made.
    """
    topm_check(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset)
    M, item_offset = _as_int(M), _as_int(item_offset)
    tile = TOPM_TILE if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"topm_dot: tile must be >= 1, got {tile}")
    B, N = user_vecs.shape[0], item_vecs.shape[0]
    cd = _compute_dtype(user_vecs)
    dev = user_vecs.device
    u = user_vecs.to(cd)
    # the running candidates of each row, in ranking order: local id, score, eligible
    c_id = torch.full((B, M), N, dtype=torch.int64, device=dev)
    c_sc = torch.full((B, M), float("-inf"), dtype=cd, device=dev)
    c_ok = torch.zeros((B, M), dtype=torch.bool, device=dev)
    ex_rows, ex_cols = topm_exclusion_pairs(B, N, exclude_offsets, exclude_ids, item_offset)
    ex_rows, ex_cols = ex_rows.to(dev), ex_cols.to(dev)
    for j0 in range(0, N, tile):
        j1 = min(N, j0 + tile)
        s = u @ item_vecs[j0:j1].to(cd).T + 0.0  # (B, T); + 0.0 turns -0.0 into +0.0
        ok = torch.ones(s.shape, dtype=torch.bool, device=dev)
        a, b = torch.searchsorted(ex_cols, torch.tensor([j0, j1], device=dev)).tolist()
        ok[ex_rows[a:b], ex_cols[a:b] - j0] = False
        # the tile's items that can still enter: all eligible ones while a row has fewer than
        # M candidates, else those scoring above the M-th (NaN kept: the sort decides)
        full = c_ok[:, M - 1:M]
        thr = c_sc[:, M - 1:M]
        enter = ok & (~full | ~(s <= thr))
        n_enter = enter.sum(dim=1)
        W = int(n_enter.max()) if B > 0 else 0
        if W == 0:
            continue
        rr, cc = enter.nonzero(as_tuple=True)  # row-major: ascending item within a row
        slot = (torch.cumsum(enter, dim=1) - 1)[rr, cc]
        t_id = torch.full((B, W), N, dtype=torch.int64, device=dev)
        t_sc = torch.full((B, W), float("-inf"), dtype=cd, device=dev)
        t_ok = torch.zeros((B, W), dtype=torch.bool, device=dev)
        t_id[rr, slot] = cc + j0
        t_sc[rr, slot] = s[rr, cc]
        t_ok[rr, slot] = True
        a_id, a_sc, a_ok = torch.cat([c_id, t_id], 1), torch.cat([c_sc, t_sc], 1), torch.cat([c_ok, t_ok], 1)
        o = _rank_order(a_sc, a_id, a_ok)[:, :M]
        c_id, c_sc, c_ok = a_id.gather(1, o), a_sc.gather(1, o), a_ok.gather(1, o)
    ids = torch.where(c_ok, c_id + item_offset, torch.full_like(c_id, -1))
    scores = torch.where(c_ok, c_sc, torch.full_like(c_sc, float("-inf")))
    return ids, scores
