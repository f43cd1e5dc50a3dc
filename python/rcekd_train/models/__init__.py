"""Backbones: MF (BPR), LightGCN (BPR), HSTU (next-item sampled softmax)."""
from __future__ import annotations

import inspect

from .base import Recommender, dot_all, dot_items, eval_mode
from .hstu import HSTU
from .lightgcn import LightGCN, normalized_adjacency
from .mf import MF

MODELS = {"mf": MF, "bpr": MF, "lightgcn": LightGCN, "hstu": HSTU}

__all__ = ["MF", "LightGCN", "HSTU", "Recommender", "build_model", "MODELS", "dot_all", "dot_items",
           "normalized_adjacency", "model_args", "model_hparams", "eval_mode"]


def model_args(name: str):
    """The keyword arguments a backbone accepts (its hyperparameters)."""
    cls = MODELS[name.lower()]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "data")]


def model_hparams(cfg) -> dict:
    """The backbone hyperparameters of a run config (its ``model`` section without the name)."""
    return {k: v for k, v in cfg["model"].items() if k != "name"}


def build_model(name: str, data, **hparams) -> Recommender:
    """Builds a backbone; unknown hyperparameters are an error naming them."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(set(MODELS) - {'bpr'})}")
    allowed = set(model_args(key))
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(f"model {key}: unknown hyperparameter(s) {unknown}; allowed: {sorted(allowed)}")
    return MODELS[key](data, **hparams)
