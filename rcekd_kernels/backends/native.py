"""The compiled backends "cpp" (CPU) and "cuda": wrappers of the ops ``torch.ops.rcekd_C.*``.

The ops live in the extension module ``rcekd_kernels._C`` (sources in ``csrc/``,
built by ``setup.py`` or ``CMakeLists.txt``). Importing this module never fails:

* no extension file (a pure-Python install, ``RCEKD_NO_EXTENSION=1``): both
  backends report "not built", silently;
* the file exists but cannot be loaded (built against another torch, a missing
  library, ...): ONE warning says why, and both backends report it.

:data:`cpp` and :data:`cuda` are backends (:mod:`rcekd_kernels.backends.base`): ``NAME``,
``available(device_type)``, ``supports(call)`` and the loss ops of
:mod:`rcekd_kernels.backends.reference`, same signatures (``cpp`` also ``gathered_dot``,
``topm_dot`` and ``layer_mean``).
:func:`build_info` says what was built.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from typing import Any, Dict, Optional

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
    out: Dict[str, Any] = {"loaded": True}
    out.update(_info)
    spec = importlib.util.find_spec(EXTENSION)
    out["path"] = spec.origin if spec is not None else None
    out["torch_runtime"] = torch.__version__
    return out


#: score dtypes the compiled loss kernels read (arithmetic in float32, float64 for float64)
LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes of the vectors of the CPU gathered_dot kernel
GATHERED_DTYPES = (torch.float32, torch.float64)
#: largest catalogue the compiled kernels index (item ids fit a 32-bit field of their keys)
MAX_N = (1 << 31) - 1


class _Native:
    """The compiled backend of one device type: wrappers of ``torch.ops.rcekd_C.*``."""

    def __init__(self, name: str, device_type: str, description: str):
        self.NAME = name
        self.DESCRIPTION = description
        self.device_type = device_type
        if device_type == "cpu":  # from vectors (gathered scores, top-M): CPU kernels only
            self.gathered_dot = self._gathered_dot
            self.gathered_dot_bwd = self._gathered_dot_bwd
            self.topm_dot = self._topm_dot
            self.layer_mean = self._layer_mean

    def available(self, dev: str) -> Optional[str]:
        if _ops is None:
            return _load_error
        if dev != self.device_type:
            return f"the {self.NAME!r} backend runs on {self.device_type} tensors only, not {dev}"
        if self.device_type == "cuda":
            if not (_info or {}).get("cuda", False):
                return "the compiled extension was built without CUDA (no nvcc or a CPU-only torch at build time)"
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None

    def supports(self, call) -> Optional[str]:
        if call.op == "topm_dot":
            if not hasattr(_ops, "topm_dot"):
                return "the compiled extension has no topm_dot (rebuild it)"
            return None  # float16 / bfloat16 vectors are widened to float32 first
        if call.op == "layer_mean":
            if not hasattr(_ops, "csr_layer_mean"):
                return "the compiled extension has no csr_layer_mean (rebuild it)"
            if call.dtypes != (torch.float32,):
                return f"its layer_mean reads float32 vectors, got {list(call.dtypes)}"
            return None
        if call.op.startswith("gathered_dot"):
            if not hasattr(_ops, "gathered_dot"):
                return "the compiled extension has no gathered_dot (rebuild it)"
            if any(d not in GATHERED_DTYPES for d in call.dtypes) or len(set(call.dtypes)) > 1:
                return f"its gathered_dot reads float32 or float64 vectors of one dtype, got {list(call.dtypes)}"
            return None
        bad = [d for d in call.dtypes if d not in LOSS_DTYPES]
        if bad:
            return f"it reads float16, bfloat16, float32 and float64 scores, got {bad[0]}"
        if call.N > MAX_N:
            return f"it indexes at most {MAX_N} items per row, got N = {call.N}"
        return None

    # the five loss ops: tensors + the flattened configuration (ops.HPARAMS order) + the seed
    def select(self, s, t, teacher_topk, exclude, row_ids, cfg, seed):
        return tuple(_lib().select(s, t, teacher_topk, exclude, row_ids, *_flatten(cfg), int(seed) & 0xFFFFFFFF))

    def subset_ce_fwd(self, s_g, t_g, q2_mask, gamma, cfg):
        return tuple(_lib().subset_ce_fwd(s_g, t_g, q2_mask, gamma, *_flatten(cfg), 0))

    def subset_ce_bwd(self, grad_rows, s_g, t_g, q2_mask, gamma, cfg):
        return _lib().subset_ce_bwd(grad_rows, s_g, t_g, q2_mask, gamma, *_flatten(cfg), 0)

    def fused_fwd(self, s, t, teacher_topk, exclude, row_ids, cfg, seed):
        return tuple(_lib().fused_fwd(s, t, teacher_topk, exclude, row_ids, *_flatten(cfg), int(seed) & 0xFFFFFFFF))

    def fused_bwd(self, grad_rows, s, t, idx, q2_mask, gamma, cfg):
        return _lib().fused_bwd(grad_rows, s, t, idx, q2_mask, gamma, *_flatten(cfg), 0)

    def _topm_dot(self, u, v, M, exclude_offsets=None, exclude_ids=None, item_offset=0, *, block_users: int = 0,
                  tile_items: int = 0):
        """``torch.ops.rcekd_C.topm_dot`` (csrc/cpu/topm_cpu.cpp): float32 / float64; float16 and
        bfloat16 vectors are widened to float32 (the compute dtype) first. ``block_users`` /
        ``tile_items`` (0: 128 users, 512 float32 / 256 float64 items) set the blocking; the result
        does not depend on them."""
        if u.dtype in (torch.float16, torch.bfloat16):
            u, v = u.float(), v.float()
        ids, scores = _lib().topm_dot(u, v, int(M), exclude_offsets, exclude_ids, int(item_offset),
                                      int(block_users), int(tile_items))
        return ids, scores

    def _layer_mean(self, adj, parts, layers, backward=False):
        """``torch.ops.rcekd_C.csr_layer_mean`` (csrc/cpu/graph_cpu.cpp) on the CSR form of ``adj``."""
        if adj.layout != torch.sparse_csr:
            adj = adj.to_sparse_csr()
        return list(_lib().csr_layer_mean(adj.crow_indices(), adj.col_indices(), adj.values(), list(parts),
                                          int(layers), bool(backward)))

    def _gathered_dot(self, u, v, idx):
        return _lib().gathered_dot(u, v, idx)

    def _gathered_dot_bwd(self, g, u, v, idx):
        return tuple(_lib().gathered_dot_bwd(g, u, v, idx))


def _lib() -> Any:
    """``torch.ops.rcekd_C`` (a backend method runs only once available() said it is loaded)."""
    if _ops is None:
        raise RuntimeError(f"the compiled extension is not loaded: {_load_error}")
    return _ops


def _flatten(cfg):
    from ..ops import flatten  # the one table of the schemas (ops imports the registry, not this module)
    return flatten(cfg)


cpp = _Native("cpp", "cpu", "compiled C++ extension, CPU")
cuda = _Native("cuda", "cuda", "compiled CUDA extension")
