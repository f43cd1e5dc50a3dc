"""LightGCN: embeddings smoothed over the user-item graph, layer-mean readout, BPR loss.

The symmetric normalised adjacency D^-1/2 A D^-1/2 of the bipartite graph (users
then items, (U + I) nodes) is built from the training pairs directly as a sparse
matrix (no dense (U + I)^2 matrix ever exists). Propagation runs once per training
step (``base_loss`` returns the propagated vectors, which the KD loss reuses) and
once per evaluation.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

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


#: columns per block of the propagation: (U + I) x 64 float32 rows stay in the cache through all the
#: layers, where a whole (U + I) x D matrix (243 MB for CiteULike at D = 2000) streams from memory at
#: every sparse product (the three layers at D = 2000 on one thread: 1.1 s against 2.4 s, min of 6)
COLUMN_BLOCK = 64


def _rows_block(parts, c: int, block: int) -> torch.Tensor:
    """Columns [c, c + block) of the row-wise concatenation of ``parts``, contiguous."""
    return torch.cat([p[:, c:c + block] for p in parts]) if len(parts) > 1 else parts[0][:, c:c + block].contiguous()


def _write_rows_block(outs, c: int, block: int, value: torch.Tensor) -> None:
    r = 0
    for o in outs:
        o[:, c:c + block] = value[r:r + o.shape[0]]
        r += o.shape[0]


def _layer_mean(adj: torch.Tensor, parts, layers: int, block: int, backward: bool = False):
    """For x the rows of ``parts`` one after the other (users then items: no (U + I) x D concatenation),
    returned split as ``parts`` are, column block by column block:

    * forward: (x + adj x + ... + adj^layers x) / (layers + 1) (the sums of each row are those of
      whole-matrix products: a row's products are added in the same order);
    * ``backward`` (x is the gradient, adj symmetric): h + adj (h + adj (h + ...)) with
      h = x / (layers + 1), the order in which autograd adds the terms through the layer-by-layer
      graph, so the gradient is the same as through separate products."""
    outs = [torch.empty_like(p) for p in parts]
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


class _LayerMean(torch.autograd.Function):
    """The layer-mean readout of LightGCN as one autograd node, from the user and the item embeddings to
    the propagated user and item vectors: the forward and the backward each run ``layers`` sparse
    products per column block, with no (U + I) x D intermediate kept for the backward (adj is
    symmetric, so the backward is the same propagation of the gradient)."""

    @staticmethod
    def forward(ctx, adj, user_emb, item_emb, layers, block):
        ctx.adj, ctx.layers, ctx.block = adj, layers, block
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u, i = _layer_mean(adj, [user_emb, item_emb], layers, block)
        return u, i

    @staticmethod
    def backward(ctx, g_user, g_item):
        grads = [g.contiguous() for g in (g_user, g_item)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            du, di = _layer_mean(ctx.adj, grads, ctx.layers, ctx.block, backward=True)
        return None, du, di, None, None


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
        """(all user vectors, all item vectors) after the layer-mean readout."""
        self.propagations += 1
        ue, ie = self.user_emb.weight, self.item_emb.weight
        block = COLUMN_BLOCK if ue.device.type == "cpu" else ue.shape[1]  # a GPU streams whole matrices
        return _LayerMean.apply(self.adj, ue, ie, self.layers, block)

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
