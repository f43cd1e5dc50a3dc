"""What every backbone provides.

All three backbones score a (user, item) pair by a dot product of a user vector
and an item vector, so a model exposes:

* ``represent(users)`` -> (user vectors (B, D), item vectors (N, D)), differentiable;
* ``base_loss(batch)`` -> (loss, users, user vectors, item vectors): the training
  loss of one batch and the representation computed on the way (LightGCN
  propagates once per step; the KD loss reuses these vectors);
* ``score_all(users)`` (B, N) and ``score_items(users, items)`` (B, X);
* ``represent_all()`` -> (all user vectors, item vectors), no gradient, for
  evaluation and for freezing a teacher;
* ``batches(data, batch_size, generator, shard=None)``: the training batches of one epoch, an iterator with
  ``len()`` (the number of batches of the epoch; progress bars read it); with a shard (data-parallel training,
  ``rcekd_train.parallel.Shard``) only the samples of its users, in its number of steps;
* ``forward(batch)`` is ``base_loss(batch)`` (what DistributedDataParallel calls), ``base_reduction`` says
  whether the base loss sums or averages over the batch, ``sample_counts(data)`` the training samples of each
  user (what a data-parallel run balances over its processes).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import numpy as np
import torch
from torch import nn

from rcekd_kernels import gathered_dot

Tensor = torch.Tensor


def dot_items(user_vecs: Tensor, item_vecs: Tensor, items: Tensor) -> Tensor:
    """Scores (B, X) of items (B, X) for users given by their vectors (B, D)."""
    # rcekd_kernels.gathered_dot: on the CPU a C++ kernel that makes neither the (B, X, D) gathered
    # vectors nor their gradient (torch's index_select + bmm elsewhere); ids come from the loss's
    # selection or the data, so they are not validated again
    return gathered_dot(user_vecs, item_vecs, items, validate=False)


def dot_all(user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
    return user_vecs @ item_vecs.T


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """For the block: ``model.eval()`` (no dropout) and ``torch.no_grad()``; afterwards the model is back
    in the mode it was in (training or not), also when the block raises. The one way the drivers evaluate,
    represent or freeze a model."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


class Recommender(nn.Module):
    name = "base"
    #: how the base loss reduces over a batch: "sum" (BPR, as the authors' code) or "mean"
    base_reduction = "sum"

    def __init__(self, data):
        super().__init__()
        self.num_users = data.num_users
        self.num_items = data.num_items

    # --- to implement ------------------------------------------------------------------
    def represent(self, users: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def base_loss(self, batch) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def make_batcher(self, data, batch_size: int, shard=None):
        """The batch maker of this backbone: BPR pair batches (MF, LightGCN); a backbone with another
        objective overrides this (and ``sample_counts``)."""
        return PairBatches(data, batch_size, next(self.parameters()).device, shard)

    def sample_counts(self, data) -> np.ndarray:
        """The training samples of each user in one epoch (U,): its training pairs."""
        return data.train.lengths()

    def batches(self, data, batch_size: int, generator: torch.Generator, shard=None) -> "EpochBatches":
        """The batches of one epoch (the batch maker is built once per batch size and shard, and kept)."""
        b = getattr(self, "_batcher", None)
        if b is None or b.batch_size != batch_size or b.shard != shard:
            self._batcher = self.make_batcher(data, batch_size, shard)
        return self._batcher(generator)

    def forward(self, batch):
        """The base loss of a batch (``base_loss``): what a training step calls, through DistributedDataParallel
        in a data-parallel run."""
        return self.base_loss(batch)

    # --- shared ---------------------------------------------------------------------------
    def score_all(self, users: Tensor) -> Tensor:
        u, i = self.represent(users)
        return dot_all(u, i)

    def score_items(self, users: Tensor, items: Tensor) -> Tensor:
        u, i = self.represent(users)
        return dot_items(u, i, items)

    @torch.no_grad()
    def represent_all(self, chunk: int = 4096) -> Tuple[Tensor, Tensor]:
        dev = next(self.parameters()).device
        users = torch.arange(self.num_users, device=dev)
        parts, items = [], None
        for s in range(0, self.num_users, chunk):
            u, items = self.represent(users[s:s + chunk])
            parts.append(u)
        return torch.cat(parts), items


class EpochBatches:
    """The batches of one epoch: an iterator (drawn lazily, as the batch maker's generator) that also knows
    how many batches it yields (``len``), so that a progress bar needs nothing else."""

    def __init__(self, batches: Iterator, count: int):
        self._batches, self._count = batches, int(count)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self):
        return next(self._batches)


def to_device(x: Tensor, device) -> Tensor:
    """A host tensor on ``device``: through pinned memory and a non-blocking copy for a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def batch_bounds(n: int, batch_size: int, shard=None):
    """[(start, end)] of an epoch's batches over n samples: of ``batch_size`` each (the last one shorter), or, with
    a shard, ``shard.steps`` nearly equal batches (every rank of a data-parallel run takes as many steps)."""
    if shard is None:
        return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return [(i * n // shard.steps, (i + 1) * n // shard.steps) for i in range(shard.steps)]


class PairBatches:
    """BPR batches: every training pair once per epoch, shuffled, each with one negative item drawn
    uniformly from the items the user has not interacted with in train. With a shard, the pairs of its users
    [shard.lo, shard.hi) only (the pairs are stored user by user), in ``shard.steps`` batches."""

    def __init__(self, data, batch_size: int, device="cpu", shard=None):
        self.data, self.batch_size, self.device, self.shard = data, batch_size, device, shard
        pairs = data.train.pairs()
        if shard is not None:
            ip = data.train.indptr
            pairs = pairs[ip[shard.lo]:ip[shard.hi]]
        self.users = torch.from_numpy(pairs[:, 0])
        self.items = torch.from_numpy(pairs[:, 1])

    def __len__(self):
        if self.shard is not None:
            return self.shard.steps
        return (len(self.users) + self.batch_size - 1) // self.batch_size

    def sample_negatives(self, users: Tensor, generator: torch.Generator) -> Tensor:
        n = self.data.num_items
        neg = torch.randint(0, n, users.shape, generator=generator)
        bad = torch.from_numpy(self.data.is_train_pair(users.numpy(), neg.numpy()))
        while bad.any():
            idx = bad.nonzero().squeeze(1)
            neg[idx] = torch.randint(0, n, (len(idx),), generator=generator)
            bad[idx] = torch.from_numpy(self.data.is_train_pair(users[idx].numpy(), neg[idx].numpy()))
        return neg

    def __call__(self, generator: torch.Generator) -> EpochBatches:
        return EpochBatches(self._epoch(generator), len(self))

    def _epoch(self, generator: torch.Generator):
        neg = self.sample_negatives(self.users, generator)
        perm = torch.randperm(len(self.users), generator=generator)
        # the epoch's pairs move to the device once (pinned, non-blocking); batches are views of them,
        # so a training step neither copies nor waits for the host
        epoch = to_device(torch.stack([self.users[perm], self.items[perm], neg[perm]]), self.device)
        for s, e in batch_bounds(len(perm), self.batch_size, self.shard):
            b = epoch[:, s:e]
            yield (b[0], b[1], b[2])


class UserBatches:
    """Batches of users (sequential models): every user with at least one training item, shuffled (with a
    shard: those of its users, in ``shard.steps`` batches)."""

    def __init__(self, data, batch_size: int, device="cpu", shard=None):
        users = np.nonzero(data.train.lengths() > 0)[0]
        if shard is not None:
            users = users[(users >= shard.lo) & (users < shard.hi)]
        self.users = torch.from_numpy(users)
        self.batch_size, self.device, self.shard = batch_size, device, shard

    def __len__(self):
        if self.shard is not None:
            return self.shard.steps
        return (len(self.users) + self.batch_size - 1) // self.batch_size

    def __call__(self, generator: torch.Generator) -> EpochBatches:
        return EpochBatches(self._epoch(generator), len(self))

    def _epoch(self, generator: torch.Generator):
        perm = torch.randperm(len(self.users), generator=generator)
        users = to_device(self.users[perm], self.device)
        for s, e in batch_bounds(len(perm), self.batch_size, self.shard):
            yield users[s:e]


def bpr_loss(user_vecs: Tensor, item_vecs: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Summed over the batch: - sum log sigmoid(s(u, pos) - s(u, neg))."""
    sp = (user_vecs * item_vecs[pos]).sum(-1)
    sn = (user_vecs * item_vecs[neg]).sum(-1)
    return -torch.nn.functional.logsigmoid(sp - sn).sum()
