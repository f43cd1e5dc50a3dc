"""HetComp: distillation from the teacher's training trajectory (Kang et al., "Distillation from
Heterogeneous Models for Top-K Recommendation", WWW 2023), as defined in docs/KD_METHODS.md.

The teacher's trajectory is a sequence of C ranking targets, easy to hard: the top-K lists (training
items excluded) of C - 1 checkpoints kept while the teacher trained (``rcekd train-teacher --keep-every``)
and of the final teacher. Each user u follows it at its own pace: its current target is pi^{v_u}.

* Dynamic knowledge construction (every ``p`` epochs, from epoch p on, while the mean of v is below
  C - 1): with sigma_u the student's top-K (training items excluded) and D(sigma, pi) = 1 - NDCG@K of
  sigma with pi as the graded ground truth, the first check stores d_u = D(sigma_u, pi^{v_u + 1}); later
  checks move u to its next target when the student has come closer to it fast enough, or has moved
  away: with r = d_u / D(sigma_u, pi^{v_u + 1}) and the threshold alpha * decay^(epoch // p),
  r > threshold or r < 1 -> v_u += 1 and d_u = D(sigma_u, pi^{min(v_u + 1, C - 1)}).
* Adaptive knowledge transfer: while the mean of v (rounded to 2 decimals) is below C - 1 the loss is
  the "overall" one (every target item and every observed item above the unobserved non-target items,
  order free); afterwards the "ranking" one (Plackett-Luce of the observed items, of the first K/2 and
  of the first K/10 target items, each above the unobserved items outside that prefix).

Its per-user state (v, d, the stage) is carried in the trainer's checkpoint (``state_dict``), so a resumed
run continues the same curriculum.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from ..files import load_torch
from ..models.base import eval_mode
from .base import KDMethod
from .teacher import list_trajectory, topk_from_vectors

Tensor = torch.Tensor


# --- formulas -------------------------------------------------------------------------------------------
def ndcg_discrepancy(student_list: Tensor, target: Tensor, lam: float = 10.0,
                     relevance: str = "teacher_rank") -> Tensor:
    """D = 1 - NDCG@K per row of the student's list (B, K) against a target permutation (B, K).

    ``teacher_rank``: item i of the target at rank r (0-based) has gain 2^{exp(-r / lam)} - 1, other items 0;
    DCG = sum_t gain(student_list[t]) / log2(t + 2), IDCG = sum_{r < K} (2^{exp(-r / lam)} - 1) / log2(r + 2).
    ``student_position`` (the authors' implementation): the gain of the student's t-th item is
    2^{exp(-t / lam)} - 1 when it is anywhere in the target, else 0 (same IDCG)."""
    B, K = student_list.shape
    ranks = torch.arange(K, dtype=torch.float64, device=student_list.device)
    gain_at = torch.pow(2.0, torch.exp(-ranks / lam)) - 1.0
    disc = 1.0 / torch.log2(ranks + 2.0)
    eq = student_list.unsqueeze(2) == target.unsqueeze(1)                    # (B, t, r)
    present = eq.any(2)
    if relevance == "teacher_rank":
        r = eq.to(torch.int64).argmax(2)                                      # rank in the target
        gains = torch.where(present, gain_at[r], torch.zeros((), dtype=torch.float64))
    elif relevance == "student_position":
        gains = present.to(torch.float64) * gain_at.unsqueeze(0)
    else:
        raise ValueError(f"hetcomp: relevance must be 'teacher_rank' or 'student_position', got {relevance!r}")
    dcg = (gains * disc).sum(1)
    idcg = (gain_at * disc).sum()
    return 1.0 - dcg / idcg


def _log_sum_outside(s: Tensor, excluded: Tensor) -> Tensor:
    """log sum_{k not excluded} exp(s_k) per row (B,), from the complement directly (no cancellation)."""
    return torch.logsumexp(s.masked_fill(excluded, float("-inf")), dim=1)


def _pl_rows(ordered: Tensor, log_below: Tensor) -> Tensor:
    """- sum_m [ o_m - log( sum_{m' >= m} exp(o_m') + exp(log_below) ) ] per row."""
    suffix = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
    return -(ordered - torch.logaddexp(suffix, log_below.unsqueeze(1))).sum(1)


def _mask_of(items: Tensor, N: int, base: Tensor) -> Tensor:
    return base.clone().scatter_(1, items, True)


def _overall_from(x: Tensor, log_els: Tensor) -> Tensor:
    """The overall loss per row from s at pos ∪ targets (B, P + K) and log E_T (B,)."""
    return -2.0 * (x - torch.logaddexp(x, log_els.unsqueeze(1))).sum(1)


def _prefixes(targets: Tensor):
    """The targets' first K/2 and K/10 (at least one each)."""
    K = targets.shape[1]
    return targets[:, :max(K // 2, 1)], targets[:, :max(K // 10, 1)]


def _rank_from(x_pos: Tensor, x_half: Tensor, x_tenth: Tensor, log_half: Tensor, log_tenth: Tensor) -> Tensor:
    """The ranking loss per row from s at pos, at the targets' first K/2 and K/10, and log E of each prefix."""
    top = _pl_rows(x_half, log_half) + _pl_rows(x_tenth, log_tenth)
    return _pl_rows(x_pos, log_half) + top / 2.0


def hetcomp_overall_rows(s: Tensor, train_mask: Tensor, targets: Tensor, pos: Tensor) -> Tensor:
    """Overall stage: -2 sum_{x in pos ∪ targets} [ s_x - log( exp(s_x) + sum_{k unobserved, k not in targets}
    exp(s_k) ) ] per row (s: the student's full rows (B, N))."""
    log_els = _log_sum_outside(s, _mask_of(targets, s.shape[1], train_mask))
    return _overall_from(s.gather(1, torch.cat([pos, targets], dim=1)), log_els)


def hetcomp_rank_rows(s: Tensor, train_mask: Tensor, targets: Tensor, pos: Tensor) -> Tensor:
    """Ranking stage: PL(pos | below_half) + [PL(targets[:K/2] | below_half) + PL(targets[:K/10] | below_tenth)] / 2,
    below_X = the unobserved items outside X (the targets' prefix)."""
    half, tenth = _prefixes(targets)
    log_half = _log_sum_outside(s, _mask_of(half, s.shape[1], train_mask))
    log_tenth = _log_sum_outside(s, _mask_of(tenth, s.shape[1], train_mask))
    return _rank_from(s.gather(1, pos), s.gather(1, half), s.gather(1, tenth), log_half, log_tenth)


#: scores per block of rows of the fused losses on the CPU (about 4 MB of float32: a block's (b, N) scores
#: and masks stay in the cache through every elementwise pass)
CPU_BLOCK_ELEMS = 1 << 20


def _block_coords(exclusion, r0: int, r1: int):
    """(row in the block, item) of the training items of rows r0..r1 of a batch, from its CSR exclusion
    (offsets (B + 1,), ids (nnz,)): the places a block's scores are set to -inf by index, never through a
    dense (b, N) mask."""
    offsets, ids = exclusion
    lo, hi = int(offsets[r0]), int(offsets[min(r1, len(offsets) - 1)])
    lens = offsets[r0 + 1:r1 + 1] - offsets[r0:r1]
    rows = torch.repeat_interleave(torch.arange(len(lens), device=ids.device), lens)
    return rows, ids[lo:hi]


def _minus_inf_at(s: Tensor, coords, ex: Tensor) -> Tensor:
    """s (in place) with -inf at the training items (coords) and at the listed items ``ex`` (b, E)."""
    s[coords] = float("-inf")
    return s.scatter_(1, ex, float("-inf"))


class _ComplementLSE(torch.autograd.Function):
    """From the vectors, without a (B, N) tensor kept for the backward: per row, for each exclusion list
    E_m, log sum_{k unobserved, k not in E_m} exp(s_k), and s at ``gather_idx``, with
    s = clamp(user_vecs @ item_vecs.T, -clamp, clamp). Rows are taken ``block`` at a time; the backward
    recomputes each block's scores. The excluded items (training items and E_m) are set to -inf by
    index, so that every pass over a block's (b, N) scores is one of the formula's. The values are those
    of the (B, N) formulas (``hetcomp_*_rows``), the item gradient up to the order of its sums over rows."""

    @staticmethod
    def forward(ctx, u, v, clamp, exclusion, gather_idx, block, *excluded):
        B = u.shape[0]
        lse = u.new_empty(B, len(excluded))
        got = u.new_empty(B, gather_idx.shape[1])
        for r0 in range(0, B, block):
            sl = slice(r0, r0 + block)
            s = (u[sl] @ v.T).clamp_(-clamp, clamp)
            coords = _block_coords(exclusion, r0, min(r0 + block, B))
            got[sl] = s.gather(1, gather_idx[sl])
            for j, ex in enumerate(excluded):
                t = s if j == len(excluded) - 1 else s.clone()  # the last one may overwrite the block's s
                lse[sl, j] = torch.logsumexp(_minus_inf_at(t, coords, ex[sl]), dim=1)
        ctx.save_for_backward(u, v, lse, gather_idx, *excluded)
        ctx.clamp, ctx.exclusion, ctx.block = clamp, exclusion, block
        return lse, got

    @staticmethod
    def backward(ctx, g_lse, g_got):
        u, v, lse, gather_idx, *excluded = ctx.saved_tensors
        c, B = ctx.clamp, u.shape[0]
        du, dv = torch.empty_like(u), torch.zeros_like(v)
        for r0 in range(0, B, ctx.block):
            sl = slice(r0, r0 + ctx.block)
            s, clamped = _clamped_scores(u[sl], v, c)
            coords = _block_coords(ctx.exclusion, r0, min(r0 + ctx.block, B))
            ds = None
            for j, ex in enumerate(excluded):  # d lse / d s_k = softmax over the complement (0 where excluded)
                p = _minus_inf_at(s - lse[sl, j:j + 1], coords, ex[sl]).exp_().mul_(g_lse[sl, j:j + 1])
                ds = p if ds is None else ds.add_(p)
            ds.scatter_add_(1, gather_idx[sl], g_got[sl])
            if clamped is not None:
                ds.masked_fill_(clamped, 0)  # clamp's gradient
            du[sl] = ds @ v
            dv.addmm_(ds.T, u[sl])
        return (du, dv, None, None, None, None) + (None,) * len(excluded)


class _NestedComplementLSE(torch.autograd.Function):
    """``_ComplementLSE`` for two exclusion lists of which the second is a prefix of the first (the ranking
    stage: the targets' first K/2 and first K/10), each list of distinct items: one masked pass gives
    L_1 = log sum over the complement of (training items and the list), and since the prefix's complement
    is that one plus the list's rest, L_2 = logaddexp(L_1, log sum of exp(s) over the rest that is not a
    training item). In the backward, d/ds of g_1 L_1 + g_2 L_2 is exp(s - L_1) (g_1 + g_2 exp(L_1 - L_2))
    on the first complement and g_2 exp(s - L_2) on the rest: one exponential per score instead of one per
    list, and no copy of the block."""

    @staticmethod
    def forward(ctx, u, v, clamp, exclusion, gather_idx, block, outer, n_inner):
        B = u.shape[0]
        lse = u.new_empty(B, 2)
        got = u.new_empty(B, gather_idx.shape[1])
        rest = outer[:, n_inner:]
        rest_ok = torch.ones(rest.shape, dtype=torch.bool, device=u.device)  # rest items that are not training items
        for r0 in range(0, B, block):
            sl = slice(r0, r0 + block)
            s = (u[sl] @ v.T).clamp_(-clamp, clamp)
            got[sl] = s.gather(1, gather_idx[sl])
            s[_block_coords(exclusion, r0, min(r0 + block, B))] = float("-inf")
            x_rest = s.gather(1, rest[sl])
            rest_ok[sl] = x_rest != float("-inf")
            lse[sl, 0] = torch.logsumexp(s.scatter_(1, outer[sl], float("-inf")), dim=1)
            lse[sl, 1] = torch.logaddexp(lse[sl, 0], torch.logsumexp(x_rest, dim=1))
        ctx.save_for_backward(u, v, lse, gather_idx, outer, rest_ok)
        ctx.clamp, ctx.exclusion, ctx.block, ctx.n_inner = clamp, exclusion, block, n_inner
        return lse, got

    @staticmethod
    def backward(ctx, g_lse, g_got):
        u, v, lse, gather_idx, outer, rest_ok = ctx.saved_tensors
        c, B = ctx.clamp, u.shape[0]
        rest = outer[:, ctx.n_inner:]
        du, dv = torch.empty_like(u), torch.zeros_like(v)
        for r0 in range(0, B, ctx.block):
            sl = slice(r0, r0 + ctx.block)
            s, clamped = _clamped_scores(u[sl], v, c)
            l1, l2 = lse[sl, 0:1], lse[sl, 1:2]
            g1, g2 = g_lse[sl, 0:1], g_lse[sl, 1:2]
            x_rest = s.gather(1, rest[sl])
            ds = (s - l1).exp_().mul_(g1 + g2 * (l1 - l2).exp())
            ds[_block_coords(ctx.exclusion, r0, min(r0 + ctx.block, B))] = 0
            ds.scatter_(1, outer[sl], 0)
            ds.scatter_add_(1, rest[sl], torch.where(rest_ok[sl], (x_rest - l2).exp() * g2, 0))
            ds.scatter_add_(1, gather_idx[sl], g_got[sl])
            if clamped is not None:
                ds.masked_fill_(clamped, 0)  # clamp's gradient
            du[sl] = ds @ v
            dv.addmm_(ds.T, u[sl])
        return du, dv, None, None, None, None, None, None


def _clamped_scores(u_block: Tensor, v: Tensor, c: float):
    """(clamp(u_block @ v.T, -c, c), the mask of the clamped scores or None when none is): the backward's
    block. On the CPU the mask is skipped when nothing is clamped (a check that costs a sync on a GPU)."""
    s = u_block @ v.T
    if s.device.type == "cpu":
        lo, hi = torch.aminmax(s)
        clamped = ((s < -c) | (s > c)) if (float(lo) < -c or float(hi) > c) else None
    else:
        clamped = (s < -c) | (s > c)
    if clamped is not None:
        s.clamp_(-c, c)
    return s, clamped


def complement_lse(user_vecs: Tensor, item_vecs: Tensor, clamp: float, exclusion, gather_idx: Tensor,
                   excluded: List[Tensor], block: Optional[int] = None):
    """(lse (B, len(excluded)), s at gather_idx (B, W)) of ``_ComplementLSE``; ``exclusion``: the batch's
    training items as (offsets (B + 1,), ids (nnz,)) int64 (``data.train_exclusion(users)``). ``block``
    rows at a time (default: about ``CPU_BLOCK_ELEMS`` scores on the CPU, the whole batch on a GPU)."""
    block = _block_rows(user_vecs, item_vecs, block)
    return _ComplementLSE.apply(user_vecs, item_vecs, float(clamp), exclusion, gather_idx, block, *excluded)


def complement_lse_nested(user_vecs: Tensor, item_vecs: Tensor, clamp: float, exclusion, gather_idx: Tensor,
                          outer: Tensor, n_inner: int, block: Optional[int] = None):
    """``complement_lse`` with the two lists ``[outer, outer[:, :n_inner]]`` (rows of distinct items), by
    ``_NestedComplementLSE``: the same values, with about half the passes over the scores."""
    if not 1 <= n_inner <= outer.shape[1]:
        raise ValueError(f"complement_lse_nested: n_inner must be in [1, {outer.shape[1]}], got {n_inner}")
    return _NestedComplementLSE.apply(user_vecs, item_vecs, float(clamp), exclusion, gather_idx,
                                      _block_rows(user_vecs, item_vecs, block), outer, int(n_inner))


def _block_rows(user_vecs: Tensor, item_vecs: Tensor, block: Optional[int]) -> int:
    if block is None:
        N = item_vecs.shape[0]
        block = max(1, CPU_BLOCK_ELEMS // max(N, 1)) if user_vecs.device.type == "cpu" else user_vecs.shape[0]
    return int(max(block, 1))


def hetcomp_overall_from_vectors(user_vecs, item_vecs, clamp, exclusion, targets, pos, block=None) -> Tensor:
    """``hetcomp_overall_rows`` of s = clamp(user_vecs @ item_vecs.T), computed block by block."""
    lse, x = complement_lse(user_vecs, item_vecs, clamp, exclusion, torch.cat([pos, targets], dim=1), [targets],
                            block)
    return _overall_from(x, lse[:, 0])


def hetcomp_rank_from_vectors(user_vecs, item_vecs, clamp, exclusion, targets, pos, block=None) -> Tensor:
    """``hetcomp_rank_rows`` of s = clamp(user_vecs @ item_vecs.T), computed block by block."""
    half, tenth = _prefixes(targets)
    lse, x = complement_lse_nested(user_vecs, item_vecs, clamp, exclusion, torch.cat([pos, half, tenth], dim=1),
                                   half, tenth.shape[1], block)
    x_pos, x_half, x_tenth = torch.split(x, [pos.shape[1], half.shape[1], tenth.shape[1]], dim=1)
    return _rank_from(x_pos, x_half, x_tenth, lse[:, 0], lse[:, 1])


def choose_checkpoints(kept: List[int], best_epoch: int, n: int) -> List[int]:
    """n kept epochs before the best one, spread over the training: for i = 1..n the kept epoch nearest to
    best_epoch * i / (n + 1) (ties to the earlier), all distinct; ValueError when there are not enough."""
    cand = sorted(e for e in kept if e < best_epoch)
    if len(cand) < n:
        raise ValueError(f"hetcomp needs {n} kept teacher checkpoints before its best epoch {best_epoch}, the "
                         f"teacher run has {len(cand)} ({cand}); retrain it with a smaller --keep-every "
                         f"(train.keep_every)")
    chosen: List[int] = []
    for i in range(1, n + 1):
        goal = best_epoch * i / (n + 1)
        free = [e for e in cand if e not in chosen and (not chosen or e > chosen[-1])]
        # leave enough later checkpoints for the remaining picks
        free = free[:len(free) - (n - i)] if n - i else free
        chosen.append(min(free, key=lambda e: (abs(e - goal), e)))
    return chosen


# --- the method -----------------------------------------------------------------------------------------
class HetComp(KDMethod):
    name = "hetcomp"
    defaults = dict(num_ckpt=3, K=50, p=10, alpha=1.05, alpha_decay=0.995, lam=10.0, relevance="teacher_rank",
                    pos_order="teacher", num_pos=None, clamp=40.0, reduction="sum", chunk=1024)

    choices = {"relevance": ("teacher_rank", "student_position"), "pos_order": ("teacher", "data")}

    def __init__(self, teacher, data, seed=0, **hp):
        super().__init__(teacher, data, seed, **hp)
        U = data.num_users
        self.v = torch.zeros(U, dtype=torch.long)
        self.last_dist: Optional[Tensor] = None
        self.is_first = True
        self.v_result = 0.0
        self.trajectory_epochs: List[int] = []
        if teacher is not None:
            self.attach(teacher)

    def attach(self, teacher) -> None:
        """The targets of the trajectory and the users' positives, from the teacher (and its kept checkpoints)."""
        super().attach(teacher)
        self.perms = self._trajectory_targets()
        self.pos = self._positives()

    # --- the trajectory -----------------------------------------------------------------------------
    def _teacher_dir(self) -> str:
        d = getattr(self.teacher, "run_dir", None)
        if not d:
            raise ValueError("hetcomp needs the teacher's run directory (its kept trajectory): the teacher must "
                             "be loaded from a train-teacher run (--teacher RUN_DIR)")
        return d

    @torch.no_grad()
    def _trajectory_targets(self) -> Tensor:
        """(C, U, K) int64: the top-K (training items excluded) of each chosen checkpoint, then of the
        final (best) teacher."""
        from ..models import build_model
        h, d = self.hp, self._teacher_dir()
        C = int(h["num_ckpt"])
        best_epoch = _best_epoch(d)
        kept = [e for e, _ in list_trajectory(d)]
        epochs = choose_checkpoints(kept, best_epoch, C - 1) if C > 1 else []
        paths = dict(list_trajectory(d))
        perms = []
        for e in epochs:
            snap = load_torch(paths[e], "trajectory checkpoint", ("model", "hparams", "state"))
            if snap.get("data_fingerprint") not in (None, self.data.fingerprint()):
                raise ValueError(f"{paths[e]} was trained on different data")
            model = build_model(snap["model"], self.data, **snap["hparams"])
            model.load_state_dict(snap["state"])
            model.to(self.teacher.item_vecs.device)
            with eval_mode(model):
                u, i = model.represent_all()
            perms.append(topk_from_vectors(u, i, int(h["K"]), data=self.data, chunk=int(h["chunk"])).long())
            del model
        perms.append(topk_from_vectors(self.teacher.user_vecs, self.teacher.item_vecs, int(h["K"]), data=self.data,
                                       chunk=int(h["chunk"])).long())
        self.trajectory_epochs = epochs + [best_epoch]
        return torch.stack(perms)

    @torch.no_grad()
    def _positives(self) -> Tensor:
        """(U, P) observed items per user: P = num_pos (default: the fewest training items of a user), the
        user's training items ordered by the final teacher's score (``pos_order: teacher``) or in the data's
        order (``data``, the authors' code), truncated to P."""
        tr = self.data.train
        lens = tr.lengths()
        P = int(self.hp["num_pos"] or lens.min())
        if P < 1 or P > lens.min():
            raise ValueError(f"hetcomp: num_pos must be in [1, {lens.min()}] (the fewest training items of a "
                             f"user), got {P}")
        out = np.zeros((self.data.num_users, P), dtype=np.int64)
        uv, iv = self.teacher.user_vecs.cpu(), self.teacher.item_vecs.cpu()
        for u in range(self.data.num_users):
            items = tr.items_of(u)
            if self.hp["pos_order"] == "teacher":
                sc = (iv[torch.from_numpy(items)] @ uv[u]).numpy()
                items = items[np.argsort(-sc, kind="stable")]
            out[u] = items[:P]
        return torch.from_numpy(out).to(self.teacher.item_vecs.device)

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"v": self.v.clone(), "last_dist": None if self.last_dist is None else self.last_dist.clone(),
                "is_first": self.is_first, "v_result": self.v_result}

    def load_state_dict(self, state: Dict) -> None:
        self.v = state["v"].clone()
        self.last_dist = None if state["last_dist"] is None else state["last_dist"].clone()
        self.is_first, self.v_result = bool(state["is_first"]), float(state["v_result"])

    # --- the epoch ----------------------------------------------------------------------------------------
    def _D(self, sigma: Tensor, level: Tensor) -> Tensor:
        U = sigma.shape[0]
        target = self.perms[level.to(self.perms.device), torch.arange(U, device=self.perms.device)]
        return ndcg_discrepancy(sigma, target.to(sigma.device), float(self.hp["lam"]), self.hp["relevance"]).cpu()

    @torch.no_grad()
    def dkc(self, sigma: Tensor, epoch: int) -> None:
        """One check of the dynamic knowledge construction with the student's top-K lists ``sigma`` (U, K)."""
        C = self.perms.shape[0]
        nxt = (self.v + 1).clamp_max(C - 1)
        if self.is_first:
            self.last_dist = self._D(sigma, nxt)
            self.is_first = False
        else:
            th = float(self.hp["alpha"]) * float(self.hp["alpha_decay"]) ** (epoch // int(self.hp["p"]))
            active = self.v < C - 1
            d_next = self._D(sigma, nxt)
            ratio = torch.where(d_next > 0, self.last_dist / d_next.clamp_min(1e-300),
                                torch.full_like(d_next, math.inf))
            move = active & ((ratio > th) | (ratio < 1))
            self.v = torch.where(move, self.v + 1, self.v)
            after = self._D(sigma, (self.v + 1).clamp_max(C - 1))
            self.last_dist = torch.where(move, after, self.last_dist)
        self.v_result = round(float(self.v.double().mean()), 2)

    @torch.no_grad()
    def on_epoch_start(self, student, epoch):
        super().on_epoch_start(student, epoch)
        C, p = self.perms.shape[0], int(self.hp["p"])
        if epoch % p == 0 and epoch >= p and self.v_result < C - 1:
            uv, iv = self.student_vectors(student)
            sigma = topk_from_vectors(uv, iv, int(self.hp["K"]), data=self.data, chunk=int(self.hp["chunk"])).long()
            self.dkc(sigma, epoch)
        U = self.data.num_users
        self.targets = self.perms[self.v.to(self.perms.device), torch.arange(U, device=self.perms.device)]
        self.rank_stage = self.v_result >= C - 1
        dev = self.perms.device
        self.epoch_diag = {"traj_level": torch.tensor(self.v_result, device=dev),
                           "rank_stage": torch.tensor(float(self.rank_stage), device=dev)}

    def rows(self, users, user_vecs, item_vecs, step, weights):
        # s = clamp(user_vecs @ item_vecs.T) as the authors' code (keeps exp finite), by blocks of rows
        fn = hetcomp_rank_from_vectors if self.rank_stage else hetcomp_overall_from_vectors
        return (fn(user_vecs, item_vecs, float(self.hp["clamp"]), self.data.train_exclusion(users),
                   self.targets[users], self.pos[users]),
                dict(self.epoch_diag))


def _best_epoch(run_dir: str) -> int:
    res = os.path.join(run_dir, "result.json")
    if os.path.exists(res):
        with open(res) as f:
            return int(json.load(f)["best_epoch"])
    best = os.path.join(run_dir, "best_model.pt")
    if not os.path.exists(best):
        raise FileNotFoundError(f"{best} not found: is {run_dir} a finished train-teacher run?")
    return int(load_torch(best, "weights file", ("epoch",))["epoch"])
