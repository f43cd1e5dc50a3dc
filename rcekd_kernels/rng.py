"""The counter-based random numbers that fix RCE-KD's sampling.

Every backend draws the same uniform number for a given ``(seed, row_id, item)``
triple, so a seed gives the same sample on the CPU, in Triton and in CUDA.
The hash is ``lowbias32`` (a 32-bit integer finaliser) applied three times::

    k1 = lowbias32((seed mod 2**32) ^ 0x9E3779B9)
    k2 = lowbias32(k1 ^ (row_id mod 2**32))
    h  = lowbias32(k2 ^ (item mod 2**32))
    u  = ((h >> 8) + 0.5) * 2**-24          # exact in float64, strictly inside (0, 1)
    g  = -log(-log(u))                      # a standard Gumbel number, in float64

and the sampling key of a pool item with integer count c is

    key = float32(c / T + g)                # sum in float64, rounded once to float32

u and g are float64 on purpose: u has 25 significant bits (it is not exact in
float32, and rounding it to float32 can give u = 1 and g = +inf), and a float64
log makes every backend agree on the float32 key except, with a probability of
order 1e-9, where the float64 value lies on a float32 rounding boundary.

PyTorch has no unsigned 32-bit type with wrap-around multiplication, so the
tensor version keeps every value in int64 in ``[0, 2**32)`` and multiplies by
16-bit halves, which never overflows 63 bits.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B

__all__ = [
    "lowbias32_int",
    "hash_int",
    "uniform_int",
    "lowbias32",
    "row_keys",
    "uniform",
    "gumbel",
    "sampling_keys",
]


# ---------------------------------------------------------------- Python ints
def lowbias32_int(x: int) -> int:
    """lowbias32 on a Python int (taken modulo 2**32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 16
    return x


def hash_int(seed: int, row_id: int, item: int) -> int:
    """The 32-bit hash ``h`` of one (seed, row, item) triple, in exact integers."""
    k1 = lowbias32_int((seed & MASK32) ^ GOLDEN)
    k2 = lowbias32_int(k1 ^ (row_id & MASK32))
    return lowbias32_int(k2 ^ (item & MASK32))


def uniform_int(seed: int, row_id: int, item: int) -> float:
    """The uniform number ``u`` of one triple, as a Python float (exact in float64)."""
    return ((hash_int(seed, row_id, item) >> 8) + 0.5) * 2.0**-24


# -------------------------------------------------------------- torch tensors
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without overflowing int64."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor whose values lie in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL2)
    return x ^ (x >> 16)


def row_keys(seed: int, row_ids: torch.Tensor) -> torch.Tensor:
    """``k2`` for every row: int64 (B,) in [0, 2**32)."""
    k1 = lowbias32_int((int(seed) & MASK32) ^ GOLDEN)
    return lowbias32((row_ids.to(torch.int64) & MASK32) ^ k1)


def uniform(seed: int, row_ids: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """u for items (B, X) of rows row_ids (B,): float64 in (0, 1), exact."""
    k2 = row_keys(seed, row_ids).unsqueeze(-1)
    h = lowbias32(k2 ^ (items.to(torch.int64) & MASK32))
    return ((h >> 8).to(torch.float64) + 0.5) * (2.0**-24)


def gumbel(seed: int, row_ids: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """g = -log(-log(u)) in float64 for items (B, X) of rows row_ids (B,)."""
    u = uniform(seed, row_ids, items)
    return -torch.log(-torch.log(u))


def sampling_keys(counts: torch.Tensor, T: float, seed: int, row_ids: torch.Tensor,
                  items: torch.Tensor) -> torch.Tensor:
    """float32(c / T + g): the Gumbel-top-L keys of pool items (B, X) with counts c."""
    g = gumbel(seed, row_ids, items)
    return (counts.to(torch.float64) / float(T) + g).to(torch.float32)
