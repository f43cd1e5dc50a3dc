"""Matrix factorisation trained with BPR (one uniform negative per training pair)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Recommender, bpr_loss


class MF(Recommender):
    name = "mf"

    def __init__(self, data, dim: int = 64, init_std: float = 0.01):
        super().__init__(data)
        self.dim = dim
        self.user_emb = nn.Embedding(self.num_users, dim)
        self.item_emb = nn.Embedding(self.num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)

    def represent(self, users):
        return self.user_emb(users), self.item_emb.weight

    def base_loss(self, batch):
        users, pos, neg = batch
        u, items = self.represent(users)
        return bpr_loss(u, items, pos, neg), users, u, items

    @torch.no_grad()
    def represent_all(self, chunk: int = 4096):
        return self.user_emb.weight.detach(), self.item_emb.weight.detach()
