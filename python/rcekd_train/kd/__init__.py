"""Knowledge distillation: RCE-KD (through rcekd_kernels) and the baselines, one interface."""
from __future__ import annotations

from typing import Optional

from rcekd_kernels.spec import ranked_topk

from .base import KDMethod, NoKD, gumbel_topk, mix_seed
from .baselines import CD, DCD, RRD, VanillaCE, cd_rows, ce_rows, listwise_rows
from .hetcomp import HetComp
from .rcekd import RCEKD
from .teacher import FrozenTeacher, cache_topk, load_teacher, load_topk, save_topk, topk_from_vectors

METHODS = {"none": NoKD, "rcekd": RCEKD, "ce": VanillaCE, "cd": CD, "rrd": RRD, "dcd": DCD, "hetcomp": HetComp}

__all__ = ["METHODS", "build_kd", "kd_from_config", "kd_lambda", "kd_base_weight", "KDMethod", "load_teacher",
           "cache_topk", "FrozenTeacher", "RCEKD", "VanillaCE", "CD", "RRD", "DCD", "HetComp", "NoKD", "ce_rows",
           "cd_rows", "listwise_rows", "topk_from_vectors", "ranked_topk", "save_topk", "load_topk", "gumbel_topk",
           "mix_seed"]


def build_kd(method: str, teacher, data, seed: int = 0, **hp) -> KDMethod:
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"unknown kd method {method!r}; choose from {list(METHODS)}")
    return METHODS[key](teacher, data, seed, **hp)


def kd_lambda(cfg) -> float:
    """The weight of the KD loss of a run config (0 without distillation)."""
    return float((cfg.get("kd") or {}).get("lambda", 0.0))


def kd_base_weight(cfg) -> float:
    """The weight of the base loss of a run config (``kd.base_weight``, default 1: loss = base_weight x base +
    lambda x KD; 0 trains on the KD loss alone, as the authors' HetComp did before 2025-01-29)."""
    return float((cfg.get("kd") or {}).get("base_weight", 1.0))


def kd_from_config(cfg, data) -> Optional[KDMethod]:
    """The KD method of a run config, built once (its hyperparameters checked) and without its teacher
    (``attach`` gives it one): ``topk_needed`` says how much of the teacher's top-K cache to load. None for a
    teacher or a student from scratch."""
    kd = dict(cfg.get("kd") or {})
    method = kd.pop("method", "none")
    kd.pop("lambda", None)
    kd.pop("base_weight", None)
    if cfg["role"] != "student" or method == "none":
        return None
    return build_kd(method, None, data, int(cfg.get("seed", 0)), **kd)
