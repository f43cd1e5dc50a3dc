"""The ``torch.library`` custom ops of RCE-KD: schemas, fake impls, autograd.

Seven ops, the ops of :mod:`rcekd_kernels.backends.base`::

    rcekd::select            (dense rows) -> idx, q2_mask, counts       no gradient
    rcekd::sets_from_pool    (pool, QT) -> idx, q2_mask, counts         no gradient
    rcekd::subset_ce_fwd     (gathered scores, sets) -> loss rows       autograd -> subset_ce_bwd
    rcekd::subset_ce_bwd
    rcekd::fused_fwd         (dense rows) -> loss rows, stats, sets     autograd -> fused_bwd
    rcekd::fused_bwd
    rcekd::topm_dot          (user vecs, item vecs) -> top-M ids, scores  no gradient
    rcekd::gathered_dot      (user vecs, item vecs, ids) -> scores      autograd -> gathered_dot_bwd
    rcekd::gathered_dot_bwd

The hyperparameters travel as one :class:`~rcekd_kernels.config.RCEKDConfig`; the
one table :data:`HPARAMS` says how it is flattened into the schemas (and into the
C++ ops ``rcekd_C::*``, whose schemas list the same fields in the same order, see
``csrc/params.h``). Each implementation checks its tensors
(:mod:`rcekd_kernels._checks`; data checks only when ``validate``), handles the empty
batch, then hands the work to the backend the dispatcher picks for the call
(:func:`rcekd_kernels.backends.resolve`). The ops are opaque to ``torch.compile`` and
have fake implementations, so a function that calls the loss compiles with
``fullgraph=True``.

The gradient of the dense loss has one implementation, :func:`fused_grad`, used by the
op's autograd and by :class:`~rcekd_kernels.RCEKDFunction` alike (both save what it
reads with :func:`save_fused`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from . import _checks
from .backends import Call, resolve
from .config import RCEKDConfig
from .spec import compute_dtype

Tensor = torch.Tensor

__all__ = ["HPARAMS", "flatten", "unflatten", "N_STATS", "select", "sets_from_pool", "subset_ce_fwd", "subset_ce_bwd",
           "fused_fwd", "fused_bwd", "topm_dot", "gathered_dot", "gathered_dot_bwd", "save_fused", "fused_grad"]

#: The one table of the hyperparameters in the ops' schemas: (field of RCEKDConfig, schema type),
#: in schema order. ``reduction`` is not here: the ops return one loss per row.
HPARAMS: Tuple[Tuple[str, str], ...] = (
    ("K", "int"), ("M", "int"), ("L", "int"), ("tau", "float"), ("T", "float"), ("beta", "float"),
    ("mode", "str"),
)
_N_HP = len(HPARAMS)
_HP_SCHEMA = ", ".join(f"{typ} {name}" for name, typ in HPARAMS)

N_STATS = 5  # L1, L2, gamma, |Q1|, |QT & A|


def flatten(cfg: RCEKDConfig) -> Tuple[Any, ...]:
    """The values of ``cfg`` in the schemas' order (:data:`HPARAMS`)."""
    return tuple(getattr(cfg, name) for name, _ in HPARAMS)


@functools.lru_cache(maxsize=256)
def unflatten(values: Tuple[Any, ...]) -> RCEKDConfig:
    """The configuration from schema values (validated: a direct op call with K = 0 is a
    ValueError naming K)."""
    return RCEKDConfig(**{name: v for (name, _), v in zip(HPARAMS, values)})


def _cfg(rest: Sequence[Any]) -> Tuple[RCEKDConfig, Sequence[Any]]:
    """Splits the trailing schema arguments into the configuration and what follows it."""
    return unflatten(tuple(rest[:_N_HP])), rest[_N_HP:]


def _define(name: str, schema: str, impl: Callable, fake: Callable):
    op = torch.library.custom_op(f"rcekd::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _dense_call(op: str, s: Tensor, t: Optional[Tensor], cfg: RCEKDConfig) -> Call:
    dtypes = (s.dtype,) if t is None else (s.dtype, t.dtype)
    return Call(op, s.device.type, dtypes, cfg, s.shape[1])


# ----------------------------------------------------------------------------- select
def _select_empty(s: Tensor, cfg: RCEKDConfig) -> Tuple[Tensor, Tensor, Tensor]:
    B = s.shape[0]
    return (s.new_empty((B, cfg.width), dtype=torch.int64), s.new_empty((B, cfg.K), dtype=torch.bool),
            s.new_empty((B, 2), dtype=torch.int64))


def _select_impl(s, t, teacher_topk, exclude, row_ids, *rest):
    cfg, (seed, backend, validate) = _cfg(rest)
    _checks.check_dense(s, t, teacher_topk, exclude, row_ids, cfg, validate=validate, need_teacher_scores=False)
    if s.shape[0] == 0:
        return _select_empty(s, cfg)
    impl = resolve(backend, _dense_call("select", s, t if teacher_topk is None else None, cfg))
    return impl.select(s, t, teacher_topk, exclude, row_ids, cfg, seed)


def _select_fake(s, t, teacher_topk, exclude, row_ids, *rest):
    cfg, _ = _cfg(rest)
    _checks.check_dense(s, t, teacher_topk, exclude, row_ids, cfg, validate=False, need_teacher_scores=False)
    return _select_empty(s, cfg)


select = _define(
    "select",
    f"(Tensor s, Tensor? t, Tensor? teacher_topk, Tensor? exclude, Tensor row_ids, {_HP_SCHEMA}, int seed, "
    f"str backend, bool validate) -> (Tensor, Tensor, Tensor)", _select_impl, _select_fake)


def _pool_impl(pool, qt, row_ids, *rest):
    cfg, (seed, backend, validate) = _cfg(rest)
    _checks.check_pool(pool, qt, row_ids, cfg, validate=validate)
    if pool.shape[0] == 0:
        return _select_empty(pool, cfg)
    impl = resolve(backend, Call("sets_from_pool", pool.device.type, (torch.float32,), cfg, 0))
    return impl.sets_from_pool(pool, qt, row_ids, cfg, seed)


def _pool_fake(pool, qt, row_ids, *rest):
    cfg, _ = _cfg(rest)
    _checks.check_pool(pool, qt, row_ids, cfg, validate=False)
    return _select_empty(pool, cfg)


sets_from_pool = _define(
    "sets_from_pool",
    f"(Tensor pool, Tensor teacher_topk, Tensor row_ids, {_HP_SCHEMA}, int seed, str backend, bool validate) "
    f"-> (Tensor, Tensor, Tensor)", _pool_impl, _pool_fake)


# ---------------------------------------------------------------------- subset CE
def _subset_empty(s_g: Tensor) -> Tuple[Tensor, Tensor]:
    B, dt = s_g.shape[0], compute_dtype(s_g)
    return s_g.new_empty((B,), dtype=dt), s_g.new_empty((B, 2), dtype=dt)


def _subset_fwd_impl(s_g, t_g, q2_mask, gamma, *rest):
    cfg, (backend, validate) = _cfg(rest)
    _checks.check_gathered(s_g, t_g, q2_mask, gamma, cfg, validate=validate)
    if s_g.shape[0] == 0:
        return _subset_empty(s_g)
    impl = resolve(backend, Call("subset_ce_fwd", s_g.device.type, (s_g.dtype, t_g.dtype), cfg))
    return impl.subset_ce_fwd(s_g, t_g, q2_mask, gamma, cfg)


def _subset_fwd_fake(s_g, t_g, q2_mask, gamma, *rest):
    cfg, _ = _cfg(rest)
    _checks.check_gathered(s_g, t_g, q2_mask, gamma, cfg)
    return _subset_empty(s_g)


subset_ce_fwd = _define(
    "subset_ce_fwd",
    f"(Tensor s_g, Tensor t_g, Tensor q2_mask, Tensor gamma, {_HP_SCHEMA}, str backend, bool validate) "
    f"-> (Tensor, Tensor)", _subset_fwd_impl, _subset_fwd_fake)


def _subset_bwd_impl(grad_rows, s_g, t_g, q2_mask, gamma, *rest):
    cfg, (backend,) = _cfg(rest)
    _checks.check_gathered(s_g, t_g, q2_mask, gamma, cfg, grad_rows=grad_rows)
    if s_g.shape[0] == 0:
        return torch.zeros_like(s_g)
    impl = resolve(backend, Call("subset_ce_bwd", s_g.device.type, (s_g.dtype, t_g.dtype), cfg))
    return impl.subset_ce_bwd(grad_rows, s_g, t_g, q2_mask, gamma, cfg).to(s_g.dtype)


def _subset_bwd_fake(grad_rows, s_g, t_g, q2_mask, gamma, *rest):
    cfg, _ = _cfg(rest)
    _checks.check_gathered(s_g, t_g, q2_mask, gamma, cfg, grad_rows=grad_rows)
    return torch.empty_like(s_g)


subset_ce_bwd = _define(
    "subset_ce_bwd",
    f"(Tensor grad_rows, Tensor s_g, Tensor t_g, Tensor q2_mask, Tensor gamma, {_HP_SCHEMA}, str backend) -> Tensor",
    _subset_bwd_impl, _subset_bwd_fake)


def _subset_setup(ctx, inputs, output):
    s_g, t_g, q2_mask, gamma = inputs[:4]
    ctx.save_for_backward(s_g, t_g, q2_mask, gamma)
    ctx.rest = inputs[4:-1]  # the configuration and the backend (not validate)
    ctx.n_inputs = len(inputs)


def _subset_backward(ctx, grad_loss, grad_parts):
    s_g, t_g, q2_mask, gamma = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = subset_ce_bwd(grad_loss, s_g, t_g, q2_mask, gamma, *ctx.rest)
    return (grad,) + (None,) * (ctx.n_inputs - 1)


subset_ce_fwd.register_autograd(_subset_backward, setup_context=_subset_setup)


# --------------------------------------------------------------------- fused dense
def _fused_empty(s: Tensor, cfg: RCEKDConfig) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B = s.shape[0]
    return (s.new_empty((B,), dtype=compute_dtype(s)), s.new_empty((B, N_STATS), dtype=torch.float32),
            s.new_empty((B, cfg.width), dtype=torch.int64), s.new_empty((B, cfg.K), dtype=torch.bool))


def _fused_fwd_impl(s, t, teacher_topk, exclude, row_ids, *rest):
    cfg, (seed, backend, validate) = _cfg(rest)
    _checks.check_dense(s, t, teacher_topk, exclude, row_ids, cfg, validate=validate, need_teacher_scores=True)
    if s.shape[0] == 0:
        return _fused_empty(s, cfg)
    impl = resolve(backend, _dense_call("fused_fwd", s, t, cfg))
    return impl.fused_fwd(s, t, teacher_topk, exclude, row_ids, cfg, seed)


def _fused_fwd_fake(s, t, teacher_topk, exclude, row_ids, *rest):
    cfg, _ = _cfg(rest)
    _checks.check_dense(s, t, teacher_topk, exclude, row_ids, cfg, validate=False, need_teacher_scores=True)
    return _fused_empty(s, cfg)


fused_fwd = _define(
    "fused_fwd",
    f"(Tensor s, Tensor t, Tensor? teacher_topk, Tensor? exclude, Tensor row_ids, {_HP_SCHEMA}, int seed, "
    f"str backend, bool validate) -> (Tensor, Tensor, Tensor, Tensor)", _fused_fwd_impl, _fused_fwd_fake)


def _fused_bwd_impl(grad_rows, s, t, idx, q2_mask, gamma, *rest):
    cfg, (backend,) = _cfg(rest)
    _checks.check_fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, cfg)
    if s.shape[0] == 0:
        return torch.zeros_like(s)
    impl = resolve(backend, _dense_call("fused_bwd", s, t, cfg))
    return impl.fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, cfg)


def _fused_bwd_fake(grad_rows, s, t, idx, q2_mask, gamma, *rest):
    cfg, _ = _cfg(rest)
    _checks.check_fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, cfg)
    return torch.empty_like(s)


fused_bwd = _define(
    "fused_bwd",
    f"(Tensor grad_rows, Tensor s, Tensor t, Tensor idx, Tensor q2_mask, Tensor gamma, {_HP_SCHEMA}, "
    f"str backend) -> Tensor", _fused_bwd_impl, _fused_bwd_fake)


def save_fused(ctx, s: Tensor, t: Tensor, output: Sequence[Tensor], cfg: RCEKDConfig, backend: str) -> None:
    """Saves on ``ctx`` what :func:`fused_grad` reads, from the inputs and outputs of ``fused_fwd``."""
    _loss, stats, idx, q2_mask = output
    ctx.save_for_backward(s, t, idx, q2_mask, stats[:, 2].contiguous())
    ctx.rcekd = (cfg, backend)


def fused_grad(ctx, grad_loss: Optional[Tensor]) -> Optional[Tensor]:
    """The gradient of the dense loss rows with respect to the student scores (or None)."""
    s, t, idx, q2_mask, gamma = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None
    cfg, backend = ctx.rcekd
    return fused_bwd(grad_loss, s, t, idx, q2_mask, gamma, *flatten(cfg), backend)


def _fused_setup(ctx, inputs, output):
    cfg, (_seed, backend, _validate) = _cfg(inputs[5:])
    save_fused(ctx, inputs[0], inputs[1], output, cfg, backend)
    ctx.n_inputs = len(inputs)


def _fused_backward(ctx, grad_loss, *_unused):
    return (fused_grad(ctx, grad_loss),) + (None,) * (ctx.n_inputs - 1)


fused_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)


# --------------------------------------------------------------------- topm_dot
def _topm_empty(u: Tensor, M: int) -> Tuple[Tensor, Tensor]:
    B = u.shape[0]
    return u.new_empty((B, M), dtype=torch.int64), u.new_empty((B, M), dtype=compute_dtype(u))


def _topm_impl(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset, backend):
    _checks.check_topm(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset)
    call = Call("topm_dot", user_vecs.device.type, (user_vecs.dtype,), None, item_vecs.shape[0], M)
    return resolve(backend, call).topm_dot(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset)


def _topm_fake(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset, backend):
    return _topm_empty(user_vecs, M)


topm_dot = _define(
    "topm_dot", "(Tensor user_vecs, Tensor item_vecs, int M, Tensor? exclude_offsets, Tensor? exclude_ids, "
    "int item_offset, str backend) -> (Tensor, Tensor)", _topm_impl, _topm_fake)


# --------------------------------------------------------------------- gathered_dot
def _gd_call(op: str, u: Tensor, v: Tensor) -> Call:
    return Call(op, u.device.type, (u.dtype, v.dtype), None, v.shape[0] if v.dim() == 2 else 0)


def _gd_impl(user_vecs, item_vecs, idx, backend, validate):
    _checks.check_gathered_dot(user_vecs, item_vecs, idx, validate=validate)
    if idx.numel() == 0:
        return user_vecs.new_zeros(idx.shape)
    return resolve(backend, _gd_call("gathered_dot", user_vecs, item_vecs)).gathered_dot(user_vecs, item_vecs, idx)


def _gd_fake(user_vecs, item_vecs, idx, backend, validate):
    _checks.check_gathered_dot(user_vecs, item_vecs, idx, validate=False)
    return user_vecs.new_empty(idx.shape)


gathered_dot = _define(
    "gathered_dot", "(Tensor user_vecs, Tensor item_vecs, Tensor idx, str backend, bool validate) -> Tensor",
    _gd_impl, _gd_fake)


def _gd_bwd_impl(grad, user_vecs, item_vecs, idx, backend):
    _checks.check_gathered_dot(user_vecs, item_vecs, idx, validate=False, grad=grad)
    if idx.numel() == 0:
        return torch.zeros_like(user_vecs), torch.zeros_like(item_vecs)
    impl = resolve(backend, _gd_call("gathered_dot_bwd", user_vecs, item_vecs))
    return impl.gathered_dot_bwd(grad, user_vecs, item_vecs, idx)


def _gd_bwd_fake(grad, user_vecs, item_vecs, idx, backend):
    _checks.check_gathered_dot(user_vecs, item_vecs, idx, validate=False, grad=grad)
    return torch.empty_like(user_vecs), torch.empty_like(item_vecs)


gathered_dot_bwd = _define(
    "gathered_dot_bwd",
    "(Tensor grad, Tensor user_vecs, Tensor item_vecs, Tensor idx, str backend) -> (Tensor, Tensor)",
    _gd_bwd_impl, _gd_bwd_fake)


def _gd_setup(ctx, inputs, output):
    u, v, idx, backend, _validate = inputs
    ctx.save_for_backward(u, v, idx)
    ctx.backend = backend


def _gd_backward(ctx, grad):
    u, v, idx = ctx.saved_tensors
    gu, gv = gathered_dot_bwd(grad.contiguous(), u, v, idx, ctx.backend)
    return (gu if ctx.needs_input_grad[0] else None), (gv if ctx.needs_input_grad[1] else None), None, None, None


gathered_dot.register_autograd(_gd_backward, setup_context=_gd_setup)
