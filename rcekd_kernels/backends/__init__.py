"""Backend registry and the one dispatcher.

A backend (see :mod:`rcekd_kernels.backends.base`) is a module or object with
``NAME``, ``DESCRIPTION``, ``available(device_type)``, ``supports(call)`` and the
ops it implements, under the names and signatures of
:mod:`rcekd_kernels.backends.reference` (which implements them all).

Which backend runs a call: the ``backend`` argument of the API, else the
environment variable ``RCEKD_BACKEND``, else ``"auto"``:

* ``"auto"`` takes the first backend of :data:`AUTO_ORDER` for the tensors' device
  that is available there and supports the call (op, dtype, sizes);
* a named backend runs the call or raises a ``ValueError`` that says why it cannot
  and which backends could.

``RCEKD_BACKEND`` names the backend of every op that backend implements; an op it
does not implement at all (``gathered_dot`` outside ``reference`` and ``cpp``) goes
to ``auto``. The ``backend`` argument is strict for every op.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .base import OPS, Backend, Call, implements

__all__ = ["Call", "Backend", "OPS", "AUTO_ORDER", "ENV_VAR", "names", "available_backends", "describe",
           "requested", "resolve", "unsupported_reason", "get", "for_op"]

# name -> (module, attribute inside it or None, what it is)
_REGISTRY: Dict[str, Tuple[str, Optional[str], str]] = {
    "reference": ("rcekd_kernels.backends.reference", None, "pure PyTorch, CPU and CUDA"),
    "triton": ("rcekd_kernels.backends.triton", None, "fused Triton kernels, CUDA (CPU in the interpreter)"),
    "cpp": ("rcekd_kernels.backends.native", "cpp", "compiled C++ extension, CPU"),
    "cuda": ("rcekd_kernels.backends.native", "cuda", "compiled CUDA extension"),
}

AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

ENV_VAR = "RCEKD_BACKEND"

_loaded: Dict[str, Any] = {}  # Backend objects (modules or instances)
_load_errors: Dict[str, str] = {}


def names() -> Tuple[str, ...]:
    """All backend names this package knows (available or not)."""
    return tuple(_REGISTRY)


def _load(name: str) -> Optional[Any]:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    module, attr, _ = _REGISTRY[name]
    try:
        obj = importlib.import_module(module)
        if attr is not None:
            obj = getattr(obj, attr)
    except ImportError as e:  # not built / not installed
        _load_errors[name] = f"cannot be imported ({e})"
        return None
    _loaded[name] = obj
    return obj


def get(name: str) -> Any:
    """The backend object ``name`` (loaded on first use); ValueError when it cannot be loaded."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r} (known: {list(_REGISTRY)})")
    obj = _load(name)
    if obj is None:
        raise ValueError(f"backend {name!r} {_load_errors[name]}")
    return obj


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend ``name`` can run on ``device_type`` at all; else why not."""
    if name not in _REGISTRY:
        return f"unknown backend (known: {list(_REGISTRY)})"
    obj = _load(name)
    if obj is None:
        return _load_errors[name]
    return obj.available(device_type)


def unsupported_reason(name: str, call: Call) -> Optional[str]:
    """None when backend ``name`` can run ``call``; else why not (device, op, dtype, sizes)."""
    why = unavailable_reason(name, call.device_type)
    if why is not None:
        return why
    obj = _loaded[name]
    if not implements(obj, call.op):
        return f"it does not implement {call.op}"
    return obj.supports(call)


def _capable(call: Call) -> List[str]:
    return [n for n in _REGISTRY if unsupported_reason(n, call) is None]


def requested(backend: Optional[str], op: Optional[str] = None) -> str:
    """The backend name asked for: the argument, else $RCEKD_BACKEND, else ``"auto"``.

    With ``op``, a name from the environment whose backend does not implement ``op`` at
    all becomes ``"auto"`` (see the module docstring)."""
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if not env:
            return "auto"
        if env != "auto" and env not in _REGISTRY:
            raise ValueError(f"${ENV_VAR} must be 'auto' or one of {list(_REGISTRY)}, got {env!r}")
        if op is not None and env != "auto":
            obj = _load(env)
            if obj is not None and not implements(obj, op):
                return "auto"
        return env
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {list(_REGISTRY)}, got {backend!r}")
    return backend


def for_op(backend: Optional[str], op: str) -> Optional[str]:
    """For a function that runs several ops: ``backend`` for the ops it implements, ``None``
    (the default choice) for the others (e.g. ``gathered_dot`` under ``backend="triton"``)."""
    if backend is None or backend == "auto" or backend not in _REGISTRY:
        return backend
    obj = _load(backend)
    return backend if obj is None or implements(obj, op) else None


def resolve(backend: str, call: Call) -> Any:
    """The dispatcher: the backend object (a :class:`~rcekd_kernels.backends.base.Backend`, and a
    ``GatheredDotBackend`` for the gathered_dot ops) that runs ``call`` for the name ``backend``."""
    if backend == "auto":
        for name in AUTO_ORDER.get(call.device_type, ("reference",)):
            if unsupported_reason(name, call) is None:
                return _loaded[name]
        return get("reference")
    why = unsupported_reason(backend, call)
    if why is not None:
        raise ValueError(f"backend {backend!r} cannot run {call.op} on {call.device_type} {call.dtype} tensors: "
                         f"{why}. Backends that can: {_capable(call)}")
    return _loaded[backend]


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Maps every known backend to None (usable on ``device``) or the reason it is not.

    ``device`` defaults to CUDA when a GPU is present, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: unavailable_reason(name, device_type) for name in _REGISTRY}


def describe(device=None, *, op: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             config=None, N: int = 0) -> str:
    """What each backend is and whether it runs on ``device``; with ``op`` (and optionally
    ``dtype``, ``config``, ``N``), whether it runs that call, why not, and what ``auto`` picks.

    Example: ``describe("cpu", op="fused_fwd", dtype=torch.float64)``.
    """
    rows = []
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if op is None:
        for name, why in available_backends(device).items():
            rows.append(f"{name:10s} {'yes' if why is None else 'no':4s} {_REGISTRY[name][2]}"
                        + ("" if why is None else f"  [{why}]"))
        return "\n".join(rows)
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    call = Call(op, device_type, (dtype or torch.float32,), config, N)
    for name in _REGISTRY:
        why = unsupported_reason(name, call)
        rows.append(f"{name:10s} {'yes' if why is None else 'no':4s} {_REGISTRY[name][2]}"
                    + ("" if why is None else f"  [{why}]"))
    rows.append(f"auto picks: {resolve('auto', call).NAME}")
    return "\n".join(rows)
