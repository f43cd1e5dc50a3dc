"""Scores of given items: ``out[b, w] = <user_vecs[b], item_vecs[idx[b, w]]>``.

The per-epoch protocol of RCE-KD scores, in every training step, only the 2K + L
items ``Selection.indices`` of each user. With ``index_select`` + ``bmm`` that
makes a (B, W, D) tensor of gathered item vectors and, in the backward, a
(B, W, D) gradient scattered back with ``index_add``: most of the cost of a KD
step of a small model on a CPU. The ``cpp`` backend computes the same values and
gradients without either (deterministic for any number of threads); the
``reference`` backend is the torch formulation, its oracle in the tests.

It is the custom op ``rcekd::gathered_dot`` (with a fake implementation and
autograd), dispatched like the loss ops (:mod:`rcekd_kernels.backends`), so
``torch.compile`` traces it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import ops
from .backends import requested


def gathered_dot(user_vecs: Tensor, item_vecs: Tensor, idx: Tensor, *, backend: Optional[str] = None,
                 validate: bool = True) -> Tensor:
    """``out[b, w] = <user_vecs[b], item_vecs[idx[b, w]]>``: (B, D), (N, D), int64 (B, W) -> (B, W),
    differentiable in ``user_vecs`` and ``item_vecs``.

    ``backend``: ``auto`` (default: the C++ kernel for float32/float64 CPU tensors when the
    extension is built, else the torch formulation), ``reference`` (torch: index_select + bmm)
    or ``cpp``; ``$RCEKD_BACKEND`` applies when it names a backend that implements it.
    ``validate`` reads ``idx`` once to check that the ids lie in [0, N) (a host synchronisation
    on a GPU); pass False in a loop whose ids are known to be valid (e.g. from ``select``).

    Example::

        >>> u, v = torch.randn(2, 8), torch.randn(100, 8)
        >>> gathered_dot(u, v, torch.tensor([[0, 5], [7, 7]])).shape
        torch.Size([2, 2])
    """
    return ops.gathered_dot(user_vecs, item_vecs, idx, requested(backend, "gathered_dot"), bool(validate))
