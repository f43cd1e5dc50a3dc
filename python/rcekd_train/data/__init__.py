"""Data sets: synthetic (built in), CiteULike (users.dat), Gowalla and Yelp2018 (LightGCN format)."""
from __future__ import annotations

import os
from typing import Optional

from .base import DataFormatError, InteractionData, Split, split_in_order
from .citeulike import load_citeulike, read_users_dat, write_split
from .lightgcn_format import load_lightgcn_format, read_user_lines
from .synthetic import DEFAULTS as SYNTHETIC_DEFAULTS
from .synthetic import make_synthetic

ENV_VAR = "RCEKD_DATA"
DATASETS = ("synthetic", "citeulike", "gowalla", "yelp2018")
ALIASES = {"yelp": "yelp2018", "citeulike-t": "citeulike"}
#: the loader options (the config's ``data`` section) of each data set
DATA_OPTIONS = {"synthetic": tuple(SYNTHETIC_DEFAULTS), "citeulike": ("min_user_items",),
                "gowalla": ("valid_frac",), "yelp2018": ("valid_frac",)}

__all__ = ["InteractionData", "Split", "DataFormatError", "load_dataset", "resolve_data_dir", "make_synthetic",
           "load_citeulike", "load_lightgcn_format", "read_users_dat", "read_user_lines", "write_split",
           "split_in_order", "DATASETS", "DATA_OPTIONS", "ENV_VAR"]


def canonical_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {list(DATASETS)}")
    return name


def resolve_data_dir(data_dir: Optional[str]) -> str:
    """--data-dir, else $RCEKD_DATA; raises with a helpful message when neither is set."""
    d = data_dir or os.environ.get(ENV_VAR)
    if not d:
        raise FileNotFoundError(f"no data directory: pass --data-dir DIR or set {ENV_VAR}=DIR "
                                f"(DIR holds citeulike/, gowalla/, yelp2018/; `rcekd download` fills it)")
    return d


def load_dataset(name: str, data_dir: Optional[str] = None, **options) -> InteractionData:
    """Loads a data set by name. ``options``: the synthetic generator's arguments, ``min_user_items``
    (CiteULike) or ``valid_frac`` (Gowalla / Yelp2018)."""
    name = canonical_name(name)
    if name == "synthetic":
        args = dict(SYNTHETIC_DEFAULTS)
        args.update({k: v for k, v in options.items() if k in SYNTHETIC_DEFAULTS})
        return make_synthetic(**args)
    root = resolve_data_dir(data_dir)
    if name == "citeulike":
        return load_citeulike(os.path.join(root, "citeulike"), options.get("min_user_items", 5))
    return load_lightgcn_format(os.path.join(root, name), name, options.get("valid_frac", 0.1))
