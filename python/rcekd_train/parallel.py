"""Data-parallel training over users: the drivers under ``torchrun`` (docs/DISTRIBUTED.md, "Data-parallel
training").

Every process (a *rank*) holds the whole model, the catalogue and the teacher; the users are split into
contiguous blocks, one per rank, balanced by their training samples (:func:`user_blocks`), and a rank trains
on the samples of its block only (:class:`Shard`). DistributedDataParallel averages the gradients of every
step; every other exchange goes through the few collectives of this module:

* :class:`Parallel` is the world of one process, where every collective is the identity: the drivers run
  through the same code with or without torchrun;
* :class:`Distributed` is a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU) opened from
  torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) by
  :func:`session`, with a timeout on every collective: when a rank fails, is killed or hangs, every other
  rank raises :class:`RankFailed` (at once when the peer's connection closes, else after the timeout)
  instead of waiting for ever;
* rank 0 is the only writer of the run directory: :meth:`Parallel.on_writer` runs a block there and hands
  its result, or its error, to the other ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import pickle
import re
import signal
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

T = TypeVar("T")

#: seconds a collective waits for the other ranks (``--dist-timeout``, ``$RCEKD_DIST_TIMEOUT``): longer than the
#: longest work one rank does alone (rank 0 writing a checkpoint, loading data before the first collective)
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "RCEKD_DIST_TIMEOUT"


class RankFailed(RuntimeError):
    """Another process of the run failed, was killed or did not answer within the timeout."""


def launched() -> bool:
    """Whether this process is one of several launched together (torchrun's ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def user_blocks(weights: Sequence[float], parts: int) -> List[int]:
    """Boundaries ``b`` (parts + 1 of them, b[0] = 0, b[-1] = len(weights)) of ``parts`` contiguous blocks of
    users, block r = users [b[r], b[r + 1]), with about equal sums of ``weights`` (a user's training samples);
    a ValueError when some block would have no sample."""
    w = np.asarray(weights, dtype=np.float64)
    n, total = len(w), float(w.sum())
    if parts < 1:
        raise ValueError(f"need at least one process, got {parts}")
    cum = np.cumsum(w)
    bounds = [0]
    for r in range(1, parts):
        b = int(np.searchsorted(cum, total * r / parts, side="left")) + 1
        bounds.append(min(max(b, bounds[-1] + 1), n - (parts - r)))
    bounds.append(n)
    sums = [float(w[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    if n < parts or min(sums) <= 0:
        raise ValueError(f"cannot split {n} users ({int(total)} training samples) into {parts} processes with "
                         f"samples in each: use fewer processes")
    return bounds


def spans(n: int, parts: int) -> List[Tuple[int, int]]:
    """[lo, hi) of ``parts`` contiguous, nearly equal pieces of range(n) (some empty when n < parts)."""
    return [(r * n // parts, (r + 1) * n // parts) for r in range(parts)]


@dataclass(frozen=True)
class Shard:
    """A rank's part of an epoch: the users [lo, hi) of its block and the number of training steps of an epoch,
    the same on every rank (DistributedDataParallel averages the gradients of one step of each rank)."""

    lo: int
    hi: int
    steps: int


def shard_for(weights: Sequence[float], batch_size: int, rank: int, world: int) -> Shard:
    """Rank ``rank``'s shard: its block of :func:`user_blocks` and steps = the most batches of ceil(batch_size /
    world) samples of any rank (a rank with fewer samples makes its batches smaller), so that a step of all ranks
    together covers about ``batch_size`` samples, as one step of one process."""
    b = user_blocks(weights, world)
    w = np.asarray(weights, dtype=np.float64)
    per_rank = math.ceil(int(batch_size) / world)
    steps = max(math.ceil(float(w[lo:hi].sum()) / per_rank) for lo, hi in zip(b[:-1], b[1:]))
    return Shard(b[rank], b[rank + 1], int(steps))


_PATH = re.compile(r"^\[[^\]]*\]\s*")


def is_comm_error(e: BaseException) -> bool:
    """Whether an exception comes from the communication (a peer that closed its connection, a timeout), as
    gloo and NCCL report it, and not from the computation."""
    dist = torch.distributed
    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    if kinds and isinstance(e, kinds):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out", "Broken pipe"))


def short_reason(e: BaseException) -> str:
    """The first sentence of a communication error, without gloo's source path and advice."""
    text = _PATH.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return text.split(". This is typically")[0].rstrip(".")


class Parallel:
    """One process: rank 0 of a world of 1; every collective returns its input (the single-process run)."""

    rank, world, local_rank = 0, 1, 0
    timeout_s = DEFAULT_TIMEOUT_S

    def __init__(self):
        #: bytes sent through each kind of collective of this module (not counting DDP's gradients)
        self.comm_bytes: Dict[str, int] = {}

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the run directory (rank 0)."""
        return self.rank == 0

    @property
    def who(self) -> str:
        return f"rank {self.rank}/{self.world}"

    def device(self, name: Optional[str]) -> str:
        """The device of this rank for a configured device name."""
        return name or "cpu"

    @contextlib.contextmanager
    def talking(self, what: str) -> Iterator[None]:
        """A block of collectives: a communication error in it becomes :class:`RankFailed` naming ``what``."""
        yield

    def all_reduce(self, t: torch.Tensor, op: str = "sum", what: str = "an all-reduce") -> torch.Tensor:
        """``t`` reduced over the ranks (``sum``, ``min`` or ``max``), in place (``what`` names it in errors)."""
        return t

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        return obj

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def gather_rows(self, part: torch.Tensor, counts: Sequence[int]) -> Optional[torch.Tensor]:
        """The rows of every rank (rank r holds ``counts[r]``), concatenated in rank order, on rank 0; None on
        the other ranks."""
        return part

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module a training step calls: ``model`` itself, or its DistributedDataParallel."""
        return model

    def on_writer(self, fn: Callable[[], T], what: str = "its part") -> T:
        """Runs ``fn`` on rank 0 only and returns its result on every rank. When it raises, rank 0 raises its
        error and the other ranks a :class:`RankFailed` that quotes it."""
        return fn()

    def span(self, n: int) -> Tuple[int, int]:
        """This rank's [lo, hi) of :func:`spans` (n, world)."""
        return spans(n, self.world)[self.rank]

    def close(self) -> None:
        pass


SINGLE = Parallel()
_CURRENT: Parallel = SINGLE


def current() -> Parallel:
    """The world of this process (:func:`session` sets it; one process otherwise)."""
    return _CURRENT


def _error_text(e: BaseException) -> str:
    msg = "; ".join(p.strip() for p in str(e).splitlines() if p.strip())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class Distributed(Parallel):
    """A ``torch.distributed`` process group of torchrun's processes (``init_method="env://"``)."""

    def __init__(self, device: Optional[str] = None, timeout_s: Optional[float] = None):
        super().__init__()
        dist = torch.distributed
        if not dist.is_available():
            raise RuntimeError("this torch has no torch.distributed: it cannot run several processes")
        env = os.environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is {env.get('WORLD_SIZE')} but {', '.join(missing)} is not set: launch "
                               f"the processes with torchrun (or rcekd ... --nproc N)")
        self.rank, self.world = int(env["RANK"]), int(env["WORLD_SIZE"])
        self.local_rank = int(env.get("LOCAL_RANK", self.rank))
        self.timeout_s = float(timeout_s if timeout_s is not None else env.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
        if not self.timeout_s > 0:
            raise ValueError(f"the collectives' timeout must be > 0 seconds, got {self.timeout_s}")
        self.cuda = str(device or "cpu").startswith("cuda")
        if self.cuda:
            if str(device) != "cuda":
                raise ValueError(f"under torchrun give --device cuda, not {device}: each process takes the GPU "
                                 f"of its LOCAL_RANK")
            if not torch.cuda.is_available() or self.local_rank >= torch.cuda.device_count():
                have = torch.cuda.device_count() if torch.cuda.is_available() else 0
                raise ValueError(f"process {self.rank} (LOCAL_RANK {self.local_rank}) needs GPU {self.local_rank}, "
                                 f"this machine has {have}: launch at most {have} process(es) per machine")
            torch.cuda.set_device(self.local_rank)
        self.backend = "nccl" if self.cuda else "gloo"
        self.comm_device = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        with self.talking("starting the process group"):
            dist.init_process_group(self.backend, init_method="env://", rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(seconds=self.timeout_s))

    def device(self, name: Optional[str]) -> str:
        return f"cuda:{self.local_rank}" if self.cuda else (name or "cpu")

    @contextlib.contextmanager
    def talking(self, what: str) -> Iterator[None]:
        try:
            yield
        except RankFailed:
            raise
        except Exception as e:
            if not is_comm_error(e):
                raise
            raise RankFailed(f"{self.who}: {what}: another process of the run failed, was killed or did not answer "
                             f"within {self.timeout_s:g} s ({short_reason(e)}); the run is stopped (its error, if "
                             f"any, is in that process's output; --resume continues from the last complete "
                             f"epoch)") from e

    def _count(self, kind: str, n: int) -> None:
        self.comm_bytes[kind] = self.comm_bytes.get(kind, 0) + int(n)

    def all_reduce(self, t: torch.Tensor, op: str = "sum", what: str = "an all-reduce") -> torch.Tensor:
        dist = torch.distributed
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        buf = t.to(self.comm_device)
        with self.talking(what):
            dist.all_reduce(buf, op=ops[op])
        self._count("all_reduce", buf.numel() * buf.element_size())
        if buf is not t:
            t.copy_(buf)
        return t

    def _bytes_to_all(self, data: Optional[bytes]) -> bytes:
        """Rank 0's bytes on every rank (two broadcasts: the length, then the bytes)."""
        dist = torch.distributed
        n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=self.comm_device)
        with self.talking("broadcast from rank 0"):
            dist.broadcast(n, 0)
            if self.is_writer:
                buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8).to(self.comm_device)
            else:
                buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.comm_device)
            if buf.numel():
                dist.broadcast(buf, 0)
        self._count("broadcast", 8 + buf.numel())
        return data if self.is_writer and data is not None else buf.cpu().numpy().tobytes()

    def broadcast(self, obj=None):
        data = self._bytes_to_all(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.is_writer else None)
        return obj if self.is_writer else pickle.loads(data)

    def all_gather(self, obj) -> list:
        out: list = [None] * self.world
        with self.talking("all-gather"):
            torch.distributed.all_gather_object(out, obj)
        return out

    def gather_rows(self, part: torch.Tensor, counts: Sequence[int]) -> Optional[torch.Tensor]:
        dist = torch.distributed
        if len(part) != counts[self.rank]:
            raise ValueError(f"{self.who} holds {len(part)} rows, expected {counts[self.rank]}")
        m = max(counts)
        buf = torch.zeros((m,) + tuple(part.shape[1:]), dtype=part.dtype, device=self.comm_device)
        buf[:len(part)] = part.to(self.comm_device)
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        with self.talking("all-gather of rows"):
            dist.all_gather(outs, buf)
        self._count("all_gather", buf.numel() * buf.element_size())
        if not self.is_writer:
            return None
        return torch.cat([o[:c] for o, c in zip(outs, counts)]).to(part.device)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import inspect

        from torch.nn.parallel import DistributedDataParallel
        dev = next(model.parameters()).device
        # the buffers (HSTU's sequences) are built from the data, the same on every rank: not synchronised at
        # every forward (torch >= 2.13 names the option forward_sync_buffers, older ones broadcast_buffers)
        options = inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
        with self.talking("setting up DistributedDataParallel"):
            return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                           **{sync: False})

    def on_writer(self, fn: Callable[[], T], what: str = "its part") -> T:
        if self.is_writer:
            try:
                value = fn()
            except BaseException as e:
                with contextlib.suppress(Exception):  # the others may be gone already: rank 0's own error first
                    self.broadcast(("error", _error_text(e)))
                raise
            self.broadcast(("ok", value))
            return value
        tag, value = self.broadcast(None)
        if tag == "error":
            raise RankFailed(f"{self.who}: rank 0 failed ({what}): {value}")
        return value

    def close(self) -> None:
        """Frees what still holds the process group (a DistributedDataParallel in a reference cycle keeps it, and
        gloo's threads, alive until the interpreter's exit, where freeing them aborts the process), then destroys
        it."""
        dist = torch.distributed
        gc.collect()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _stopped(signum, frame):
    raise RankFailed(f"{current().who}: stopped by signal {signal.Signals(signum).name} (torchrun stops every "
                     f"process of a run when one of them fails; that one's error is in its output)")


@contextlib.contextmanager
def session(device: Optional[str] = None, timeout_s: Optional[float] = None) -> Iterator[Parallel]:
    """The world of this process for a block: one process, or, when launched by torchrun (``WORLD_SIZE`` > 1),
    the process group of the run (closed at the end of the block, however it ends). SIGTERM (what torchrun
    sends the other processes when one fails) becomes a :class:`RankFailed` in the main thread, so that every
    rank ends with its own error line."""
    global _CURRENT
    if not launched():
        yield SINGLE
        return
    if _CURRENT is not SINGLE:  # already inside a session (several runs of one command)
        yield _CURRENT
        return
    par = Distributed(device, timeout_s)
    previous = signal.signal(signal.SIGTERM, _stopped)
    _CURRENT = par
    try:
        yield par
    finally:
        _CURRENT = SINGLE
        signal.signal(signal.SIGTERM, previous)
        par.close()
