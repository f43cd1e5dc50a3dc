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
