"""Pure-PyTorch reference backend: the spec, vectorised over rows.

This is the CPU fallback, the test oracle of the fast backends, and the
definition every other backend must reproduce. It implements every op of
:mod:`rcekd_kernels.backends.base`, under the same names and signatures:

``select``            the sets of one batch of dense score rows
``subset_ce_fwd``     the loss of each row on gathered scores
``subset_ce_bwd``     its gradient with respect to the gathered student scores
``fused_fwd``         ``select`` + gather + ``subset_ce_fwd`` on dense rows
``fused_bwd``         the dense (B, N) gradient of ``fused_fwd``
``gathered_dot(_bwd)`` scores of given items from user and item vectors, and their gradients

The spec's own math (ranking order, counts, gamma) is in :mod:`rcekd_kernels.spec`.

Arithmetic is float32 for float16 / bfloat16 / float32 inputs and float64 for
float64 inputs (used by gradcheck). Sampling keys are float32, from float64
Gumbel numbers (see :mod:`rcekd_kernels.rng`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import rng
from ..config import RCEKDConfig
from ..spec import compute_dtype, exclusion_pairs, gamma_from_counts, pool_counts, ranked_topk
from .base import Call

Tensor = torch.Tensor

NAME = "reference"
DESCRIPTION = "pure PyTorch, CPU and CUDA"


def available(device_type: str) -> Optional[str]:
    """None when this backend runs on ``device_type``; otherwise the reason it does not."""
    return None


def supports(call: Call) -> Optional[str]:
    """The reference runs every call: every op, dtype and size."""
    return None


def _positions(pool: Tensor, items: Tensor) -> Tensor:
    """Position of each of ``items`` (B, X) in ``pool`` (B, P), or P when absent."""
    P = pool.shape[1]
    srt, perm = torch.sort(pool, dim=1)
    loc = torch.searchsorted(srt, items.contiguous()).clamp_max(P - 1)
    found = srt.gather(1, loc) == items
    return torch.where(found, perm.gather(1, loc), torch.full_like(items, P))


def _isin_rows(items: Tensor, pool: Tensor) -> Tensor:
    return _positions(pool, items) < pool.shape[1]


def select(s: Tensor, t: Optional[Tensor], teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
           row_ids: Tensor, cfg: RCEKDConfig, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The sets of each row.

    Returns ``(idx (B, 2K + L), q2_mask (B, K), counts (B, 2))``: ``idx`` = [QS | A | QT]
    with QS in student order and A by decreasing Gumbel key, ``q2_mask[r, i]`` true when
    teacher item i is in Q2 and not sampled (so U = A + masked teacher items),
    ``counts = (|Q1|, |QT & A|)``.
    """
    K, M = cfg.K, cfg.m
    pool = ranked_topk(s, M, exclude)  # (B, M), student order
    if teacher_topk is None:
        assert t is not None, "the checks require teacher scores when teacher_topk is not given"
        qt = ranked_topk(t, K, exclude)
    else:  # checked when validate=True; otherwise an id outside [0, N) is clamped into it (docs/LOSS.md)
        qt = teacher_topk.clamp(0, s.shape[1] - 1)
    return sets_from_pool(pool, qt, row_ids, cfg, seed)


def sets_from_pool(pool: Tensor, qt: Tensor, row_ids: Tensor, cfg: RCEKDConfig, seed: int
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """The sets of each row from its pool (B, M) in student order and QT (B, K): the part of
    ``select`` after the two rankings. Returns ``(idx, q2_mask, counts)`` as ``select``."""
    K, M, L = cfg.K, cfg.m, cfg.L
    pos_t = _positions(pool, qt)  # (B, K): pool position, M when outside
    c = pool_counts(pos_t, K, M, cfg.mode)
    key = rng.sampling_keys(c, cfg.T, seed, row_ids, pool)
    # ties of the key go to the smaller item id: sort the pool by id first, then stably by key
    by_id, perm = torch.sort(pool, dim=1)
    order = torch.sort(key.gather(1, perm), dim=1, descending=True, stable=True).indices[:, :L]
    sampled = by_id.gather(1, order)
    in_a = _isin_rows(qt, sampled)
    q2_mask = (pos_t >= K) & ~in_a
    counts = torch.stack([(pos_t < K).sum(dim=1), in_a.sum(dim=1)], dim=1)
    return torch.cat([pool[:, :K], sampled, qt], dim=1), q2_mask, counts


def _subset_softmaxes(s_g: Tensor, t_g: Tensor, q2_mask: Tensor, K: int, tau: float):
    dt = compute_dtype(s_g)
    x = s_g.to(dt) / tau
    y = t_g.to(dt) / tau
    B = x.shape[0]
    in_u = torch.cat([torch.ones(B, x.shape[1] - 2 * K, dtype=torch.bool, device=x.device), q2_mask], 1)
    xs, ys = x[:, :K], y[:, :K]
    xu = x[:, K:].masked_fill(~in_u, float("-inf"))
    yu = y[:, K:].masked_fill(~in_u, float("-inf"))
    return xs, ys, xu, yu, in_u


def subset_ce_fwd(s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor, cfg: RCEKDConfig
                  ) -> Tuple[Tensor, Tensor]:
    """Per-row loss on gathered scores [QS (K) | A (L) | QT (K)] and (L1, L2) per row."""
    xs, ys, xu, yu, in_u = _subset_softmaxes(s_g, t_g, q2_mask, cfg.K, cfg.tau)
    l1 = -(torch.softmax(ys, 1) * torch.log_softmax(xs, 1)).sum(1)
    l2 = -torch.where(in_u, torch.softmax(yu, 1) * torch.log_softmax(xu, 1), 0.0).sum(1)
    g = gamma.to(l1.dtype)
    loss = (1 - g) * l1 + g * l2
    return loss, torch.stack([l1, l2], dim=1)


def subset_ce_bwd(grad_rows: Tensor, s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor,
                  cfg: RCEKDConfig) -> Tensor:
    """d(sum_r grad_rows[r] * loss[r]) / d s_g, in the compute dtype (B, 2K + L)."""
    tau = cfg.tau
    xs, ys, xu, yu, in_u = _subset_softmaxes(s_g, t_g, q2_mask, cfg.K, tau)
    dt = xs.dtype
    g = gamma.to(dt).unsqueeze(1)
    w = grad_rows.to(dt).unsqueeze(1) / tau
    d1 = (torch.softmax(xs, 1) - torch.softmax(ys, 1)) * ((1 - g) * w)
    d2 = torch.where(in_u, torch.softmax(xu, 1) - torch.softmax(yu, 1), 0.0) * (g * w)
    return torch.cat([d1, d2], dim=1)


def fused_fwd(s: Tensor, t: Tensor, teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
              row_ids: Tensor, cfg: RCEKDConfig, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss rows, stats (B, 5) = (L1, L2, gamma, |Q1|, |QT & A|), the gathered ids
    idx = [QS | A | QT] (B, 2K + L) and q2_mask (B, K)."""
    idx, q2_mask, counts = select(s, t, teacher_topk, exclude, row_ids, cfg, seed)
    gamma = gamma_from_counts(counts, cfg.beta, cfg.K, cfg.mode)
    loss, parts = subset_ce_fwd(s.gather(1, idx), t.gather(1, idx), q2_mask, gamma, cfg)
    stats = torch.cat([parts.to(torch.float32), gamma.unsqueeze(1), counts.to(torch.float32)], dim=1)
    return loss, stats, idx, q2_mask


def fused_bwd(grad_rows: Tensor, s: Tensor, t: Tensor, idx: Tensor, q2_mask: Tensor, gamma: Tensor,
              cfg: RCEKDConfig) -> Tensor:
    """Dense gradient (B, N) in the dtype of s: zero except at the gathered ids. An id outside
    [0, N) (only in a direct call with a made-up idx) reads item 0 and gets no gradient."""
    ok = (idx >= 0) & (idx < s.shape[1])
    idx = torch.where(ok, idx, 0)
    g = subset_ce_bwd(grad_rows, s.gather(1, idx), t.gather(1, idx), q2_mask, gamma, cfg)
    out = torch.zeros(s.shape, dtype=g.dtype, device=s.device)
    out.scatter_add_(1, idx, torch.where(ok, g, 0.0))  # QS and A may share items: their parts add up
    return out.to(s.dtype)


def gathered_dot(u: Tensor, v: Tensor, idx: Tensor) -> Tensor:
    """``out[b, w] = <u[b], v[idx[b, w]]>`` with index_select + bmm."""
    B, W = idx.shape
    gathered = v.index_select(0, idx.reshape(-1)).view(B, W, v.shape[1])
    return torch.bmm(gathered, u.unsqueeze(-1)).squeeze(-1)


def gathered_dot_bwd(g: Tensor, u: Tensor, v: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor]:
    """The gradients of ``gathered_dot`` for the upstream gradient g (B, W)."""
    B, W = idx.shape
    g = g.to(u.dtype)
    gathered = v.index_select(0, idx.reshape(-1)).view(B, W, v.shape[1])
    gu = torch.bmm(g.unsqueeze(1), gathered).squeeze(1)
    contrib = (g.unsqueeze(-1) * u.unsqueeze(1)).reshape(B * W, u.shape[1])
    gv = torch.zeros_like(v).index_add_(0, idx.reshape(-1), contrib)
    return gu, gv


# ----------------------------------------------------------------------------- topm_dot
# Streaming top-M of a matrix product (the op rcekd::topm_dot; docs/TOPM_DOT.md). The arguments
# are checked by rcekd_kernels._checks.check_topm before any backend runs.

#: Items per tile of the reference's topm_dot (its memory is O(B * (M + TOPM_TILE))).
TOPM_TILE = 4096


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
    M, item_offset = int(M), int(item_offset)
    tile = TOPM_TILE if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"topm_dot: tile must be >= 1, got {tile}")
    B, N = user_vecs.shape[0], item_vecs.shape[0]
    cd = compute_dtype(user_vecs)
    dev = user_vecs.device
    u = user_vecs.to(cd)
    # the running candidates of each row, in ranking order: local id, score, eligible
    c_id = torch.full((B, M), N, dtype=torch.int64, device=dev)
    c_sc = torch.full((B, M), float("-inf"), dtype=cd, device=dev)
    c_ok = torch.zeros((B, M), dtype=torch.bool, device=dev)
    ex_rows, ex_cols = exclusion_pairs(B, N, exclude_offsets, exclude_ids, item_offset)
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


# ----------------------------------------------------------------------------- layer_mean
# LightGCN's propagation (the op rcekd::layer_mean; rcekd_kernels/graph.py). The arguments are
# checked by rcekd_kernels._checks.check_layer_mean before any backend runs.

#: columns per block of the propagation on a CPU: (rows x 64) float32 blocks stay in the cache
#: through all the layers, where a whole (rows x D) matrix (243 MB for CiteULike at D = 2000)
#: streams from memory at every sparse product (the three layers at D = 2000 on one thread:
#: 1.1 s against 2.4 s, min of 6). A GPU streams whole matrices.
LAYER_MEAN_BLOCK = 64


def _rows_block(parts, c: int, block: int) -> Tensor:
    """Columns [c, c + block) of the row-wise concatenation of ``parts``, contiguous."""
    return torch.cat([p[:, c:c + block] for p in parts]) if len(parts) > 1 else parts[0][:, c:c + block].contiguous()


def _write_rows_block(outs, c: int, block: int, value: Tensor) -> None:
    r = 0
    for o in outs:
        o[:, c:c + block] = value[r:r + o.shape[0]]
        r += o.shape[0]


def layer_mean(adj: Tensor, parts, layers: int, backward: bool = False, block: int = 0):
    """For x the rows of ``parts`` one after the other (e.g. users then items: no concatenation),
    returned split as ``parts`` are, column block by column block (``block`` columns; 0: 64 on a
    CPU, all of them on a GPU):

    * forward: (x + adj x + ... + adj^layers x) / (layers + 1) (each layer's sums are those of
      whole-matrix products: a row's terms are added in the same order);
    * ``backward`` (x is the gradient, adj symmetric): h + adj (h + adj (h + ...)) with
      h = x / (layers + 1), the order in which autograd adds the terms through a layer-by-layer
      graph, so the gradient is the same as through separate products."""
    import warnings

    if block <= 0:
        block = LAYER_MEAN_BLOCK if parts[0].device.type == "cpu" else max(1, parts[0].shape[1])
    outs = [torch.empty_like(p) for p in parts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR support is a beta feature of torch
        for c in range(0, parts[0].shape[1], block):
            xc = _rows_block(parts, c, block)
            if backward:
                h = xc / (layers + 1)
                res = h
                for _ in range(layers):
                    res = h + torch.sparse.mm(adj, res)
            else:
                res, y = xc.clone(), xc
                for _ in range(layers):
                    y = torch.sparse.mm(adj, y)
                    res += y
                res = res / (layers + 1)
            _write_rows_block(outs, c, block, res)
    return outs
