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
from typing import Dict, List, Tuple

from .base import DataFormatError, InteractionData, Split, check_dense_ids, read_int_lines


def read_user_lines(path) -> Dict[int, List[int]]:
    """``{user: [items in file order]}``; raises DataFormatError naming the file and line."""
    return _read(path)[0]


def _read(path) -> Tuple[Dict[int, List[int]], Dict[int, int], Dict[str, Tuple[int, int]]]:
    """The users' items, the line of each user, and the largest user and item ids with their lines. A file must
    end with a newline (the published ones do): a last line without one is taken for a truncated file."""
    out: Dict[int, List[int]] = {}
    line_of: Dict[int, int] = {}
    largest = {"user": (-1, 0), "item": (-1, 0)}
    lines, ends_with_newline = read_int_lines(path)
    for no, values in lines:
        if not values:
            continue  # blank lines are ignored
        if any(v < 0 for v in values):
            raise DataFormatError(path, no, "negative id")
        user, items = values[0], values[1:]
        if user in out:
            raise DataFormatError(path, no, f"user {user} appears twice (first on line {line_of[user]})")
        if len(set(items)) != len(items):
            raise DataFormatError(path, no, f"repeated item id for user {user}")
        out[user], line_of[user] = items, no
        if user > largest["user"][0]:
            largest["user"] = (user, no)
        top = max(items, default=-1)
        if top > largest["item"][0]:
            largest["item"] = (top, no)
    if lines and not ends_with_newline:
        raise DataFormatError(path, len(lines), "the last line has no newline: the file looks truncated")
    if not out:
        raise DataFormatError(path, 0, "no users in the file")
    return out, line_of, largest


def load_lightgcn_format(data_dir: str, name: str, valid_frac: float = 0.1) -> InteractionData:
    paths = {p: os.path.join(data_dir, f"{p}.txt") for p in ("train", "test")}
    for p, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name} file not found: {path} (run `rcekd download {name}` or point "
                                    f"--data-dir / RCEKD_DATA at the folder holding {name}/{p}.txt)")
    (train_raw, _, train_max), (test_raw, test_line, test_max) = _read(paths["train"]), _read(paths["test"])
    # ids index the tables: the largest ids are checked before anything of their size is allocated
    for kind, distinct in (("user", set(train_raw) | set(test_raw)),
                           ("item", {i for d in (train_raw, test_raw) for items in d.values() for i in items})):
        (largest, no), path = max((train_max[kind], paths["train"]), (test_max[kind], paths["test"]),
                                  key=lambda x: x[0][0])
        check_dense_ids(path, no, kind, largest, len(distinct))
    num_users = max(max(train_raw), max(test_raw)) + 1
    num_items = 1 + max(train_max["item"][0], test_max["item"][0], 0)
    for u, items in test_raw.items():
        overlap = set(items) & set(train_raw.get(u, ()))
        if overlap:
            raise DataFormatError(paths["test"], test_line[u], f"user {u} has test items also in train: "
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
