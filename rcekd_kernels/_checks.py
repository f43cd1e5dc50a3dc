"""The one place where RCE-KD's arguments are checked.

Every public entry point (functional API, module, autograd Function, the custom
ops called directly or under ``torch.compile``) goes through these functions
before any work is done. Checks that only look at shapes, dtypes, devices and
Python values are always made; checks that must read tensor data (non-finite
scores, teacher top-K ids out of range, repeated or excluded, rows with too
few candidates) are made when ``validate`` is true. They read the data once
and synchronise with the device, so a training loop that has checked its data
can turn them off.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch

MODES = ("paper", "official")
REDUCTIONS = ("mean", "sum", "none")
MAX_KM = 1 << 30  # far above anything sensible; kernels impose their own limit


def _is_int(x) -> bool:
    # torch.SymInt: a seed that torch.compile traces as a dynamic value
    return isinstance(x, (Integral, torch.SymInt)) and not isinstance(x, bool)


def check_int(name: str, value, lo: int, hi: int, rule: str) -> None:
    """An int in [lo, hi]; ``rule`` states the constraint for the message."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must satisfy {rule}, got {name} = {value}")


def check_real(name: str, value, *, positive: bool) -> None:
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        rng = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {rng}, got {name} = {value}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_hparams(*, K=None, M=None, L=None, N=None, tau=None, T=None, beta=None,
                  mode=None, seed=None, reduction=None) -> None:
    """Checks of the Python-valued hyperparameters (no tensor is read)."""
    n = f", N = {N}" if N is not None else ""
    if K is not None:
        check_int("K", K, 1, N if N is not None else MAX_KM, f"1 <= K <= M <= N ({n[2:] or 'N unknown'})")
    if M is not None:
        lo = K if K is not None else 1
        check_int("M", M, lo, N if N is not None else MAX_KM, f"K <= M <= N (K = {lo}{n})")
    if L is not None:
        check_int("L", L, 1, M if M is not None else MAX_KM, f"1 <= L <= M (M = {M})")
    if tau is not None:
        check_real("tau", tau, positive=True)
    if T is not None:
        check_real("T", T, positive=True)
    if beta is not None:
        check_real("beta", beta, positive=False)
    if mode is not None:
        check_choice("mode", mode, MODES)
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if reduction is not None:
        check_choice("reduction", reduction, REDUCTIONS)


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


def check_dense(s, t, teacher_topk, exclude, row_ids, *, K, M, L, tau=None, T, beta, mode,
                seed, validate: bool, need_teacher_scores: bool) -> None:
    """Checks the arguments of the loss / select on dense (B, N) score rows."""
    _check_scores("student_scores", s)
    B, N = s.shape
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
    check_hparams(K=K, M=M, L=L, N=N, tau=tau, T=T, beta=beta, mode=mode, seed=seed)
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor):
            raise TypeError(f"exclude must be a bool torch.Tensor, got {type(exclude).__name__}")
        if exclude.dtype != torch.bool:
            raise TypeError(f"exclude must have dtype torch.bool, got {exclude.dtype}")
        if exclude.shape != s.shape:
            raise ValueError(f"exclude must have the shape of student_scores {tuple(s.shape)}, "
                             f"got {tuple(exclude.shape)}")
        _check_device("exclude", exclude, device)
    if not isinstance(row_ids, torch.Tensor):
        raise TypeError(f"row_ids must be an integer torch.Tensor, got {type(row_ids).__name__}")
    if row_ids.dtype.is_floating_point or row_ids.dtype.is_complex or row_ids.dtype == torch.bool:
        raise TypeError(f"row_ids must have an integer dtype, got {row_ids.dtype}")
    if row_ids.shape != (B,):
        raise ValueError(f"row_ids must have shape (B,) = ({B},), got {tuple(row_ids.shape)}")
    _check_device("row_ids", row_ids, device)
    if teacher_topk is not None:
        if not isinstance(teacher_topk, torch.Tensor):
            raise TypeError(f"teacher_topk must be an int64 torch.Tensor, got {type(teacher_topk).__name__}")
        if teacher_topk.dtype != torch.int64:
            raise TypeError(f"teacher_topk must have dtype torch.int64, got {teacher_topk.dtype}")
        if teacher_topk.shape != (B, K):
            raise ValueError(f"teacher_topk must have shape (B, K) = ({B}, {K}), "
                             f"got {tuple(teacher_topk.shape)}")
        _check_device("teacher_topk", teacher_topk, device)
    if not validate or B == 0:
        return
    # ---- checks that read the data (one pass each, one host synchronisation each)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("student_scores contains NaN or infinite values "
                         "(pass validate=False to skip this check)")
    if t is not None and not bool(torch.isfinite(t).all()):
        raise ValueError("teacher_scores contains NaN or infinite values "
                         "(pass validate=False to skip this check)")
    if exclude is not None:
        n_ok = N - exclude.sum(dim=1)
        bad = int(n_ok.min())
        if bad < M:
            row = int(torch.argmin(n_ok))
            raise ValueError(f"exclude leaves {bad} items in row {row}, fewer than M = {M}; every row "
                             f"needs at least M non-excluded items")
    if teacher_topk is not None:
        lo, hi = int(teacher_topk.min()), int(teacher_topk.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"teacher_topk ids must lie in [0, N) = [0, {N}), got min {lo}, max {hi}")
        srt = torch.sort(teacher_topk, dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise ValueError(f"teacher_topk has a repeated id in row {row}; ids must be unique per row")
        if exclude is not None:
            hit = exclude.gather(1, teacher_topk).any(dim=1)
            if bool(hit.any()):
                row = int(hit.nonzero()[0, 0])
                raise ValueError(f"teacher_topk holds an id that exclude marks in row {row}")


def check_gathered(s_g, t_g, u_mask, gamma, *, K: int, L: int, tau) -> None:
    """Checks the arguments of the loss on gathered scores (B, 2K + L)."""
    _check_scores("student_gathered", s_g)
    _check_scores("teacher_gathered", t_g)
    check_hparams(K=K, L=L, tau=tau)
    B, W = s_g.shape
    if W != 2 * K + L:
        raise ValueError(f"student_gathered must have 2K + L = {2 * K + L} columns "
                         f"(student top-K, sampled, teacher top-K), got {W}")
    if t_g.shape != s_g.shape:
        raise ValueError(f"teacher_gathered must have the shape of student_gathered {tuple(s_g.shape)}, "
                         f"got {tuple(t_g.shape)}")
    for name, x in (("teacher_gathered", t_g), ("q2_mask", u_mask), ("gamma", gamma)):
        _check_device(name, x, s_g.device)
    if u_mask.dtype != torch.bool or u_mask.shape != (B, K):
        raise ValueError(f"q2_mask must be a bool tensor of shape ({B}, {K}), "
                         f"got {u_mask.dtype} {tuple(u_mask.shape)}")
    if not gamma.dtype.is_floating_point or gamma.shape != (B,):
        raise ValueError(f"gamma must be a float tensor of shape ({B},), got {gamma.dtype} {tuple(gamma.shape)}")


def check_gathered_dot(user_vecs, item_vecs, idx, *, validate: bool) -> None:
    """Checks of ``gathered_dot(user_vecs (B, D), item_vecs (N, D), idx (B, W))``; with
    ``validate`` the ids are read (one pass, a host synchronisation) and must lie in [0, N)."""
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
    if validate and idx.numel():
        N = item_vecs.shape[0]
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"idx holds item ids outside [0, {N}): min {lo}, max {hi}")
