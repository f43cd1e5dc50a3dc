"""Knowledge distillation: RCE-KD (through rcekd_kernels) and the baselines, one interface."""
from __future__ import annotations

from .base import KDMethod, NoKD, gumbel_topk, mix_seed
from .baselines import CD, DCD, RRD, VanillaCE, cd_rows, ce_rows, listwise_rows
from .hetcomp import HetComp
from .rcekd import RCEKD
from .teacher import FrozenTeacher, load_topk, ranked_topk, save_topk, topk_from_vectors

METHODS = {"none": NoKD, "rcekd": RCEKD, "ce": VanillaCE, "cd": CD, "rrd": RRD, "dcd": DCD, "hetcomp": HetComp}

__all__ = ["METHODS", "build_kd", "KDMethod", "FrozenTeacher", "RCEKD", "VanillaCE", "CD", "RRD", "DCD", "HetComp",
           "NoKD", "ce_rows", "cd_rows", "listwise_rows", "topk_from_vectors", "ranked_topk", "save_topk", "load_topk",
           "gumbel_topk", "mix_seed"]


def build_kd(method: str, teacher, data, seed: int = 0, **hp) -> KDMethod:
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"unknown kd method {method!r}; choose from {list(METHODS)}")
    return METHODS[key](teacher, data, seed, **hp)
