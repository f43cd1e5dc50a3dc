"""``nn.Module`` wrapper of the RCE-KD loss."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from . import _checks
from .functional import rce_kd_loss

Tensor = torch.Tensor


class RCEKDLoss(nn.Module):
    """RCE-KD loss holding its hyperparameters; the sampling seed advances each step.

    Every call in training mode uses ``seed = base_seed + step`` and then advances
    ``step`` (saved in the state dict, so a resumed run continues the sequence);
    in eval mode the seed does not advance. The diagnostics of the last call
    (batch means of L1, L2, gamma, |Q1|/K, |QT & A|/K) are kept in
    ``last_diagnostics``.

    Example::

        kd = RCEKDLoss(K=50, L=50, M=200, beta=3.0, reduction="sum")
        loss = base_loss + lam * kd(student_rows, teacher_rows, row_ids=users)
    """

    def __init__(self, K: int = 100, M: Optional[int] = None, L: int = 100, tau: float = 1.0,
                 T: float = 10.0, beta: float = 5.0, mode: str = "paper", seed: int = 0,
                 reduction: str = "mean", backend: Optional[str] = None, validate: bool = True):
        super().__init__()
        M = 2 * K if M is None and isinstance(K, int) else M
        _checks.check_hparams(K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode, seed=seed,
                              reduction=reduction)
        self.K, self.M, self.L = K, M, L
        self.tau, self.T, self.beta = float(tau), float(T), float(beta)
        self.mode, self.base_seed, self.reduction = mode, int(seed), reduction
        self.backend, self.validate = backend, validate
        self.step = 0
        self.last_diagnostics: Dict[str, Tensor] = {}

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, teacher_topk: Optional[Tensor] = None,
                *, row_ids: Optional[Tensor] = None, exclude: Optional[Tensor] = None) -> Tensor:
        loss, self.last_diagnostics = rce_kd_loss(
            student_scores, teacher_scores, teacher_topk, K=self.K, M=self.M, L=self.L, tau=self.tau,
            T=self.T, beta=self.beta, mode=self.mode, seed=self.base_seed + self.step, row_ids=row_ids,
            exclude=exclude, reduction=self.reduction, backend=self.backend, validate=self.validate,
            return_diagnostics=True)
        if self.training:
            self.step += 1
        return loss

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return (f"K={self.K}, M={self.M}, L={self.L}, tau={self.tau}, T={self.T}, beta={self.beta}, "
                f"mode={self.mode!r}, seed={self.base_seed}, reduction={self.reduction!r}")
