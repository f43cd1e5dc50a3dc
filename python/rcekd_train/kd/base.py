"""The interface every distillation method implements, and shared helpers.

A method is built with its hyperparameters, the frozen teacher and the data (a run
builds it once, without the teacher: ``kd_from_config``; ``topk_needed()`` says how much
of the teacher's top-K cache to load, and ``attach(teacher)`` gives it the teacher before
the first epoch), and the trainer calls:

* ``on_epoch_start(student, epoch)`` before the batches of an epoch (per-epoch
  refresh of sets and samples; nothing to do for per-batch methods);
* ``batch_loss(users, user_vecs, item_vecs, step)`` in each training step, with the
  student's vectors of that step (gradient flows through them) -> (loss, diagnostics).
  A user that appears several times in a batch (one row per training pair) is computed
  once and weighted by its count, which gives the same value and gradient as one row per
  occurrence (the authors' code) for less work. Methods implement ``rows(...)``: the loss of
  each distinct user (B,) and the diagnostics.

The total loss is ``base + lambda * kd``. Randomness comes from generators seeded by
(seed, epoch) or (seed, step), so an interrupted and resumed run draws the same
samples.

In a data-parallel run (``rcekd_train.parallel``) each process trains the users of one block;
``restrict_users(lo, hi)`` tells the method, which may then prepare its per-epoch targets for those
users only (RCE-KD does: its sets depend on (seed, epoch, user), not on the other users; the baselines
draw one stream over all users and prepare every user's, the same on every process).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import config as C
from ..models.base import dot_all, dot_items, eval_mode

Tensor = torch.Tensor


def mix_seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (splitmix-style mixing)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x ^= (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return int(x & 0x7FFFFFFF)


def gumbel_topk(log_weights: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k column indices per row drawn without replacement with probability proportional to
    exp(log_weights) (Gumbel-top-k); -inf weights are never drawn (when enough others exist)."""
    u = torch.rand(log_weights.shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    g = -torch.log(-torch.log(u))  # drawn on the generator's device (CPU), then moved
    keys = log_weights.double() + g.to(log_weights.device)
    return torch.topk(keys, k, dim=1).indices


#: the values of the hyperparameters, by name (shared by the methods that have them; config.RULES names or
#: choices); a method's own choices are in its ``choices``
HP_RULES = {"K": "pos_int", "L": "pos_int", "M": "pos_int|None", "pool": "pos_int", "num_ckpt": "pos_int",
            "p": "pos_int", "chunk": "pos_int", "num_pos": "pos_int|None", "tau": "pos", "T": "pos", "target_T": "pos",
            "scale": "pos", "alpha": "pos", "alpha_decay": "pos", "lam": "pos", "clamp": "pos", "beta": "nonneg",
            "gamma": "unit", "floor": "nonneg", "target_shift": "finite", "exclude_train": "bool",
            "reduction": ("sum", "mean"), "user_weight": ("count", "one"), "refresh": ("epoch", "batch"),
            "mode": ("paper", "official"), "backend": "str|None", "validate": (True, False, "first")}


class KDMethod:
    name = "base"
    #: hyperparameters and their defaults (the config's kd section is checked against them)
    defaults: Dict = {}
    #: the choices of this method's own options (beyond HP_RULES)
    choices: Dict = {}

    @classmethod
    def checked(cls, hp: Dict) -> Dict:
        """The hyperparameters with the defaults filled in, each checked (a known name, its range or choices,
        the constraints between them): a ValueError names the key. The one check of a method's settings, run
        when a configuration is built (config.check) and when the method is."""
        for k in hp:
            if k not in cls.defaults:
                raise C.unknown_key_error(f"kd.{k}", sorted(cls.defaults), f" (of kd method {cls.name})")
        h = dict(cls.defaults)
        h.update(hp)
        C.check_values("kd", h, {k: r for k, r in {**HP_RULES, **cls.choices}.items() if k in cls.defaults})
        cls.check_relations(h)
        return h

    @classmethod
    def check_relations(cls, h: Dict) -> None:
        """The constraints between hyperparameters (e.g. L <= pool); ValueError naming them."""

    def __init__(self, teacher, data, seed: int = 0, **hp):
        self.hp = self.checked(hp)
        self.teacher, self.data, self.seed = teacher, data, int(seed)
        self.epoch = 0
        self.user_range: Optional[Tuple[int, int]] = None  # [lo, hi) of this process; None: every user

    def restrict_users(self, lo: int, hi: int) -> None:
        """This process trains the users [lo, hi) only (a data-parallel run): its batches hold no other user."""
        self.user_range = (int(lo), int(hi))

    def own_users(self) -> Tuple[int, int]:
        """[lo, hi) of the users whose per-epoch targets this process prepares."""
        return self.user_range or (0, self.data.num_users)

    def local(self, users: Tensor) -> Tensor:
        """Rows of the per-epoch targets of ``own_users`` for global user ids."""
        lo = self.own_users()[0]
        return users - lo if lo else users

    def attach(self, teacher) -> None:
        """Gives the method its frozen teacher, once, before the first epoch (a method built without one, to
        ask ``topk_needed`` before the teacher is loaded); methods that prepare targets from the teacher do
        it here."""
        self.teacher = teacher

    def state_dict(self) -> Dict:
        """What a method carries from epoch to epoch beyond (seed, epoch) (saved in the trainer's checkpoint
        so that a resumed run continues it); empty for every method whose draws only depend on the seed."""
        return {}

    def load_state_dict(self, state: Dict) -> None:
        if state:
            raise ValueError(f"kd method {self.name} keeps no state, got {sorted(state)}")

    def topk_needed(self) -> int:
        """How many of the teacher's top items per user the method reads from the cache."""
        return 0

    def on_epoch_start(self, student, epoch: int) -> None:
        self.epoch = epoch

    def rows(self, users: Tensor, user_vecs: Tensor, item_vecs: Tensor, step: int, weights: Optional[Tensor]
             ) -> Tuple[Tensor, Dict]:
        """The loss of each (distinct) user (B,) and diagnostics (means weighted by ``weights``, the
        users' counts in the batch; None when every row is one occurrence)."""
        raise NotImplementedError

    def dedup_users(self) -> bool:
        """Whether ``batch_loss`` computes each distinct user once: worth it where a row is costly
        (full rows of N items); ``torch.unique`` makes the host wait for the device, so methods whose
        rows are cheap compute one row per occurrence instead (same loss and gradient)."""
        return True

    def batch_loss(self, users: Tensor, user_vecs: Tensor, item_vecs: Tensor, step: int) -> Tuple[Tensor, Dict]:
        """The reduced KD loss of a batch (users may repeat; see ``dedup_users``). With the hyperparameter
        ``user_weight: one`` (the authors' RRD and DCD, which distil ``batch_user.unique()``) every distinct
        user of the batch counts once instead of once per occurrence."""
        uw = self.hp.get("user_weight", "count")
        if self.dedup_users() or uw == "one":
            uniq, inv, counts = torch.unique(users, return_inverse=True, return_counts=True)
            first = torch.full((len(uniq),), len(users), dtype=torch.long, device=users.device)
            first.scatter_reduce_(0, inv, torch.arange(len(users), device=users.device), reduce="amin")
            w = counts.to(user_vecs.dtype) if uw == "count" else torch.ones(len(uniq), dtype=user_vecs.dtype,
                                                                             device=users.device)
            rows, diag = self.rows(uniq, user_vecs[first], item_vecs, step, w)
        else:
            w = None  # one row per occurrence
            rows, diag = self.rows(users, user_vecs, item_vecs, step, w)
        red = self.hp.get("reduction", "sum")
        if w is None:
            return (rows.sum() if red == "sum" else rows.mean()), diag
        loss = (rows * w).sum()
        return (loss if red == "sum" else loss / w.sum().clamp_min(1)), diag

    # helpers
    @staticmethod
    def student_vectors(student):
        with eval_mode(student):
            return student.represent_all()

    def chunks(self, n: int, size: int = 1024, start: int = 0):
        """Users start..n-1 in chunks of ``size``."""
        for s in range(start, n, size):
            yield torch.arange(s, min(n, s + size))


class NoKD(KDMethod):
    name = "none"

    def rows(self, users, user_vecs, item_vecs, step, weights):
        return user_vecs.sum(1) * 0.0, {}


__all__ = ["KDMethod", "NoKD", "gumbel_topk", "mix_seed", "dot_all", "dot_items"]
