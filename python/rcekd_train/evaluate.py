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
    hits = (keys[pos] == q) if len(keys) else np.zeros(q.shape, bool)
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


@torch.no_grad()
def evaluate_vectors(user_vecs: torch.Tensor, item_vecs: torch.Tensor, data, ks: Sequence[int] = (10, 20),
                     splits: Iterable[str] = ("valid", "test"), batch_size: int = 1024,
                     convention: str = "ours") -> Dict[str, Dict[str, float]]:
    """Metrics of a dot-product scorer given all user vectors (U, D) and item vectors (N, D)."""
    return evaluate_scores(lambda users: user_vecs[users] @ item_vecs.T, data, ks, splits, batch_size,
                           device=user_vecs.device, convention=convention)


@torch.no_grad()
def evaluate_scores(score_fn, data, ks: Sequence[int] = (10, 20), splits: Iterable[str] = ("valid", "test"),
                    batch_size: int = 1024, device="cpu", convention: str = "ours") -> Dict[str, Dict[str, float]]:
    """Metrics of any scorer ``score_fn(users) -> (B, num_items)``, users in batches, averaged by
    ``convention`` (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    splits = list(splits)
    kmax = max(ks)
    N = data.num_items
    keys = {s: _split_keys(getattr(data, s), N) for s in splits}
    lens = {s: getattr(data, s).lengths() for s in splits}
    users_needed = np.nonzero(np.logical_or.reduce([lens[s] > 0 for s in splits]))[0]
    acc = {s: {m: [] for m in metric_names(ks)} for s in splits}
    for start in range(0, len(users_needed), batch_size):
        users = torch.from_numpy(users_needed[start:start + batch_size]).to(device)
        scores = score_fn(users).float()
        scores = scores.masked_fill(data.train_mask_rows(users), float("-inf"))
        topk = torch.topk(scores, min(kmax, N), dim=1).indices
        for s in splits:
            per_user = metrics_from_topk(topk, users, getattr(data, s), N, ks, keys[s])
            for m, v in per_user.items():
                acc[s][m].append(v)
    def average(parts):
        n = sum(len(x) for x in parts)
        if not n:
            return 0.0
        total = float(np.concatenate(parts).sum())
        return total / n if convention == "ours" else total / data.num_users

    return {s: {m: average(v) for m, v in acc[s].items()} for s in splits}


def evaluate_model(model, data, ks=(10, 20), splits=("valid", "test"), batch_size: int = 1024,
                   convention: str = "ours"):
    with eval_mode(model):
        u, i = model.represent_all()
        return evaluate_vectors(u, i, data, ks, splits, batch_size, convention)
