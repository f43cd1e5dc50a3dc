"""LightGCN: embeddings smoothed over the user-item graph, layer-mean readout, BPR loss.

The symmetric normalised adjacency D^-1/2 A D^-1/2 of the bipartite graph (users
then items, (U + I) nodes) is built from the training pairs directly as a sparse
matrix (no dense (U + I)^2 matrix ever exists). Propagation (rcekd_kernels.graph:
the layer mean and its gradient as one autograd node, by column blocks) runs once per
training step (``base_loss`` returns the propagated vectors, which the KD loss reuses)
and once per evaluation.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from rcekd_kernels.graph import propagate

from .base import Recommender, bpr_loss


def normalized_adjacency(data, fmt: str = "csr") -> torch.Tensor:
    """Sparse (U + I, U + I) float32 matrix with entries 1 / sqrt(deg(a) deg(b)) on the graph's edges."""
    U, I = data.num_users, data.num_items
    users = data.train.users_of_pairs()
    items = data.train.indices + U
    keys = np.unique(users * (U + I) + items)  # duplicates (if any) count once
    users, items = keys // (U + I), keys % (U + I)
    rows = np.concatenate([users, items])
    cols = np.concatenate([items, users])
    deg = np.bincount(rows, minlength=U + I).astype(np.float64)
    vals = 1.0 / np.sqrt(deg[rows] * deg[cols])
    idx = torch.from_numpy(np.stack([rows, cols]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adj = torch.sparse_coo_tensor(idx, torch.from_numpy(vals).float(), (U + I, U + I)).coalesce()
        if fmt == "csr":
            adj = adj.to_sparse_csr()
            if adj.shape[0] < 2 ** 31 and adj._nnz() < 2 ** 31:  # int32 indices: CPU products 1.7x faster
                adj = torch.sparse_csr_tensor(adj.crow_indices().int(), adj.col_indices().int(), adj.values(),
                                              adj.shape)
    return adj


class LightGCN(Recommender):
    name = "lightgcn"

    def __init__(self, data, dim: int = 64, layers: int = 3, init_std: float = 0.1):
        super().__init__(data)
        self.dim, self.layers = dim, layers
        self.user_emb = nn.Embedding(self.num_users, dim)
        self.item_emb = nn.Embedding(self.num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self._data = data
        self._adj = None
        self.propagations = 0  # counts graph propagations (tests check once per step)

    @property
    def adj(self):
        if self._adj is None or self._adj.device != self.user_emb.weight.device:
            adj = normalized_adjacency(self._data, "csr" if self.user_emb.weight.device.type == "cpu" else "coo")
            self._adj = adj.to(self.user_emb.weight.device)
        return self._adj

    def propagate(self):
        """(all user vectors, all item vectors) after the layer-mean readout (one autograd node:
        rcekd_kernels.graph.propagate, the C++ kernel on a CPU for 64 columns or more)."""
        self.propagations += 1
        u, i = propagate(self.adj, [self.user_emb.weight, self.item_emb.weight], self.layers)
        return u, i

    def represent(self, users):
        u, i = self.propagate()
        return u[users], i

    def base_loss(self, batch):
        users, pos, neg = batch
        all_u, items = self.propagate()
        u = all_u[users]
        return bpr_loss(u, items, pos, neg), users, u, items

    @torch.no_grad()
    def represent_all(self, chunk: int = 4096):
        return self.propagate()
