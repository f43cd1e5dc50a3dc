"""Configuration: packaged YAML files, merged with user files and command-line overrides.

A run is described by one resolved dictionary::

    role: teacher | student         dataset: name        data: {...loader options}
    seed, device, threads, data_dir
    model: {name, ...backbone hyperparameters}
    train: {epochs, batch_size, lr, wd, patience, ...}
    kd:    {method, lambda, ...method hyperparameters}       (students)
    teacher_topk: size of the teacher's cached top-K lists  (teachers)

It is built, lowest priority first, from ``configs/defaults.yaml``, the data set's
file (``configs/<dataset>.yaml``: shared settings, then ``teacher.<model>`` or
``student.<model>``, then ``distill.<teacher>-><student>`` for students), a user
``--config FILE`` (same layout, or a resolved config), ``--set key.sub=value``
overrides, and finally the explicit command-line flags.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: how a split's metrics are averaged over users (train.metric_convention):
#:   ours    - the mean over the users that have items in the split;
#:   authors - the authors' code: the sum over those users divided by all users (users without items in
#:             the split count as zeros; on CiteULike valid = 0.8657 x ours, test unchanged)
METRIC_CONVENTIONS = ("ours", "authors")
RUN_KEYS = ("role", "dataset", "data", "data_dir", "seed", "device", "threads", "model", "train", "kd",
            "teacher_topk", "teacher_dir", "synthetic")


def load_yaml(path: str) -> Dict:
    with open(path, "r", encoding="utf-8") as f:
        obj = yaml.safe_load(f) or {}
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level")
    return obj


def packaged(name: str) -> Dict:
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        avail = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise FileNotFoundError(f"no packaged config {name!r}; available: {avail}")
    return load_yaml(path)


def merge(base: Dict, over: Optional[Dict]) -> Dict:
    """Recursive merge (``over`` wins); returns a new dict."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """Command-line value: int, float (1e-3 too), bool, null, a YAML list/map, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_sets(cfg: Dict, sets: Iterable[str]) -> Dict:
    """Applies ``key.sub=value`` overrides."""
    cfg = copy.deepcopy(cfg)
    for item in sets or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. train.lr=1e-3), got {item!r}")
        key, value = item.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = parse_value(value.strip())
    return cfg


def pair_key(teacher_model: str, student_model: str) -> str:
    return f"{teacher_model}->{student_model}"


def resolve(dataset: str, role: str, model: str, *, kd_method: str = "none", teacher_model: Optional[str] = None,
            user_config: Optional[Dict] = None, sets: Iterable[str] = (), flags: Optional[Dict] = None) -> Dict:
    """The resolved run config (see the module docstring)."""
    from .data import canonical_name
    dataset = canonical_name(dataset)
    model = model.lower()
    defaults = packaged("defaults")
    ds = packaged(dataset) if os.path.exists(os.path.join(CONFIG_DIR, f"{dataset}.yaml")) else {}
    if user_config and user_config.get("dataset") and canonical_name(user_config["dataset"]) != dataset:
        raise ValueError(f"--config is for data set {user_config['dataset']!r}, not {dataset!r}")

    def layered(source: Dict) -> Dict:
        """Shared settings of a config file, then the role/model (and pair) specific ones."""
        cfg = {k: v for k, v in source.items() if k in ("seed", "device", "threads", "data", "train",
                                                          "teacher_topk", "synthetic")}
        models = source.get("models", {})
        if model in models:
            cfg = merge(cfg, {"model": models[model]})
        spec = source.get(role, {}).get(model, {}) if isinstance(source.get(role), dict) else {}
        cfg = merge(cfg, {k: v for k, v in spec.items() if k in ("model", "train", "data", "teacher_topk")})
        if role == "student" and kd_method != "none":
            cfg = merge(cfg, {"kd": source.get("kd", {}).get(kd_method, {})})
            pair = source.get("distill", {}).get(pair_key(teacher_model or model, model), {})
            cfg = merge(cfg, {k: v for k, v in pair.items() if k in ("train", "model")})
            # a method's own section: its hyperparameters, and training settings of this method alone
            # (the authors tune e.g. weight decay and batch size per method): "train:" / "model:" keys
            spec_kd = dict(pair.get(kd_method) or {})
            cfg = merge(cfg, {k: spec_kd.pop(k) for k in ("train", "model") if isinstance(spec_kd.get(k), dict)})
            cfg = merge(cfg, {"kd": spec_kd})
        return cfg

    cfg = {"role": role, "dataset": dataset, "data_dir": None}
    cfg = merge(cfg, layered(defaults))
    cfg = merge(cfg, layered(ds))
    if user_config:
        if "role" in user_config or "model" in user_config and "name" in user_config.get("model", {}):
            cfg = merge(cfg, {k: v for k, v in user_config.items() if k in RUN_KEYS})  # a resolved config
        else:
            cfg = merge(cfg, layered(user_config))
    cfg.setdefault("model", {})["name"] = model
    kd = cfg.get("kd", {}) if role == "student" else {}
    cfg["kd"] = merge(kd, {"method": kd_method})
    if role == "student" and kd_method == "none":
        cfg["kd"] = {"method": "none", "lambda": 0.0}
    cfg = apply_sets(cfg, sets)
    for key, value in (flags or {}).items():
        if value is not None:
            node = cfg
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
    check(cfg)
    return cfg


def check(cfg: Dict) -> None:
    """Rejects unknown train keys and bad values early, with the key's name."""
    known = packaged("defaults").get("train", {})
    unknown = sorted(set(cfg.get("train", {})) - set(known))
    if unknown:
        raise ValueError(f"unknown train option(s) {unknown}; known: {sorted(known)}")
    t = cfg["train"]
    for key in ("epochs", "batch_size", "patience", "eval_every"):
        if not isinstance(t[key], int) or t[key] < (0 if key == "epochs" else 1):
            raise ValueError(f"train.{key} must be a positive integer, got {t[key]!r}")
    for key in ("lr", "wd"):
        if not isinstance(t[key], (int, float)) or t[key] < 0:
            raise ValueError(f"train.{key} must be a non-negative number, got {t[key]!r}")
    if t.get("metric_convention", "ours") not in METRIC_CONVENTIONS:
        raise ValueError(f"train.metric_convention must be one of {list(METRIC_CONVENTIONS)}, "
                         f"got {t.get('metric_convention')!r}")
    keep = t.get("keep_every")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"train.keep_every must be a positive integer (epochs) or null, got {keep!r}")
    epochs = t.get("keep_epochs") or []
    if not isinstance(epochs, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                                               for e in epochs):
        raise ValueError(f"train.keep_epochs must be a list of positive epoch numbers, got {epochs!r}")


#: keys a resumed run may change: how long it runs and how it shows progress, where it runs
IGNORED_ON_RESUME = {("train", "epochs"), ("train", "patience"), ("train", "progress"), ("train", "max_minutes"),
                     ("train", "stop_after"), ("train", "plot"), ("train", "nonfinite"), ("device",), ("threads",),
                     ("data_dir",)}


def flatten(d: Dict, prefix: tuple = ()) -> Dict[tuple, Any]:
    """{(key, sub, ...): leaf value} of a nested dict."""
    out: Dict[tuple, Any] = {}
    for k, v in d.items():
        key = prefix + (k,)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_differences(a: Dict, b: Dict, ignored=IGNORED_ON_RESUME):
    """[(dotted key, value in a, value in b)] of the leaves that differ, except the ``ignored`` keys."""
    fa, fb = flatten(a), flatten(b)
    diffs = []
    for k in sorted(set(fa) | set(fb), key=str):
        if k in ignored:
            continue
        if fa.get(k) != fb.get(k):
            diffs.append((".".join(k), fa.get(k), fb.get(k)))
    return diffs


def dump(cfg: Dict, path: str) -> None:
    from .files import write_text
    write_text(path, yaml.safe_dump(cfg, sort_keys=False))
