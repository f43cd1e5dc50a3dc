"""The one place where RCE-KD's tensor arguments are checked.

The hyperparameters' ranges are checked once, when their
:class:`~rcekd_kernels.config.RCEKDConfig` is built; this module checks the
tensors against them. Every public entry point (functional API, module, autograd
Function, the custom ops called directly or under ``torch.compile``) goes through
these functions before any work is done. Checks that only look at shapes, dtypes, devices and
Python values are always made; checks that must read tensor data (non-finite
scores, teacher top-K ids out of range, repeated or excluded, rows with too
few candidates) are made when ``validate`` is true. They read the data once
and synchronise with the device, so a training loop that has checked its data
can turn them off.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from .config import MAX_SCORE_OVER_TAU, RCEKDConfig


def _check_scores(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, N), got shape {tuple(x.shape)}")


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_scores is on {device}; "
                         f"all tensors must be on one device")


def check_types(required=None, optional=None) -> None:
    """The Python types of an entry point's tensor arguments, before any op sees them (so that a
    list, a numpy array or None is a TypeError / ValueError naming the argument, never a schema
    error of the op dispatcher). ``required`` and ``optional`` map names to values."""
    for name, x in (required or {}).items():
        if x is None:
            raise ValueError(f"{name} is required")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (optional or {}).items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")


def check_score_range(name: str, x: torch.Tensor, tau: float) -> None:
    """Finite scores with |score| / tau <= MAX_SCORE_OVER_TAU (one pass over x): in that range
    every quantity of the loss, its gradient and the sampling is finite in float32 (docs/LOSS.md,
    "Numerical range")."""
    if x.numel() == 0:
        return
    m = float(x.detach().abs().amax())  # NaN propagates; inf stays inf
    if not math.isfinite(m):
        raise ValueError(f"{name} contains NaN or infinite values (pass validate=False to skip this check)")
    if m > MAX_SCORE_OVER_TAU * tau:
        raise ValueError(f"{name} is out of range: |score| / tau must be at most {MAX_SCORE_OVER_TAU:g}, got "
                         f"max |score| = {m:.4g} with tau = {tau:g}; scale the scores down or raise tau "
                         f"(pass validate=False to skip this check)")


def _check_tensor(name: str, x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be {what} torch.Tensor, got {type(x).__name__}")


def check_dense(s, t, teacher_topk, exclude, row_ids, cfg: RCEKDConfig, *, validate: bool,
                need_teacher_scores: bool) -> None:
    """Checks the arguments of the loss / select on dense (B, N) score rows."""
    _check_scores("student_scores", s)
    B, N = s.shape
    K, M = cfg.K, cfg.m
    device = s.device
    if t is None:
        if need_teacher_scores or teacher_topk is None:
            raise ValueError("teacher_scores is required"
                             + ("" if need_teacher_scores else " when teacher_topk is not given"))
    else:
        _check_scores("teacher_scores", t)
        if t.shape != s.shape:
            raise ValueError(f"teacher_scores must have the shape of student_scores {tuple(s.shape)}, "
                             f"got {tuple(t.shape)}")
        _check_device("teacher_scores", t, device)
    cfg.check_catalog(N)
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor):
            raise TypeError(f"exclude must be a bool torch.Tensor, got {type(exclude).__name__}")
        if exclude.dtype != torch.bool:
            raise TypeError(f"exclude must have dtype torch.bool, got {exclude.dtype}")
        if exclude.shape != s.shape:
            raise ValueError(f"exclude must have the shape of student_scores {tuple(s.shape)}, "
                             f"got {tuple(exclude.shape)}")
        _check_device("exclude", exclude, device)
    _check_tensor("row_ids", row_ids, "an integer")
    if row_ids.dtype.is_floating_point or row_ids.dtype.is_complex or row_ids.dtype == torch.bool:
        raise TypeError(f"row_ids must have an integer dtype, got {row_ids.dtype}")
    if row_ids.shape != (B,):
        raise ValueError(f"row_ids must have shape (B,) = ({B},), got {tuple(row_ids.shape)}")
    _check_device("row_ids", row_ids, device)
    if teacher_topk is not None:
        _check_tensor("teacher_topk", teacher_topk, "an int64")
        if teacher_topk.dtype != torch.int64:
            raise TypeError(f"teacher_topk must have dtype torch.int64, got {teacher_topk.dtype}")
        if teacher_topk.shape != (B, K):
            raise ValueError(f"teacher_topk must have shape (B, K) = ({B}, {K}), "
                             f"got {tuple(teacher_topk.shape)}")
        _check_device("teacher_topk", teacher_topk, device)
    if not validate or B == 0:
        return
    # ---- checks that read the data (one pass each, one host synchronisation each)
    check_score_range("student_scores", s, cfg.tau)
    if t is not None:
        check_score_range("teacher_scores", t, cfg.tau)
    if exclude is not None:
        n_ok = N - exclude.sum(dim=1)
        bad = int(n_ok.min())
        if bad < M:
            row = int(torch.argmin(n_ok))
            raise ValueError(f"exclude leaves {bad} items in row {row}, fewer than M = {M}; every row "
                             f"needs at least M non-excluded items")
    if teacher_topk is not None:
        check_topk_ids(teacher_topk, N)
        if exclude is not None:
            hit = exclude.gather(1, teacher_topk).any(dim=1)
            if bool(hit.any()):
                row = int(hit.nonzero()[0, 0])
                raise ValueError(f"teacher_topk holds an id that exclude marks in row {row}")


def check_topk_ids(teacher_topk: torch.Tensor, N: int) -> None:
    """The data of given teacher top-K ids (B, K): in [0, N), unique per row (one pass, a synchronisation)."""
    if teacher_topk.numel() == 0:
        return
    lo, hi = int(teacher_topk.min()), int(teacher_topk.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"teacher_topk ids must lie in [0, N) = [0, {N}), got min {lo}, max {hi}")
    srt = torch.sort(teacher_topk, dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
    if bool(dup.any()):
        row = int(dup.nonzero()[0, 0])
        raise ValueError(f"teacher_topk has a repeated id in row {row}; ids must be unique per row")


def check_pool(pool, qt, row_ids, cfg: RCEKDConfig, *, validate: bool) -> None:
    """Checks of ``sets_from_pool``: a pool (B, M) of item ids in student order and QT (B, K);
    with ``validate`` the ids are read: >= 0 and unique per row (one pass, a synchronisation)."""
    check_types(dict(pool=pool, teacher_topk=qt, row_ids=row_ids))
    if pool.dtype != torch.int64 or pool.dim() != 2 or pool.shape[1] != cfg.m:
        raise ValueError(f"pool must be int64 of shape (B, M) with M = {cfg.m}, got {pool.dtype} {tuple(pool.shape)}")
    B = pool.shape[0]
    if qt.dtype != torch.int64 or qt.shape != (B, cfg.K):
        raise ValueError(f"teacher_topk must be int64 of shape (B, K) = ({B}, {cfg.K}), got {qt.dtype} "
                         f"{tuple(qt.shape)}")
    if row_ids.dtype.is_floating_point or row_ids.dtype.is_complex or row_ids.dtype == torch.bool:
        raise TypeError(f"row_ids must have an integer dtype, got {row_ids.dtype}")
    if row_ids.shape != (B,):
        raise ValueError(f"row_ids must have shape (B,) = ({B},), got {tuple(row_ids.shape)}")
    for name, x in (("teacher_topk", qt), ("row_ids", row_ids)):
        _check_device(name, x, pool.device)
    if not validate or B == 0:
        return
    for name, x in (("pool", pool), ("teacher_topk", qt)):
        if int(x.min()) < 0:
            raise ValueError(f"{name} holds a negative id (a row with fewer than M eligible items?)")
        srt = torch.sort(x, dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            raise ValueError(f"{name} has a repeated id in row {int(dup.nonzero()[0, 0])}; ids must be unique per row")


def check_gathered(s_g, t_g, q2_mask, gamma, cfg: RCEKDConfig, *, grad_rows=None, validate: bool = False) -> None:
    """Checks the arguments of the loss on gathered scores (B, 2K + L) (and of its backward,
    with ``grad_rows``); with ``validate`` also the data: the scores' range (as the dense loss)
    and gamma in [0, 1] (one pass each and a host synchronisation)."""
    _check_scores("student_gathered", s_g)
    _check_scores("teacher_gathered", t_g)
    B, W = s_g.shape
    K = cfg.K
    if W != cfg.width:
        raise ValueError(f"student_gathered must have 2K + L = {cfg.width} columns "
                         f"(student top-K, sampled, teacher top-K), got {W}")
    if t_g.shape != s_g.shape:
        raise ValueError(f"teacher_gathered must have the shape of student_gathered {tuple(s_g.shape)}, "
                         f"got {tuple(t_g.shape)}")
    _check_tensor("q2_mask", q2_mask, "a bool")
    _check_tensor("gamma", gamma, "a float")
    for name, x in (("teacher_gathered", t_g), ("q2_mask", q2_mask), ("gamma", gamma)):
        _check_device(name, x, s_g.device)
    if q2_mask.dtype != torch.bool or q2_mask.shape != (B, K):
        raise ValueError(f"q2_mask must be a bool tensor of shape ({B}, {K}), "
                         f"got {q2_mask.dtype} {tuple(q2_mask.shape)}")
    if not gamma.dtype.is_floating_point or gamma.shape != (B,):
        raise ValueError(f"gamma must be a float tensor of shape ({B},), got {gamma.dtype} {tuple(gamma.shape)}")
    if grad_rows is not None:
        _check_grad_rows(grad_rows, B, s_g.device)
    if validate and B:
        check_score_range("student_gathered", s_g, cfg.tau)
        check_score_range("teacher_gathered", t_g, cfg.tau)
        lo, hi = float(gamma.amin()), float(gamma.amax())
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
            raise ValueError(f"gamma must lie in [0, 1], got min {lo:g}, max {hi:g} (the selection's gamma is "
                             f"exp(-beta n / K))")


def _check_grad_rows(grad_rows, B: int, device: torch.device) -> None:
    _check_tensor("grad_rows", grad_rows, "a float")
    if not grad_rows.dtype.is_floating_point or grad_rows.shape != (B,):
        raise ValueError(f"grad_rows must be a float tensor of shape ({B},), "
                         f"got {grad_rows.dtype} {tuple(grad_rows.shape)}")
    if grad_rows.device != device:
        raise ValueError(f"grad_rows is on {grad_rows.device} but the scores are on {device}")


def check_fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, cfg: RCEKDConfig) -> None:
    """Checks the arguments of the dense loss's backward (shapes only: ``idx`` comes from
    the forward; its values are bounded by the kernels)."""
    _check_scores("student_scores", s)
    _check_scores("teacher_scores", t)
    B, N = s.shape
    if t.shape != s.shape:
        raise ValueError(f"teacher_scores must have the shape of student_scores {tuple(s.shape)}, "
                         f"got {tuple(t.shape)}")
    _check_tensor("idx", idx, "an int64")
    if idx.dtype != torch.int64 or idx.shape != (B, cfg.width):
        raise ValueError(f"idx must be int64 of shape (B, 2K + L) = ({B}, {cfg.width}), "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    _check_tensor("q2_mask", q2_mask, "a bool")
    _check_tensor("gamma", gamma, "a float")
    if q2_mask.dtype != torch.bool or q2_mask.shape != (B, cfg.K):
        raise ValueError(f"q2_mask must be a bool tensor of shape ({B}, {cfg.K}), "
                         f"got {q2_mask.dtype} {tuple(q2_mask.shape)}")
    if not gamma.dtype.is_floating_point or gamma.shape != (B,):
        raise ValueError(f"gamma must be a float tensor of shape ({B},), got {gamma.dtype} {tuple(gamma.shape)}")
    for name, x in (("teacher_scores", t), ("idx", idx), ("q2_mask", q2_mask), ("gamma", gamma)):
        _check_device(name, x, s.device)
    _check_grad_rows(grad_rows, B, s.device)


def _as_int(v) -> Optional[int]:
    """v as a Python int when it is an integer (not a bool, not a float), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_topm(user_vecs, item_vecs, M, exclude_offsets, exclude_ids, item_offset) -> None:
    """ValueError / TypeError for arguments topm_dot does not accept (every backend)."""
    for name, x in (("user_vecs", user_vecs), ("item_vecs", item_vecs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"topm_dot: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"topm_dot: {name} must be 2-D, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"topm_dot: {name} must have a floating dtype, got {x.dtype}")
    if user_vecs.dtype != item_vecs.dtype:
        raise TypeError(f"topm_dot: user_vecs ({user_vecs.dtype}) and item_vecs ({item_vecs.dtype}) "
                        f"must have one dtype")
    if user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"topm_dot: user_vecs has D = {user_vecs.shape[1]} but item_vecs has "
                         f"D = {item_vecs.shape[1]}")
    if user_vecs.device != item_vecs.device:
        raise ValueError(f"topm_dot: user_vecs ({user_vecs.device}) and item_vecs ({item_vecs.device}) "
                         f"must be on one device")
    if _as_int(M) is None or M < 1:
        raise ValueError(f"topm_dot: M must be an integer >= 1, got {M!r}")
    if _as_int(item_offset) is None or item_offset < 0:
        raise ValueError(f"topm_dot: item_offset must be an integer >= 0, got {item_offset!r}")
    if item_offset + item_vecs.shape[0] > 2**63 - 1:
        raise ValueError("topm_dot: item_offset + N must fit int64")
    if (exclude_offsets is None) != (exclude_ids is None):
        raise ValueError("topm_dot: exclude_offsets and exclude_ids must be given together")
    if exclude_offsets is None:
        return
    B = user_vecs.shape[0]
    for name, x in (("exclude_offsets", exclude_offsets), ("exclude_ids", exclude_ids)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 1:
            raise TypeError(f"topm_dot: {name} must be a 1-D int64 tensor")
        if x.device != user_vecs.device:
            raise ValueError(f"topm_dot: {name} ({x.device}) must be on the device of user_vecs "
                             f"({user_vecs.device})")
    if exclude_offsets.shape[0] != B + 1:
        raise ValueError(f"topm_dot: exclude_offsets must have shape (B + 1,) = ({B + 1},), "
                         f"got {tuple(exclude_offsets.shape)}")
    nnz = exclude_ids.shape[0]
    if int(exclude_offsets[0]) < 0 or int(exclude_offsets[-1]) > nnz:
        raise ValueError(f"topm_dot: exclude_offsets must lie in [0, len(exclude_ids)] = [0, {nnz}], "
                         f"got first {int(exclude_offsets[0])}, last {int(exclude_offsets[-1])}")
    if bool((exclude_offsets[1:] < exclude_offsets[:-1]).any()):
        raise ValueError("topm_dot: exclude_offsets must be non-decreasing")


def check_gathered_dot(user_vecs, item_vecs, idx, *, validate: bool, grad=None) -> None:
    """Checks of ``gathered_dot(user_vecs (B, D), item_vecs (N, D), idx (B, W))`` (and of its
    backward, with ``grad`` (B, W)); with ``validate`` the ids are read (one pass, a host
    synchronisation) and must lie in [0, N)."""
    for name, x in (("user_vecs", user_vecs), ("item_vecs", item_vecs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor, got {type(idx).__name__}")
    B, D = user_vecs.shape
    if item_vecs.shape[1] != D:
        raise ValueError(f"user_vecs (B, D) = {tuple(user_vecs.shape)} and item_vecs (N, D) = "
                         f"{tuple(item_vecs.shape)} must have the same D")
    if item_vecs.dtype != user_vecs.dtype:
        raise TypeError(f"user_vecs and item_vecs must have one dtype, got {user_vecs.dtype} and {item_vecs.dtype}")
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != B:
        raise ValueError(f"idx must be int64 of shape (B, W) with B = {B}, got {idx.dtype} {tuple(idx.shape)}")
    for name, x in (("item_vecs", item_vecs), ("idx", idx)):
        if x.device != user_vecs.device:
            raise ValueError(f"{name} is on {x.device} but user_vecs is on {user_vecs.device}; "
                             f"all tensors must be on one device")
    if grad is not None:
        _check_tensor("grad", grad, "a float")
        if not grad.dtype.is_floating_point or grad.shape != idx.shape or grad.device != user_vecs.device:
            raise ValueError(f"grad must be a float tensor of the shape of idx {tuple(idx.shape)} on "
                             f"{user_vecs.device}, got {grad.dtype} {tuple(grad.shape)} on {grad.device}")
    if validate and idx.numel():
        N = item_vecs.shape[0]
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"idx holds item ids outside [0, {N}): min {lo}, max {hi}")


def check_layer_mean(adj, parts, layers) -> None:
    """ValueError / TypeError for arguments layer_mean does not accept (every backend): ``adj`` a
    square sparse (COO or CSR) float matrix with a row per row of the ``parts`` together, ``parts``
    2-D float matrices of one dtype, one number of columns and adj's device, ``layers`` >= 0."""
    if not isinstance(adj, torch.Tensor) or adj.layout not in (torch.sparse_coo, torch.sparse_csr):
        got = adj.layout if isinstance(adj, torch.Tensor) else type(adj).__name__
        raise TypeError(f"layer_mean: adj must be a sparse COO or CSR tensor, got {got}")
    if isinstance(parts, torch.Tensor) or not isinstance(parts, (list, tuple)) or not parts:
        raise TypeError("layer_mean: parts must be a non-empty list of (rows, D) tensors")
    for k, x in enumerate(parts):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer_mean: parts[{k}] must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"layer_mean: parts[{k}] must be a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
        if x.dtype != parts[0].dtype or x.shape[1] != parts[0].shape[1] or x.device != parts[0].device:
            raise ValueError(f"layer_mean: parts[{k}] is {x.dtype} (., {x.shape[1]}) on {x.device} but parts[0] is "
                             f"{parts[0].dtype} (., {parts[0].shape[1]}) on {parts[0].device}: the parts must share "
                             f"dtype, number of columns and device")
    rows = sum(int(x.shape[0]) for x in parts)
    if adj.dim() != 2 or tuple(adj.shape) != (rows, rows):
        raise ValueError(f"layer_mean: adj must be ({rows}, {rows}) (the parts have {rows} rows together), "
                         f"got {tuple(adj.shape)}")
    if adj.dtype != parts[0].dtype:
        raise TypeError(f"layer_mean: adj ({adj.dtype}) must have the dtype of the parts ({parts[0].dtype})")
    if adj.device != parts[0].device:
        raise ValueError(f"layer_mean: adj is on {adj.device} but the parts are on {parts[0].device}")
    if _as_int(layers) is None or layers < 0:
        raise ValueError(f"layer_mean: layers must be an integer >= 0, got {layers!r}")
