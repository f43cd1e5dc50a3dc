"""A synthetic implicit-feedback data set (no download needed).

Users and items get latent factors (standard normal, ``dim`` dimensions, items
grouped around ``clusters`` centres), and items a long-tail popularity
(Zipf with exponent ``zipf``). User u picks n_u distinct items (n_u from a
shifted geometric law, mean about ``mean_items``) without replacement, with
probability proportional to exp((p_u . q_i) / (sqrt(dim) * temperature) + log pop_i),
by the Gumbel-top-k trick. The picks are in a random order, and each user's
list is split 8:1:1 in that order like CiteULike. Everything is drawn from one
``numpy.random.Generator(seed)``: the same arguments give the same data.
"""
from __future__ import annotations

import numpy as np

from .base import InteractionData, Split, split_in_order

DEFAULTS = dict(num_users=2000, num_items=1500, dim=16, clusters=20, mean_items=30, min_items=8,
                max_items=300, zipf=1.2, temperature=0.35, seed=0)


def make_synthetic(num_users: int = 2000, num_items: int = 1500, dim: int = 16, clusters: int = 20,
                   mean_items: float = 30, min_items: int = 8, max_items: int = 300, zipf: float = 1.2,
                   temperature: float = 0.35, seed: int = 0) -> InteractionData:
    if not (num_users >= 1 and num_items >= 2 and dim >= 1 and 3 <= min_items <= max_items < num_items):
        raise ValueError("synthetic: need num_users >= 1, 3 <= min_items <= max_items < num_items, dim >= 1")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(clusters, 1), dim))
    item_cluster = rng.integers(0, max(clusters, 1), num_items)
    q = centres[item_cluster] + 0.5 * rng.standard_normal((num_items, dim))
    user_cluster = rng.integers(0, max(clusters, 1), num_users)
    p = centres[user_cluster] + 0.7 * rng.standard_normal((num_users, dim))
    ranks = rng.permutation(num_items) + 1
    log_pop = -zipf * np.log(ranks)
    extra = max(mean_items - min_items, 1e-9)
    n_u = min_items + rng.geometric(1.0 / (1.0 + extra), num_users) - 1
    n_u = np.minimum(n_u, max_items)
    lists = []
    for u in range(num_users):
        logits = (q @ p[u]) / (np.sqrt(dim) * temperature) + log_pop
        keys = logits + rng.gumbel(size=num_items)
        picked = np.argpartition(-keys, n_u[u] - 1)[: n_u[u]]
        lists.append(rng.permutation(picked).tolist())
    train, valid, test = zip(*(split_in_order(x) for x in lists))
    return InteractionData("synthetic", num_users, num_items, Split.from_lists(train), Split.from_lists(valid),
                           Split.from_lists(test), info={"generator": dict(
                               num_users=num_users, num_items=num_items, dim=dim, clusters=clusters,
                               mean_items=mean_items, min_items=min_items, max_items=max_items, zipf=zipf,
                               temperature=temperature, seed=seed)})
