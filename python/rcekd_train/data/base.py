"""The in-memory form of an implicit-feedback data set.

Every split is kept as a CSR structure over users (``indptr``, ``indices``), with
each user's items in the order of the source file (the order matters for the
sequential backbone and for the 8:1:1 splits). Ids are contiguous from 0.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


class DataFormatError(ValueError):
    """A data file that cannot be parsed; the message names the file and the line."""

    def __init__(self, path, line_no: int, message: str):
        self.path, self.line_no = str(path), line_no
        where = f"{path}, line {line_no}" if line_no else str(path)
        super().__init__(f"{where}: {message}")


#: a token of a data file: ASCII digits with an optional minus sign (Python's int would also take "1_5697",
#: "+5" or an Arabic-Indic digit); tokens are separated by spaces, tabs (and a CR before the newline)
_INT_TOKEN = re.compile(rb"-?[0-9]+")
_INT_CHARS = b"0123456789- \t\r"
#: the largest id a file may hold (ids are int64 in memory)
MAX_ID = 2 ** 63 - 1


def read_int_lines(path) -> Tuple[List[Tuple[int, List[int]]], bool]:
    """The lines of a text file of integers: ([(line number, values)], whether the file ends with a newline).
    DataFormatError naming the file and the line for undecodable bytes, a token that is not a plain decimal
    integer (``--5``, ``1_5697``, ``1.5``), or an integer beyond int64."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    ends_with_newline = raw.endswith(b"\n")
    if ends_with_newline or not raw:
        lines = lines[:-1]
    out = []
    for no, line in enumerate(lines, start=1):
        tokens = line.split()
        if line.translate(None, _INT_CHARS) or (b"-" in line and not all(map(_INT_TOKEN.fullmatch, tokens))):
            raise DataFormatError(path, no, _why_not_integers(line))
        values = [int(t) for t in tokens]
        if tokens and max(map(len, tokens)) > 18 and any(abs(v) > MAX_ID for v in values):
            big = next(v for v in values if abs(v) > MAX_ID)
            raise DataFormatError(path, no, f"the integer {big} is beyond int64 (|id| <= {MAX_ID})")
        out.append((no, values))
    return out, ends_with_newline


def _why_not_integers(line: bytes) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"undecodable bytes (not UTF-8) at column {e.start + 1}: {line[e.start:e.start + 4]!r}"
    bad = next((t for t in line.split() if not _INT_TOKEN.fullmatch(t)), None)
    if bad is None:  # a separator other than spaces and tabs
        return f"unexpected characters (expected integers separated by spaces): {line.decode('utf-8')[:60]!r}"
    return f"not an integer: {bad.decode('utf-8')!r} (ids are plain decimal integers)"


def check_dense_ids(path, line_no: int, kind: str, largest: int, distinct: int) -> None:
    """Ids index the embedding tables (a table has largest id + 1 rows): refuses, before anything of that size
    is allocated, an id far beyond the number of distinct ids (at most 2 x distinct + 1024, and below 2^31, the
    int32 of the top-K caches); it names the file and the line of that id."""
    limit = min(2 * distinct + 1024, 2 ** 31 - 1)
    if largest >= limit:
        raise DataFormatError(path, line_no, f"{kind} id {largest} is too large: the files hold {distinct} distinct "
                              f"{kind} ids, and ids index the embedding tables ({largest + 1} rows); ids must be "
                              f"0-based and nearly contiguous (below {limit})")


@dataclass
class Split:
    """Items of each user, CSR: user u owns ``indices[indptr[u]:indptr[u+1]]``."""

    indptr: np.ndarray  # int64 (U + 1,)
    indices: np.ndarray  # int64 (nnz,)

    @staticmethod
    def from_lists(lists: Sequence[Sequence[int]]) -> "Split":
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = [i for x in lists for i in x]
        return Split(indptr, np.asarray(flat, dtype=np.int64).reshape(-1))

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def items_of(self, u: int) -> np.ndarray:
        return self.indices[self.indptr[u]:self.indptr[u + 1]]

    def users_of_pairs(self) -> np.ndarray:
        """The user of each stored pair (nnz,)."""
        return np.repeat(np.arange(self.num_users, dtype=np.int64), self.lengths())

    def pairs(self) -> np.ndarray:
        """(nnz, 2) array of (user, item) in storage order."""
        return np.stack([self.users_of_pairs(), self.indices], axis=1)


@dataclass
class InteractionData:
    """Users, items and the train / valid / test splits of one data set."""

    name: str
    num_users: int
    num_items: int
    train: Split
    valid: Split
    test: Split
    info: Dict = field(default_factory=dict)

    def __post_init__(self):
        for part in ("train", "valid", "test"):
            sp = getattr(self, part)
            if sp.num_users != self.num_users:
                raise ValueError(f"{part} split has {sp.num_users} users, expected {self.num_users}")
            if sp.nnz and (sp.indices.min() < 0 or sp.indices.max() >= self.num_items):
                raise ValueError(f"{part} split has item ids outside [0, {self.num_items})")
        self._train_keys = None

    # --- helpers used by training and evaluation -------------------------------------
    def train_keys(self) -> np.ndarray:
        """Sorted user * num_items + item keys of the training pairs (membership tests)."""
        if self._train_keys is None:
            keys = self.train.users_of_pairs() * self.num_items + self.train.indices
            self._train_keys = np.unique(keys)
        return self._train_keys

    def is_train_pair(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = self.train_keys()
        q = users.astype(np.int64) * self.num_items + items.astype(np.int64)
        pos = np.searchsorted(keys, q)
        pos = np.minimum(pos, len(keys) - 1)
        return keys[pos] == q if len(keys) else np.zeros(q.shape, dtype=bool)

    def train_mask_rows(self, users: torch.Tensor) -> torch.Tensor:
        """Dense bool (B, num_items): True at each user's training items."""
        users_np = users.detach().cpu().numpy()
        ip, ind = self.train.indptr, self.train.indices
        starts, ends = ip[users_np], ip[users_np + 1]
        lens = ends - starts
        rows = np.repeat(np.arange(len(users_np)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        cols = ind[np.repeat(starts, lens) + offs]
        mask = torch.zeros(len(users_np), self.num_items, dtype=torch.bool)
        mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return mask.to(users.device)

    def train_exclusion(self, users: torch.Tensor):
        """The users' training items as a sparse exclusion (offsets (B + 1,), ids (nnz,)) int64 on the users'
        device: the form ``rcekd_kernels.topm_dot`` and the loss from embeddings take (never a (B, N) mask)."""
        users_np = users.detach().cpu().numpy().astype(np.int64)
        ip, ind = self.train.indptr, self.train.indices
        starts, ends = ip[users_np], ip[users_np + 1]
        lens = ends - starts
        offsets = np.zeros(len(users_np) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        ids = ind[np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])]
        return torch.from_numpy(offsets).to(users.device), torch.from_numpy(ids).to(users.device)

    def stats(self) -> Dict[str, float]:
        n = self.train.nnz + self.valid.nnz + self.test.nnz
        return {
            "users": self.num_users, "items": self.num_items, "interactions": n,
            "train": self.train.nnz, "valid": self.valid.nnz, "test": self.test.nnz,
            "density": n / float(self.num_users * self.num_items),
        }

    def fingerprint(self) -> str:
        """A short hash of the splits (stored with checkpoints and teacher caches)."""
        h = hashlib.sha256()
        h.update(f"{self.num_users},{self.num_items}".encode())
        for part in (self.train, self.valid, self.test):
            h.update(part.indptr.tobytes())
            h.update(part.indices.tobytes())
        return h.hexdigest()[:16]


def split_in_order(items: Sequence[int], ratios=(8, 1, 1)) -> (List[int], List[int], List[int]):
    """Splits one user's list in the given order: train = first max(floor(r0 n / s), 1),
    valid up to floor((r0 + r1) n / s), test the rest."""
    n = len(items)
    s = sum(ratios)
    l_end = max((ratios[0] * n) // s, 1)
    r_end = max(((ratios[0] + ratios[1]) * n) // s, l_end)
    return list(items[:l_end]), list(items[l_end:r_end]), list(items[r_end:])
