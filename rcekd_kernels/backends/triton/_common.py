"""Shared pieces of the Triton backend: jit helpers and launcher utilities.

Jit helpers (used by the kernels of ``selection.py``, ``subset_ce.py`` and ``fused.py``):

``lowbias32``   the spec's 32-bit integer finaliser, on uint32 tensors (wrap-around products)
``gumbel``      g = -log(-log(u)) of the counter-based uniform u(seed, row, item)
                (``gumbel_from_hash``: the same from the 32-bit hash)
``ord_key``     float32 -> uint32 image that preserves order (-0.0 and +0.0 map alike)
``composite``   (uint32 image, item id) -> uint64 key: larger key = earlier in ranking
                order (larger score, ties to the smaller item id); unique per item
``kth_prefix``  bisection over the bits: the R-th largest value, or an earlier prefix
                that already has exactly R values at or above it
``kth_radix``   radix selection (8-bit digits, one histogram each): the R-th largest value
``take_top``    the R largest of a block (ties at the threshold taken in lane order)
``key_item``    the item id stored in a composite key

Launcher utilities: the row-split chunk size knob (:data:`CHUNK`, env
``RCEKD_TRITON_CHUNK``), the threshold search (:func:`select_algo`, env ``RCEKD_TRITON_SELECT``), block sizes, and
:func:`rng_values` (the kernels' hash and Gumbel numbers, for tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ... import spec

# ----------------------------------------------------------------------------- knobs
#: Items of one row handled by one program of the selection's first phase. A row
#: longer than this is split over several programs whose top-R candidates are then
#: merged by the same kernel. Power of two; raised to 4 * block(R) for a top-R search.
#: Read at every launch, so tests may change it (or set ``RCEKD_TRITON_CHUNK``).
CHUNK = int(os.environ.get("RCEKD_TRITON_CHUNK", "4096"))

#: Largest K and M (and so L) the kernels accept: the pool lives in one program.
from . import MAX_KM  # noqa: E402,F401  (defined where supports() reads it)

#: Smallest block (lanes) of the per-row kernels: fewer variants to compile.
MIN_BLOCK = 16

MASK32 = 0xFFFFFFFF

#: the cap of the official counts, for the kernels (rcekd_kernels.spec.OFFICIAL_CAP)
OFFICIAL_CAP = tl.constexpr(spec.OFFICIAL_CAP)


def interpreting() -> bool:
    """True when triton.jit builds interpreted kernels (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(ord_key, InterpretedFunction)


#: How the selection's first phase finds a chunk's R-th largest score: ``bisect`` (one
#: block-wide count per bit, up to 32) or ``radix`` (one 256-bin histogram per 8-bit digit,
#: at most 4). Read at every launch (env ``RCEKD_TRITON_SELECT``), so benchmarks can compare.
SELECT_ALGOS = ("bisect", "radix")


def select_algo() -> str:
    algo = os.environ.get("RCEKD_TRITON_SELECT", "bisect").strip().lower() or "bisect"
    if algo not in SELECT_ALGOS:
        raise ValueError(f"RCEKD_TRITON_SELECT must be one of {SELECT_ALGOS}, got {algo!r}")
    return algo


def chunk_size(R: int) -> int:
    """Power-of-two chunk for a top-R search: the knob, at least 4 * block(R)."""
    ch = max(int(os.environ.get("RCEKD_TRITON_CHUNK", "0")) or CHUNK, 16)
    return max(triton.next_power_of_2(ch), 4 * block(R))


def block(n: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(int(n)))


# Low bits of the float32 image that are constant for a dtype (bfloat16: 16 mantissa
# bits, float16: 13), so the bisection of the threshold can skip them.
_LOW_BITS = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}


def low_bits(dtype: torch.dtype) -> int:
    return _LOW_BITS[dtype]


_DUMMY: dict = {}


def dummy_u8(device) -> torch.Tensor:
    """A one-byte uint8 tensor standing for an absent mask (same kernel signature)."""
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros((1, 1), dtype=torch.uint8, device=device)
    return _DUMMY[key]


def as_u8(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 (same storage and strides)."""
    return mask.view(torch.uint8)


def warps_for(block_elems: int) -> int:
    if block_elems >= 4096:
        return 8
    if block_elems >= 1024:
        return 4
    return 2


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def lowbias32(x):
    """lowbias32 on a uint32 tensor (products wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def gumbel_from_hash(h):
    """g = -log(-log(u)) in float64, u = ((h >> 8) + 0.5) * 2**-24 exact in float64, for
    uint32 hashes h (see rcekd_kernels.rng: float64 so that every backend agrees)."""
    u = ((h >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08
    return -tl.log(-tl.log(u))


@triton.jit
def gumbel(k2, item):
    """The float64 Gumbel number of int64 items for the row key k2 (uint32)."""
    return gumbel_from_hash(lowbias32(k2 ^ item.to(tl.uint32)))


@triton.jit
def sampling_key(c, T_hi, T_lo, g):
    """float32(c / T + g) with the sum in float64; T = T_hi + T_lo (two float32 halves,
    since Triton passes Python floats as float32)."""
    T = (tl.zeros_like(g) + T_hi) + T_lo  # float64 (scalars may be Python floats in the interpreter)
    return (c.to(tl.float64) / T + g).to(tl.float32)


def split_f64(x: float):
    """x as two float32 numbers hi + lo (hi = float32(x), lo = float32(x - hi))."""
    import numpy as np

    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@triton.jit
def load_f32(ptrs, mask):
    """Scores at ``ptrs`` as float32 (0 where ``mask`` is false). bfloat16 is widened through its
    bits, exactly as the hardware does: Triton's interpreter flushes bfloat16 subnormals when it
    converts them, and subnormal scores must rank as in the reference everywhere."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        b = tl.load(ptrs.to(tl.pointer_type(tl.int16)), mask=mask, other=0)
        return (b.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def ord_key(x):
    """Order-preserving uint32 image of float32 x; -0.0 is mapped as +0.0. Bit operations only:
    a float comparison would flush subnormal scores to zero where the GPU flushes denormals."""
    b = x.to(tl.uint32, bitcast=True)
    b = tl.where(b == 0x80000000, 0, b)
    neg = (b >> 31) != 0
    return tl.where(neg, tl.full((), 0xFFFFFFFF, tl.uint32) - b, b | 0x80000000)


@triton.jit
def composite(hi, item):
    """uint64 key (hi << 32) | (2**32 - 1 - item): larger = earlier in ranking order."""
    lo = (4294967295 - item.to(tl.int64)).to(tl.uint64)
    return (hi.to(tl.uint64) << 32) | lo


@triton.jit
def key_item(key):
    """The int64 item id of a composite key."""
    return 4294967295 - key.to(tl.uint32).to(tl.int64)


@triton.jit
def key_hi(key):
    return (key >> 32).to(tl.uint32)


@triton.jit
def kth_prefix(hs, R, NBITS: tl.constexpr):
    """Bisection over the bits of the uint32 tensor hs (values < 2**NBITS, hs.numel >= R):
    a threshold v with #{hs >= v} >= R that is either the R-th largest value of hs or
    has #{hs >= v} == R exactly (the search stops early once R lanes are isolated)."""
    one = tl.full((), 1, tl.uint32)
    prefix = tl.zeros((), tl.uint32)
    bit = one << (NBITS - 1)
    n_ge = tl.sum(tl.full(hs.shape, 1, tl.int32), 0)  # #{hs >= prefix}
    while (bit != 0) & (n_ge != R):
        cand = prefix | bit
        cnt = tl.sum((hs >= cand).to(tl.int32), 0)
        up = cnt >= R
        prefix = tl.where(up, cand, prefix)
        n_ge = tl.where(up, cnt, n_ge)
        bit = bit >> 1
    return prefix


@triton.jit
def kth_radix(hs, R, NBITS: tl.constexpr):
    """The R-th largest value of the uint32 tensor hs (values < 2**NBITS, hs.numel >= R) by
    radix selection: 8-bit digits from the top, one 256-bin histogram of the lanes that still
    match the prefix per digit (4 passes for float32, 2 for bfloat16, 3 for float16)."""
    NPASS: tl.constexpr = (NBITS + 7) // 8
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), tl.uint32)
    need = tl.zeros((), tl.int32) + R  # lanes still to take from those matching the prefix
    for p in tl.static_range(NPASS):
        shift = (NPASS - 1 - p) * 8  # a compile-time value in each unrolled pass
        digit = ((hs >> shift) & 0xFF).to(tl.int32)
        if p == 0:
            hist = tl.histogram(digit, 256)
        else:
            active = (hs >> (shift + 8)) == (prefix >> (shift + 8))
            hist = tl.histogram(digit, 256, mask=active)
        # ge[d] = number of matching lanes whose digit is >= d; the digit of the R-th largest is
        # the largest d with ge[d] >= need
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        d = tl.max(tl.where(ge >= need, bins, 0), 0)
        need = need - tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = prefix | (d.to(tl.uint32) << shift)
    return prefix


@triton.jit
def take_top(hs, R, NBITS: tl.constexpr, RADIX: tl.constexpr = False):
    """Mask of the R largest lanes of hs; ties at the threshold go to the lower lanes.
    The threshold by radix selection (RADIX) or bisection over the bits (when that search
    stopped early, every lane >= thr is taken: need = #{hs == thr})."""
    if RADIX:
        thr = kth_radix(hs, R, NBITS)
    else:
        thr = kth_prefix(hs, R, NBITS)
    above = hs > thr
    at = hs == thr
    need = R - tl.sum(above.to(tl.int32), 0)
    return above | (at & (tl.cumsum(at.to(tl.int32), 0) <= need))


@triton.jit
def _rng_kernel(k2_ptr, x_ptr, h_ptr, g_ptr, n, HASH: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0)
    if HASH:
        k2 = tl.load(k2_ptr + offs, mask=m, other=0).to(tl.uint32)
        h = lowbias32(k2 ^ x.to(tl.uint32))
    else:
        h = x.to(tl.uint32)
    tl.store(h_ptr + offs, h.to(tl.int64), mask=m)
    tl.store(g_ptr + offs, gumbel_from_hash(h), mask=m)


def rng_values(k2: torch.Tensor, x: torch.Tensor, hash: bool = True):
    """(h, g) as the kernels compute them, for testing: with ``hash``, h = lowbias32(k2 ^ x)
    (k2 = row keys from :func:`rcekd_kernels.rng.row_keys`, x = item ids), else h = x.
    Flat int64 tensors in, (int64 h, float64 g) out."""
    x = x.reshape(-1).to(torch.int64).contiguous()
    k2 = k2.reshape(-1).to(torch.int64).expand(x.shape[0]).contiguous()
    h = torch.empty_like(x)
    g = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    BLOCK = 1024
    _rng_kernel[(triton.cdiv(x.shape[0], BLOCK),)](k2, x, h, g, x.shape[0], HASH=hash, BLOCK=BLOCK)
    return h, g
