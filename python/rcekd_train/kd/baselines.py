"""Baseline distillation methods (defined in docs/KD_METHODS.md).

* ``ce``  -- vanilla cross-entropy on the student's top-K items;
* ``cd``  -- pointwise distillation on items drawn from the teacher's ranking;
* ``rrd`` -- relaxed ranking distillation (listwise on teacher-ranked items, sampled
  uninteresting items below);
* ``dcd`` -- user-side dual correction (listwise on items the two models rank most
  differently).

The loss formulas are plain functions (``ce_rows``, ``cd_rows``, ``listwise_rows``) so
they can be checked against hand computations; the classes only choose the items.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import KDMethod, dot_all, dot_items, gumbel_topk, mix_seed
from .teacher import ranked_topk

Tensor = torch.Tensor


# --- loss formulas ----------------------------------------------------------------------------
def ce_rows(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """- sum_j softmax(t / tau)_j log softmax(s / tau)_j over the columns, per row."""
    return -(torch.softmax(t / tau, dim=1) * torch.log_softmax(s / tau, dim=1)).sum(1)


def cd_rows(s: Tensor, t: Tensor) -> Tensor:
    """Pointwise: sum_j BCE(sigmoid(s_j), target sigmoid(t_j)), per row."""
    return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t), reduction="none").sum(1)


def listwise_rows(ordered: Tensor, below: Tensor) -> Tensor:
    """Plackett-Luce negative log-likelihood that the ``ordered`` items (B, K) come first, in that
    order, above all ``below`` items (B, L) (whose order is free):
    - sum_k [ s_k - log( sum_{k' >= k} exp(s_k') + sum_l exp(b_l) ) ]."""
    below_lse = torch.logsumexp(below, dim=1, keepdim=True) if below.shape[1] else \
        torch.full_like(ordered[:, :1], float("-inf"))
    # log of suffix sums of exp(ordered), stabilised by a reversed logcumsumexp
    suffix = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
    denom = torch.logaddexp(suffix, below_lse.expand_as(suffix))
    return -(ordered - denom).sum(1)


def rank_sampling(Kpool: int, n: int, T: float, generator, rows: int) -> Tensor:
    """Positions in [0, Kpool) drawn without replacement with probability proportional to exp(-pos / T),
    n per row, returned sorted (best position first)."""
    logw = -(torch.arange(Kpool, dtype=torch.float64) + 1) / T
    pos = gumbel_topk(logw.expand(rows, Kpool), n, generator)
    return torch.sort(pos, dim=1).values


# --- methods ----------------------------------------------------------------------------------
class VanillaCE(KDMethod):
    """CE between teacher and student softmaxes over the student's top-K (refreshed per epoch or batch)."""
    name = "ce"
    defaults = dict(K=50, tau=1.0, refresh="epoch", reduction="sum", chunk=1024)

    @torch.no_grad()
    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        if self.hp["refresh"] == "epoch":
            uv, iv = self.student_vectors(student)
            self.qs = torch.cat([ranked_topk(dot_all(uv[u.to(uv.device)], iv), self.hp["K"])
                                 for u in self.chunks(self.data.num_users, self.hp["chunk"])])
            self.t_qs = self.teacher.score_items(torch.arange(self.data.num_users, device=self.qs.device), self.qs)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        if self.hp["refresh"] == "epoch":
            idx, t = self.qs[users], self.t_qs[users]
        else:
            with torch.no_grad():
                idx = ranked_topk(dot_all(user_vecs, item_vecs), self.hp["K"])
            t = self.teacher.score_items(users, idx)
        s = dot_items(user_vecs, item_vecs, idx)
        return ce_rows(s, t, float(self.hp["tau"])), {}


class CD(KDMethod):
    """Collaborative distillation: L items per user drawn from the teacher's top ``pool`` with probability
    proportional to exp(-rank / T) (new draw each epoch); pointwise BCE to the teacher's sigmoid."""
    name = "cd"
    defaults = dict(L=10, pool=100, T=10.0, reduction="sum")

    def topk_needed(self):
        return self.hp["pool"]

    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 3))
        pos = rank_sampling(self.hp["pool"], self.hp["L"], float(self.hp["T"]), g, self.data.num_users)
        dev = self.teacher.item_vecs.device
        users = torch.arange(self.data.num_users, device=dev)
        self.items = self.teacher.topk(users, self.hp["pool"]).gather(1, pos.to(dev))
        self.t_items = self.teacher.score_items(users, self.items)  # fixed for the epoch

    def rows(self, users, user_vecs, item_vecs, step, weights):
        s = dot_items(user_vecs, item_vecs, self.items[users])
        return cd_rows(s, self.t_items[users]), {}


class RRD(KDMethod):
    """Relaxed ranking distillation: K "interesting" items drawn from the teacher's top ``pool``
    (probability proportional to exp(-rank / T)), kept in teacher order, must come first in that order;
    L "uninteresting" items drawn uniformly from outside the pool must come below them."""
    name = "rrd"
    defaults = dict(K=20, L=20, pool=100, T=10.0, reduction="sum")

    def topk_needed(self):
        return self.hp["pool"]

    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        h = self.hp
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 4))
        U, N = self.data.num_users, self.data.num_items
        pool = self.teacher.topk(torch.arange(U, device=self.teacher.item_vecs.device), h["pool"]).cpu()
        pos = rank_sampling(h["pool"], h["K"], float(h["T"]), g, U)
        self.interesting = pool.gather(1, pos)
        unint = torch.randint(0, N, (U, h["L"]), generator=g)
        srt = torch.sort(pool, dim=1).values
        for _ in range(100):  # redraw the ones inside the pool (rare when pool << N)
            loc = torch.searchsorted(srt, unint).clamp_max(srt.shape[1] - 1)
            bad = srt.gather(1, loc) == unint
            if not bad.any():
                break
            unint[bad] = torch.randint(0, N, (int(bad.sum()),), generator=g)
        dev = self.teacher.item_vecs.device
        self.interesting, self.uninteresting = self.interesting.to(dev), unint.to(dev)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        s_int = dot_items(user_vecs, item_vecs, self.interesting[users])
        s_un = dot_items(user_vecs, item_vecs, self.uninteresting[users])
        return listwise_rows(s_int, s_un), {}


class DCD(KDMethod):
    """User-side dual correction distillation. Each epoch, per user: among the teacher's top ``pool`` items,
    those the student ranks lower than the teacher (discrepancy d = rank_S - rank_T > 0) are drawn (L of
    them) with probability proportional to tanh(max(d, 0) / scale) (+ a tiny floor); among the student's
    top ``pool``, those the teacher ranks lower (d' = rank_T - rank_S > 0) likewise. The union (2L items)
    is ordered by the teacher's ranking and distilled listwise (Plackett-Luce NLL of that order)."""
    name = "dcd"
    defaults = dict(L=20, pool=100, scale=100.0, reduction="sum", chunk=512)

    def topk_needed(self):
        return self.hp["pool"]

    @staticmethod
    def ranks_sorted(sorted_desc: Tensor, scores: Tensor, items: Tensor) -> Tensor:
        """0-based rank of items (B, X) in full rows (B, N) = the number of strictly larger scores;
        ``sorted_desc`` is each row sorted in decreasing order."""
        vals = scores.gather(1, items)
        # number of entries strictly greater than each value, via the ascending copy
        asc = sorted_desc.flip(1).contiguous()
        return asc.shape[1] - torch.searchsorted(asc, vals.contiguous(), right=True)

    @torch.no_grad()
    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        h = self.hp
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 5))
        uv, iv = self.student_vectors(student)
        out = []
        for users in self.chunks(self.data.num_users, h["chunk"]):
            users = users.to(uv.device)
            s = dot_all(uv[users], iv).float()
            t = self.teacher.score_rows(users).float()
            s_sorted = torch.sort(s, dim=1, descending=True).values
            t_sorted = torch.sort(t, dim=1, descending=True).values
            qt = self.teacher.topk(users, h["pool"])
            qs = ranked_topk(s, h["pool"])
            d_up = self.ranks_sorted(s_sorted, s, qt) - self.ranks_sorted(t_sorted, t, qt)
            d_down = self.ranks_sorted(t_sorted, t, qs) - self.ranks_sorted(s_sorted, s, qs)
            up = qt.gather(1, gumbel_topk(self._logw(d_up), h["L"], g))
            down = qs.gather(1, gumbel_topk(self._logw(d_down), h["L"], g))
            both = torch.cat([up, down], dim=1)
            order = torch.sort(t.gather(1, both), dim=1, descending=True, stable=True).indices
            out.append(both.gather(1, order))
        self.items = torch.cat(out)

    def _logw(self, d: Tensor) -> Tensor:
        w = torch.tanh(d.clamp_min(0).double() / float(self.hp["scale"])) + 1e-6
        return torch.log(w)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        s = dot_items(user_vecs, item_vecs, self.items[users])
        return listwise_rows(s, s[:, :0]), {}
