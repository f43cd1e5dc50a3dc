"""RCE-KD from embeddings: the loss, the selection and the top-M without a (B, N) score matrix.

Every backbone of the paper (MF, LightGCN, HSTU) scores a user and an item by the dot
product of their vectors, and the loss needs only each row's top-M and the scores of
2K + L items. So:

* :func:`topm_dot` -- each row's first M items of ``user_vecs @ item_vecs.T`` in the
  spec's ranking order, tile by tile (the scores are never written out), with a sparse
  exclusion (CSR: per-row lists of item ids);
* :func:`select_embeddings` -- the sets of RCE-KD: the student's pool by :func:`topm_dot`,
  the teacher's top-K given or by :func:`topm_dot` over the teacher's vectors, then
  :func:`~rcekd_kernels.select_from_pool`;
* :func:`rce_kd_loss_embeddings` -- the loss: the sets (given, for the per-epoch protocol,
  or made now), the scores of the 2K + L items by :func:`~rcekd_kernels.gathered_dot`
  (the gradient flows to the user and item vectors), then
  :func:`~rcekd_kernels.rce_kd_loss_gathered`;
* :class:`RCEKDEmbeddingLoss` -- the same as a module (hyperparameters, seed per step).

The results are those of the dense API on ``user_vecs @ item_vecs.T`` (identical sets and
losses whenever the products are the same numbers; gradients to float rounding).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _checks, ops
from .backends import for_op, requested
from .config import RCEKDConfig, check_seed
from .functional import Selection, _seed, rce_kd_loss_gathered, select_from_pool
from .gathered import gathered_dot

Tensor = torch.Tensor
#: a sparse exclusion: (offsets (B + 1,), ids (nnz,)) int64; row b excludes ids[offsets[b]:offsets[b + 1]]
Exclusion = Tuple[Tensor, Tensor]

__all__ = ["topm_dot", "csr_exclusion", "select_embeddings", "rce_kd_loss_embeddings", "RCEKDEmbeddingLoss",
           "Exclusion"]


def csr_exclusion(items: Union[Tensor, Sequence[Sequence[int]]], device=None) -> Exclusion:
    """A sparse exclusion (offsets, ids) from a bool mask (B, N) or per-row lists of item ids.

    Example::

        >>> csr_exclusion([[3, 1], [], [7]])
        (tensor([0, 2, 2, 3]), tensor([3, 1, 7]))
    """
    if isinstance(items, Tensor):
        if items.dtype != torch.bool or items.dim() != 2:
            raise TypeError(f"items must be a bool (B, N) mask or per-row lists of ids, got {items.dtype} "
                            f"{tuple(items.shape)}")
        rows, cols = items.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=items.shape[0])
        offsets = torch.zeros(items.shape[0] + 1, dtype=torch.int64, device=items.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return offsets.to(device or items.device), cols.to(torch.int64).to(device or items.device)
    lists = [list(map(int, r)) for r in items]
    offsets = torch.zeros(len(lists) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in lists], dtype=torch.int64), 0)
    ids = torch.tensor([i for r in lists for i in r], dtype=torch.int64)
    return offsets.to(device or "cpu"), ids.to(device or "cpu")


def _exclusion(exclude: Optional[Exclusion]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if exclude is None:
        return None, None
    if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
        raise TypeError("exclude must be a pair (offsets, ids) of int64 tensors (see csr_exclusion), got "
                        f"{type(exclude).__name__}")
    return exclude[0], exclude[1]


def topm_dot(user_vecs: Tensor, item_vecs: Tensor, M: int, *, exclude: Optional[Exclusion] = None,
             item_offset: int = 0, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Each row's first M items of ``user_vecs @ item_vecs.T`` in the spec's ranking order
    (larger score first, ties to the smaller id), excluded items never taken.

    Args:
        user_vecs: (B, D) float; item_vecs: (N, D), the same dtype and device.
        M: the length of the lists (>= 1; may exceed N).
        exclude: optional (offsets (B + 1,), ids (nnz,)) int64 (see :func:`csr_exclusion`):
            row b excludes the global ids ``ids[offsets[b]:offsets[b + 1]]`` (any order,
            duplicates allowed, ids outside this shard ignored).
        item_offset: the global id of item row 0 (a shard of a larger catalogue).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (default: $RCEKD_BACKEND,
            else auto). In the functions below that run several ops, a backend that lacks one of
            them (``gathered_dot`` in ``triton``) leaves that op to the default choice.

    Returns:
        ``(ids (B, M) int64, scores (B, M))``: global ids in ranking order and their scores
        (float32; float64 for float64 vectors); a row with fewer than M eligible items ends with
        id -1 and score -inf. Memory O(B * (M + tile)): the (B, N) scores are never written.

    Example::

        >>> ids, scores = topm_dot(torch.randn(4, 16), torch.randn(10000, 16), 20)
    """
    offs, ids = _exclusion(exclude)
    _checks.check_topm(user_vecs, item_vecs, M, offs, ids, item_offset)  # before the op: no schema errors
    return ops.topm_dot(user_vecs, item_vecs, int(M), offs, ids, int(item_offset), requested(backend, "topm_dot"))


@torch.no_grad()
def select_embeddings(
    user_vecs: Tensor,
    item_vecs: Tensor,
    teacher_topk: Optional[Tensor] = None,
    *,
    teacher_user_vecs: Optional[Tensor] = None,
    teacher_item_vecs: Optional[Tensor] = None,
    exclude: Optional[Exclusion] = None,
    config: Optional[RCEKDConfig] = None,
    K: Optional[int] = None,
    M: Optional[int] = None,
    L: Optional[int] = None,
    tau: Optional[float] = None,
    T: Optional[float] = None,
    beta: Optional[float] = None,
    mode: Optional[str] = None,
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> Selection:
    """The sets of RCE-KD from the student's (and the teacher's) vectors: the sets :func:`select`
    gives on ``user_vecs @ item_vecs.T`` (with the teacher's top-K of ``teacher_user_vecs @
    teacher_item_vecs.T`` when ``teacher_topk`` is not given), without the score rows.

    ``exclude`` is sparse (offsets, ids) (see :func:`csr_exclusion`); with ``validate`` every row
    must keep at least M items and a given ``teacher_topk`` must hold distinct, non-excluded ids
    in [0, N) (one pass, a host synchronisation). Call it on chunks of users for the per-epoch
    protocol and join the chunks with :meth:`Selection.cat`.
    """
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode)
    _checks.check_types(dict(user_vecs=user_vecs, item_vecs=item_vecs),
                        dict(teacher_topk=teacher_topk, teacher_user_vecs=teacher_user_vecs,
                             teacher_item_vecs=teacher_item_vecs, row_ids=row_ids))
    N = item_vecs.shape[0] if item_vecs.dim() == 2 else 0
    cfg.check_catalog(N)
    pool, _ = topm_dot(user_vecs.detach(), item_vecs.detach(), cfg.m, exclude=exclude, backend=backend)
    if teacher_topk is None:
        if teacher_user_vecs is None or teacher_item_vecs is None:
            raise ValueError("teacher_topk, or teacher_user_vecs and teacher_item_vecs, are required")
        if teacher_item_vecs.shape[0] != N:
            raise ValueError(f"teacher_item_vecs must have the student's N = {N} items, got "
                             f"{teacher_item_vecs.shape[0]}")
        teacher_topk, _ = topm_dot(teacher_user_vecs.detach(), teacher_item_vecs.detach(), cfg.K, exclude=exclude,
                                   backend=backend)
    if validate and pool.shape[0]:
        short = pool[:, -1] < 0
        if bool(short.any()):
            row = int(short.nonzero()[0, 0])
            raise ValueError(f"exclude leaves fewer than M = {cfg.m} items in row {row}; every row needs at "
                             f"least M non-excluded items")
        _check_teacher_topk(teacher_topk, N, exclude)
    return select_from_pool(pool, teacher_topk, config=cfg, seed=seed, row_ids=row_ids, validate=validate)


def _check_teacher_topk(qt: Tensor, N: int, exclude: Optional[Exclusion]) -> None:
    if qt.numel() == 0:
        return
    lo, hi = int(qt.min()), int(qt.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"teacher_topk ids must lie in [0, N) = [0, {N}), got min {lo}, max {hi}")
    if exclude is not None:
        offs, ids = exclude
        rows = torch.repeat_interleave(torch.arange(qt.shape[0], device=ids.device), offs[1:] - offs[:-1])
        ex_ids = ids[int(offs[0]):int(offs[-1])]
        keys = rows * N + ex_ids
        q_keys = torch.arange(qt.shape[0], device=qt.device).unsqueeze(1) * N + qt
        hit = torch.isin(q_keys, keys.to(qt.device))
        if bool(hit.any()):
            raise ValueError(f"teacher_topk holds an id that exclude marks in row {int(hit.nonzero()[0, 0])}")


def _teacher_gathered(sel: Selection, teacher_user_vecs: Optional[Tensor], teacher_item_vecs: Optional[Tensor],
                      teacher_scores: Optional[Callable[[Tensor], Tensor]], backend: Optional[str]) -> Tensor:
    with torch.no_grad():
        if teacher_scores is not None:
            if not callable(teacher_scores):
                raise TypeError(f"teacher_scores must be a callable ids (B, 2K + L) -> scores, got "
                                f"{type(teacher_scores).__name__}")
            return teacher_scores(sel.indices)
        if teacher_user_vecs is None or teacher_item_vecs is None:
            raise ValueError("teacher_scores, or teacher_user_vecs and teacher_item_vecs, are required for the "
                             "teacher's scores at the selected items")
        return gathered_dot(teacher_user_vecs, teacher_item_vecs, sel.indices, backend=backend, validate=False)


def rce_kd_loss_embeddings(
    user_vecs: Tensor,
    item_vecs: Tensor,
    teacher_topk: Optional[Tensor] = None,
    *,
    teacher_user_vecs: Optional[Tensor] = None,
    teacher_item_vecs: Optional[Tensor] = None,
    teacher_scores: Optional[Callable[[Tensor], Tensor]] = None,
    selection: Optional[Selection] = None,
    exclude: Optional[Exclusion] = None,
    config: Optional[RCEKDConfig] = None,
    K: Optional[int] = None,
    M: Optional[int] = None,
    L: Optional[int] = None,
    tau: Optional[float] = None,
    T: Optional[float] = None,
    beta: Optional[float] = None,
    mode: Optional[str] = None,
    reduction: Optional[str] = None,
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
    return_diagnostics: bool = False,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """RCE-KD loss from the student's user and item vectors, without a (B, N) score matrix.

    Args:
        user_vecs: (B, D) student user vectors; item_vecs: (N, D) student item vectors (the
            gradient flows to both).
        teacher_topk: optional (B, K) teacher top-K ids; else computed from the teacher's vectors.
        teacher_user_vecs, teacher_item_vecs: the teacher's vectors (B, Dt), (N, Dt): its scores
            are their dot products (never receive a gradient).
        teacher_scores: instead of the teacher's vectors, a callable ``ids (B, 2K + L) -> scores``
            (for teachers that do not score by a dot product).
        selection: the sets (per-epoch protocol: from :func:`select_embeddings` once per epoch,
            indexed by the batch's users); when not given they are made now from these vectors
            (per-batch protocol).
        exclude: sparse (offsets, ids), see :func:`csr_exclusion` (when the sets are made here).
        config / K ... mode, reduction, seed, row_ids, backend, validate, return_diagnostics:
            as :func:`~rcekd_kernels.rce_kd_loss`.

    Returns:
        The loss of :func:`~rcekd_kernels.rce_kd_loss` on ``user_vecs @ item_vecs.T`` (and the
        teacher's scores), with its diagnostics when asked.

    Example::

        >>> u = torch.randn(8, 16, requires_grad=True); v = torch.randn(500, 16, requires_grad=True)
        >>> tu, tv = torch.randn(8, 32), torch.randn(500, 32)
        >>> loss = rce_kd_loss_embeddings(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv, K=10, L=10)
        >>> loss.backward()
    """
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode, reduction=reduction)
    _checks.check_types(dict(user_vecs=user_vecs, item_vecs=item_vecs))
    if selection is None:
        selection = select_embeddings(user_vecs, item_vecs, teacher_topk, teacher_user_vecs=teacher_user_vecs,
                                      teacher_item_vecs=teacher_item_vecs, exclude=exclude, config=cfg, seed=seed,
                                      row_ids=row_ids, backend=backend, validate=validate)
    elif not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, got {type(selection).__name__}")
    s_g = gathered_dot(user_vecs, item_vecs, selection.indices, backend=for_op(backend, "gathered_dot"),
                       validate=validate)
    t_g = _teacher_gathered(selection, teacher_user_vecs, teacher_item_vecs, teacher_scores,
                            for_op(backend, "gathered_dot"))
    # tau and the reduction: those asked for, else the selection's (the config made here when the sets are)
    tau_ = tau if tau is not None else (config.tau if config is not None else None)
    red_ = reduction if reduction is not None else (config.reduction if config is not None else None)
    return rce_kd_loss_gathered(s_g, t_g, selection, tau=tau_, reduction=red_, backend=backend,
                                validate=validate, return_diagnostics=return_diagnostics)


class RCEKDEmbeddingLoss(nn.Module):
    """:func:`rce_kd_loss_embeddings` as a module: holds one :class:`RCEKDConfig`; in training mode
    the sampling seed is ``base_seed + step`` and ``step`` advances each call (saved in the state
    dict); the diagnostics of the last call are in ``last_diagnostics``.

    Example::

        kd = RCEKDEmbeddingLoss(K=50, M=200, L=50, beta=3.0, mode="official", reduction="sum")
        loss = base + lam * kd(user_vecs, item_vecs, teacher_user_vecs=tu, teacher_item_vecs=tv, row_ids=users)
    """

    def __init__(self, *, config: Optional[RCEKDConfig] = None, seed: int = 0, backend: Optional[str] = None,
                 validate: bool = True, **hparams):
        super().__init__()
        self.config = RCEKDConfig.from_kwargs(config, **hparams)
        check_seed(seed)
        self.base_seed = int(seed)
        self.backend, self.validate = backend, validate
        self.step = 0
        self.last_diagnostics: Dict[str, Tensor] = {}

    def forward(self, user_vecs: Tensor, item_vecs: Tensor, teacher_topk: Optional[Tensor] = None, **kw) -> Tensor:
        loss, self.last_diagnostics = rce_kd_loss_embeddings(
            user_vecs, item_vecs, teacher_topk, config=self.config, seed=_seed(self.base_seed + self.step),
            backend=self.backend, validate=self.validate, return_diagnostics=True, **kw)
        if self.training:
            self.step += 1
        return loss

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = int(state["step"])
