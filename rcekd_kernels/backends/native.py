"""The compiled backends "cpp" (CPU) and "cuda": wrappers of the ops ``torch.ops.rcekd_C.*``.

The ops live in the extension module ``rcekd_kernels._C`` (sources in ``csrc/``,
built by ``setup.py`` or ``CMakeLists.txt``). Importing this module never fails:

* no extension file (a pure-Python install, ``RCEKD_NO_EXTENSION=1``): both
  backends report "not built", silently;
* the file exists but cannot be loaded (built against another torch, a missing
  library, ...): ONE warning says why, and both backends report it.

:data:`cpp` and :data:`cuda` are namespaces with ``NAME``, ``available(device_type)``
and the five ops of :mod:`rcekd_kernels.backends.reference`, same signatures.
:func:`build_info` says what was built.
"""
from __future__ import annotations

import importlib
import os
import importlib.util
import json
import types
import warnings
from typing import Optional

import torch

__all__ = ["cpp", "cuda", "build_info", "load_error", "EXTENSION"]

EXTENSION = "rcekd_kernels._C"

_ops = None  # torch.ops.rcekd_C once loaded
_load_error: Optional[str] = None  # why the ops are not there
_info: Optional[dict] = None


DISABLE_VAR = "RCEKD_DISABLE_EXTENSION"


def _load() -> None:
    global _ops, _load_error, _info
    if os.environ.get(DISABLE_VAR) == "1":
        _load_error = f"the compiled extension is disabled ({DISABLE_VAR}=1)"
        return
    try:
        spec = importlib.util.find_spec(EXTENSION)
    except Exception as e:  # a broken package layout
        spec, _load_error = None, f"cannot look for {EXTENSION} ({type(e).__name__}: {e})"
        return
    if spec is None:
        _load_error = (f"the compiled extension {EXTENSION} is not built (pure-Python install; "
                       f"reinstall with a C++ compiler: pip install --no-build-isolation -e .)")
        return
    try:
        importlib.import_module(EXTENSION)
        ops = torch.ops.rcekd_C
        _info = json.loads(ops.build_info())
        _ops = ops
    except Exception as e:  # noqa: BLE001 - any loader / ABI error must not break the import
        _load_error = (f"the compiled extension {spec.origin} exists but failed to load "
                       f"({type(e).__name__}: {e}); rebuild it against the installed torch "
                       f"{torch.__version__}: pip install --no-build-isolation -e .")
        warnings.warn(f"rcekd_kernels: {_load_error}. The 'cpp' and 'cuda' backends are unavailable; "
                      f"the reference (and Triton) backends still work.", RuntimeWarning, stacklevel=2)


_load()


def load_error() -> Optional[str]:
    """None when the extension is loaded; else why it is not."""
    return _load_error


def ops():
    """``torch.ops.rcekd_C`` when the extension is loaded, else None."""
    return _ops


def build_info() -> dict:
    """What the compiled extension was built with.

    Keys: ``loaded`` (bool), ``error`` (why not, when not loaded), and when loaded
    ``cpu``, ``cuda`` (bools), ``cuda_archs`` (list of SM numbers), ``cuda_runtime``,
    ``nvcc``, ``compiler``, ``openmp``, ``torch`` (the torch it was compiled against),
    ``path`` (the library file), ``torch_runtime`` (the torch running now).
    """
    if _info is None:
        return {"loaded": False, "error": _load_error, "cpu": False, "cuda": False,
                "torch_runtime": torch.__version__}
    out = {"loaded": True}
    out.update(_info)
    spec = importlib.util.find_spec(EXTENSION)
    out["path"] = spec.origin if spec is not None else None
    out["torch_runtime"] = torch.__version__
    return out


def _make(name: str, device_type: str, describe: str) -> types.SimpleNamespace:
    def available(dev: str) -> Optional[str]:
        if _ops is None:
            return _load_error
        if dev != device_type:
            return f"the {name!r} backend runs on {device_type} tensors only, not {dev}"
        if device_type == "cuda":
            if not _info.get("cuda", False):
                return "the compiled extension was built without CUDA (no nvcc or a CPU-only torch at build time)"
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None

    def select(s, t, teacher_topk, exclude, row_ids, K, M, L, T, mode, seed):
        return tuple(_ops.select(s, t, teacher_topk, exclude, row_ids, K, M, L, float(T), mode, int(seed) & 0xFFFFFFFF))

    def subset_ce_fwd(s_g, t_g, q2_mask, gamma, K, L, tau):
        return tuple(_ops.subset_ce_fwd(s_g, t_g, q2_mask, gamma, K, L, float(tau)))

    def subset_ce_bwd(grad_rows, s_g, t_g, q2_mask, gamma, K, L, tau):
        return _ops.subset_ce_bwd(grad_rows, s_g, t_g, q2_mask, gamma, K, L, float(tau))

    def fused_fwd(s, t, teacher_topk, exclude, row_ids, K, M, L, tau, T, beta, mode, seed):
        return tuple(_ops.fused_fwd(s, t, teacher_topk, exclude, row_ids, K, M, L, float(tau), float(T),
                                    float(beta), mode, int(seed) & 0xFFFFFFFF))

    def fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, K, L, tau):
        return _ops.fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, K, L, float(tau))

    ns = types.SimpleNamespace(NAME=name, DESCRIPTION=describe, available=available, select=select,
                               subset_ce_fwd=subset_ce_fwd, subset_ce_bwd=subset_ce_bwd,
                               fused_fwd=fused_fwd, fused_bwd=fused_bwd)
    return ns


cpp = _make("cpp", "cpu", "compiled C++ extension, CPU")
cuda = _make("cuda", "cuda", "compiled CUDA extension")
