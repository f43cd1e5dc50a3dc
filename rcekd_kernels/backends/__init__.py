"""Backend registry and the one dispatcher.

A backend is a module (or namespace) with ``NAME``, ``available(device_type)``
(None when usable there, else the reason) and the five ops of
:mod:`rcekd_kernels.backends.reference`, under the same names and signatures:
``select``, ``subset_ce_fwd``, ``subset_ce_bwd``, ``fused_fwd``, ``fused_bwd``.

Selection: the ``backend`` argument of the API, else the environment variable
``RCEKD_BACKEND``, else ``"auto"``: the first available backend of
:data:`AUTO_ORDER` for the tensors' device.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional

import torch

OPS = ("select", "subset_ce_fwd", "subset_ce_bwd", "fused_fwd", "fused_bwd")

# name -> (module, attribute inside it or None, what it is)
_REGISTRY = {
    "reference": ("rcekd_kernels.backends.reference", None, "pure PyTorch, CPU and CUDA"),
    "triton": ("rcekd_kernels.backends.triton", None, "fused Triton kernels, CUDA (CPU in the interpreter)"),
    "cpp": ("rcekd_kernels.backends.native", "cpp", "compiled C++ extension, CPU"),
    "cuda": ("rcekd_kernels.backends.native", "cuda", "compiled CUDA extension"),
}

AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

ENV_VAR = "RCEKD_BACKEND"

_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}


def names():
    """All backend names this package knows (available or not)."""
    return tuple(_REGISTRY)


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    module, attr, _ = _REGISTRY[name]
    try:
        obj = importlib.import_module(module)
        if attr is not None:
            obj = getattr(obj, attr)
    except ImportError as e:  # not built / not installed / not written yet
        _load_errors[name] = f"cannot be imported ({e})"
        return None
    missing = [op for op in OPS if not hasattr(obj, op)]
    if missing:
        _load_errors[name] = f"does not implement {missing}"
        return None
    _loaded[name] = obj
    return obj


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend ``name`` runs on ``device_type``; else why not."""
    if name not in _REGISTRY:
        return f"unknown backend (known: {list(_REGISTRY)})"
    obj = _load(name)
    if obj is None:
        return _load_errors[name]
    return obj.available(device_type)


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Maps every known backend to None (usable on ``device``) or the reason it is not.

    ``device`` defaults to CUDA when a GPU is present, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: unavailable_reason(name, device_type) for name in _REGISTRY}


def describe(device=None) -> str:
    """A table of the backends, what they are and whether they run on ``device``."""
    rows = []
    for name, why in available_backends(device).items():
        rows.append(f"{name:10s} {'yes' if why is None else 'no':4s} {_REGISTRY[name][2]}"
                    + ("" if why is None else f"  [{why}]"))
    return "\n".join(rows)


def requested(backend: Optional[str]) -> str:
    """The backend name asked for: the argument, else $RCEKD_BACKEND, else 'auto'."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "") or "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {list(_REGISTRY)}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device):
    """The dispatcher: the backend object that runs ``backend`` on ``device``."""
    device_type = torch.device(device).type
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if unavailable_reason(name, device_type) is None:
                return _loaded[name]
        return _load("reference")
    why = unavailable_reason(backend, device_type)
    if why is not None:
        ok = [n for n in _REGISTRY if unavailable_reason(n, device_type) is None]
        raise ValueError(f"backend {backend!r} is not available on {device_type}: {why}. "
                         f"Available there: {ok}")
    return _loaded[backend]
