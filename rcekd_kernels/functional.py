"""Functional API of the RCE-KD loss.

* :func:`rce_kd_loss` -- the drop-in loss on dense score rows (per-batch refresh);
* :func:`select` + :func:`rce_kd_loss_gathered` -- the per-epoch protocol: compute
  the sets once (in chunks of users), then each batch needs only the scores at
  ``selection.indices`` (2K + L items per user);
* :class:`RCEKDFunction` -- the same dense loss as a ``torch.autograd.Function``.

Every function takes the hyperparameters either as one
:class:`~rcekd_kernels.config.RCEKDConfig` (``config=``) or as keyword arguments
(a convenience that builds one; keywords given with ``config`` override its fields).
See ``docs/LOSS.md`` for the definition of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch

from . import _checks, ops
from .backends import requested
from .config import RCEKDConfig, check_seed
from .spec import gamma_from_counts

Tensor = torch.Tensor

__all__ = ["rce_kd_loss", "select", "select_from_pool", "rce_kd_loss_gathered", "Selection", "RCEKDFunction"]

_SEED_MOD = 1 << 32


def _seed(seed: Any) -> Any:
    """The seed modulo 2**32 (spec section 4), whatever the size of the int."""
    check_seed(seed)
    return seed % _SEED_MOD


def _row_ids(row_ids: Optional[Tensor], x: Tensor) -> Tensor:
    if row_ids is not None:
        return row_ids
    return torch.arange(x.shape[0] if x.dim() else 0, device=x.device, dtype=torch.int64)


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
    exclude: Optional[Tensor] = None,
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
        config: the hyperparameters as one :class:`RCEKDConfig`; the keyword arguments
            below, when given, override its fields.
        K: size of the top lists, 1 <= K <= M (default 100).
        M: size of the student's candidate pool, K <= M <= N (default 2K).
        L: number of sampled pool items, 1 <= L <= M (default 100).
        tau: logit temperature (> 0, default 1).
        T: sampling temperature (> 0, default 10); weights are exp(count / T).
        beta: strength of the adaptive weight gamma (>= 0, default 5).
        mode: ``"paper"`` (default: the paper's equations) or ``"official"`` (the authors' code).
        reduction: ``"mean"`` (default), ``"sum"`` (the authors' code) or ``"none"``.
        seed: int fixing the random sample (same sample on every backend), taken modulo 2**32.
        row_ids: (B,) integer ids of the rows for the sampler (default 0..B-1);
            pass the user ids so a user's sample does not depend on batch position.
        exclude: optional (B, N) bool; True items are absent from the row's catalog.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"``
            (default: $RCEKD_BACKEND, else ``"auto"``).
        validate: check the data (non-finite scores, ids) before the work; costs one
            read of the inputs and a host synchronisation.
        return_diagnostics: also return a dict of batch means (detached):
            ``L1``, ``L2``, ``gamma``, ``q1_frac`` (|Q1|/K), ``qt_in_sampled_frac`` (|QT & A|/K).

    Returns:
        The loss (0-dim for mean/sum, (B,) for none), float32 (float64 for float64
        inputs); with ``return_diagnostics`` a tuple (loss, diagnostics).

    Example::

        >>> s = torch.randn(4, 1000, requires_grad=True); t = torch.randn(4, 1000)
        >>> loss = rce_kd_loss(s, t, K=10, L=10, seed=0)
        >>> loss.backward()
    """
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode,
                                  reduction=reduction)
    seed = _seed(seed)
    name = requested(backend)
    _checks.check_types(dict(student_scores=student_scores, teacher_scores=teacher_scores),
                        dict(teacher_topk=teacher_topk, row_ids=row_ids, exclude=exclude))
    rows = _row_ids(row_ids, student_scores)
    loss_rows, stats, _idx, _q2 = ops.fused_fwd(student_scores, teacher_scores, teacher_topk, exclude, rows,
                                                *ops.flatten(cfg), seed, name, bool(validate))
    loss = _reduce(loss_rows, cfg.reduction)
    if return_diagnostics:
        return loss, _diagnostics(stats, cfg.K)
    return loss


@dataclass(frozen=True)
class Selection:
    """The sets of RCE-KD for a batch of rows (spec sections 2-5).

    Attributes:
        indices: (B, 2K + L) int64, [QS | A | QT]: the items whose scores the gathered
            loss needs, in this layout (QS in student order, A by decreasing Gumbel key,
            QT in teacher order). Only this class knows the layout: use the properties.
        q2_mask: (B, K) bool, teacher items in Q2 = QT \\ QS that were not sampled;
            U = A + these items.
        gamma: (B,) float32, the weight of L2.
        n_q1: (B,) int64, |Q1| = |QT & QS|.
        n_qt_sampled: (B,) int64, |QT & A|.
        config: the :class:`RCEKDConfig` the sets were made with (None when built by hand);
            :func:`rce_kd_loss_gathered` takes tau and the reduction from it by default.
    """

    indices: Tensor
    q2_mask: Tensor
    gamma: Tensor
    n_q1: Tensor
    n_qt_sampled: Tensor
    config: Optional[RCEKDConfig] = None

    _TENSORS = ("indices", "q2_mask", "gamma", "n_q1", "n_qt_sampled")

    @staticmethod
    def from_sets(student_topk: Tensor, sampled: Tensor, teacher_topk: Tensor, q2_mask: Tensor, gamma: Tensor,
                  n_q1: Tensor, n_qt_sampled: Tensor, config: Optional[RCEKDConfig] = None) -> "Selection":
        """A selection from its three id lists (B, K), (B, L), (B, K) and the rest."""
        return Selection(torch.cat([student_topk, sampled, teacher_topk], dim=1), q2_mask, gamma, n_q1,
                         n_qt_sampled, config)

    @property
    def K(self) -> int:
        return self.q2_mask.shape[1]

    @property
    def L(self) -> int:
        return self.indices.shape[1] - 2 * self.K

    @property
    def student_topk(self) -> Tensor:
        """(B, K) QS in student order."""
        return self.indices[:, :self.K]

    @property
    def sampled(self) -> Tensor:
        """(B, L) A, by decreasing Gumbel key."""
        return self.indices[:, self.K:self.K + self.L]

    @property
    def teacher_topk(self) -> Tensor:
        """(B, K) QT."""
        return self.indices[:, self.K + self.L:]

    def union(self) -> Tuple[Tensor, Tensor]:
        """U = A + (Q2 \\ A) as padded ids (B, L + K) and a validity mask."""
        ids = self.indices[:, self.K:]
        mask = torch.cat([torch.ones_like(self.sampled, dtype=torch.bool), self.q2_mask], dim=1)
        return ids, mask

    def _map(self, fn) -> "Selection":
        return Selection(fn(self.indices), fn(self.q2_mask), fn(self.gamma), fn(self.n_q1), fn(self.n_qt_sampled),
                         self.config)

    def __getitem__(self, rows) -> "Selection":
        """The selection of some rows (an index tensor, a slice or a bool mask)."""
        if isinstance(rows, Tensor) and rows.dim() == 1 and not rows.dtype.is_floating_point \
                and rows.dtype != torch.bool:
            # index_select: the rows copied whole (advanced indexing is ~10x slower on the CPU)
            rows = rows.long()
            if rows.numel() and not rows.is_cuda:
                n = self.indices.shape[0]
                lo, hi = int(rows.min()), int(rows.max())
                if lo < -n or hi >= n:
                    raise IndexError(f"row index out of range for a selection of {n} rows: min {lo}, max {hi}")
                rows = torch.where(rows < 0, rows + n, rows) if lo < 0 else rows
            return self._map(lambda x: x.index_select(0, rows))
        return self._map(lambda x: x[rows])

    def to(self, device) -> "Selection":
        return self._map(lambda x: x.to(device))

    def __len__(self) -> int:
        return self.indices.shape[0]

    @staticmethod
    def cat(parts: Iterable["Selection"]) -> "Selection":
        """Concatenates selections of consecutive row chunks (made with one configuration)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Selection.cat needs at least one selection")
        config = parts[0].config
        if any(p.config != config for p in parts):
            raise ValueError("Selection.cat: the selections were made with different configurations")
        cat = [torch.cat([getattr(p, f) for p in parts]) for f in Selection._TENSORS]
        return Selection(cat[0], cat[1], cat[2], cat[3], cat[4], config)


@torch.no_grad()
def select(
    student_scores: Tensor,
    teacher_scores: Optional[Tensor] = None,
    teacher_topk: Optional[Tensor] = None,
    *,
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
    exclude: Optional[Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> Selection:
    """The sets of RCE-KD for dense score rows (the select step of the per-epoch protocol).

    Same arguments as :func:`rce_kd_loss`; ``teacher_scores`` may be omitted when
    ``teacher_topk`` is given (tau is only kept in the selection's config, for the
    gathered loss). Call it on chunks of users and join the chunks with
    :meth:`Selection.cat`; no gradient flows through it.

    Example::

        >>> sel = select(torch.randn(4, 1000), torch.randn(4, 1000), K=10, L=10, seed=0)
        >>> sel.indices.shape
        torch.Size([4, 30])
    """
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode)
    seed = _seed(seed)
    name = requested(backend)
    _checks.check_types(dict(student_scores=student_scores), dict(teacher_scores=teacher_scores,
                        teacher_topk=teacher_topk, row_ids=row_ids, exclude=exclude))
    rows = _row_ids(row_ids, student_scores)
    s = student_scores.detach()
    t = teacher_scores.detach() if isinstance(teacher_scores, Tensor) else teacher_scores
    idx, q2, counts = ops.select(s, t, teacher_topk, exclude, rows, *ops.flatten(cfg), seed, name, bool(validate))
    gamma = gamma_from_counts(counts, cfg.beta, cfg.K, cfg.mode)
    return Selection(idx, q2, gamma, counts[:, 0], counts[:, 1], cfg)


@torch.no_grad()
def select_from_pool(
    pool: Tensor,
    teacher_topk: Tensor,
    *,
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
    """The sets of RCE-KD from a pool that was ranked elsewhere: ``pool`` (B, M) int64, each row's
    first M items in the student's ranking order (larger score first, ties to the smaller id),
    and ``teacher_topk`` (B, K) int64. The same sets as :func:`select` on the dense rows whose
    rankings these are: the step after the rankings, for a top-M computed from embeddings, by an
    approximate index or across processes. No score is read.

    Example::

        >>> s = torch.randn(4, 1000); qt = torch.topk(torch.randn(4, 1000), 10).indices
        >>> pool = torch.topk(s, 20).indices   # (no ties here: topk's order is the ranking order)
        >>> sel = select_from_pool(pool, qt, K=10, M=20, L=10, seed=0)
    """
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode)
    seed = _seed(seed)
    name = requested(backend, "sets_from_pool")
    _checks.check_types(dict(pool=pool, teacher_topk=teacher_topk), dict(row_ids=row_ids))
    rows = _row_ids(row_ids, pool)
    idx, q2, counts = ops.sets_from_pool(pool, teacher_topk, rows, *ops.flatten(cfg), seed, name, bool(validate))
    gamma = gamma_from_counts(counts, cfg.beta, cfg.K, cfg.mode)
    return Selection(idx, q2, gamma, counts[:, 0], counts[:, 1], cfg)


def _gathered_config(selection: Selection, tau: Optional[float], reduction: Optional[str]) -> RCEKDConfig:
    base = selection.config
    if base is None:  # a selection built by hand: K and L from its shapes (M is not used here)
        base = RCEKDConfig(K=selection.K, M=max(selection.K, selection.L), L=selection.L)
    return RCEKDConfig.from_kwargs(base, tau=tau, reduction=reduction)


def rce_kd_loss_gathered(
    student_gathered: Tensor,
    teacher_gathered: Tensor,
    selection: Selection,
    *,
    tau: Optional[float] = None,
    reduction: Optional[str] = None,
    backend: Optional[str] = None,
    validate: bool = True,
    return_diagnostics: bool = False,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """RCE-KD loss from scores gathered at ``selection.indices`` (B, 2K + L).

    ``student_gathered[r, j]`` must be the student's score of item
    ``selection.indices[r, j]`` (and likewise for the teacher); the gradient flows
    to ``student_gathered``. This is the per-batch step of the per-epoch protocol.
    ``tau`` and ``reduction`` default to those of ``selection.config`` (1 and "mean"
    when the selection has none). ``validate`` checks the data as the dense loss does
    (finite scores in range, gamma in [0, 1]): one pass and a host synchronisation,
    which a training loop that has checked its data turns off.
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection (from rcekd_kernels.select), "
                        f"got {type(selection).__name__}")
    _checks.check_types(dict(student_gathered=student_gathered, teacher_gathered=teacher_gathered))
    cfg = _gathered_config(selection, tau, reduction)
    name = requested(backend)
    loss_rows, parts = ops.subset_ce_fwd(student_gathered, teacher_gathered, selection.q2_mask, selection.gamma,
                                         *ops.flatten(cfg), name, bool(validate))
    loss = _reduce(loss_rows, cfg.reduction)
    if return_diagnostics:
        stats = torch.cat([parts.detach().float(), selection.gamma.unsqueeze(1).float(),
                           selection.n_q1.unsqueeze(1).float(), selection.n_qt_sampled.unsqueeze(1).float()], 1)
        return loss, _diagnostics(stats, selection.K)
    return loss


def _function_args(args: Tuple[Any, ...]) -> Tuple[RCEKDConfig, Any, Optional[str], bool]:
    """(config, seed, backend, validate) from RCEKDFunction.apply's trailing arguments: either
    ``config, seed, backend, validate`` or ``K, M, L, tau, T, beta, mode, seed, backend, validate``."""
    if args and isinstance(args[0], RCEKDConfig):
        if len(args) != 4:
            raise TypeError("RCEKDFunction.apply(s, t, teacher_topk, exclude, row_ids, config, seed, backend, "
                            f"validate) takes 9 arguments, got {5 + len(args)}")
        cfg, seed, backend, validate = args
    else:
        n = len(ops.HPARAMS)
        if len(args) != n + 3:
            raise TypeError(f"RCEKDFunction.apply takes 9 (with a config) or {8 + n} arguments, got {5 + len(args)}")
        cfg = RCEKDConfig(**{name: v for (name, _), v in zip(ops.HPARAMS, args[:n])})
        seed, backend, validate = args[n:]
    return cfg, _seed(seed), backend, bool(validate)


class RCEKDFunction(torch.autograd.Function):
    """The dense RCE-KD loss rows as a ``torch.autograd.Function``.

    ``RCEKDFunction.apply(s, t, teacher_topk, exclude, row_ids, config, seed, backend, validate)``
    or, with the hyperparameters spelled out, ``RCEKDFunction.apply(s, t, teacher_topk,
    exclude, row_ids, K, M, L, tau, T, beta, mode, seed, backend, validate)`` returns the
    (B,) loss rows; every argument is positional and required (None for the optional
    tensors and for the default backend, a (B,) int64 ``row_ids``). It is a thin face of
    the custom op ``rcekd::fused_fwd`` and of the same gradient (:func:`ops.fused_grad`),
    so it computes exactly what :func:`rce_kd_loss` computes.
    """

    @staticmethod
    def forward(ctx, s, t, teacher_topk, exclude, row_ids, *args):
        cfg, seed, backend, validate = _function_args(args)
        _checks.check_types(dict(student_scores=s, teacher_scores=t, row_ids=row_ids),
                            dict(teacher_topk=teacher_topk, exclude=exclude))
        name = requested(backend)
        out = ops.fused_fwd(s, t, teacher_topk, exclude, row_ids, *ops.flatten(cfg), seed, name, validate)
        ops.save_fused(ctx, s, t, out, cfg, name)
        ctx.n_inputs = 5 + len(args)
        return out[0]

    @staticmethod
    def backward(ctx, grad_rows):
        return (ops.fused_grad(ctx, grad_rows),) + (None,) * (ctx.n_inputs - 1)
