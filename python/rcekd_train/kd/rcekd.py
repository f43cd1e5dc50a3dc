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
"""
from __future__ import annotations

import torch

from rcekd_kernels import Selection, rce_kd_loss, rce_kd_loss_gathered, select

from .base import KDMethod, dot_all, dot_items, mix_seed


class RCEKD(KDMethod):
    name = "rcekd"
    defaults = dict(K=50, M=None, L=50, tau=1.0, T=10.0, beta=3.0, mode="official", refresh="epoch",
                    reduction="sum", exclude_train=False, chunk=1024, backend=None, validate="first")

    def __init__(self, teacher, data, seed=0, **hp):
        super().__init__(teacher, data, seed, **hp)
        h = self.hp
        if h["M"] is None:
            h["M"] = 2 * h["K"]
        if h["refresh"] not in ("epoch", "batch"):
            raise ValueError(f"rcekd: refresh must be 'epoch' or 'batch', got {h['refresh']!r}")
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

    @torch.no_grad()
    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        if self.hp["refresh"] != "epoch":
            return
        uv, iv = self.student_vectors(student)
        seed = mix_seed(self.seed, epoch, 1)
        validate = self._validate()
        parts = []
        for users in self.chunks(self.data.num_users, self.hp["chunk"]):
            users = users.to(uv.device)
            exclude = self.data.train_mask_rows(users) if self.hp["exclude_train"] else None
            parts.append(select(dot_all(uv[users], iv), teacher_topk=self.teacher.topk(users, self.hp["K"]),
                                seed=seed, row_ids=users, exclude=exclude, validate=validate, **self._common()))
        self.selection = sel = Selection.cat(parts)
        # the diagnostics of the epoch's sets, prepared once (means over all users; constant through
        # the epoch, so not recomputed per step)
        self.epoch_diag = {"gamma": sel.gamma.float().mean(), "q1_frac": sel.n_q1.float().mean() / self.hp["K"]}
        # the teacher is frozen and the sets are fixed for the epoch: its scores at the 2K + L items of
        # every user are computed once here instead of in every batch
        all_users = torch.arange(self.data.num_users, device=uv.device)
        self.teacher_at_sel = self.teacher.score_items(all_users, self.selection.indices)

    def rows(self, users, user_vecs, item_vecs, step, weights):
        h = self.hp
        if h["refresh"] == "epoch":
            sel = self.selection[users]
            s_g = dot_items(user_vecs, item_vecs, sel.indices)
            t_g = self.teacher_at_sel[users]
            # the scores come from the models (no data check: it would synchronise every step)
            rows, diag = rce_kd_loss_gathered(s_g, t_g, sel, tau=float(h["tau"]), reduction="none",
                                              backend=h["backend"], validate=False, return_diagnostics=True)
            out = dict(self.epoch_diag)
        else:
            s = dot_all(user_vecs, item_vecs)
            t = self.teacher.score_rows(users)
            exclude = self.data.train_mask_rows(users) if h["exclude_train"] else None
            rows, diag = rce_kd_loss(s, t, self.teacher.topk(users, h["K"]), tau=float(h["tau"]),
                                     seed=mix_seed(self.seed, step, 2), row_ids=users, exclude=exclude,
                                     reduction="none", validate=self._validate(), return_diagnostics=True,
                                     **self._common())
            out = {"gamma": diag["gamma"], "q1_frac": diag["q1_frac"]}
        out.update(L1=diag["L1"], L2=diag["L2"])  # detached 0-dim tensors: no host synchronisation
        return rows, out
