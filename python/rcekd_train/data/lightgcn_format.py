"""The LightGCN / NGCF text format (Gowalla, Yelp2018).

``train.txt`` and ``test.txt``: one line per user, ``user item item ...``
(0-based ids, separated by spaces). The given test set is kept; a validation
set is carved from the end of each user's training list: ceil(valid_frac * n)
items, always leaving at least one item in train (users with a single training
item get no validation item).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

from .base import DataFormatError, InteractionData, Split


def read_user_lines(path) -> Dict[int, List[int]]:
    """``{user: [items in file order]}``; raises DataFormatError naming the file and line."""
    out: Dict[int, List[int]] = {}
    with open(path, "r", encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                if line.strip() == "":
                    continue  # blank lines are ignored
            try:
                values = [int(t) for t in tokens]
            except ValueError:
                bad = next(t for t in tokens if not t.lstrip("-").isdigit())
                raise DataFormatError(path, no, f"not an integer: {bad!r}") from None
            if any(v < 0 for v in values):
                raise DataFormatError(path, no, "negative id")
            user, items = values[0], values[1:]
            if user in out:
                raise DataFormatError(path, no, f"user {user} appears twice")
            if len(set(items)) != len(items):
                raise DataFormatError(path, no, f"repeated item id for user {user}")
            out[user] = items
    if not out:
        raise DataFormatError(path, 0, "no users in the file")
    return out


def load_lightgcn_format(data_dir: str, name: str, valid_frac: float = 0.1) -> InteractionData:
    paths = {p: os.path.join(data_dir, f"{p}.txt") for p in ("train", "test")}
    for p, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name} file not found: {path} (run `rcekd download {name}` or point "
                                    f"--data-dir / RCEKD_DATA at the folder holding {name}/{p}.txt)")
    train_raw = read_user_lines(paths["train"])
    test_raw = read_user_lines(paths["test"])
    num_users = max(max(train_raw), max(test_raw)) + 1
    num_items = 1 + max([i for d in (train_raw, test_raw) for items in d.values() for i in items] or [0])
    for u, items in test_raw.items():
        overlap = set(items) & set(train_raw.get(u, ()))
        if overlap:
            raise DataFormatError(paths["test"], 0, f"user {u} has test items also in train: "
                                  f"{sorted(overlap)[:5]}")
    train, valid, test = [], [], []
    for u in range(num_users):
        items = train_raw.get(u, [])
        n_valid = min(max(len(items) - 1, 0), math.ceil(valid_frac * len(items)))
        cut = len(items) - n_valid
        train.append(items[:cut])
        valid.append(items[cut:])
        test.append(test_raw.get(u, []))
    return InteractionData(name, num_users, num_items, Split.from_lists(train), Split.from_lists(valid),
                           Split.from_lists(test), info={"source": data_dir, "valid_frac": valid_frac})
