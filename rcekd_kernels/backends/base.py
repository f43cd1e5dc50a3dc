"""The backend interface: what a backend is, and what the dispatcher asks it.

A backend implements some of the :data:`OPS` under these names and signatures
(tensors in, plus the :class:`~rcekd_kernels.config.RCEKDConfig` and the seed),
says where it can run at all (:meth:`Backend.available`) and whether it can run
one particular call (:meth:`Backend.supports`, given a :class:`Call`: op, device,
dtype, sizes). The dispatcher (:func:`rcekd_kernels.backends.resolve`) asks both;
a backend never calls another backend.

The ops' outputs (B = rows, W = 2K + L gathered columns [QS | A | QT]):

========================  ==========================================================
``select``                ``idx`` (B, W) int64, ``q2_mask`` (B, K) bool, ``counts`` (B, 2) int64
``subset_ce_fwd``         ``loss`` (B,), ``parts`` (B, 2) = (L1, L2), compute dtype
``subset_ce_bwd``         d loss / d gathered student scores (B, W), compute dtype
``fused_fwd``             ``loss`` (B,), ``stats`` (B, 5) float32, ``idx`` (B, W), ``q2_mask`` (B, K)
``fused_bwd``             the dense gradient (B, N), dtype of the student scores
``gathered_dot``          ``out[b, w] = <u[b], v[idx[b, w]]>`` (B, W)
``gathered_dot_bwd``      (grad of u (B, D), grad of v (N, D))
``sets_from_pool``        as ``select``, from the pool (B, M) in student order and QT (B, K)
``topm_dot``              each row's first M items of u @ v.T: ids (B, M) int64, scores (B, M)
``layer_mean``            LightGCN's propagation of the rows of ``parts`` over a sparse graph, per part
========================  ==========================================================

``counts`` = (|Q1|, |QT & A|); ``stats`` = (L1, L2, gamma, |Q1|, |QT & A|); the compute
dtype is float64 for float64 inputs, else float32 (:func:`rcekd_kernels.spec.compute_dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple, runtime_checkable

import torch

from ..config import RCEKDConfig

Tensor = torch.Tensor

#: The loss ops every backend implements.
LOSS_OPS = ("select", "subset_ce_fwd", "subset_ce_bwd", "fused_fwd", "fused_bwd")
#: Ops a backend may implement besides: the scores of given items from vectors, and the sets
#: from a given pool (the rankings done elsewhere: from embeddings, across processes), and
#: LightGCN's propagation over a sparse graph.
EXTRA_OPS = ("gathered_dot", "gathered_dot_bwd", "sets_from_pool", "topm_dot", "layer_mean")
OPS = LOSS_OPS + EXTRA_OPS


@dataclass(frozen=True)
class Call:
    """What the dispatcher knows of one call before choosing a backend.

    ``dtypes`` are the dtypes of the score tensors the op reads (student first; the
    vectors for ``gathered_dot``); ``N`` the catalogue size (items) of the dense ops and
    of ``gathered_dot`` (0 for the gathered loss); ``config`` the hyperparameters (None
    for ``gathered_dot`` and ``topm_dot``); ``M`` the length of ``topm_dot``'s lists.
    """

    op: str
    device_type: str
    dtypes: Tuple[torch.dtype, ...]
    config: Optional[RCEKDConfig] = None
    N: int = 0
    M: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """The student scores' dtype (the vectors' for ``gathered_dot``)."""
        return self.dtypes[0]


@runtime_checkable
class Backend(Protocol):
    """A backend of the loss ops (module or object)."""

    NAME: str
    DESCRIPTION: str

    def available(self, device_type: str) -> Optional[str]:
        """None when the backend can run on ``device_type`` at all; else the reason."""

    def supports(self, call: Call) -> Optional[str]:
        """None when the backend can run this call; else the reason (dtype, sizes, op)."""

    def select(self, s: Tensor, t: Optional[Tensor], teacher_topk: Optional[Tensor],
               exclude: Optional[Tensor], row_ids: Tensor, cfg: RCEKDConfig,
               seed: int) -> Tuple[Tensor, Tensor, Tensor]: ...

    def subset_ce_fwd(self, s_g: Tensor, t_g: Tensor, q2_mask: Tensor, gamma: Tensor,
                      cfg: RCEKDConfig) -> Tuple[Tensor, Tensor]: ...

    def subset_ce_bwd(self, grad_rows: Tensor, s_g: Tensor, t_g: Tensor, q2_mask: Tensor,
                      gamma: Tensor, cfg: RCEKDConfig) -> Tensor: ...

    def fused_fwd(self, s: Tensor, t: Tensor, teacher_topk: Optional[Tensor], exclude: Optional[Tensor],
                  row_ids: Tensor, cfg: RCEKDConfig, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def fused_bwd(self, grad_rows: Tensor, s: Tensor, t: Tensor, idx: Tensor, q2_mask: Tensor,
                  gamma: Tensor, cfg: RCEKDConfig) -> Tensor: ...


def implements(backend: object, op: str) -> bool:
    """True when ``backend`` has an implementation of ``op``."""
    return callable(getattr(backend, op, None))
