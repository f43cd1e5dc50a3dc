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

from rcekd_kernels import topm_dot
from rcekd_kernels.spec import ranked_topk

from .base import KDMethod, dot_all, dot_items, gumbel_topk, mix_seed
from .teacher import topk_from_vectors

Tensor = torch.Tensor


# --- loss formulas ----------------------------------------------------------------------------
def ce_rows(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """- sum_j softmax(t / tau)_j log softmax(s / tau)_j over the columns, per row."""
    return -(torch.softmax(t / tau, dim=1) * torch.log_softmax(s / tau, dim=1)).sum(1)


def cd_rows(s: Tensor, t: Tensor, target_T: float = 1.0, target_shift: float = 0.0) -> Tensor:
    """Pointwise: sum_j BCE(sigmoid(s_j), target sigmoid((t_j + target_shift) / target_T)), per row."""
    target = torch.sigmoid((t + target_shift) / target_T)
    return F.binary_cross_entropy_with_logits(s, target, reduction="none").sum(1)


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


def pairwise_rank_sampling(Kpool: int, n: int, T: float, generator, rows: int, rounds: int = 8) -> Tensor:
    """n distinct positions in [0, Kpool) per row drawn as the authors' CD does ("student guide"): repeatedly
    two positions are drawn with replacement with probability proportional to exp(-(pos + 1) / T) and the
    better-ranked one (the smaller position) is kept, until n distinct positions are collected. Returned in
    the order they were collected."""
    if n > Kpool:
        raise ValueError(f"cannot draw {n} distinct positions out of {Kpool}")
    w = torch.exp(-(torch.arange(Kpool, dtype=torch.float64) + 1) / T)
    cdf = torch.cumsum(w / w.sum(), 0)
    out = torch.full((rows, n), -1, dtype=torch.long)
    todo = torch.arange(rows)
    while len(todo):
        u = torch.rand((len(todo), rounds, 2), generator=generator, dtype=torch.float64)
        pos = torch.searchsorted(cdf, u).clamp_max(Kpool - 1).min(dim=2).values       # (R, rounds)
        srt, order = torch.sort(pos, dim=1, stable=True)
        first_sorted = torch.ones_like(srt, dtype=torch.bool)
        first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
        first = torch.zeros_like(first_sorted).scatter_(1, order, first_sorted)      # first occurrences
        take = first & (torch.cumsum(first.int(), 1) <= n)
        ok = take.sum(1) == n
        if ok.any():
            rows_ok = todo[ok]
            out[rows_ok] = pos[ok][take[ok]].view(-1, n)
        todo = todo[~ok]
        rounds *= 2
    return out


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
            self.qs = torch.cat([topm_dot(uv[u.to(uv.device)], iv, self.hp["K"])[0]
                                 for u in self.chunks(self.data.num_users, self.hp["chunk"])])
            self.t_qs = self.teacher.score_items(torch.arange(self.data.num_users, device=self.qs.device), self.qs)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        if self.hp["refresh"] == "epoch":
            idx, t = self.qs[users], self.t_qs[users]
        else:
            with torch.no_grad():
                idx = topm_dot(user_vecs, item_vecs, self.hp["K"])[0]
            t = self.teacher.score_items(users, idx)
        s = dot_items(user_vecs, item_vecs, idx)
        return ce_rows(s, t, float(self.hp["tau"])), {}


class CD(KDMethod):
    """Collaborative distillation: L items per user drawn from the top ``pool`` of a ranking (the teacher's,
    ``guide: teacher``, or the student's at the start of each epoch, ``guide: student``, the authors'
    "student guide") with probability proportional to exp(-(rank + 1) / T) (new draw each epoch;
    ``draw: pairwise`` is the authors' two-draw tournament); pointwise BCE to the teacher's
    sigmoid((t + target_shift) / target_T). ``exclude_train`` drops the users' training items from the ranking
    (the authors' code does)."""
    name = "cd"
    defaults = dict(L=10, pool=100, T=10.0, reduction="sum", guide="teacher", draw="plain", exclude_train=False,
                    target_T=1.0, target_shift=0.0, chunk=1024)

    choices = {"guide": ("teacher", "student"), "draw": ("plain", "pairwise")}

    @classmethod
    def check_relations(cls, h):
        if not h["L"] <= h["pool"]:
            raise ValueError(f"kd (cd): need L <= pool, got L={h['L']}, pool={h['pool']}")

    def __init__(self, teacher, data, seed=0, **hp):
        super().__init__(teacher, data, seed, **hp)
        self._teacher_list = None

    def topk_needed(self):
        return self.hp["pool"] if self.hp["guide"] == "teacher" and not self.hp["exclude_train"] else 0

    @torch.no_grad()
    def _guide_list(self, student) -> Tensor:
        h = self.hp
        excl = self.data if h["exclude_train"] else None
        if h["guide"] == "student":
            uv, iv = self.student_vectors(student)
            return topk_from_vectors(uv, iv, h["pool"], data=excl, chunk=h["chunk"]).long()
        if self._teacher_list is None:
            dev = self.teacher.item_vecs.device
            self._teacher_list = (topk_from_vectors(self.teacher.user_vecs, self.teacher.item_vecs, h["pool"],
                                                    data=excl, chunk=h["chunk"]).long() if excl is not None else
                                  self.teacher.topk(torch.arange(self.data.num_users, device=dev), h["pool"]))
        return self._teacher_list

    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        h = self.hp
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 3))
        sample = pairwise_rank_sampling if h["draw"] == "pairwise" else rank_sampling
        pos = sample(h["pool"], h["L"], float(h["T"]), g, self.data.num_users)
        ranking = self._guide_list(student)
        dev = self.teacher.item_vecs.device
        users = torch.arange(self.data.num_users, device=dev)
        self.items = ranking.to(dev).gather(1, pos.to(dev))
        self.t_items = self.teacher.score_items(users, self.items)  # fixed for the epoch

    def rows(self, users, user_vecs, item_vecs, step, weights):
        s = dot_items(user_vecs, item_vecs, self.items[users])
        return cd_rows(s, self.t_items[users], float(self.hp["target_T"]), float(self.hp["target_shift"])), {}


class RRD(KDMethod):
    """Relaxed ranking distillation: K "interesting" items drawn from the teacher's top ``pool``
    (probability proportional to exp(-rank / T)), kept in teacher order, must come first in that order;
    L "uninteresting" items drawn uniformly from outside the pool must come below them. ``exclude_train``
    (the authors' code): the teacher's list skips the users' training items and no training item is drawn
    as uninteresting; ``user_weight: one`` (the authors' code): a user counts once per batch."""
    name = "rrd"
    defaults = dict(K=20, L=20, pool=100, T=10.0, reduction="sum", exclude_train=False, user_weight="count",
                    chunk=1024)

    @classmethod
    def check_relations(cls, h):
        if not h["K"] <= h["pool"]:
            raise ValueError(f"kd (rrd): need K <= pool (K interesting items are drawn from the pool), got "
                             f"K={h['K']}, pool={h['pool']}")

    def topk_needed(self):
        return 0 if self.hp["exclude_train"] else self.hp["pool"]

    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        h = self.hp
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 4))
        U, N = self.data.num_users, self.data.num_items
        pool = teacher_list(self.teacher, self.data, h["pool"], h["exclude_train"], h["chunk"], self).cpu()
        pos = rank_sampling(h["pool"], h["K"], float(h["T"]), g, U)
        self.interesting = pool.gather(1, pos)
        unint = torch.randint(0, N, (U, h["L"]), generator=g)
        srt = torch.sort(pool, dim=1).values
        rows = torch.arange(U).unsqueeze(1).expand_as(unint)
        for _ in range(1000):  # redraw the ones inside the pool (or training items): rare when pool << N
            loc = torch.searchsorted(srt, unint).clamp_max(srt.shape[1] - 1)
            bad = srt.gather(1, loc) == unint
            if h["exclude_train"]:
                bad |= torch.from_numpy(self.data.is_train_pair(rows.numpy(), unint.numpy()))
            if not bad.any():
                break
            unint[bad] = torch.randint(0, N, (int(bad.sum()),), generator=g)
        else:
            raise ValueError("rrd: could not draw uninteresting items outside the pool (pool too large?)")
        dev = self.teacher.item_vecs.device
        self.interesting, self.uninteresting = self.interesting.to(dev), unint.to(dev)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        s_int = dot_items(user_vecs, item_vecs, self.interesting[users])
        s_un = dot_items(user_vecs, item_vecs, self.uninteresting[users])
        return listwise_rows(s_int, s_un), {}


def teacher_list(teacher, data, n: int, exclude_train: bool, chunk: int = 1024, cache_owner=None) -> Tensor:
    """The teacher's top-n items per user (U, n) int64: from its cache, or, with ``exclude_train``, computed
    once with the users' training items skipped (cached on ``cache_owner``)."""
    if not exclude_train:
        return teacher.topk(torch.arange(data.num_users, device=teacher.item_vecs.device), n)
    key = ("_teacher_list", n)
    got = getattr(cache_owner, "_tlist_cache", {}).get(key) if cache_owner is not None else None
    if got is None:
        got = topk_from_vectors(teacher.user_vecs, teacher.item_vecs, n, data=data, chunk=chunk).long()
        if cache_owner is not None:
            cache_owner._tlist_cache = {key: got}
    return got


# DCD with over_from: student keeps the teacher's sorted score rows (users x items float32) up to this size
TEACHER_SORT_CACHE_BYTES = 1 << 30


class DCD(KDMethod):
    """User-side dual correction distillation. Each epoch, per user: among the teacher's top ``pool`` items,
    those the student ranks lower than the teacher (discrepancy d = rank_S - rank_T > 0) are drawn (L of
    them) with probability proportional to max(tanh(max(d, 0) / scale), floor); over-ranked items
    (d' = rank_T - rank_S > 0) are drawn likewise among the student's top ``pool`` (``over_from: student``)
    or among the teacher's top ``pool`` (``over_from: teacher``, the authors' code; with a student far from the
    teacher almost no item of that list is over-ranked, and the draw is then uniform over it). ``order: teacher``:
    the 2L items are ordered by the teacher's ranking and distilled listwise (Plackett-Luce NLL of that order);
    ``order: under_over`` (the authors' code): the under-ranked items, in the order drawn, must come first
    and above the over-ranked ones (whose order is free). ``exclude_train`` (the authors' code): the
    teacher's list and ranks skip the users' training items (and so does the student's list with
    ``over_from: student``; the student's ranks count every item, as the authors' code)."""
    name = "dcd"
    defaults = dict(L=20, pool=100, scale=100.0, floor=1e-6, over_from="student", order="teacher",
                    exclude_train=False, user_weight="count", reduction="sum", chunk=512)

    choices = {"over_from": ("student", "teacher"), "order": ("teacher", "under_over")}

    @classmethod
    def check_relations(cls, h):
        if not h["L"] <= h["pool"]:
            raise ValueError(f"kd (dcd): need L <= pool, got L={h['L']}, pool={h['pool']}")

    def topk_needed(self):
        return 0 if self.hp["exclude_train"] else self.hp["pool"]

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
        tlist = teacher_list(self.teacher, self.data, h["pool"], h["exclude_train"], 1024, self)
        # over_from: teacher -> only the teacher's ranks of its own list are needed, and the teacher is frozen:
        # they are computed on the first epoch and kept (same values, no teacher rows afterwards)
        keep_rank_t = h["over_from"] == "teacher"
        fresh = not keep_rank_t or getattr(self, "_rank_t", None) is None
        # over_from: student -> the teacher's sorted rows are needed every epoch (its ranks of the student's
        # items): sorted on the first epoch and kept when they fit in TEACHER_SORT_CACHE_BYTES (the same values,
        # so the same draws; half of an epoch's sorting)
        keep_sorted = h["over_from"] == "student" and \
            self.data.num_users * self.data.num_items * 4 <= TEACHER_SORT_CACHE_BYTES
        kept_sorted = getattr(self, "_t_sorted", None) if keep_sorted else None
        rank_t_parts, sorted_parts = [], []
        out, below = [], []
        for ci, users in enumerate(self.chunks(self.data.num_users, h["chunk"])):
            users = users.to(uv.device)
            s = dot_all(uv[users], iv).float()
            s_sorted = torch.sort(s, dim=1, descending=True).values
            qt = tlist[users.to(tlist.device)].to(uv.device)
            train = self.data.train_mask_rows(users).to(uv.device) if h["exclude_train"] and fresh else None
            if fresh:
                t = self.teacher.score_rows(users).float()
                if train is not None:
                    t = t.masked_fill(train, float("-inf"))
                if kept_sorted is not None:
                    t_sorted = kept_sorted[ci]
                else:
                    t_sorted = torch.sort(t, dim=1, descending=True).values
                    if keep_sorted:
                        sorted_parts.append(t_sorted)
                rank_t = self.ranks_sorted(t_sorted, t, qt)
                rank_t_parts.append(rank_t)
            else:
                rank_t = self._rank_t[ci]
            d_up = self.ranks_sorted(s_sorted, s, qt) - rank_t
            if h["over_from"] == "student":
                # exclude_train: the student's list skips the training items too (the teacher ranks them last,
                # so they would all be drawn as over-ranked and pushed below the teacher's items)
                cand = ranked_topk(s if train is None else s.masked_fill(train, float("-inf")), h["pool"])
                d_down = self.ranks_sorted(t_sorted, t, cand) - self.ranks_sorted(s_sorted, s, cand)
            else:
                cand, d_down = qt, -d_up
            up = qt.gather(1, gumbel_topk(self._logw(d_up), h["L"], g))           # in the order drawn
            down = cand.gather(1, gumbel_topk(self._logw(d_down), h["L"], g))
            if h["order"] == "teacher":
                both = torch.cat([up, down], dim=1)
                # (without fresh teacher rows every item is from the teacher's list: no training item)
                t_both = t.gather(1, both) if fresh else self.teacher.score_items(users, both).float()
                order = torch.sort(t_both, dim=1, descending=True, stable=True).indices
                out.append(both.gather(1, order))
            else:
                out.append(up)
                below.append(down)
        if keep_rank_t and fresh:
            self._rank_t = rank_t_parts
        if keep_sorted and kept_sorted is None:
            self._t_sorted = sorted_parts
        self.items = torch.cat(out)
        self.below = torch.cat(below) if below else None

    def _logw(self, d: Tensor) -> Tensor:
        w = torch.tanh(d.clamp_min(0).double() / float(self.hp["scale"])).clamp_min(float(self.hp["floor"]))
        return torch.log(w)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        s = dot_items(user_vecs, item_vecs, self.items[users])
        if self.below is None:
            return listwise_rows(s, s[:, :0]), {}
        return listwise_rows(s, dot_items(user_vecs, item_vecs, self.below[users])), {}
