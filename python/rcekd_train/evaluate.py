"""Full-ranking evaluation: Recall@K and NDCG@K over all items.

For each user with at least one item in the evaluated split, every item is
scored, the user's training items are masked below every real score (-inf),
and the top max(K) items are compared with the split's items (binary
relevance):

    Recall@K = |top-K  ∩ relevant| / |relevant|
    NDCG@K   = DCG@K / IDCG@K,  DCG@K = sum_{r < K, top[r] relevant} 1 / log2(r + 2),
               IDCG@K = sum_{r < min(K, |relevant|)} 1 / log2(r + 2)

averaged over those users (``convention="ours"``). Valid and test share one ranking
(only train is masked), as in the authors' code.

The per-user values are summed in fixed point (:func:`fixed_point_bits`: exact integer sums, so that the
metrics do not depend on the order or the split of the users over processes; an error below 4e-15 per value
on 30,000 users).

``convention="authors"`` averages as the authors' code does (``evaluation.py`` of
woriazzc/RCEKD): the per-user values are summed over the users with items in the
split and divided by the number of all users, i.e. users without items in the
split count as zeros. On CiteULike 4,518 of the 5,219 users have validation items,
so valid metrics are 0.8657 x ours, and every user has test items, so test metrics
are the same under both conventions. The best epoch (early stopping on a valid
metric) is the same under both, since the factor is constant.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from rcekd_kernels import topm_dot

from .models.base import eval_mode

METRICS = ("recall", "ndcg")
CONVENTIONS = ("ours", "authors")


def metric_names(ks: Sequence[int] = (10, 20)):
    return [f"{m}@{k}" for m in METRICS for k in ks]


def _split_keys(split, num_items: int) -> np.ndarray:
    return np.sort(split.users_of_pairs() * num_items + split.indices)


def metrics_from_topk(topk: torch.Tensor, users: torch.Tensor, split, num_items: int,
                      ks: Sequence[int], keys: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Per-user metrics (arrays over the users that have relevant items) from ranked lists (B, >= max K)."""
    keys = _split_keys(split, num_items) if keys is None else keys
    u = users.cpu().numpy().astype(np.int64)
    n_rel = split.lengths()[u]
    keep = n_rel > 0
    top = topk.cpu().numpy()[keep].astype(np.int64)
    u, n_rel = u[keep], n_rel[keep]
    q = u[:, None] * num_items + top
    pos = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
    hits = (keys[pos] == q) & (top >= 0) if len(keys) else np.zeros(q.shape, bool)  # id -1: no item there
    kmax = max(ks)
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal = np.concatenate([[0.0], np.cumsum(disc)])
    out = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = h.sum(1) / n_rel
        dcg = (h * disc[:k]).sum(1)
        out[f"ndcg@{k}"] = dcg / ideal[np.minimum(n_rel, k)]
    return out


def fixed_point_bits(num_users: int) -> int:
    """The bits after the binary point of the metric sums: a per-user value in [0, 1] is rounded to a multiple of
    2^-bits and summed as an integer, so that the sum over the users (at most ``num_users`` values) fits an int64
    and is the same whatever the order or the split of the users over processes (integer addition is exact):
    47 bits for 30,000 users, an error below 4e-15 per value."""
    return 62 - int(num_users).bit_length()


@torch.no_grad()
def evaluate_vectors(user_vecs: torch.Tensor, item_vecs: torch.Tensor, data, ks: Sequence[int] = (10, 20),
                     splits: Iterable[str] = ("valid", "test"), batch_size: int = 1024,
                     convention: str = "ours", par=None) -> Dict[str, Dict[str, float]]:
    """Metrics of a dot-product scorer given all user vectors (U, D) and item vectors (N, D).

    The lists come from ``rcekd_kernels.topm_dot`` (the top max(K) of ``user_vecs @ item_vecs.T`` tile by tile,
    the training items excluded sparsely, ties to the smaller id): no (batch, N) score matrix is written. A user
    with fewer than max(K) items outside their training items gets -1 in the tail of the list (no hit)."""
    kmax = max(ks)

    def topk_fn(users):
        ids, _ = topm_dot(user_vecs[users], item_vecs, kmax, exclude=data.train_exclusion(users))
        return ids
    return _evaluate(topk_fn, data, ks, splits, batch_size, user_vecs.device, convention, par)


@torch.no_grad()
def evaluate_scores(score_fn, data, ks: Sequence[int] = (10, 20), splits: Iterable[str] = ("valid", "test"),
                    batch_size: int = 1024, device="cpu", convention: str = "ours",
                    par=None) -> Dict[str, Dict[str, float]]:
    """Metrics of any scorer ``score_fn(users) -> (B, num_items)``, users in batches, averaged by
    ``convention`` (see the module docstring).

    With ``par`` (a :class:`rcekd_train.parallel.Parallel` of several processes) the batches of users are split
    into contiguous runs, one per process (the same batches as in one process, so the same scores); each process
    sums its users' values in fixed point (:func:`fixed_point_bits`) and counts them, and one all-reduce of
    those integers gives every process the sums and counts of all users: the metrics equal the single-process
    ones exactly."""
    kmax = min(max(ks), data.num_items)

    def topk_fn(users):
        scores = score_fn(users).float()
        scores = scores.masked_fill(data.train_mask_rows(users), float("-inf"))
        return torch.topk(scores, kmax, dim=1).indices
    return _evaluate(topk_fn, data, ks, splits, batch_size, device, convention, par)


def _evaluate(topk_fn, data, ks, splits, batch_size, device, convention, par) -> Dict[str, Dict[str, float]]:
    """The metrics from ranked lists ``topk_fn(users) -> (B, <= max K)`` ids (training items excluded; -1: no
    item), over the users in batches (split over the processes of ``par``)."""
    from .parallel import SINGLE
    par = par or SINGLE
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    splits = list(splits)
    names = metric_names(ks)
    N = data.num_items
    keys = {s: _split_keys(getattr(data, s), N) for s in splits}
    lens = {s: getattr(data, s).lengths() for s in splits}
    users_needed = np.nonzero(np.logical_or.reduce([lens[s] > 0 for s in splits]))[0]
    bits = fixed_point_bits(data.num_users)
    scale = float(2 ** bits)
    # per split: the fixed-point sum of each metric, then the number of users with items in the split
    acc = np.zeros((len(splits), len(names) + 1), dtype=np.int64)
    first, last = par.span((len(users_needed) + batch_size - 1) // batch_size)
    for start in range(first * batch_size, min(last * batch_size, len(users_needed)), batch_size):
        users = torch.from_numpy(users_needed[start:start + batch_size]).to(device)
        topk = topk_fn(users)
        for si, s in enumerate(splits):
            per_user = metrics_from_topk(topk, users, getattr(data, s), N, ks, keys[s])
            for mi, m in enumerate(names):
                acc[si, mi] += int(np.rint(per_user[m] * scale).astype(np.int64).sum())
            acc[si, -1] += len(per_user[names[0]])
    if par.distributed:
        acc = par.all_reduce(torch.from_numpy(acc), what="the evaluation's sums").numpy()

    def average(total: int, n: int) -> float:
        if not n:
            return 0.0
        return int(total) / (2 ** bits * (n if convention == "ours" else data.num_users))

    return {s: {m: average(acc[si, mi], acc[si, -1]) for mi, m in enumerate(names)} for si, s in enumerate(splits)}


def evaluate_model(model, data, ks=(10, 20), splits=("valid", "test"), batch_size: int = 1024,
                   convention: str = "ours", par=None):
    """Metrics of a model (its best weights are the caller's business); with ``par``, the users split over the
    processes (:func:`evaluate_scores`)."""
    with eval_mode(model):
        u, i = model.represent_all()
        return evaluate_vectors(u, i, data, ks, splits, batch_size, convention, par)
