"""Functional API of the RCE-KD loss.

* :func:`rce_kd_loss` -- the drop-in loss on dense score rows (per-batch refresh);
* :func:`select` + :func:`rce_kd_loss_gathered` -- the per-epoch protocol: compute
  the sets once (in chunks of users), then each batch needs only the scores at
  ``selection.indices`` (2K + L items per user);
* :class:`RCEKDFunction` -- the same dense loss as a ``torch.autograd.Function``.

See ``docs/LOSS.md`` for the definition of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from . import _checks, ops
from .backends import reference, requested

Tensor = torch.Tensor

__all__ = ["rce_kd_loss", "select", "rce_kd_loss_gathered", "Selection", "RCEKDFunction"]


def _default_m(K, M):
    return 2 * K if M is None and isinstance(K, int) else M


def _row_ids(row_ids: Optional[Tensor], B: int, device) -> Tensor:
    if row_ids is None:
        return torch.arange(B, device=device, dtype=torch.int64)
    return row_ids


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / max(rows.shape[0], 1)  # B = 0 gives 0, not NaN


def _diagnostics(stats: Tensor, K: int) -> Dict[str, Tensor]:
    with torch.no_grad():
        m = stats.to(torch.float32).mean(0) if stats.shape[0] else stats.new_zeros(stats.shape[1])
        return {"L1": m[0], "L2": m[1], "gamma": m[2], "q1_frac": m[3] / K, "qt_in_sampled_frac": m[4] / K}


def rce_kd_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    teacher_topk: Optional[Tensor] = None,
    *,
    K: int = 100,
    M: Optional[int] = None,
    L: int = 100,
    tau: float = 1.0,
    T: float = 10.0,
    beta: float = 5.0,
    mode: str = "paper",
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    exclude: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
    validate: bool = True,
    return_diagnostics: bool = False,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """RCE-KD loss of a batch of dense score rows (sets refreshed from these scores).

    Args:
        student_scores: (B, N) float student scores; the gradient flows to them.
        teacher_scores: (B, N) float teacher scores (never receive a gradient).
        teacher_topk: optional cached (B, K) int64 teacher top-K ids, unique per row.
            Computed from ``teacher_scores`` when not given.
        K: size of the top lists, 1 <= K <= M.
        M: size of the student's candidate pool, K <= M <= N (default 2K).
        L: number of sampled pool items, 1 <= L <= M.
        tau: logit temperature (> 0).
        T: sampling temperature (> 0); weights are exp(count / T).
        beta: strength of the adaptive weight gamma (>= 0).
        mode: ``"paper"`` (the paper's equations) or ``"official"`` (the authors' code).
        seed: int fixing the random sample (same sample on every backend).
        row_ids: (B,) integer ids of the rows for the sampler (default 0..B-1);
            pass the user ids so a user's sample does not depend on batch position.
        exclude: optional (B, N) bool; True items are absent from the row's catalog.
        reduction: ``"mean"`` (default), ``"sum"`` (the authors' code) or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"``
            (default: $RCEKD_BACKEND, else ``"auto"``).
        validate: check the data (non-finite scores, ids) before the work; costs one
            read of the inputs and a host synchronisation.
        return_diagnostics: also return a dict of batch means (detached):
            ``L1``, ``L2``, ``gamma``, ``q1_frac`` (|Q1|/K), ``qt_in_sampled_frac`` (|QT & A|/K).

    Returns:
        The loss (0-dim for mean/sum, (B,) for none), float32 (float64 for float64
        inputs); with ``return_diagnostics`` a tuple (loss, diagnostics).
    """
    M = _default_m(K, M)
    _checks.check_hparams(K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode, seed=seed, reduction=reduction)
    name = requested(backend)
    if not isinstance(student_scores, Tensor):
        raise TypeError(f"student_scores must be a torch.Tensor, got {type(student_scores).__name__}")
    rows = _row_ids(row_ids, student_scores.shape[0] if student_scores.dim() else 0, student_scores.device)
    loss_rows, stats, _idx, _q2 = ops.fused_fwd(
        student_scores, teacher_scores, teacher_topk, exclude, rows, K, M, L, float(tau), float(T),
        float(beta), mode, seed, name, bool(validate))
    loss = _reduce(loss_rows, reduction)
    if return_diagnostics:
        return loss, _diagnostics(stats, K)
    return loss


@dataclass(frozen=True)
class Selection:
    """The sets of RCE-KD for a batch of rows (spec section 2-5).

    Attributes:
        student_topk: (B, K) int64, QS in student order.
        sampled: (B, L) int64, A (by decreasing Gumbel key).
        teacher_topk: (B, K) int64, QT.
        q2_mask: (B, K) bool, teacher items in Q2 = QT \\ QS that were not sampled;
            U = A + these items.
        gamma: (B,) float32, the weight of L2.
        n_q1: (B,) int64, |Q1| = |QT & QS|.
        n_qt_sampled: (B,) int64, |QT & A|.
    """

    student_topk: Tensor
    sampled: Tensor
    teacher_topk: Tensor
    q2_mask: Tensor
    gamma: Tensor
    n_q1: Tensor
    n_qt_sampled: Tensor

    @property
    def K(self) -> int:
        return self.student_topk.shape[1]

    @property
    def L(self) -> int:
        return self.sampled.shape[1]

    @property
    def indices(self) -> Tensor:
        """(B, 2K + L) ids whose scores the gathered loss needs: [QS | A | QT]."""
        return torch.cat([self.student_topk, self.sampled, self.teacher_topk], dim=1)

    def union(self) -> Tuple[Tensor, Tensor]:
        """U = A + (Q2 \\ A) as padded ids (B, L + K) and a validity mask."""
        ids = torch.cat([self.sampled, self.teacher_topk], dim=1)
        mask = torch.cat([torch.ones_like(self.sampled, dtype=torch.bool), self.q2_mask], dim=1)
        return ids, mask

    def __getitem__(self, rows) -> "Selection":
        """The selection of some rows (an index tensor, a slice or a bool mask)."""
        return Selection(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def to(self, device) -> "Selection":
        return Selection(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return self.student_topk.shape[0]

    @staticmethod
    def cat(parts) -> "Selection":
        """Concatenates selections of consecutive row chunks."""
        parts = list(parts)
        return Selection(*(torch.cat([getattr(p, f) for p in parts]) for f in Selection.__dataclass_fields__))


@torch.no_grad()
def select(
    student_scores: Tensor,
    teacher_scores: Optional[Tensor] = None,
    teacher_topk: Optional[Tensor] = None,
    *,
    K: int = 100,
    M: Optional[int] = None,
    L: int = 100,
    T: float = 10.0,
    beta: float = 5.0,
    mode: str = "paper",
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    exclude: Optional[Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> Selection:
    """The sets of RCE-KD for dense score rows (the select step of the per-epoch protocol).

    Same arguments as :func:`rce_kd_loss`; ``teacher_scores`` may be omitted when
    ``teacher_topk`` is given. Call it on chunks of users and join the chunks with
    :meth:`Selection.cat`; no gradient flows through it.
    """
    M = _default_m(K, M)
    _checks.check_hparams(K=K, M=M, L=L, T=T, beta=beta, mode=mode, seed=seed)
    name = requested(backend)
    if not isinstance(student_scores, Tensor):
        raise TypeError(f"student_scores must be a torch.Tensor, got {type(student_scores).__name__}")
    rows = _row_ids(row_ids, student_scores.shape[0] if student_scores.dim() else 0, student_scores.device)
    s = student_scores.detach()
    t = teacher_scores.detach() if isinstance(teacher_scores, Tensor) else teacher_scores
    qs, a, qt, q2, counts = ops.select(s, t, teacher_topk, exclude, rows, K, M, L, float(T), mode,
                                       seed, name, bool(validate))
    gamma = reference.gamma_from_counts(counts, float(beta), K, mode)
    return Selection(qs, a, qt, q2, gamma, counts[:, 0], counts[:, 1])


def rce_kd_loss_gathered(
    student_gathered: Tensor,
    teacher_gathered: Tensor,
    selection: Selection,
    *,
    tau: float = 1.0,
    reduction: str = "mean",
    backend: Optional[str] = None,
    return_diagnostics: bool = False,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """RCE-KD loss from scores gathered at ``selection.indices`` (B, 2K + L).

    ``student_gathered[r, j]`` must be the student's score of item
    ``selection.indices[r, j]`` (and likewise for the teacher); the gradient flows
    to ``student_gathered``. This is the per-batch step of the per-epoch protocol.
    """
    _checks.check_hparams(tau=tau, reduction=reduction)
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection (from rcekd_kernels.select), "
                        f"got {type(selection).__name__}")
    name = requested(backend)
    loss_rows, parts = ops.subset_ce_fwd(student_gathered, teacher_gathered, selection.q2_mask,
                                         selection.gamma, selection.K, selection.L, float(tau), name)
    loss = _reduce(loss_rows, reduction)
    if return_diagnostics:
        stats = torch.cat([parts.detach().float(), selection.gamma.unsqueeze(1).float(),
                           selection.n_q1.unsqueeze(1).float(), selection.n_qt_sampled.unsqueeze(1).float()], 1)
        return loss, _diagnostics(stats, selection.K)
    return loss


class RCEKDFunction(torch.autograd.Function):
    """The dense RCE-KD loss rows as a ``torch.autograd.Function``.

    ``RCEKDFunction.apply(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta,
    mode, seed, backend, validate)`` returns the (B,) loss rows; every argument is
    positional and required (pass None for the optional tensors, and a (B,) int64
    ``row_ids``). It runs the same ops as :func:`rce_kd_loss`.
    """

    @staticmethod
    def forward(ctx, s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta, mode, seed, backend,
                validate):
        loss_rows, stats, idx, q2_mask = ops.fused_fwd(s, t, teacher_topk, exclude, row_ids, K, M, L,
                                                       float(tau), float(T), float(beta), mode, seed,
                                                       requested(backend), bool(validate))
        ctx.save_for_backward(s, t, idx, q2_mask, stats)
        ctx.hp = (K, L, float(tau), requested(backend))
        return loss_rows

    @staticmethod
    def backward(ctx, grad_rows):
        return ops.fused_backward(ctx, grad_rows)
