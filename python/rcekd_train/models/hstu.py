"""HSTU, the research layer of "Actions Speak Louder than Words" (Zhai et al., 2024),
as a next-item model over each user's training sequence.

One layer, for input X (B, n, D) with n the padded length:

    U, V, Q, K = split(SiLU(LayerNorm(X) W_uvqk))             (fused projection)
    A[i, j]    = SiLU(Q_i . K_j + b[i - j]) / n   for j <= i   (causal, pointwise, no softmax)
    Y          = X + W_o(Dropout(U * LayerNorm(A V)))          (per head, heads concatenated)

with b a learned relative-position bias (``rel_bias=False``: b = 0, which is what the
authors' code computes: it builds the bias module but passes no timestamps to it, so the
bias is never added). The input is item embedding * sqrt(D) + learned position embedding
(with dropout), padding positions are zeroed, and the output of the last layer is
L2-normalised. Training is next-item prediction with a sampled softmax over the positive
item and ``num_negatives`` items drawn uniformly (``negatives="position"``: a draw for each
position, as the authors' LocalNegativesSampler; ``"batch"``: one draw shared by all
positions of a batch; a negative equal to the positive is masked), on L2-normalised item
embeddings with a temperature. The representation of a user is
the output at the last position of the training sequence; a score is its dot
product with the L2-normalised item embedding.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Recommender, UserBatches, dot_items, eval_mode


def l2norm(x, eps: float = 1e-6):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class HSTULayer(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dim: int, linear_dim: int, max_len: int,
                 linear_dropout: float, rel_bias: bool = True):
        super().__init__()
        self.dim, self.heads, self.attn_dim, self.linear_dim = dim, heads, attn_dim, linear_dim
        self.uvqk = nn.Parameter(torch.empty(dim, heads * (2 * linear_dim + 2 * attn_dim)).normal_(0, 0.02))
        self.out = nn.Linear(heads * linear_dim, dim)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.rel_bias = nn.Parameter(torch.empty(2 * max_len - 1).normal_(0, 0.02)) if rel_bias else None
        self.max_len = max_len
        self.dropout = linear_dropout

    def forward(self, x):
        B, n, D = x.shape
        h = F.silu(F.layer_norm(x, (D,), eps=1e-6) @ self.uvqk)
        H, dv, dqk = self.heads, self.linear_dim, self.attn_dim
        u, v, q, k = torch.split(h, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        q = q.view(B, n, H, dqk)
        k = k.view(B, n, H, dqk)
        v = v.view(B, n, H, dv)
        scores = torch.einsum("bihd,bjhd->bhij", q, k)
        pos = torch.arange(n, device=x.device)
        rel = pos.view(n, 1) - pos.view(1, n)  # i - j
        if self.rel_bias is not None:
            scores = scores + self.rel_bias[rel + self.max_len - 1]
        causal = (rel >= 0).to(x.dtype) / self.max_len  # the causal mask, divided by the padded length
        attn = F.silu(scores) * causal  # (one pass over the (B, H, n, n) scores for both)
        a = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(B, n, H * dv)
        a = F.layer_norm(a, (H * dv,), eps=1e-6)
        return x + self.out(F.dropout(u * a, p=self.dropout, training=self.training))


def length_groups(lengths):
    """[(indices, m)]: the positions of a batch grouped by the bit length of (length - 1), i.e. lengths
    1-2, 3-4, 5-8, 9-16, ..., each with ``m`` its longest length (at least 1): a group's padded cost is at
    most about four times its own, in a handful of groups per batch. ``lengths``: a tensor (read once,
    one host sync on a GPU) or a list of ints."""
    values = lengths.tolist() if torch.is_tensor(lengths) else list(lengths)
    if not values:
        return []
    groups, longest = {}, {}
    for i, v in enumerate(values):
        k = max(int(v) - 1, 0).bit_length()
        groups.setdefault(k, []).append(i)
        longest[k] = max(longest.get(k, 1), int(v))
    device = lengths.device if torch.is_tensor(lengths) else None
    return [(torch.tensor(groups[k], dtype=torch.long, device=device), longest[k]) for k in sorted(groups)]


#: how the sampled softmax draws its negatives: "position" (num_negatives per position, the authors' code:
#: every position has its own uniform draw) or "batch" (one draw of num_negatives shared by the batch's positions)
NEGATIVES = ("position", "batch")
#: the initial item and position tables (and output biases): "normal" (ours: N(0, .02) clamped to +-.04,
#: positions N(0, 1 / D), output biases 0) or "xavier" (what the authors' code ends with; see ``__init__``)
INITS = ("normal", "xavier")
#: the authors' position table has max_output_len = 10 rows more than max_len (xavier's std depends on it)
XAVIER_EXTRA_POSITIONS = 10


class HSTU(Recommender):
    name = "hstu"
    base_reduction = "mean"  # the sampled softmax is averaged over the batch's positions

    def __init__(self, data, dim: int = 32, blocks: int = 2, heads: int = 1, attn_dim: int = 16,
                 linear_dim: int = 16, max_len: int = 100, dropout: float = 0.5, linear_dropout: float = 0.5,
                 temperature: float = 0.05, num_negatives: int = 1024, rel_bias: bool = True,
                 negatives: str = "batch", init: str = "normal"):
        super().__init__(data)
        if negatives not in NEGATIVES:
            raise ValueError(f"hstu: negatives must be one of {list(NEGATIVES)}, got {negatives!r}")
        if init not in INITS:
            raise ValueError(f"hstu: init must be one of {list(INITS)}, got {init!r}")
        self.dim, self.max_len, self.temperature = dim, max_len, temperature
        self.num_negatives, self.negatives = num_negatives, negatives
        self.item_emb = nn.Embedding(self.num_items + 1, dim, padding_idx=0)  # id 0 = padding
        if init == "normal":  # (the draws in this order: runs recorded before `init` existed are redrawn exactly)
            with torch.no_grad():
                self.item_emb.weight.normal_(0, 0.02).clamp_(-0.04, 0.04)
                self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(max_len, dim)
        if init == "normal":
            nn.init.normal_(self.pos_emb.weight, std=math.sqrt(1.0 / dim))
        self.input_dropout = dropout
        self.layers = nn.ModuleList(HSTULayer(dim, heads, attn_dim, linear_dim, max_len, linear_dropout, rel_bias)
                                    for _ in range(blocks))
        if init == "xavier":
            # what the authors' HSTU ends with: its reset_para means a truncated normal for the item table but
            # matches no parameter name, then applies xavier_normal_ to every parameter outside the layers:
            # the item table (std sqrt(2 / (N + 1 + D))) and the position table, whose first dimension is
            # max_len + max_output_len there (rows that no position reads, but xavier's std counts them); the
            # layers keep their own init, where the output bias is nn.Linear's default
            with torch.no_grad():
                nn.init.xavier_normal_(self.item_emb.weight)
                self.item_emb.weight[0].zero_()  # (theirs is not zero, but id 0 is masked out everywhere)
                self.pos_emb.weight.normal_(0, math.sqrt(2.0 / (max_len + XAVIER_EXTRA_POSITIONS + dim)))
                for layer in self.layers:
                    bound = 1.0 / math.sqrt(layer.out.in_features)
                    layer.out.bias.uniform_(-bound, bound)
        seq = np.zeros((self.num_users, max_len), dtype=np.int64)
        for u in range(self.num_users):
            items = data.train.items_of(u)[-max_len:]
            seq[u, :len(items)] = items + 1
        self.register_buffer("seq", torch.from_numpy(seq), persistent=False)
        self.register_buffer("lengths", torch.from_numpy(np.minimum(data.train.lengths(), max_len)),
                             persistent=False)

    def encode(self, users):
        """Outputs (B, n, D), L2-normalised, for the users' padded training sequences, ``n`` the batch's
        longest sequence (the positions from a user's length on hold nothing meaningful; none is read).
        Sequences are right-padded to ``max_len`` (the attention is divided by it), but the layers run on
        groups of users of similar length, each cut to its own longest sequence (:func:`length_groups`):
        that changes nothing, since the causal mask hides later positions from earlier ones, and on
        CiteULike (median length 8, a batch's longest about 100) it costs about a tenth of the attention
        and a fifth of the projections of one padded batch."""
        lengths = self.lengths[users]
        groups = length_groups(lengths)  # the batch's one host sync
        n = max((m for _, m in groups), default=1)
        ids = self.seq[users, :n]
        if len(groups) <= 1:
            return self._layers(ids), ids, lengths
        out = None
        for g, m in groups:  # each group's outputs written once into their rows (zeros past a group's m)
            y = self._layers(ids[g, :m])
            if out is None:
                out = y.new_zeros(len(users), n, y.shape[-1])
            out[g, :m] = y
        return out, ids, lengths

    def _layers(self, ids):
        """The L2-normalised outputs (b, m, D) of the layers for padded item ids (b, m)."""
        x = self.item_emb(ids) * math.sqrt(self.dim) + self.pos_emb.weight[: ids.shape[1]]
        x = F.dropout(x, p=self.input_dropout, training=self.training)
        x = x * (ids != 0).unsqueeze(-1).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return l2norm(x)

    def item_vectors(self):
        return l2norm(self.item_emb.weight[1:])

    def represent(self, users):
        out, _ids, lengths = self.encode(users)
        last = out[torch.arange(len(users), device=out.device), (lengths - 1).clamp_min(0)]
        return last, self.item_vectors()

    def base_loss(self, users):
        out, ids, lengths = self.encode(users)
        items = self.item_vectors()
        B, n, D = out.shape
        last = out[torch.arange(B, device=out.device), (lengths - 1).clamp_min(0)]
        if n < 2:
            return out.sum() * 0.0, users, last, items
        query = out[:, :-1]  # position t predicts item t + 1
        target = ids[:, 1:]  # padded with 0
        valid = target != 0
        q = query[valid]  # (P, D)
        pos_ids = target[valid] - 1
        pos_logit = (q * items[pos_ids]).sum(-1, keepdim=True) / self.temperature
        if self.negatives == "position":
            # (P, R) ids, a draw per position; the scores by gathered_dot (no (P, R, D) copy of the vectors)
            neg_ids = torch.randint(0, self.num_items, (len(pos_ids), self.num_negatives), device=out.device)
            neg_logit = dot_items(q, items, neg_ids) / self.temperature
            neg_logit = neg_logit.masked_fill(neg_ids == pos_ids.view(-1, 1), float("-inf"))
        else:
            neg_ids = torch.randint(0, self.num_items, (self.num_negatives,), device=out.device)
            neg_logit = (q @ items[neg_ids].T) / self.temperature
            neg_logit = neg_logit.masked_fill(neg_ids.view(1, -1) == pos_ids.view(-1, 1), float("-inf"))
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        loss = -F.log_softmax(logits, dim=1)[:, 0].mean()
        return loss, users, last, items

    def make_batcher(self, data, batch_size, shard=None):
        return UserBatches(data, batch_size, self.item_emb.weight.device, shard)

    def sample_counts(self, data):
        """One sample per user with training items (a batch is a batch of users)."""
        return (data.train.lengths() > 0).astype(np.int64)

    def represent_all(self, chunk: int = 1024):
        with eval_mode(self):  # no dropout in the representation
            return super().represent_all(chunk)
