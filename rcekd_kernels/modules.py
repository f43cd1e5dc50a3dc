"""``nn.Module`` wrapper of the RCE-KD loss."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .config import RCEKDConfig, check_seed
from .functional import rce_kd_loss

Tensor = torch.Tensor


class RCEKDLoss(nn.Module):
    """RCE-KD loss holding its hyperparameters (one :class:`RCEKDConfig`); the sampling seed
    advances each step.

    Every call in training mode uses ``seed = base_seed + step`` and then advances
    ``step`` (saved in the state dict, so a resumed run continues the sequence);
    in eval mode the seed does not advance. The diagnostics of the last call
    (batch means of L1, L2, gamma, |Q1|/K, |QT & A|/K) are kept in
    ``last_diagnostics``.

    Args: the hyperparameters as ``config=`` or as keywords (see :func:`rce_kd_loss`),
    ``seed`` (the base seed), ``backend``, ``validate``.

    Example::

        kd = RCEKDLoss(K=50, L=50, M=200, beta=3.0, reduction="sum")
        loss = base_loss + lam * kd(student_rows, teacher_rows, row_ids=users)
    """

    def __init__(self, K: Optional[int] = None, M: Optional[int] = None, L: Optional[int] = None,
                 tau: Optional[float] = None, T: Optional[float] = None, beta: Optional[float] = None,
                 mode: Optional[str] = None, seed: int = 0, reduction: Optional[str] = None,
                 backend: Optional[str] = None, validate: bool = True, *, config: Optional[RCEKDConfig] = None):
        super().__init__()
        self.config = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode,
                                              reduction=reduction)
        check_seed(seed)
        self.base_seed = int(seed)
        self.backend, self.validate = backend, validate
        self.step = 0
        self.last_diagnostics: Dict[str, Tensor] = {}

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, teacher_topk: Optional[Tensor] = None,
                *, row_ids: Optional[Tensor] = None, exclude: Optional[Tensor] = None) -> Tensor:
        loss, self.last_diagnostics = rce_kd_loss(
            student_scores, teacher_scores, teacher_topk, config=self.config, seed=self.base_seed + self.step,
            row_ids=row_ids, exclude=exclude, backend=self.backend, validate=self.validate,
            return_diagnostics=True)
        if self.training:
            self.step += 1
        return loss

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        c = self.config
        return (f"K={c.K}, M={c.M}, L={c.L}, tau={c.tau}, T={c.T}, beta={c.beta}, "
                f"mode={c.mode!r}, seed={self.base_seed}, reduction={c.reduction!r}")


def _config_field(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"``config.{name}`` (read-only)")


# the hyperparameters read as attributes (kd.K, kd.beta, ...), from the one config
for _name in ("K", "M", "L", "tau", "T", "beta", "mode", "reduction"):
    setattr(RCEKDLoss, _name, _config_field(_name))
