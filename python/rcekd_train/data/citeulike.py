"""CiteULike-t from ``users.dat`` with the authors' 8:1:1 split.

``users.dat`` has one line per user (the 0-based line number is the user id):
``N item_1 ... item_N``. The preprocessing (the authors' README: kcore4user 5,
kcore4item 0, ratios 8:1:1, split in file order):

1. keep the users with at least ``min_user_items`` items (no item filter);
2. re-index users by ascending original id and items by ascending original id
   among the kept users;
3. split each user's items in file order: train = first max(floor(8n/10), 1),
   valid = up to floor(9n/10), test = the rest.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from ..files import write_text
from .base import DataFormatError, InteractionData, Split, read_int_lines, split_in_order

FILE = "users.dat"


def read_users_dat(path) -> List[List[int]]:
    """Parses ``users.dat``: one list of original item ids per line (the user id is the line index). A trailing
    newline is allowed (the published file has none); a malformed line is a DataFormatError naming it."""
    users: List[List[int]] = []
    lines, _ = read_int_lines(path)
    for no, values in lines:
        if not values:
            raise DataFormatError(path, no, "empty line (expected 'N item_1 ... item_N')")
        n, items = values[0], values[1:]
        if n != len(items):
            cut = "; the last line: is the file truncated?" if no == len(lines) and n > len(items) else ""
            raise DataFormatError(path, no, f"the count says {n} items but the line has {len(items)}{cut}")
        if any(i < 0 for i in items):
            raise DataFormatError(path, no, "negative item id")
        if len(set(items)) != len(items):
            raise DataFormatError(path, no, "repeated item id")
        users.append(items)
    if not users:
        raise DataFormatError(path, 0, "no users in the file")
    return users


def preprocess(raw: List[List[int]], min_user_items: int = 5, ratios=(8, 1, 1)
               ) -> Tuple[List[List[int]], List[List[int]], List[List[int]], int, np.ndarray, np.ndarray]:
    """Filter, re-index and split. Returns (train, valid, test, num_items, kept original user ids,
    original item id of each new item id)."""
    kept = [u for u, items in enumerate(raw) if len(items) >= min_user_items]
    item_ids = np.unique(np.fromiter((i for u in kept for i in raw[u]), dtype=np.int64))
    remap = {int(o): n for n, o in enumerate(item_ids)}
    train, valid, test = [], [], []
    for u in kept:
        items = [remap[i] for i in raw[u]]
        a, b, c = split_in_order(items, ratios)
        train.append(a)
        valid.append(b)
        test.append(c)
    return train, valid, test, len(item_ids), np.asarray(kept, dtype=np.int64), item_ids


def load_citeulike(data_dir: str, min_user_items: int = 5) -> InteractionData:
    path = os.path.join(data_dir, FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CiteULike file not found: {path} (run `rcekd download citeulike` "
                                f"or point --data-dir / RCEKD_DATA at the folder holding citeulike/{FILE})")
    raw = read_users_dat(path)
    train, valid, test, n_items, kept, item_ids = preprocess(raw, min_user_items)
    return InteractionData("citeulike", len(kept), n_items, Split.from_lists(train), Split.from_lists(valid),
                           Split.from_lists(test), info={"source": path, "original_user_ids": kept,
                                                         "original_item_ids": item_ids})


def write_split(data: InteractionData, out_dir: str) -> None:
    """Writes train.txt / valid.txt / test.txt as tab-separated ``USER\\tITEM`` with a header."""
    os.makedirs(out_dir, exist_ok=True)
    for part in ("train", "valid", "test"):
        pairs = getattr(data, part).pairs()
        write_text(os.path.join(out_dir, f"{part}.txt"), "USER\tITEM\n" + "".join(f"{u}\t{i}\n" for u, i in pairs))
