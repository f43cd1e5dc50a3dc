"""RCE-KD with the item catalogue sharded by rows across the processes of a group.

When the item table no longer fits one device it is split by rows (as TorchRec's row-wise
sharding does): process ``r`` of a ``torch.distributed`` group holds a contiguous range of
the items, ``[item_offset_r, item_offset_r + N_local_r)`` -- its item vectors, or its columns
of the score rows -- and **every process holds the same users** (the same B rows). This
module computes, on every process, exactly what the single-process API computes on the whole
catalogue:

* :func:`sharded_select` (dense score columns) and :func:`sharded_select_embeddings` (user
  vectors against the shard's item vectors): each process ranks its own items (the first M
  in the spec's order, and the teacher's first K when ``teacher_topk`` is not given) with
  global item ids; one ``all_gather`` brings every process the P candidate lists (B x M per
  process, never B x N); the merge under the spec's order (score descending, global id
  ascending, excluded items last) gives the same pool and QT as a single process, and
  :func:`rcekd_kernels.select_from_pool` the same sets and the same sample (the
  counter-based RNG keys on global ids): the same :class:`~rcekd_kernels.Selection` on
  every process.
* :func:`sharded_loss_gathered` (scores from callables), :func:`sharded_rce_kd_loss` (dense
  shards, sets refreshed per batch) and :func:`sharded_loss_embeddings` (vectors): the scores
  of the 2K + L selected items are assembled from their owners -- each process fills the
  columns it owns, zeros elsewhere, and one sum all-reduce gives every process the full
  (B, 2K + L) scores, bit for bit the owners' values (as vocabulary-parallel cross-entropy
  does) -- then :func:`rcekd_kernels.rce_kd_loss_gathered`. In the backward each process
  keeps the gradient of its own columns only, so every item's gradient reaches it on its
  owner and nowhere else.

Collectives are those of ``torch.distributed`` (``gloo`` on CPU tensors, ``nccl`` on CUDA
tensors; a ``gloo`` group given CUDA tensors stages them through the CPU). Every argument
check that could fail on one process only is turned into one agreed outcome (a small
``all_gather`` of a status word), so a bad argument raises on every process of the group,
naming the argument and the rank, instead of leaving the others waiting in a collective.
The communication of each call can be recorded in a :class:`CommLog`
(``docs/DISTRIBUTED.md`` derives it as a function of B, M, K, L, P and N).

Example (``torchrun --nproc-per-node 2 train.py``)::

    dist.init_process_group("nccl")                     # or "gloo" on CPUs
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    layout = shard_layout(item_vecs_shard.shape[0], device="cuda")   # offsets of the shards, once
    with torch.no_grad():                               # per epoch / per refresh
        sel = sharded_select_embeddings(user_vecs, item_vecs_shard, t_user_vecs, t_item_vecs_shard,
                                        item_offset=layout.offset, K=50, M=200, L=50, seed=epoch,
                                        row_ids=users)
    kd = sharded_loss_embeddings(user_vecs, item_vecs_shard, t_user_vecs, t_item_vecs_shard, sel,
                                 item_offset=layout.offset, reduction="sum")
    kd.backward()                                       # on every process
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _checks
from .config import MODES, REDUCTIONS, RCEKDConfig
from .embedding import topm_dot
from .functional import Selection, _gathered_config, _seed, rce_kd_loss_gathered, select_from_pool
from .gathered import gathered_dot
from .spec import compute_dtype, ranked_topk

Tensor = torch.Tensor
#: ``local_topm(user_vecs, item_vecs, k, exclude_offsets, exclude_ids, item_offset) -> (values, ids)``
LocalTopM = Callable[[Tensor, Tensor, int, Optional[Tensor], Optional[Tensor], int], Tuple[Tensor, Tensor]]
#: ``scores_at(local_ids (B, W) int64) -> (B, W)``: a shard's scores at its own items
ScoresAt = Callable[[Tensor], Tensor]

__all__ = ["sharded_select", "sharded_select_embeddings", "sharded_loss_gathered", "sharded_rce_kd_loss",
           "sharded_loss_embeddings", "shard_input", "shard_layout", "ShardLayout", "topm_matmul", "CommLog",
           "CommRecord"]


# ============================================================================ communication log
@dataclass(frozen=True)
class CommRecord:
    """One collective of one call on this process.

    ``bytes`` is the payload: what this process contributes to an ``all_gather`` (it receives
    P times as much) or the size of the tensor of an ``all_reduce``. :attr:`wire_bytes` is what
    this process sends (and receives) with the bandwidth-optimal ring algorithms:
    (P - 1) * bytes for an all_gather, 2 (P - 1) / P * bytes for an all_reduce.
    """

    op: str
    what: str
    bytes: int
    world: int

    @property
    def wire_bytes(self) -> int:
        P = self.world
        if self.op == "all_reduce":
            return (2 * (P - 1) * self.bytes) // P
        return (P - 1) * self.bytes


@dataclass
class CommLog:
    """Collects the :class:`CommRecord` of the calls it is passed to (``comm_log=``).

    ``what`` names the purpose: ``select.meta`` (the agreement on shapes and offsets),
    ``select.status`` (the agreement on the data checks, ``validate=True``),
    ``select.candidates`` (the candidate lists), ``loss.meta``, ``loss.status``,
    ``loss.scores`` (the gathered scores' all-reduce), ``loss.user_grad`` (the user vectors'
    gradient, :func:`shard_input`)."""

    records: List[CommRecord] = field(default_factory=list)

    def add(self, op: str, what: str, nbytes: int, world: int) -> None:
        self.records.append(CommRecord(op, what, int(nbytes), int(world)))

    def reset(self) -> None:
        self.records.clear()

    def payload_bytes(self, prefix: str = "") -> int:
        """The summed payload of the records whose ``what`` starts with ``prefix``."""
        return sum(r.bytes for r in self.records if r.what.startswith(prefix))

    def wire_bytes(self, prefix: str = "") -> int:
        """The summed :attr:`CommRecord.wire_bytes` of the records whose ``what`` starts with ``prefix``."""
        return sum(r.wire_bytes for r in self.records if r.what.startswith(prefix))

    def summary(self) -> Dict[str, Dict[str, int]]:
        """Per ``what``: the number of collectives, their payload and wire bytes."""
        out: Dict[str, Dict[str, int]] = {}
        for r in self.records:
            d = out.setdefault(r.what, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0})
            d["calls"] += 1
            d["payload_bytes"] += r.bytes
            d["wire_bytes"] += r.wire_bytes
        return out


# ============================================================================ the group
@dataclass(frozen=True)
class _Group:
    pg: Any  # the process group (None: the world)
    rank: int
    size: int


def _group(group: Any, where: str) -> _Group:
    if not dist.is_available():
        raise RuntimeError(f"{where}: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialized; call "
                           f"torch.distributed.init_process_group first (group=None means the world)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: this process is not a member of group")
    return _Group(group, rank, dist.get_world_size(group))


def _comm_device(g: _Group, device: torch.device) -> torch.device:
    """Where a collective's tensors live: the data's device, except CUDA data on a gloo group,
    which goes through the CPU."""
    if device.type != "cpu" and dist.get_backend(g.pg) == "gloo":
        return torch.device("cpu")
    return device


_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(x: Tensor, g: _Group, log: Optional[CommLog], what: str) -> Tensor:
    """(P, *x.shape): every process's x, in rank order."""
    dev = _comm_device(g, x.device)
    flat = x.detach().reshape(-1).to(dev).contiguous()
    out = flat.new_empty(g.size * flat.numel())
    _gather_single(out, flat, group=g.pg)
    if log is not None:
        log.add("all_gather", what, flat.numel() * flat.element_size(), g.size)
    return out.view(g.size, *x.shape).to(x.device)


def _all_reduce_sum(x: Tensor, g: _Group, log: Optional[CommLog], what: str) -> Tensor:
    """The sum of every process's x (a new tensor)."""
    dev = _comm_device(g, x.device)
    y = x.detach().to(dev, copy=True).contiguous()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=g.pg)
    if log is not None:
        log.add("all_reduce", what, y.numel() * y.element_size(), g.size)
    return y.to(x.device)


# ============================================================================ agreement
def _try(fn: Callable[[], Any], broad: bool = False) -> Optional[Exception]:
    """The check's error (TypeError / ValueError; any Exception with ``broad``, for user code) or None."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        return e
    except Exception as e:
        if not broad:
            raise
        return e
    return None


def _raise_agreed(failed: Sequence[int], local: Optional[Exception], g: _Group, where: str) -> None:
    """Raises on every process when any failed (``failed``: the ranks, known to all): the
    process's own error where it has one, otherwise a ValueError quoting the first failed rank."""
    if not failed:
        return
    msgs: List[Optional[str]] = [None] * g.size
    dist.all_gather_object(msgs, None if local is None else f"{type(local).__name__}: {local}", group=g.pg)
    if local is not None:
        msg = f"{where} (rank {g.rank} of the group): {local}"
        try:
            again = type(local)(msg)
        except Exception:
            again = RuntimeError(msg)
        raise again from local
    r = failed[0]
    raise ValueError(f"{where}: rank {r} of the group rejected its arguments ({msgs[r]}); "
                     f"every rank of the group raises")


def _agree_status(local: Optional[Exception], device: torch.device, g: _Group, log: Optional[CommLog],
                  what: str, where: str, extra: Sequence[int] = ()) -> List[List[int]]:
    """One small all_gather of a status word (the error flag and ``extra`` ints): raises on every
    process if any failed; returns every process's ``extra``."""
    word = torch.tensor([0 if local is None else 1, *extra], dtype=torch.int64, device=device)
    table = _all_gather(word, g, log, what).cpu().tolist()
    _raise_agreed([r for r, row in enumerate(table) if row[0]], local, g, where)
    return [row[1:] for row in table]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# name of each field of the metadata word (index, what it is, for the messages); per-rank fields apart
_META: Tuple[Tuple[str, str], ...] = (
    ("kind", "the function called"), ("err", ""), ("validate", "validate"), ("B", "B (the rows)"),
    ("n_local", ""), ("item_offset", ""), ("K", "K"), ("M", "M"), ("L", "L"), ("mode", "mode"),
    ("tau", "tau"), ("T", "T"), ("beta", "beta"), ("seed", "seed (mod 2**32)"),
    ("dtype", "the dtype of the student's scores / vectors"),
    ("t_dtype", "the dtype of the teacher's scores / vectors"),
    ("has_topk", "whether teacher_topk is given"), ("has_exclude", "whether an exclusion is given"),
    ("D", "D (the vectors' dimension)"), ("rows_sum", "row_ids / the user vectors (checksum, validate=True)"),
    ("topk_sum", "teacher_topk (checksum, validate=True)"),
    ("excl_sum", "the exclusion lists (checksum, validate=True)"),
    ("reduction", "reduction"), ("W", "2K + L (the selection's columns)"),
    ("sel_sum", "the selection (checksum of its indices, validate=True)"),
)
_META_LEN = len(_META)
_IDX = {name: i for i, (name, _) in enumerate(_META)}
_KINDS = {0: "shard_layout", 1: "sharded_select", 2: "sharded_select_embeddings", 3: "the sharded loss"}


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _dtype_code(x: Optional[Tensor]) -> int:
    if x is None:
        return -1
    return _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 99


_P1, _P2, _P3 = 2147483629, 2147483587, 2147483647


def _checksum(*xs: Optional[Tensor]) -> int:
    """A position-dependent checksum of integer or float tensors (their bits), in exact int64."""
    total = 0
    for x in xs:
        if x is None or x.numel() == 0:
            continue
        v = x.detach().reshape(-1)
        if v.dtype.is_floating_point:
            v = v.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()])
        v = v.to(torch.int64) % _P1
        pos = torch.arange(v.numel(), device=v.device, dtype=torch.int64) % _P2 + 1
        total = (total * 31 + int(((v * pos) % _P3).sum())) % (1 << 61)
    return total


def _cfg_meta(cfg: Optional[RCEKDConfig]) -> Dict[str, int]:
    if cfg is None:
        return {}
    return dict(K=cfg.K, M=cfg.m, L=cfg.L, mode=MODES.index(cfg.mode), tau=_float_bits(cfg.tau),
                T=_float_bits(cfg.T), beta=_float_bits(cfg.beta))


@dataclass(frozen=True)
class ShardLayout:
    """Where the shards lie: ``offsets[r]``, ``sizes[r]`` of every rank r of the group, this rank's
    ``offset`` and ``size``, and the catalogue size ``N``."""

    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def N(self) -> int:
        return sum(self.sizes)


def _layout(table: Tensor, g: _Group, where: str) -> ShardLayout:
    """The layout from the gathered metadata (identical on every rank, so are its errors)."""
    sizes = [int(v) for v in table[:, _IDX["n_local"]].tolist()]
    given = [int(v) for v in table[:, _IDX["item_offset"]].tolist()]
    if all(o < 0 for o in given):  # item_offset=None everywhere: the shards in rank order
        offsets = [sum(sizes[:r]) for r in range(g.size)]
    elif any(o < 0 for o in given):
        raise ValueError(f"{where}: item_offset must be given on every rank or on none (None on ranks "
                         f"{[r for r, o in enumerate(given) if o < 0]})")
    else:
        offsets = given
        cursor = 0
        for r in sorted(range(g.size), key=lambda r: (offsets[r], sizes[r])):
            if offsets[r] != cursor:
                what = "overlap" if offsets[r] < cursor else "leave a gap"
                ranges = ", ".join(f"rank {q}: [{offsets[q]}, {offsets[q] + sizes[q]})" for q in range(g.size))
                raise ValueError(f"{where}: the shards' item ranges must tile [0, N) without overlap or gap; "
                                 f"they {what} at item {min(offsets[r], cursor)} (item_offset and the shard "
                                 f"sizes: {ranges})")
            cursor += sizes[r]
    return ShardLayout(tuple(offsets), tuple(sizes), g.rank)


def _agree_meta(fields: Dict[str, int], local: Optional[Exception], device: torch.device, g: _Group,
                log: Optional[CommLog], what: str, where: str) -> Tuple[Tensor, ShardLayout]:
    """The metadata agreement: one all_gather of a small int64 word per process. Raises on every
    process when one failed its local checks or when the fields that must agree differ."""
    word = [0] * _META_LEN
    word[_IDX["n_local"]] = 0
    word[_IDX["item_offset"]] = -1
    for k, v in fields.items():
        word[_IDX[k]] = int(v)
    word[_IDX["err"]] = 0 if local is None else 1
    table = _all_gather(torch.tensor(word, dtype=torch.int64, device=device), g, log, what).cpu()
    kinds = table[:, _IDX["kind"]].tolist()
    if len(set(kinds)) > 1:
        raise ValueError(f"{where}: the ranks of the group called different functions "
                         f"({', '.join(f'rank {r}: {_KINDS.get(k, k)}' for r, k in enumerate(kinds))})")
    _raise_agreed([r for r, f in enumerate(table[:, _IDX["err"]].tolist()) if f], local, g, where)
    for name, desc in _META:
        if not desc or name == "kind":
            continue
        col = table[:, _IDX[name]].tolist()
        if len(set(col)) > 1:
            raise ValueError(f"{where}: {desc} must agree across the ranks of the group, got "
                             f"{', '.join(f'rank {r}: {_show(name, v)}' for r, v in enumerate(col))}")
    return table, _layout(table, g, where)


def _show(name: str, v: int) -> str:
    if name in ("tau", "T", "beta"):
        return repr(struct.unpack("<d", struct.pack("<q", v))[0])
    if name in ("dtype", "t_dtype"):
        return str(_DTYPES[v]) if 0 <= v < len(_DTYPES) else ("none" if v < 0 else "other")
    if name == "mode":
        return repr(MODES[v])
    if name == "reduction":
        return repr(REDUCTIONS[v])
    if name.endswith("_sum"):
        return f"checksum {v:#x}"
    return str(v)


def shard_layout(n_local: int, *, group: Any = None, comm_log: Optional[CommLog] = None,
                 device: Union[str, torch.device] = "cpu") -> ShardLayout:
    """The layout of shards kept in rank order (rank 0 holds the first items): one all_gather of
    the shard sizes. Compute it once and pass ``item_offset=layout.offset`` to the calls of a
    training loop, which then need no collective to find their offsets. ``device``: where the
    collective's tensor lives (a CUDA device for an NCCL group)."""
    g = _group(group, "shard_layout")
    err = _try(lambda: _check_count("n_local", n_local))
    _, layout = _agree_meta(dict(kind=0, n_local=n_local if err is None else 0), err, torch.device(device), g,
                            comm_log, "layout.meta", "shard_layout")
    return layout


def _check_count(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def _check_offset(item_offset: Any) -> None:
    if item_offset is not None:
        _check_count("item_offset", item_offset)


# ============================================================================ ranking keys
_PAD_KEY = -(1 << 63)
_LO = (1 << 32) - 1
_PACK_MAX_N = (1 << 32) - 2  # packed ids: 0 .. 2**32 - 2 (2**32 - 1 and -1 are never real ids)


def _packs(dtype: torch.dtype, N: int) -> bool:
    """Candidates of float32 arithmetic travel as one int64 key (value bits, id) when N allows."""
    return dtype != torch.float64 and N <= _PACK_MAX_N


def _encode(vals: Tensor, ids: Tensor, packed: bool) -> Tensor:
    """(B, k) values (compute dtype) and global ids (-1: padding) -> int64 (B, k) keys (packed)
    or (B, 2k) [value bits as float64 | ids]. A packed key orders as the spec does: larger value
    first, then the smaller id; padding below everything."""
    v = vals + 0.0  # -0.0 -> +0.0: equal scores, as the single process compares them
    if packed:
        b = v.to(torch.float32).view(torch.int32).to(torch.int64)
        u = torch.where(b < 0, b ^ 0x7FFFFFFF, b)  # signed order of the float32 values
        key = u * (1 << 32) + (_LO - ids)
        return torch.where(ids < 0, torch.full_like(key, _PAD_KEY), key)
    return torch.cat([v.to(torch.float64).view(torch.int64), ids], dim=1)


def _key_values(keys: Tensor) -> Tensor:
    """The float32 values of packed keys (padding: NaN)."""
    u = keys >> 32
    b = torch.where(u < 0, u ^ 0x7FFFFFFF, u).to(torch.int32)
    return b.view(torch.float32)


def _merge(parts: Tensor, k: int, packed: bool) -> Tuple[Tensor, Tensor]:
    """Merges the candidate lists of every process, ``parts`` (P, B, k or 2k) as encoded, into the
    first k of each row in the spec's order: (ids (B, k) int64, values (B, k))."""
    P, B, C = parts.shape
    if packed:
        keys = parts.permute(1, 0, 2).reshape(B, P * C)
        top = torch.topk(keys, k, dim=1, sorted=True).values  # keys are unique (ids are)
        ids = torch.where(top == _PAD_KEY, torch.full_like(top, -1), _LO - (top & _LO))
        return ids, _key_values(top)
    h = C // 2
    vals = parts[:, :, :h].contiguous().view(torch.float64).permute(1, 0, 2).reshape(B, P * h)
    ids = parts[:, :, h:].permute(1, 0, 2).reshape(B, P * h)
    by_id = torch.sort(torch.where(ids < 0, torch.full_like(ids, torch.iinfo(torch.int64).max), ids), dim=1).indices
    ids, vals = ids.gather(1, by_id), vals.gather(1, by_id)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return ids.gather(1, order), vals.gather(1, order)


def _dense_candidates(x: Tensor, k: int, exclude: Optional[Tensor], offset: int) -> Tuple[Tensor, Tensor]:
    """A shard's first min(k, n) items in ranking order (excluded items ranked last with score
    -inf, as the single process ranks them), global ids; padded with (-inf, -1) to k columns."""
    B, n = x.shape
    dt = compute_dtype(x)
    vals = torch.full((B, k), float("-inf"), dtype=dt, device=x.device)
    ids = torch.full((B, k), -1, dtype=torch.int64, device=x.device)
    kk = min(k, n)
    if kk > 0 and B > 0:
        idx = ranked_topk(x, kk, exclude)
        v = x.gather(1, idx).to(dt)
        if exclude is not None:
            v = v.masked_fill(exclude.gather(1, idx), float("-inf"))
        vals[:, :kk] = v
        ids[:, :kk] = idx + offset
    return vals, ids


def topm_matmul(user_vecs: Tensor, item_vecs: Tensor, k: int, exclude_offsets: Optional[Tensor] = None,
                exclude_ids: Optional[Tensor] = None, item_offset: int = 0, *, backend: Optional[str] = None,
                chunk_elems: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The default ``local_topm``: the first ``k`` items of each row of ``user_vecs @ item_vecs.T``
    in the spec's ranking order, ids global, excluded items never taken, rows with fewer than
    ``k`` eligible items padded with (-inf, -1), by :func:`rcekd_kernels.topm_dot` (tile by tile:
    the shard's scores are never written out). Returns ``(values, ids)``, the order of
    ``local_topm``'s results. ``chunk_elems`` is accepted for compatibility and ignored."""
    ex = None if exclude_offsets is None or exclude_ids is None else (exclude_offsets, exclude_ids)
    ids, vals = topm_dot(user_vecs, item_vecs, k, exclude=ex, item_offset=item_offset, backend=backend)
    return vals, ids


def _csr_mask(offsets: Tensor, ids: Tensor, b0: int, b1: int, item_offset: int, n: int) -> Tensor:
    """(b1 - b0, n) bool: the CSR exclusion of rows b0..b1 restricted to the shard's items."""
    lo, hi = int(offsets[b0]), int(offsets[b1])
    seg = ids[lo:hi] - item_offset
    counts = (offsets[b0 + 1:b1 + 1] - offsets[b0:b1]).to(torch.int64)
    row = torch.repeat_interleave(torch.arange(b1 - b0, device=ids.device), counts)
    keep = (seg >= 0) & (seg < n)
    mask = torch.zeros(b1 - b0, n, dtype=torch.bool, device=ids.device)
    mask[row[keep], seg[keep]] = True
    return mask


# ============================================================================ selection
def _check_score_tensor(name: str, x: Any, B: Optional[int] = None, n: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name} must have B = {B} rows, got shape {tuple(x.shape)}")
    if n is not None and x.shape[1] != n:
        raise ValueError(f"{name} must have {n} columns, got shape {tuple(x.shape)}")


def _check_rows(row_ids: Optional[Tensor], teacher_topk: Optional[Tensor], B: int, K: int, device: torch.device
                ) -> None:
    if row_ids is not None:
        if row_ids.dtype.is_floating_point or row_ids.dtype.is_complex or row_ids.dtype == torch.bool:
            raise TypeError(f"row_ids must have an integer dtype, got {row_ids.dtype}")
        if row_ids.shape != (B,):
            raise ValueError(f"row_ids must have shape (B,) = ({B},), got {tuple(row_ids.shape)}")
        if row_ids.device != device:
            raise ValueError(f"row_ids is on {row_ids.device}, the scores on {device}")
    if teacher_topk is not None:
        if teacher_topk.dtype != torch.int64:
            raise TypeError(f"teacher_topk must have dtype torch.int64, got {teacher_topk.dtype}")
        if teacher_topk.shape != (B, K):
            raise ValueError(f"teacher_topk must have shape (B, K) = ({B}, {K}) (global item ids), "
                             f"got {tuple(teacher_topk.shape)}")
        if teacher_topk.device != device:
            raise ValueError(f"teacher_topk is on {teacher_topk.device}, the scores on {device}")


def _check_eligible(vals: Tensor, k: int, what: str) -> None:
    """With finite scores (validate=True), a merged entry of value -inf or NaN (padding) is an
    excluded or a missing item: the row has fewer than k eligible items in the catalogue."""
    if vals.numel() == 0:
        return
    bad = ~(vals[:, k - 1] > float("-inf"))
    if bool(bad.any()):
        raise ValueError(f"{what} leaves fewer than {k} eligible items in row {int(bad.nonzero()[0, 0])} (all "
                         f"shards together); every row needs at least M non-excluded items")


Candidates = Tuple[Tuple[Tensor, Tensor], Optional[Tuple[Tensor, Tensor]]]


def _select_core(where: str, g: _Group, cfg: RCEKDConfig, seed: int, fields: Dict[str, int],
                 err: Optional[Exception], dev: torch.device, log: Optional[CommLog], validate: bool,
                 data_checks: Callable[[ShardLayout], None], candidates: Callable[[ShardLayout], Candidates],
                 teacher_topk: Optional[Tensor], rows: Callable[[], Tensor], backend: Optional[str], excl_name: str
                 ) -> Tuple[Selection, ShardLayout]:
    """What both selections share once their local checks ran: the metadata agreement, the data
    checks and the local candidates (agreed with one status word under ``validate``), the
    all_gather of the candidates, the merge, and the sets."""
    _, layout = _agree_meta(fields, err, dev, g, log, "select.meta", where)
    cfg.check_catalog(layout.N)  # the same N on every rank: the same outcome
    out: List[Candidates] = []

    def work() -> None:
        if validate:
            data_checks(layout)
        with torch.no_grad():
            out.append(candidates(layout))

    if validate:  # a failure on one process (a check, or the user's local_topm) raises on all
        _agree_status(_try(work, broad=True), dev, g, log, "select.status", where)
    else:
        work()
    (vs, ids), teacher = out[0]
    M, K = cfg.m, cfg.K
    with torch.no_grad():
        packed_s = _packs(vs.dtype, layout.N)
        payload = [_encode(vs, ids, packed_s)]
        packed_t: Optional[bool] = None
        if teacher is not None:
            packed_t = _packs(teacher[0].dtype, layout.N)
            payload.append(_encode(teacher[0], teacher[1], packed_t))
        parts = _all_gather(torch.cat(payload, dim=1), g, log, "select.candidates")  # (P, B, C)
        cs = M if packed_s else 2 * M
        pool, pool_vals = _merge(parts[:, :, :cs], M, packed_s)
        if packed_t is None:
            assert teacher_topk is not None
            qt = teacher_topk
        else:
            qt, qt_vals = _merge(parts[:, :, cs:], K, packed_t)
        if validate:  # the merged lists are the same on every rank: the same outcome
            _check_eligible(pool_vals, M, excl_name)
            if packed_t is not None:
                _check_eligible(qt_vals, K, excl_name)
        sel = select_from_pool(pool, qt, config=cfg, seed=seed, row_ids=rows(), backend=backend, validate=False)
    return sel, layout


def _check_exclude_shard(exclude_shard: Optional[Tensor], student_shard: Tensor) -> None:
    if exclude_shard is None:
        return
    if exclude_shard.dtype != torch.bool:
        raise TypeError(f"exclude_shard must have dtype torch.bool, got {exclude_shard.dtype}")
    if exclude_shard.shape != student_shard.shape or exclude_shard.device != student_shard.device:
        raise ValueError(f"exclude_shard must have the shape {tuple(student_shard.shape)} and device of student_shard, "
                         f"got {tuple(exclude_shard.shape)} on {exclude_shard.device}")


def _select_dense(where: str, g: _Group, student_shard: Tensor, teacher_shard: Optional[Tensor],
                  teacher_topk: Optional[Tensor], item_offset: Optional[int], cfg: RCEKDConfig, seed: int,
                  row_ids: Optional[Tensor], exclude_shard: Optional[Tensor], backend: Optional[str], validate: bool,
                  log: Optional[CommLog], need_teacher: bool = False) -> Tuple[Selection, ShardLayout]:
    dev = _comm_device(g, student_shard.device) if isinstance(student_shard, Tensor) else torch.device("cpu")
    uses_t = teacher_topk is None

    def local() -> None:
        _checks.check_types(dict(student_shard=student_shard), dict(teacher_shard=teacher_shard,
                            teacher_topk=teacher_topk, row_ids=row_ids, exclude_shard=exclude_shard))
        _check_score_tensor("student_shard", student_shard)
        B, n = student_shard.shape
        if teacher_shard is not None:
            _check_score_tensor("teacher_shard", teacher_shard, B, n)
            if teacher_shard.device != student_shard.device:
                raise ValueError(f"teacher_shard is on {teacher_shard.device}, student_shard on {student_shard.device}")
        elif uses_t or need_teacher:
            raise ValueError("teacher_shard is required " + ("(the loss reads the teacher's scores)" if need_teacher
                                                             else "when teacher_topk is not given"))
        _check_exclude_shard(exclude_shard, student_shard)
        _check_rows(row_ids, teacher_topk, B, cfg.K, student_shard.device)
        _check_offset(item_offset)

    err = _try(local)
    fields: Dict[str, int] = dict(kind=1, validate=int(bool(validate)), seed=seed, **_cfg_meta(cfg))
    if err is None:
        B, n = student_shard.shape
        fields.update(B=B, n_local=n, item_offset=-1 if item_offset is None else item_offset,
                      dtype=_dtype_code(student_shard), t_dtype=_dtype_code(teacher_shard if uses_t else None),
                      has_topk=int(not uses_t), has_exclude=int(exclude_shard is not None), D=-1)
        if validate:
            fields.update(rows_sum=_checksum(row_ids), topk_sum=_checksum(teacher_topk))

    def data(layout: ShardLayout) -> None:
        off, n = layout.offset, layout.size
        _checks.check_score_range("student_shard", student_shard, cfg.tau)
        if uses_t:
            assert teacher_shard is not None
            _checks.check_score_range("teacher_shard", teacher_shard, cfg.tau)
            return
        assert teacher_topk is not None
        _checks.check_topk_ids(teacher_topk, layout.N)
        if exclude_shard is not None and n and teacher_topk.numel():
            mine = (teacher_topk >= off) & (teacher_topk < off + n)
            hit = (mine & exclude_shard.gather(1, torch.where(mine, teacher_topk - off, 0))).any(dim=1)
            if bool(hit.any()):
                raise ValueError(f"teacher_topk holds an id that exclude_shard marks in row {int(hit.nonzero()[0, 0])}")

    def candidates(layout: ShardLayout) -> Candidates:
        s = _dense_candidates(student_shard.detach(), cfg.m, exclude_shard, layout.offset)
        if not uses_t:
            return s, None
        assert teacher_shard is not None
        return s, _dense_candidates(teacher_shard.detach(), cfg.K, exclude_shard, layout.offset)

    def rows() -> Tensor:
        return row_ids if row_ids is not None else torch.arange(student_shard.shape[0], device=student_shard.device)

    return _select_core(where, g, cfg, seed, fields, err, dev, log, validate, data, candidates, teacher_topk, rows,
                        backend, "exclude_shard")


def sharded_select(
    student_shard: Tensor,
    teacher_shard: Optional[Tensor] = None,
    teacher_topk: Optional[Tensor] = None,
    *,
    item_offset: Optional[int] = None,
    config: Optional[RCEKDConfig] = None,
    K: Optional[int] = None,
    M: Optional[int] = None,
    L: Optional[int] = None,
    tau: Optional[float] = None,
    T: Optional[float] = None,
    beta: Optional[float] = None,
    mode: Optional[str] = None,
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    exclude_shard: Optional[Tensor] = None,
    group: Any = None,
    backend: Optional[str] = None,
    validate: bool = True,
    comm_log: Optional[CommLog] = None,
) -> Selection:
    """The sets of RCE-KD from score columns sharded across the processes of ``group``: on every
    process, the :class:`~rcekd_kernels.Selection` that :func:`rcekd_kernels.select` computes on
    the rows made of every shard's columns in item order (sets, sample, gamma: identical).

    Args:
        student_shard: (B, N_local) float: this process's columns of the student's scores
            (items ``item_offset .. item_offset + N_local - 1``); N_local may be smaller than M,
            or 0. Every process holds the same B users, in the same order.
        teacher_shard: (B, N_local) float, the teacher's columns; needed when ``teacher_topk``
            is not given.
        teacher_topk: optional (B, K) int64 *global* item ids of the teacher's top-K, the same
            on every process.
        item_offset: the global id of this shard's first item; None (default, on every process)
            places the shards in rank order (rank 0 holds the first items), found with the
            metadata all_gather. When given, the ranges of all processes must tile [0, N).
        config, K, M, L, tau, T, beta, mode, seed: as :func:`rcekd_kernels.select`; they must
            agree across the processes (checked).
        row_ids: (B,) the rows' ids for the sampler (default 0..B-1), the same on every process;
            pass the user ids (with ``validate`` the check then also catches processes holding
            different users).
        exclude_shard: optional (B, N_local) bool, this shard's columns of the exclusion mask.
        group: the process group (default: the world).
        backend: the backend of :func:`rcekd_kernels.select_from_pool`.
        validate: check the data (non-finite scores, teacher ids, the exclusion, that the ranks
            hold the same row ids and teacher ids; one small collective more).
        comm_log: a :class:`CommLog` that records this call's collectives.

    The merge: each process sends its first min(M, N_local) items in the spec's order (excluded
    items ranked last with score -inf, padding after them); the global first M items are among
    these P lists, and ordering their union by (score descending, global id ascending) gives them
    in the single process's order, ties across shards included. float32 arithmetic sends one
    int64 key per candidate (the score's bits, order-preserving, above the id), float64 two.

    Communication: a metadata all_gather (25 int64 per process), with ``validate`` a status
    all_gather of one int64, and the candidates: B x M int64 per process (B x (M + K) when the
    teacher's top-K is computed here; twice that for float64 scores), gathered by every process.
    """
    g = _group(group, "sharded_select")
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode)
    return _select_dense("sharded_select", g, student_shard, teacher_shard, teacher_topk, item_offset, cfg,
                         _seed(seed), row_ids, exclude_shard, backend, validate, comm_log)[0]


def _check_csr(exclude_offsets: Optional[Tensor], exclude_ids: Optional[Tensor], B: int, device: torch.device) -> None:
    if (exclude_offsets is None) != (exclude_ids is None):
        raise ValueError("exclude_offsets and exclude_ids go together (a CSR list of excluded global ids per row)")
    if exclude_offsets is None or exclude_ids is None:
        return
    for name, x in (("exclude_offsets", exclude_offsets), ("exclude_ids", exclude_ids)):
        if not isinstance(x, Tensor) or x.dtype != torch.int64 or x.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int64 torch.Tensor")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, the vectors on {device}")
    if exclude_offsets.shape[0] != B + 1:
        raise ValueError(f"exclude_offsets must have B + 1 = {B + 1} entries, got {exclude_offsets.shape[0]}")


def _check_csr_data(exclude_offsets: Tensor, exclude_ids: Tensor, N: int, teacher_topk: Optional[Tensor]) -> None:
    nnz = exclude_ids.shape[0]
    if int(exclude_offsets[0]) != 0 or int(exclude_offsets[-1]) != nnz or \
            bool((exclude_offsets[1:] < exclude_offsets[:-1]).any()):
        raise ValueError(f"exclude_offsets must rise from 0 to len(exclude_ids) = {nnz}")
    if nnz and (int(exclude_ids.min()) < 0 or int(exclude_ids.max()) >= N):
        raise ValueError(f"exclude_ids must be global item ids in [0, N) = [0, {N})")
    if teacher_topk is not None and nnz and teacher_topk.numel():
        B = teacher_topk.shape[0]
        rows = torch.repeat_interleave(torch.arange(B, device=exclude_ids.device), exclude_offsets.diff())
        hit = torch.isin(torch.arange(B, device=teacher_topk.device).unsqueeze(1) * N + teacher_topk,
                         rows * N + exclude_ids).any(dim=1)
        if bool(hit.any()):
            raise ValueError(f"teacher_topk holds an id that the exclusion lists mark in row "
                             f"{int(hit.nonzero()[0, 0])}")


def _topm_checked(topm: LocalTopM, u: Tensor, v: Tensor, k: int, eo: Optional[Tensor], ei: Optional[Tensor],
                  off: int) -> Tuple[Tensor, Tensor]:
    out = topm(u, v, k, eo, ei, off)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, Tensor) for x in out)):
        raise TypeError("local_topm must return a tuple (values, ids) of tensors")
    vals, ids = out
    B = u.shape[0]
    if vals.shape != (B, k) or ids.shape != (B, k) or ids.dtype != torch.int64 or not vals.dtype.is_floating_point:
        raise ValueError(f"local_topm must return float values and int64 ids of shape (B, k) = ({B}, {k}), got "
                         f"{vals.dtype} {tuple(vals.shape)} and {ids.dtype} {tuple(ids.shape)}")
    return vals.to(compute_dtype(vals)), ids


def _select_embeddings(where: str, g: _Group, user_vecs: Tensor, item_vecs_shard: Tensor,
                       teacher_user_vecs: Optional[Tensor], teacher_item_vecs_shard: Optional[Tensor],
                       teacher_topk: Optional[Tensor], item_offset: Optional[int], cfg: RCEKDConfig, seed: int,
                       row_ids: Optional[Tensor], exclude_offsets: Optional[Tensor], exclude_ids: Optional[Tensor],
                       local_topm: Optional[LocalTopM], backend: Optional[str], validate: bool,
                       log: Optional[CommLog]) -> Tuple[Selection, ShardLayout]:
    topm: LocalTopM = topm_matmul if local_topm is None else local_topm
    dev = _comm_device(g, user_vecs.device) if isinstance(user_vecs, Tensor) else torch.device("cpu")
    uses_t = teacher_topk is None

    def local() -> None:
        _checks.check_types(dict(user_vecs=user_vecs, item_vecs_shard=item_vecs_shard),
                            dict(teacher_user_vecs=teacher_user_vecs, teacher_item_vecs_shard=teacher_item_vecs_shard,
                                 teacher_topk=teacher_topk, row_ids=row_ids))
        _check_score_tensor("user_vecs", user_vecs)
        B, D = user_vecs.shape
        _check_score_tensor("item_vecs_shard", item_vecs_shard, n=D)
        for name, x in (("item_vecs_shard", item_vecs_shard), ("teacher_user_vecs", teacher_user_vecs),
                        ("teacher_item_vecs_shard", teacher_item_vecs_shard)):
            if x is not None and x.device != user_vecs.device:
                raise ValueError(f"{name} is on {x.device}, user_vecs on {user_vecs.device}")
        if uses_t:
            if teacher_user_vecs is None or teacher_item_vecs_shard is None:
                raise ValueError("teacher_user_vecs and teacher_item_vecs_shard are required when teacher_topk is "
                                 "not given")
            _check_score_tensor("teacher_user_vecs", teacher_user_vecs, B)
            _check_score_tensor("teacher_item_vecs_shard", teacher_item_vecs_shard, item_vecs_shard.shape[0],
                                teacher_user_vecs.shape[1])
        _check_rows(row_ids, teacher_topk, B, cfg.K, user_vecs.device)
        _check_csr(exclude_offsets, exclude_ids, B, user_vecs.device)
        _check_offset(item_offset)
        if not callable(topm):
            raise TypeError(f"local_topm must be callable, got {type(topm).__name__}")

    err = _try(local)
    fields: Dict[str, int] = dict(kind=2, validate=int(bool(validate)), seed=seed, **_cfg_meta(cfg))
    if err is None:
        B, D = user_vecs.shape
        fields.update(B=B, n_local=item_vecs_shard.shape[0], item_offset=-1 if item_offset is None else item_offset,
                      dtype=_dtype_code(user_vecs), t_dtype=_dtype_code(teacher_user_vecs if uses_t else None),
                      has_topk=int(not uses_t), has_exclude=int(exclude_offsets is not None), D=D)
        if validate:
            fields.update(rows_sum=_checksum(row_ids, user_vecs, teacher_user_vecs if uses_t else None),
                          topk_sum=_checksum(teacher_topk), excl_sum=_checksum(exclude_offsets, exclude_ids))

    def data(layout: ShardLayout) -> None:
        vecs: List[Tuple[str, Optional[Tensor]]] = [("user_vecs", user_vecs), ("item_vecs_shard", item_vecs_shard)]
        if uses_t:
            vecs += [("teacher_user_vecs", teacher_user_vecs), ("teacher_item_vecs_shard", teacher_item_vecs_shard)]
        for name, x in vecs:
            if x is not None and x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or infinite values (pass validate=False to skip this check)")
        if teacher_topk is not None:
            _checks.check_topk_ids(teacher_topk, layout.N)
        if exclude_offsets is not None and exclude_ids is not None:
            _check_csr_data(exclude_offsets, exclude_ids, layout.N, teacher_topk)

    def candidates(layout: ShardLayout) -> Candidates:
        off = layout.offset
        s = _topm_checked(topm, user_vecs.detach(), item_vecs_shard.detach(), cfg.m, exclude_offsets, exclude_ids, off)
        if not uses_t:
            return s, None
        assert teacher_user_vecs is not None and teacher_item_vecs_shard is not None
        return s, _topm_checked(topm, teacher_user_vecs.detach(), teacher_item_vecs_shard.detach(), cfg.K,
                                exclude_offsets, exclude_ids, off)

    def rows() -> Tensor:
        return row_ids if row_ids is not None else torch.arange(user_vecs.shape[0], device=user_vecs.device)

    return _select_core(where, g, cfg, seed, fields, err, dev, log, validate, data, candidates, teacher_topk, rows,
                        backend, "the exclusion (exclude_offsets, exclude_ids)")


def sharded_select_embeddings(
    user_vecs: Tensor,
    item_vecs_shard: Tensor,
    teacher_user_vecs: Optional[Tensor] = None,
    teacher_item_vecs_shard: Optional[Tensor] = None,
    teacher_topk: Optional[Tensor] = None,
    *,
    item_offset: Optional[int] = None,
    config: Optional[RCEKDConfig] = None,
    K: Optional[int] = None,
    M: Optional[int] = None,
    L: Optional[int] = None,
    tau: Optional[float] = None,
    T: Optional[float] = None,
    beta: Optional[float] = None,
    mode: Optional[str] = None,
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    exclude_offsets: Optional[Tensor] = None,
    exclude_ids: Optional[Tensor] = None,
    local_topm: Optional[LocalTopM] = None,
    group: Any = None,
    backend: Optional[str] = None,
    validate: bool = True,
    comm_log: Optional[CommLog] = None,
) -> Selection:
    """The sets of RCE-KD for dot-product models with the item tables sharded by rows: on every
    process, the :class:`~rcekd_kernels.Selection` that :func:`rcekd_kernels.select` computes on
    the dense rows ``user_vecs @ item_vecs.T`` of the whole catalogue, without forming them.

    Args:
        user_vecs: (B, D) the student's user vectors, the same on every process.
        item_vecs_shard: (N_local, D) this process's rows of the student's item table (items
            ``item_offset .. item_offset + N_local - 1``; N_local may be < M, or 0).
        teacher_user_vecs, teacher_item_vecs_shard: (B, D_t), (N_local, D_t) the teacher's, needed
            when ``teacher_topk`` (global ids, the same on every process) is not given.
        exclude_offsets, exclude_ids: optional CSR exclusion, the same on every process: row b
            excludes the global ids ``exclude_ids[exclude_offsets[b]:exclude_offsets[b + 1]]``.
        local_topm: ``local_topm(user_vecs, item_vecs_shard, k, exclude_offsets, exclude_ids,
            item_offset) -> (values (B, k), global ids (B, k) int64)``: the shard's first k items
            of ``user_vecs @ item_vecs_shard.T`` in the spec's order, excluded items never taken,
            padded with (-inf, -1) (default :func:`topm_matmul`; a fused top-M kernel with this
            signature plugs in here).
        The rest: as :func:`sharded_select` (with ``validate`` the checksum of the agreement also
        covers the user vectors, so processes holding different users are caught).

    Equality with the single process holds when the dot products are computed bit for bit alike
    (exact for integer-valued vectors; in floating point another matmul blocking may round a
    near-tie differently, as it may between two single-process chunkings). Under
    ``validate=False``, a row with fewer than M eligible items gets padding (id -1) in its pool,
    which no shard owns (its scores are 0 in the loss).

    Communication: as :func:`sharded_select`.
    """
    g = _group(group, "sharded_select_embeddings")
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode)
    return _select_embeddings("sharded_select_embeddings", g, user_vecs, item_vecs_shard, teacher_user_vecs,
                              teacher_item_vecs_shard, teacher_topk, item_offset, cfg, _seed(seed), row_ids,
                              exclude_offsets, exclude_ids, local_topm, backend, validate, comm_log)[0]


# ============================================================================ loss
class _OwnerSum(torch.autograd.Function):
    """Forward: each process's scores at the columns it owns (zeros elsewhere), summed over the
    group: the full (B, W) scores, the owners' values exactly (x + 0 = x), on every process.
    Backward: each process keeps the gradient of its own columns. The loss is the same function of
    the same full scores on every process, so column j's gradient is the owner's alone: as in
    vocabulary-parallel cross-entropy, the all-reduce's backward is the identity, and the owner
    mask routes each column to its owner."""

    @staticmethod
    def forward(ctx, s_local: Tensor, t_local: Tensor, owned: Tensor, g: _Group, log: Optional[CommLog]
                ) -> Tuple[Tensor, Tensor]:
        s = torch.where(owned, s_local, torch.zeros((), dtype=s_local.dtype, device=s_local.device))
        t = torch.where(owned, t_local, torch.zeros((), dtype=t_local.dtype, device=t_local.device))
        if s.dtype == t.dtype:
            both = _all_reduce_sum(torch.stack([s, t]), g, log, "loss.scores")
            s_full, t_full = both[0], both[1]
        else:
            s_full = _all_reduce_sum(s, g, log, "loss.scores")
            t_full = _all_reduce_sum(t, g, log, "loss.scores")
        ctx.save_for_backward(owned)
        ctx.mark_non_differentiable(t_full)
        return s_full, t_full

    @staticmethod
    def backward(ctx, grad_s: Optional[Tensor], grad_t: Optional[Tensor]):
        (owned,) = ctx.saved_tensors
        gs = None
        if grad_s is not None and ctx.needs_input_grad[0]:
            gs = torch.where(owned, grad_s, torch.zeros((), dtype=grad_s.dtype, device=grad_s.device))
        return gs, None, None, None, None


class _ShardInput(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx, x: Tensor, g: _Group, log: Optional[CommLog]) -> Tensor:
        ctx.g, ctx.log = g, log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce_sum(grad, ctx.g, ctx.log, "loss.user_grad"), None, None


def shard_input(x: Tensor, *, group: Any = None, comm_log: Optional[CommLog] = None) -> Tensor:
    """``x`` unchanged, marked as a replicated input of every shard: its gradient is summed over
    the group in the backward (one all-reduce of x's size), so that every process holds the full
    gradient of ``x`` -- the single-process gradient -- instead of the part from its own items.

    Use it on a tensor that every process computes alike and feeds into its shard's scores (the
    user vectors, a user tower's output) before scoring; every process must then run the
    backward. :func:`sharded_loss_embeddings` applies it to the user vectors by default."""
    g = _group(group, "shard_input")
    _checks.check_types(dict(x=x))
    return _ShardInput.apply(x, g, comm_log)


def _owned_ids(idx: Tensor, off: int, n: int) -> Tuple[Tensor, Tensor]:
    """(owned (B, W) bool, local ids: (B, W) in [0, n) when n > 0, else (B, 0))."""
    owned = (idx >= off) & (idx < off + n)
    if n == 0:
        return owned, idx[:, :0]
    return owned, torch.where(owned, idx - off, torch.zeros((), dtype=idx.dtype, device=idx.device))


def _scores_at(fn: ScoresAt, local: Tensor, B: int, W: int, name: str) -> Tensor:
    out = fn(local)
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    want = tuple(local.shape)
    if tuple(out.shape) != want or not out.dtype.is_floating_point:
        raise ValueError(f"{name} must return float scores of the shape of its ids {want}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if local.shape[1] == 0:  # an empty shard: zeros, still connected to the callable's graph
        out = torch.cat([out, out.new_zeros(B, W)], dim=1)
    return out


def _callable(name: str, f: Any) -> None:
    if not callable(f):
        raise TypeError(f"{name} must be callable (local ids -> scores), got {type(f).__name__}")


def _loss_core(where: str, g: _Group, student_at: ScoresAt, teacher_at: ScoresAt, selection: Selection, n: int,
               off: int, dev: torch.device, tau: Optional[float], reduction: Optional[str], backend: Optional[str],
               validate: bool, agree: bool, return_diagnostics: bool, log: Optional[CommLog]
               ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """The owners' scores, their assembly and the gathered loss. ``agree``: the callables are the
    user's, so their failure on one process (or dtypes that differ) is agreed with one status
    word before the all-reduce."""
    idx = selection.indices
    B, W = idx.shape
    owned, local = _owned_ids(idx, off, n)
    parts: List[Tensor] = []

    def compute() -> None:
        parts.append(_scores_at(student_at, local, B, W, "student_at"))
        with torch.no_grad():
            parts.append(_scores_at(teacher_at, local, B, W, "teacher_at").detach())

    if agree:
        err = _try(compute, broad=True)
        codes = [_dtype_code(p) for p in parts] if err is None else [-1, -1]
        table = _agree_status(err, dev, g, log, "loss.status", where, codes)
        for j, name in enumerate(("student_at", "teacher_at")):
            col = [row[j] for row in table]
            if len(set(col)) > 1:
                raise ValueError(f"{where}: the dtype of the scores {name} returns must agree across the ranks of "
                                 f"the group, got " + ", ".join(f"rank {r}: {_show('dtype', c)}"
                                                                for r, c in enumerate(col)))
    else:
        compute()
    s_full, t_full = _OwnerSum.apply(parts[0], parts[1], owned, g, log)
    return rce_kd_loss_gathered(s_full, t_full, selection, tau=tau, reduction=reduction, backend=backend,
                                validate=validate, return_diagnostics=return_diagnostics)


def _loss_entry(where: str, g: _Group, student_at: ScoresAt, teacher_at: ScoresAt, selection: Any, n_local: Any,
                item_offset: Optional[int], tau: Optional[float], reduction: Optional[str], backend: Optional[str],
                validate: bool, return_diagnostics: bool, log: Optional[CommLog],
                more_checks: Optional[Callable[[], None]] = None) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    if not isinstance(selection, Selection):  # the same object on every rank: the same outcome
        raise TypeError(f"selection must be a Selection (from sharded_select), got {type(selection).__name__}")
    idx = selection.indices
    dev = _comm_device(g, idx.device)
    red_tau: List[Any] = []

    def local() -> None:
        if more_checks is not None:
            more_checks()
        _check_count("n_local", n_local)
        _check_offset(item_offset)
        _callable("student_at", student_at)
        _callable("teacher_at", teacher_at)
        cfg = _gathered_config(selection, tau, reduction)
        red_tau.extend([cfg.reduction, cfg.tau])

    err = _try(local)
    if not (validate or item_offset is None):
        if err is not None:
            raise err
        return _loss_core(where, g, student_at, teacher_at, selection, n_local, item_offset, dev, tau, reduction,
                          backend, validate, False, return_diagnostics, log)
    fields = dict(kind=3, validate=int(bool(validate)), B=idx.shape[0], W=idx.shape[1], K=selection.K, L=selection.L)
    if err is None:
        fields.update(n_local=n_local, item_offset=-1 if item_offset is None else item_offset,
                      reduction=REDUCTIONS.index(red_tau[0]), tau=_float_bits(red_tau[1]))
        if validate:
            fields["sel_sum"] = _checksum(idx)
    _, layout = _agree_meta(fields, err, dev, g, log, "loss.meta", where)
    return _loss_core(where, g, student_at, teacher_at, selection, n_local, layout.offset, dev, tau, reduction,
                      backend, validate, validate, return_diagnostics, log)


def sharded_loss_gathered(
    student_at: ScoresAt,
    teacher_at: ScoresAt,
    selection: Selection,
    *,
    n_local: int,
    item_offset: Optional[int] = None,
    group: Any = None,
    tau: Optional[float] = None,
    reduction: Optional[str] = None,
    backend: Optional[str] = None,
    validate: bool = True,
    return_diagnostics: bool = False,
    comm_log: Optional[CommLog] = None,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """The RCE-KD loss of a selection (the same on every process, e.g. from
    :func:`sharded_select`) with the items' scores held by their owners.

    Args:
        student_at: ``student_at(local_ids) -> scores``: this shard's student scores of the items
            ``local_ids`` ((B, W) int64 in [0, n_local), W = 2K + L; where another shard owns the
            item the id is 0 and the score is ignored), differentiable, e.g.
            ``lambda ids: student_shard.gather(1, ids)`` or
            ``lambda ids: gathered_dot(user_vecs, item_vecs_shard, ids)``. On a process whose
            shard is empty it is called with (B, 0) ids and must return (B, 0) scores (both
            examples do).
        teacher_at: the same for the teacher (called under ``torch.no_grad``).
        selection: the selection, identical on every process.
        n_local, item_offset: this shard's size and first global id (None: the shards in rank
            order, found with one small all_gather; in a loop pass :attr:`ShardLayout.offset`).
        tau, reduction, backend, return_diagnostics: as :func:`rcekd_kernels.rce_kd_loss_gathered`.
        validate: check that the processes agree (shapes, offsets, the selection) and that the
            callables succeeded everywhere (two small all_gathers), and the data as
            :func:`rcekd_kernels.rce_kd_loss_gathered` does. With ``validate=False`` and
            ``item_offset`` given the only collective is the scores' all-reduce; a callable that
            fails on one process then leaves the others waiting in it.

    Returns:
        On **every** process the same value: the loss the single process computes on the whole
        catalogue (not a per-process share: do not average or sum it over the processes; to log
        it, read it on any one). Call ``backward()`` on it on every process: each process's shard
        then receives exactly its items' part of the single-process gradient, and nowhere else.
        A tensor that every process computes alike and feeds into its scores (user vectors, a
        user tower) receives on each process only the part from that process's items; its full
        gradient is the sum over the group. Pass it through :func:`shard_input` before scoring
        (its backward sums the gradient), and every process holds the full gradient, identical
        everywhere -- so DDP's averaging over this group of such replicated parameters leaves it
        unchanged. Item shards are distinct parameters: do not wrap them in DDP over this group
        (their gradient needs no communication).

    Communication: one all-reduce of 2 x B x (2K + L) scores (student and teacher; two
    all-reduces if their dtypes differ); with ``validate`` or ``item_offset=None`` a metadata
    all_gather, with ``validate`` a status all_gather.
    """
    g = _group(group, "sharded_loss_gathered")
    return _loss_entry("sharded_loss_gathered", g, student_at, teacher_at, selection, n_local, item_offset, tau,
                       reduction, backend, validate, return_diagnostics, comm_log)


def sharded_rce_kd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    teacher_topk: Optional[Tensor] = None,
    *,
    item_offset: Optional[int] = None,
    config: Optional[RCEKDConfig] = None,
    K: Optional[int] = None,
    M: Optional[int] = None,
    L: Optional[int] = None,
    tau: Optional[float] = None,
    T: Optional[float] = None,
    beta: Optional[float] = None,
    mode: Optional[str] = None,
    reduction: Optional[str] = None,
    seed: int = 0,
    row_ids: Optional[Tensor] = None,
    exclude_shard: Optional[Tensor] = None,
    group: Any = None,
    backend: Optional[str] = None,
    validate: bool = True,
    return_diagnostics: bool = False,
    return_selection: bool = False,
    comm_log: Optional[CommLog] = None,
) -> Any:
    """:func:`rcekd_kernels.rce_kd_loss` with the score columns sharded across the processes of
    ``group`` (sets refreshed from these scores): :func:`sharded_select` on the detached shards,
    then the loss of the scores assembled from their owners (as :func:`sharded_loss_gathered`).

    Arguments as :func:`sharded_select` (``teacher_shard`` is required here) and
    :func:`rcekd_kernels.rce_kd_loss`. The loss is the same on every process and equals the
    single-process loss to float rounding (the sets exactly); ``student_shard``'s gradient is
    this shard's columns of the single-process gradient. How the loss and the gradients of
    replicated inputs combine (do not average the loss over the processes; sum replicated
    inputs' gradients, e.g. with :func:`shard_input`): see :func:`sharded_loss_gathered`.
    ``return_selection`` also returns the :class:`~rcekd_kernels.Selection` (last).

    Communication: that of :func:`sharded_select`, then one all-reduce of 2 x B x (2K + L)
    scores.
    """
    where = "sharded_rce_kd_loss"
    g = _group(group, where)
    cfg = RCEKDConfig.from_kwargs(config, K=K, M=M, L=L, tau=tau, T=T, beta=beta, mode=mode, reduction=reduction)
    sel, layout = _select_dense(where, g, student_shard, teacher_shard, teacher_topk, item_offset, cfg, _seed(seed),
                                row_ids, exclude_shard, backend, validate, comm_log, need_teacher=True)
    out = _loss_core(where, g, lambda ids: student_shard.gather(1, ids), lambda ids: teacher_shard.gather(1, ids),
                     sel, layout.size, layout.offset, _comm_device(g, student_shard.device), None, None, backend,
                     validate, False, return_diagnostics, comm_log)
    if return_selection:
        return (*out, sel) if isinstance(out, tuple) else (out, sel)
    return out


def sharded_loss_embeddings(
    user_vecs: Tensor,
    item_vecs_shard: Tensor,
    teacher_user_vecs: Tensor,
    teacher_item_vecs_shard: Tensor,
    selection: Selection,
    *,
    item_offset: Optional[int] = None,
    group: Any = None,
    sum_user_grad: bool = True,
    tau: Optional[float] = None,
    reduction: Optional[str] = None,
    backend: Optional[str] = None,
    validate: bool = True,
    return_diagnostics: bool = False,
    comm_log: Optional[CommLog] = None,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """The RCE-KD loss of a selection for dot-product models with the item tables sharded by rows:
    the scores of the owned columns are :func:`rcekd_kernels.gathered_dot` of the user vectors and
    the shard's item vectors, assembled across the group as in :func:`sharded_loss_gathered`.

    The gradient reaches each item vector on its owner only (``item_vecs_shard``'s gradient: this
    shard's rows of the single-process gradient). ``sum_user_grad`` (default) passes the user
    vectors through :func:`shard_input`: the backward sums their gradient over the group (one
    all-reduce of B x D), so that the user vectors' gradient is the full single-process gradient
    on every process (and DDP's averaging of replicated user-side parameters leaves it
    unchanged). With ``sum_user_grad=False`` each process keeps the part from its own items
    (their sum over the group is the gradient). The loss is the same on every process, the
    single-process value (see :func:`sharded_loss_gathered`); every process must run the backward.
    """
    where = "sharded_loss_embeddings"
    g = _group(group, where)

    def checks() -> None:
        _checks.check_types(dict(user_vecs=user_vecs, item_vecs_shard=item_vecs_shard,
                                 teacher_user_vecs=teacher_user_vecs, teacher_item_vecs_shard=teacher_item_vecs_shard))
        _check_score_tensor("user_vecs", user_vecs, B=len(selection) if isinstance(selection, Selection) else None)
        _check_score_tensor("item_vecs_shard", item_vecs_shard, n=user_vecs.shape[1])
        _check_score_tensor("teacher_user_vecs", teacher_user_vecs, B=user_vecs.shape[0])
        _check_score_tensor("teacher_item_vecs_shard", teacher_item_vecs_shard, item_vecs_shard.shape[0],
                            teacher_user_vecs.shape[1])

    ok = _try(checks) is None
    u = _ShardInput.apply(user_vecs, g, comm_log) if sum_user_grad and ok else user_vecs
    n = item_vecs_shard.shape[0] if ok else 0
    return _loss_entry(where, g, lambda ids: gathered_dot(u, item_vecs_shard, ids, validate=False),
                       lambda ids: gathered_dot(teacher_user_vecs, teacher_item_vecs_shard, ids, validate=False),
                       selection, n, item_offset, tau, reduction, backend, validate, return_diagnostics, comm_log,
                       more_checks=checks)
