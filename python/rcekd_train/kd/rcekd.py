"""RCE-KD through the loss package (``rcekd_kernels``); the loss is never re-implemented here.

Two refresh protocols (spec section 8):

* ``refresh: epoch`` (the authors' code): at the start of each epoch the student's
  full score rows are computed in chunks of users and ``rcekd_kernels.select`` gives
  QS, A and QT for every user; each batch then scores only the 2K + L items
  ``selection.indices`` (student with gradient) and calls ``rce_kd_loss_gathered``; the
  frozen teacher's scores at those items are computed once per epoch (U x (2K + L) values).
* ``refresh: batch``: each batch computes the student's full rows (B, N) and the
  teacher's rows of the batch, and calls ``rce_kd_loss`` (sets from the current scores).

Diagnostics: gamma and |Q1|/K are, per epoch, the means over all users of the epoch's
sets (``refresh: epoch``) or the means over a batch's users (``refresh: batch``); L1 and
L2 are batch means.

``mode`` is ``paper`` or ``official`` (see the loss spec). QT comes from the
teacher's cached top-K. ``exclude_train`` removes the users' training items from the
catalogue of the loss (the authors' code does not).

``variant`` selects the method or one of the ablations of the paper's Figure 3 (defined in
docs/KD_METHODS.md); every variant uses the same sets QS, A, QT of ``rcekd_kernels.select``:

* ``full``: the method, (1 - gamma) L1 + gamma L2;
* ``no_split`` ("w/o sep"): one CE over X = QT ∪ A (each item once), no split, no gamma;
* ``l1_only`` ("w/o S", without the sampled subset): gamma = 0, i.e. L1 alone;
* ``const_gamma`` ("w/ const"): gamma = the constant ``gamma`` for every user.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from rcekd_kernels import RCEKDConfig, Selection, rce_kd_loss, rce_kd_loss_gathered, select, select_embeddings

from .base import KDMethod, dot_all, dot_items, mix_seed

VARIANTS = ("full", "no_split", "l1_only", "const_gamma")


def masked_ce_rows(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """- sum_{j: mask} softmax_X(t / tau)_j log softmax_X(s / tau)_j per row, X = the columns where ``mask``
    is True (at least one per row); the other columns get no weight and no gradient."""
    neg = torch.finfo(s.dtype).min
    logp_s = torch.log_softmax((s / tau).masked_fill(~mask, neg), dim=1)
    p_t = torch.softmax((t / tau).masked_fill(~mask, neg), dim=1)
    return -(p_t * logp_s.masked_fill(~mask, 0.0)).sum(1)


@torch.no_grad()
def qt_not_sampled(teacher_topk: torch.Tensor, sampled: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, K) bool: the teacher item is not among the row's sampled items A (so X = A + these)."""
    out = []
    for s in range(0, teacher_topk.shape[0], chunk):
        qt, a = teacher_topk[s:s + chunk], sampled[s:s + chunk]
        out.append(~(qt.unsqueeze(2) == a.unsqueeze(1)).any(2))
    return torch.cat(out) if out else torch.zeros(teacher_topk.shape, dtype=torch.bool)


class RCEKD(KDMethod):
    name = "rcekd"
    defaults = dict(K=50, M=None, L=50, tau=1.0, T=10.0, beta=3.0, mode="official", refresh="epoch",
                    reduction="sum", exclude_train=False, variant="full", gamma=0.5, chunk=1024, backend=None,
                    validate="first", scoring="embeddings")

    choices = {"variant": VARIANTS, "scoring": ("embeddings", "dense")}

    @classmethod
    def check_relations(cls, h):
        """The loss's own ranges (RCEKDConfig: K, M, L, tau, T, beta, mode), checked here already."""
        try:
            RCEKDConfig(K=h["K"], M=2 * h["K"] if h["M"] is None else h["M"], L=h["L"], tau=float(h["tau"]),
                        T=float(h["T"]), beta=float(h["beta"]), mode=h["mode"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"kd (rcekd): {e}") from None

    def __init__(self, teacher, data, seed=0, **hp):
        super().__init__(teacher, data, seed, **hp)
        h = self.hp
        if h["M"] is None:
            h["M"] = 2 * h["K"]
        self.selection = None
        self._validated = False

    def topk_needed(self):
        return self.hp["K"]

    def dedup_users(self) -> bool:
        # per-epoch refresh: a row is 2K + L gathered scores, cheaper than the unique's synchronisation
        return self.hp["refresh"] == "batch"

    def _validate(self) -> bool:
        v = self.hp["validate"]
        if v == "first":
            first = not self._validated
            self._validated = True
            return first
        return bool(v)

    def _common(self):
        h = self.hp
        return dict(K=h["K"], M=h["M"], L=h["L"], T=float(h["T"]), beta=float(h["beta"]), mode=h["mode"],
                    backend=h["backend"])

    def _select(self, uvecs: torch.Tensor, iv: torch.Tensor, users: torch.Tensor, seed: int, validate: bool,
                scores: Optional[torch.Tensor] = None) -> Selection:
        """The sets of these users from the student's vectors (no gradient): by ``select_embeddings`` (the
        student's top-M tile by tile, the training items excluded sparsely; no (B, N) scores), or with
        ``scoring: dense`` by ``select`` on the full score rows (the path before; the same sets whenever the
        products are the same numbers); ``scores``: the dense path's rows when the caller has them already."""
        h = self.hp
        qt = self.teacher.topk(users, h["K"])
        if h["scoring"] == "dense":
            exclude = self.data.train_mask_rows(users) if h["exclude_train"] else None
            rows = dot_all(uvecs, iv) if scores is None else scores
            return select(rows, teacher_topk=qt, seed=seed, row_ids=users, exclude=exclude,
                          validate=validate, **self._common())
        exclude = self.data.train_exclusion(users) if h["exclude_train"] else None
        return select_embeddings(uvecs, iv, qt, exclude=exclude, seed=seed, row_ids=users, validate=validate,
                                 **self._common())

    @torch.no_grad()
    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        if self.hp["refresh"] != "epoch":
            return
        uv, iv = self.student_vectors(student)
        seed = mix_seed(self.seed, epoch, 1)
        validate = self._validate()
        lo, hi = self.own_users()  # every user, or this process's block (a user's sets do not depend on others)
        self.selection = sel = Selection.cat([self._select(uv[users], iv, users, seed, validate)
                                              for users in (u.to(uv.device) for u in
                                                            self.chunks(hi, self.hp["chunk"], start=lo))])
        # the diagnostics of the epoch's sets, prepared once (means over the users; constant through
        # the epoch, so not recomputed per step)
        self.epoch_diag = {"gamma": sel.gamma.float().mean(), "q1_frac": sel.n_q1.float().mean() / self.hp["K"]}
        # the teacher is frozen and the sets are fixed for the epoch: its scores at the 2K + L items of
        # every user are computed once here instead of in every batch
        own = torch.arange(lo, hi, device=uv.device)
        self.teacher_at_sel = self.teacher.score_items(own, self.selection.indices)
        if self.hp["variant"] == "no_split":
            self.x_mask = qt_not_sampled(sel.teacher_topk, sel.sampled)
            self.epoch_diag = {"q1_frac": self.epoch_diag["q1_frac"]}  # no gamma in this variant
        elif self.hp["variant"] != "full":
            self.epoch_diag["gamma_adaptive"] = self.epoch_diag["gamma"]
            self.epoch_diag["gamma"] = self._gamma(sel.gamma).float().mean()

    def _gamma(self, adaptive: torch.Tensor) -> torch.Tensor:
        """The weight of L2 the variant uses, from the adaptive one of the selection."""
        v = self.hp["variant"]
        if v == "l1_only":
            return torch.zeros_like(adaptive)
        if v == "const_gamma":
            return torch.full_like(adaptive, float(self.hp["gamma"]))
        return adaptive

    def _variant_rows(self, s_g, t_g, sel, x_mask):
        """Loss rows of the variant from scores gathered at sel.indices = [QS | A | QT]."""
        h = self.hp
        if h["variant"] == "no_split":
            K = sel.K
            mask = torch.cat([torch.ones_like(sel.sampled, dtype=torch.bool), x_mask], dim=1)
            rows = masked_ce_rows(s_g[:, K:], t_g[:, K:], mask, float(h["tau"]))
            return rows, {}
        sel = dataclasses.replace(sel, gamma=self._gamma(sel.gamma))
        return rce_kd_loss_gathered(s_g, t_g, sel, tau=float(h["tau"]), reduction="none", backend=h["backend"],
                                    validate=False, return_diagnostics=True)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        h = self.hp
        if h["refresh"] == "epoch":
            rows_of = self.local(users)  # the rows of the epoch's sets (of this process's users)
            sel = self.selection[rows_of]
            s_g = dot_items(user_vecs, item_vecs, sel.indices)
            t_g = self.teacher_at_sel.index_select(0, rows_of)  # (index_select: ~10x advanced indexing on a CPU)
            x_mask = self.x_mask.index_select(0, rows_of) if h["variant"] == "no_split" else None
            out = dict(self.epoch_diag)
        elif h["scoring"] == "dense" and h["variant"] == "full":
            return self._dense_batch_rows(users, user_vecs, item_vecs, step)
        else:
            # the sets of this batch (the same seed and rows as the fused loss would use), then the scores of the
            # student (with gradient) and of the teacher at the 2K + L selected items only
            s = dot_all(user_vecs, item_vecs) if h["scoring"] == "dense" else None  # the rows, computed once
            sel = self._select(user_vecs.detach(), item_vecs.detach(), users, mix_seed(self.seed, step, 2),
                               self._validate(), None if s is None else s.detach())
            if s is not None:
                s_g = s.gather(1, sel.indices)
                t_g = self.teacher.score_rows(users).gather(1, sel.indices)
            else:
                s_g = dot_items(user_vecs, item_vecs, sel.indices)
                t_g = self.teacher.score_items(users, sel.indices)
            x_mask = qt_not_sampled(sel.teacher_topk, sel.sampled) if h["variant"] == "no_split" else None
            out = {"q1_frac": sel.n_q1.float().mean() / h["K"]}
        rows, diag = self._variant_rows(s_g, t_g, sel, x_mask)
        if h["refresh"] == "batch" and h["variant"] != "no_split":
            out["gamma"] = diag["gamma"]
            if h["variant"] != "full":
                out["gamma_adaptive"] = sel.gamma.float().mean()
        if "L1" in diag:
            out.update(L1=diag["L1"], L2=diag["L2"])  # detached 0-dim tensors: no host synchronisation
        return rows, out

    def _dense_batch_rows(self, users, user_vecs, item_vecs, step):
        """The per-batch protocol on full rows (``scoring: dense``, the path before): the student's (B, N) scores
        and the teacher's rows of the batch through the fused ``rce_kd_loss``."""
        h = self.hp
        s = dot_all(user_vecs, item_vecs)
        t = self.teacher.score_rows(users)
        exclude = self.data.train_mask_rows(users) if h["exclude_train"] else None
        rows, diag = rce_kd_loss(s, t, self.teacher.topk(users, h["K"]), tau=float(h["tau"]),
                                 seed=mix_seed(self.seed, step, 2), row_ids=users, exclude=exclude,
                                 reduction="none", validate=self._validate(), return_diagnostics=True,
                                 **self._common())
        out = {"gamma": diag["gamma"], "q1_frac": diag["q1_frac"]}
        if "L1" in diag:
            out.update(L1=diag["L1"], L2=diag["L2"])
        return rows, out
