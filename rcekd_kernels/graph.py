"""LightGCN's propagation: the layer mean of the embeddings over a sparse graph, and its gradient.

For x the rows of the user and the item embeddings one after the other and A the symmetric
normalised adjacency D^-1/2 A D^-1/2 of the user-item graph (``adj``, sparse)::

    layer_mean(x) = (x + A x + A^2 x + ... + A^L x) / (L + 1)

and, A being symmetric, its gradient is the same propagation of the upstream gradient g
(h + A (h + A (h + ...)) with h = g / (L + 1)). :func:`propagate` is differentiable (one
autograd node: no per-layer intermediates are kept for the backward); :func:`layer_mean`
runs one direction.

Backends (the dispatcher of :mod:`rcekd_kernels.backends`, op ``layer_mean``):

* ``reference``: ``torch.sparse.mm``, 64 columns at a time on a CPU (a block of every row
  stays in the cache through the layers), whole matrices on a GPU;
* ``cpp`` (CPU, float32): one pass per layer and column block, the row's products in vector
  registers and added into the running sum in the same pass (csrc/cpu/graph_cpu.cpp): the same
  values as the reference's to rounding (to the bit where its blocks are 32 columns or wider),
  about 1.8x faster at 2000 columns. ``auto`` takes it for 64 columns or more (below that the
  torch product is as fast and ``auto`` keeps the reference's values).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks
from .backends import Call, requested, resolve

__all__ = ["layer_mean", "propagate", "CPP_MIN_COLUMNS"]

#: narrowest matrices ``auto`` sends to the ``cpp`` kernel
CPP_MIN_COLUMNS = 64


def _backend(backend: Optional[str], parts: Sequence[Tensor]):
    name = requested(backend, "layer_mean")
    if name == "auto" and parts[0].shape[1] < CPP_MIN_COLUMNS:
        name = "reference"
    return resolve(name, Call("layer_mean", parts[0].device.type, (parts[0].dtype,), N=int(parts[0].shape[1])))


def layer_mean(adj: Tensor, parts: Sequence[Tensor], layers: int, *, backward: bool = False,
               backend: Optional[str] = None) -> List[Tensor]:
    """The layer mean of the rows of ``parts`` (taken one after the other) over ``adj``, split as
    ``parts`` are; with ``backward``, the gradient propagation h + adj (h + ...) (adj symmetric).

    ``adj``: sparse COO or CSR (R, R) with R the rows of the parts together; ``parts``: 2-D
    matrices of one float dtype and one number of columns D (e.g. the user and the item
    embeddings: no (R, D) concatenation is made); ``layers`` >= 0. ``backend``: ``auto``
    (default), ``reference`` or ``cpp``.

    Example::

        >>> adj = torch.tensor([[0., 1.], [1., 0.]]).to_sparse_csr()
        >>> layer_mean(adj, [torch.ones(1, 3), torch.zeros(1, 3)], 1)
        [tensor([[0.5000, 0.5000, 0.5000]]), tensor([[0.5000, 0.5000, 0.5000]])]
    """
    _checks.check_layer_mean(adj, parts, layers)
    parts = [p.contiguous() for p in parts]
    return list(_backend(backend, parts).layer_mean(adj, parts, int(layers), bool(backward)))


class _LayerMean(torch.autograd.Function):
    """The layer mean as one autograd node, from the parts to the propagated parts: the forward
    and the backward each run ``layers`` sparse products per column block."""

    @staticmethod
    def forward(ctx, adj, layers, backend, *parts):
        ctx.adj, ctx.layers, ctx.backend = adj, layers, backend
        return tuple(layer_mean(adj, parts, layers, backend=backend))

    @staticmethod
    def backward(ctx, *grads):
        g = [x.contiguous() for x in grads]
        return (None, None, None, *layer_mean(ctx.adj, g, ctx.layers, backward=True, backend=ctx.backend))


def propagate(adj: Tensor, parts: Sequence[Tensor], layers: int, *, backend: Optional[str] = None
              ) -> Tuple[Tensor, ...]:
    """:func:`layer_mean`, differentiable in the ``parts`` (the gradient is the same propagation
    of the upstream gradient, adj being symmetric; one autograd node).

    Example::

        >>> adj = torch.tensor([[0., 1.], [1., 0.]]).to_sparse_csr()
        >>> u, i = propagate(adj, [torch.ones(1, 2, requires_grad=True), torch.zeros(1, 2)], 1)
        >>> u.shape, i.shape
        (torch.Size([1, 2]), torch.Size([1, 2]))
    """
    _checks.check_layer_mean(adj, parts, layers)
    return tuple(_LayerMean.apply(adj, int(layers), backend, *parts))
