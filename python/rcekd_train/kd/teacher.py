"""A trained teacher, frozen: its vectors and its cached top-K lists.

A teacher is trained once (``rcekd train-teacher``); its best weights are saved and
its top-K items per user are computed in chunks of users and cached to a file
(``teacher_topk.pt``, int32 (users, K)). For distillation the teacher's user and
item vectors are computed once (all backbones score by a dot product) and the
model itself is dropped; teacher scores are then computed only where needed:
at given items (B, X) (``score_items``). No users x items teacher matrix is ever
kept, and no (B, N) teacher rows are computed in training.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from rcekd_kernels import topm_dot  # the spec's ranking order (ties to the smaller id), tile by tile

from .. import config as C
from ..files import load_torch, save_torch
from ..models import build_model, model_hparams
from ..models.base import dot_items, eval_mode

Tensor = torch.Tensor


@torch.no_grad()
def topk_from_vectors(user_vecs: Tensor, item_vecs: Tensor, K: int, data=None, chunk: int = 1024) -> Tensor:
    """Top-K item ids (users, K) int32 in ranking order (ties to the smaller id), by ``rcekd_kernels.topm_dot``
    on chunks of users (the scores are never written out). With ``data`` the users' training items are
    excluded (a user with fewer than K other items ends with id -1)."""
    K = min(K, item_vecs.shape[0])
    out = []
    for s in range(0, user_vecs.shape[0], chunk):
        users = torch.arange(s, min(s + chunk, user_vecs.shape[0]), device=user_vecs.device)
        exclude = data.train_exclusion(users) if data is not None else None
        out.append(topm_dot(user_vecs[users], item_vecs, K, exclude=exclude)[0])
    if not out:  # no user (a process without a chunk of users)
        return torch.empty((0, K), dtype=torch.int32, device=user_vecs.device)
    return torch.cat(out).to(torch.int32)


TRAJECTORY_DIR = "trajectory"


def trajectory_path(run_dir: str, epoch: int) -> str:
    """Where a run keeps its weights after ``epoch`` (1-based; ``train.keep_every`` / ``keep_epochs``)."""
    return os.path.join(run_dir, TRAJECTORY_DIR, f"epoch_{int(epoch):04d}.pt")


def list_trajectory(run_dir: str):
    """The kept epochs of a run and their files, ascending: [(epoch, path)]."""
    d = os.path.join(run_dir, TRAJECTORY_DIR)
    if not os.path.isdir(d):
        return []
    out = []
    for f in os.listdir(d):
        if f.startswith("epoch_") and f.endswith(".pt"):
            try:
                out.append((int(f[6:-3]), os.path.join(d, f)))
            except ValueError:
                continue
    return sorted(out)


def save_topk(path: str, topk: Tensor, meta: dict) -> None:
    save_torch({"topk": topk.to(torch.int32).cpu(), "meta": dict(meta)}, path)


def load_topk(path: str):
    obj = load_torch(path, "top-K cache", ("topk",))
    return obj["topk"], obj.get("meta", {})


class FrozenTeacher:
    """Teacher vectors (no gradient) and the cached top-K lists."""

    def __init__(self, user_vecs: Tensor, item_vecs: Tensor, topk: Optional[Tensor] = None, chunk: int = 256):
        self.user_vecs = user_vecs.detach()
        self.item_vecs = item_vecs.detach()
        self.topk_cache = topk
        self.chunk = chunk
        self.run_dir: Optional[str] = None  # the train-teacher run it was loaded from (load_teacher)
        self.num_users, self.num_items = user_vecs.shape[0], item_vecs.shape[0]

    @classmethod
    def from_model(cls, model, topk: Optional[Tensor] = None) -> "FrozenTeacher":
        with eval_mode(model):
            u, i = model.represent_all()
        return cls(u, i, topk)

    def to(self, device) -> "FrozenTeacher":
        topk = self.topk_cache.to(device) if self.topk_cache is not None else None
        out = FrozenTeacher(self.user_vecs.to(device), self.item_vecs.to(device), topk, self.chunk)
        out.run_dir = self.run_dir
        return out

    def topk(self, users: Tensor, K: int) -> Tensor:
        """The teacher's top-K (B, K) int64 of the given users, from the cache."""
        if self.topk_cache is None or self.topk_cache.shape[1] < K:
            have = 0 if self.topk_cache is None else self.topk_cache.shape[1]
            raise ValueError(f"the teacher's top-K cache holds {have} items per user, {K} are needed; "
                             f"recompute it with a larger teacher.topk_cache")
        return self.topk_cache[users, :K].long()

    @torch.no_grad()
    def score_items(self, users: Tensor, items: Tensor) -> Tensor:
        """Teacher scores (B, X) at items (B, X), in chunks of users (bounded memory)."""
        out = torch.empty(items.shape, dtype=self.item_vecs.dtype, device=items.device)
        for s in range(0, len(users), self.chunk):
            out[s:s + self.chunk] = dot_items(self.user_vecs[users[s:s + self.chunk]], self.item_vecs,
                                              items[s:s + self.chunk])
        return out

    @torch.no_grad()
    def score_rows(self, users: Tensor) -> Tensor:
        """Full teacher rows (B, N) of one batch (callers pass distinct users; no ``torch.unique`` here,
        which would make the host wait for the device)."""
        return self.user_vecs[users] @ self.item_vecs.T


TOPK_FILE = "teacher_topk.pt"


def cache_topk(model, data, K: int, run_dir: str, par=None, chunk: int = 1024) -> Tensor:
    """Computes a trained teacher's top-K items per user (training items not excluded) and caches them in
    ``run_dir/teacher_topk.pt``; returns them (users, K) int32. With ``par`` (several processes) each process
    ranks the users of its run of ``chunk``-user chunks (the chunks of one process, so the same scores), rank 0
    gathers and writes them: the whole lists on rank 0, this process's rows on the others."""
    from ..parallel import SINGLE, spans
    par = par or SINGLE
    with eval_mode(model):
        u, i = model.represent_all()
    if not par.distributed:
        topk = topk_from_vectors(u, i, K, chunk=chunk)
    else:
        n = u.shape[0]
        users = [(min(a * chunk, n), min(b * chunk, n)) for a, b in spans(-(-n // chunk), par.world)]
        lo, hi = users[par.rank]
        part = topk_from_vectors(u[lo:hi], i, K, chunk=chunk)
        topk = par.gather_rows(part, [b - a for a, b in users])
        if topk is None:
            topk = part
    path = os.path.join(run_dir, TOPK_FILE)
    par.on_writer(lambda: save_topk(path, topk, {"K": topk.shape[1], "exclude_train": False,
                                                 "data_fingerprint": data.fingerprint()}), f"writing {path}")
    return topk


def load_teacher(teacher_dir: str, data, device="cpu", need_topk: int = 0) -> Tuple[FrozenTeacher, Dict]:
    """Loads a trained teacher run directory as a frozen teacher (vectors + cached top-K, at least
    ``need_topk`` items per user: recomputed from the vectors when the cache holds fewer) and its config."""
    cfg_path = os.path.join(teacher_dir, "config.yaml")
    model_path = os.path.join(teacher_dir, "best_model.pt")
    for p in (cfg_path, model_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: is {teacher_dir} a finished `rcekd train-teacher` run?")
    tcfg = C.load_yaml(cfg_path)
    saved = load_torch(model_path, "weights file", ("state",))
    if saved.get("data_fingerprint") not in (None, data.fingerprint()):
        raise ValueError(f"the teacher in {teacher_dir} was trained on different data "
                         f"({saved.get('data_fingerprint')} != {data.fingerprint()})")
    model = build_model(tcfg["model"]["name"], data, **model_hparams(tcfg))
    model.load_state_dict(saved["state"])
    model.to(device)
    topk = None
    topk_path = os.path.join(teacher_dir, TOPK_FILE)
    teacher = FrozenTeacher.from_model(model)
    teacher.run_dir = teacher_dir  # HetComp reads the teacher's kept trajectory there
    if os.path.exists(topk_path):
        topk, meta = load_topk(topk_path)
        if meta.get("exclude_train"):
            raise ValueError(f"{topk_path} excludes training items; the KD methods expect the plain top-K")
    if topk is None or topk.shape[1] < min(need_topk, data.num_items):
        topk = topk_from_vectors(teacher.user_vecs, teacher.item_vecs, max(need_topk, 1))
    teacher.topk_cache = topk.to(device)
    del model
    return teacher, tcfg
