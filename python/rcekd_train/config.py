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
import difflib
import math
import os
from typing import Any, Dict, Iterable, List, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: how a split's metrics are averaged over users (train.metric_convention):
#:   ours    - the mean over the users that have items in the split;
#:   authors - the authors' code: the sum over those users divided by all users (users without items in
#:             the split count as zeros; on CiteULike valid = 0.8657 x ours, test unchanged)
METRIC_CONVENTIONS = ("ours", "authors")
RUN_KEYS = ("role", "dataset", "data", "data_dir", "seed", "device", "threads", "model", "train", "kd",
            "teacher_topk", "teacher_dir")
MODEL_NAMES = ("mf", "lightgcn", "hstu")

# --- the values a key accepts ----------------------------------------------------------------------------------
#: a rule is a tuple of choices, or a name of RULES, optionally with "|None" (null is accepted too)
RULES = {
    "int": ("an integer", lambda v: _is_int(v)),
    "pos_int": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "nonneg_int": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "pos": ("a finite number > 0", lambda v: _is_real(v) and v > 0),
    "nonneg": ("a finite number >= 0", lambda v: _is_real(v) and v >= 0),
    "finite": ("a finite number", lambda v: _is_real(v)),
    "prob": ("a number in [0, 1)", lambda v: _is_real(v) and 0 <= v < 1),
    "unit": ("a number in [0, 1]", lambda v: _is_real(v) and 0 <= v <= 1),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}
TRAIN_RULES = {"epochs": "nonneg_int", "batch_size": "pos_int", "patience": "pos_int", "eval_every": "pos_int",
               "eval_batch_size": "pos_int", "lr": "pos", "wd": "nonneg", "max_minutes": "nonneg|None",
               "stop_after": "pos_int|None", "keep_every": "pos_int|None", "progress": "bool", "plot": "bool",
               "metric_convention": METRIC_CONVENTIONS, "nonfinite": ("error", "skip"), "early_stop_metric": "str"}
MODEL_RULES = {"dim": "pos_int", "layers": "nonneg_int", "init_std": "nonneg", "blocks": "pos_int", "heads": "pos_int",
               "attn_dim": "pos_int", "linear_dim": "pos_int", "max_len": "pos_int", "dropout": "prob",
               "linear_dropout": "prob", "temperature": "pos", "num_negatives": "pos_int", "rel_bias": "bool",
               "negatives": ("position", "batch"), "init": ("normal", "xavier")}
DATA_RULES = {"num_users": "pos_int", "num_items": "pos_int", "dim": "pos_int", "clusters": "pos_int",
              "mean_items": "pos", "min_items": "pos_int", "max_items": "pos_int", "zipf": "nonneg",
              "temperature": "pos", "seed": "int", "min_user_items": "pos_int", "valid_frac": "prob"}
TOP_RULES = {"seed": "int", "threads": "pos_int|None", "teacher_topk": "pos_int", "device": "str|None",
             "data_dir": "str|None", "teacher_dir": "str|None"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(key: str, value: Any, rule) -> None:
    """ValueError naming ``key`` unless ``value`` satisfies ``rule`` (see RULES)."""
    if isinstance(rule, tuple):
        if value not in rule:
            raise ValueError(f"{key} must be one of {list(rule)}, got {value!r}")
        return
    name, _, none_ok = rule.partition("|")
    if value is None and none_ok:
        return
    what, ok = RULES[name]
    if not ok(value):
        raise ValueError(f"{key} must be {what}{' or null' if none_ok else ''}, got {value!r}")


def check_values(section: str, values: Dict, rules: Dict) -> None:
    for k, rule in rules.items():
        if k in values:
            check_value(f"{section}.{k}" if section else k, values[k], rule)


def load_yaml(path: str) -> Dict:
    """A YAML file holding a mapping; ValueError naming the file (and the line) when it is not one."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{path}{where}: not valid YAML ({what})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level")
    return obj


def packaged(name: str) -> Dict:
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        avail = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise FileNotFoundError(f"no packaged config {name!r}; available: {avail}")
    return load_yaml(path)


def marked_ours(name: str) -> List[Dict]:
    """The settings of packaged config ``name`` (or of the YAML file at path ``name``) that are marked ``# ours``
    (a value that is not the authors'), in file order: ``{"key": dotted path, "value": the YAML text, "why": the
    comment}``; a comment continued on the following comment-only lines (indented past the key) is joined to it.
    Keys of block mappings only (a flow mapping such as ``{a: 1}`` is one value)."""
    path = name if name.endswith(".yaml") else os.path.join(CONFIG_DIR, f"{name}.yaml")
    lines = open(path, encoding="utf-8").read().splitlines()
    out: List[Dict] = []
    stack: List = []  # (indent, key) of the enclosing block mappings
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        body = line.split("#", 1)[0].rstrip()
        if not body.strip():
            continue
        indent = len(body) - len(body.lstrip())
        key, sep, value = body.strip().partition(":")
        if not sep:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if "#" in line and line.split("#", 1)[1].strip().startswith("ours"):
            why = [line.split("#", 1)[1].strip()[len("ours"):].lstrip(" :")]
            while i < len(lines) and lines[i].strip().startswith("#") and \
                    len(lines[i]) - len(lines[i].lstrip()) > indent:
                why.append(lines[i].strip()[1:].strip())
                i += 1
            out.append({"key": ".".join([k for _, k in stack] + [key.strip()]), "value": value.strip(),
                        "why": " ".join(w for w in why if w)})
        if not value.strip():
            stack.append((indent, key.strip()))
    return out


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
            user_config=None, sets: Iterable[str] = (), flags: Optional[Dict] = None) -> Dict:
    """The resolved run config (see the module docstring). ``user_config``: a YAML file's path or its dict.
    Every key of every source is checked: an unknown one (a typo) is refused, naming its source."""
    from .data import canonical_name
    dataset = canonical_name(dataset)
    model = model.lower()
    defaults = packaged("defaults")
    ds = packaged(dataset) if os.path.exists(os.path.join(CONFIG_DIR, f"{dataset}.yaml")) else {}
    for name, source in (("defaults", defaults), (dataset, ds)):
        check_keys(source, layout_schema(dataset), f" (in {os.path.join(CONFIG_DIR, name + '.yaml')})")
    where = " (in --config)"
    if isinstance(user_config, str):
        user_config, where = load_yaml(user_config), f" (in {user_config})"
    if user_config and user_config.get("dataset") and canonical_name(user_config["dataset"]) != dataset:
        raise ValueError(f"--config is for data set {user_config['dataset']!r}, not {dataset!r}")
    resolved_form = bool(user_config) and ("role" in user_config or "model" in user_config and
                                           "name" in (user_config.get("model") or {}))
    this_run = run_schema({"dataset": dataset, "model": {"name": model}, "kd": {"method": kd_method}})
    if user_config:
        check_keys(user_config, this_run if resolved_form else layout_schema(dataset), where)
    for item in sets or ():
        check_set(item, this_run)

    def layered(source: Dict) -> Dict:
        """Shared settings of a config file, then the role/model (and pair) specific ones."""
        cfg = {k: v for k, v in source.items() if k in ("seed", "device", "threads", "data_dir", "data", "train",
                                                          "teacher_topk")}
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
        if resolved_form:
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


# --- the keys a config may hold ---------------------------------------------------------------------------------
# A schema is a nested dict of the valid keys: a dict for a section, None for a value.
def _sections(dataset: str) -> Dict[str, Any]:
    from .data import DATA_OPTIONS
    from .kd import METHODS
    from .models import model_args
    return {"train": dict.fromkeys(packaged("defaults")["train"]),
            "data": dict.fromkeys(DATA_OPTIONS.get(dataset, ())),
            "models": {m: dict.fromkeys(model_args(m)) for m in MODEL_NAMES},
            "kd": {m: dict.fromkeys(["lambda", "base_weight"] + list(cls.defaults))
                   for m, cls in METHODS.items() if m != "none"}}


def run_schema(cfg: Dict) -> Dict:
    """The keys of a resolved run config: its model's hyperparameters, its KD method's (any method's for a run
    without distillation: shared --set of the demo and the queue), its data set's loader options."""
    sec = _sections(cfg.get("dataset", ""))
    model = (cfg.get("model") or {}).get("name")
    method = (cfg.get("kd") or {}).get("method", "none")
    kd_keys = sec["kd"].get(method) or {k: None for keys in sec["kd"].values() for k in keys}
    schema: Dict[str, Any] = dict.fromkeys(("role", "dataset", "data_dir", "seed", "device", "threads",
                                            "teacher_topk", "teacher_dir"))
    schema.update(data=sec["data"], train=sec["train"], model={"name": None, **sec["models"].get(model, {})},
                  kd={"method": None, **kd_keys})
    return schema


def layout_schema(dataset: str) -> Dict:
    """The keys of a config file in the packaged layout (defaults, shared settings, ``models``,
    ``teacher.<model>`` / ``student.<model>``, ``kd.<method>``, ``distill."<teacher>-><student>".<method>``)."""
    sec = _sections(dataset)
    role = {m: {"model": sec["models"][m], "train": sec["train"], "data": sec["data"], "teacher_topk": None}
            for m in MODEL_NAMES}
    distill = {pair_key(t, s): {"train": sec["train"], "model": sec["models"][s],
                                **{k: {**keys, "train": sec["train"], "model": sec["models"][s]}
                                   for k, keys in sec["kd"].items()}}
               for t in MODEL_NAMES for s in MODEL_NAMES}
    return {**dict.fromkeys(("dataset", "seed", "device", "threads", "data_dir", "teacher_topk")), "data": sec["data"],
            "train": sec["train"], "models": sec["models"], "teacher": role, "student": role, "kd": sec["kd"],
            "distill": distill}


def _dotted_keys(schema: Dict, prefix: str = "") -> List[str]:
    out = []
    for k, v in schema.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _dotted_keys(v, prefix + k + ".")
    return out


def unknown_key_error(dotted: str, valid: Iterable[str], where: str = "", everywhere: Iterable[str] = ()):
    """The ValueError of an unknown key: where it came from, the closest valid key ("did you mean"), the
    valid keys of its section."""
    parent, _, last = dotted.rpartition(".")
    valid = sorted(valid)
    close = difflib.get_close_matches(last, valid, n=1, cutoff=0.6)
    guess = f"{parent}.{close[0]}" if close and parent else (close[0] if close else None)
    if guess is None:
        everywhere = list(everywhere)
        close = difflib.get_close_matches(dotted, everywhere, n=1, cutoff=0.6)
        guess = close[0] if close else next((k for k in everywhere if k.rpartition(".")[2] == last), None)
    hint = f"; did you mean {guess!r}?" if guess else ";"
    return ValueError(f"unknown config key {dotted!r}{where}{hint} the valid keys of {parent or 'a config'} are: "
                      f"{', '.join(valid)}")


def check_keys(tree: Dict, schema: Dict, where: str = "", prefix: str = "", _all=None) -> None:
    """ValueError for the first key of ``tree`` that ``schema`` does not hold (``where``: its source, for the
    message), or a section given as a value."""
    everywhere = _all if _all is not None else _dotted_keys(schema)
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        if k not in schema:
            raise unknown_key_error(dotted, schema, where, everywhere)
        if isinstance(schema[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"{dotted}{where} is a section: it must hold keys ({', '.join(sorted(schema[k]))}), "
                                 f"got {v!r}")
            check_keys(v, schema[k], where, dotted + ".", everywhere)
        elif isinstance(v, dict):
            raise ValueError(f"{dotted}{where} is a value, not a section: it has no key {next(iter(v), '')!r}")


def check_set(item: str, schema: Dict) -> None:
    """Checks the key of one ``--set key.sub=value`` against a run's schema before it is applied."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value (e.g. train.lr=1e-3), got {item!r}")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    tree: Any = parse_value(value.strip())
    for p in reversed(parts):
        tree = {p: tree}
    check_keys(tree, schema, f" (--set {item})")


# --- the values ------------------------------------------------------------------------------------------------------
def check(cfg: Dict) -> None:
    """Refuses, with the key's name, an unknown key anywhere in a resolved run config and a bad value (a
    dimension of 0, a negative or NaN learning rate, lambda or time limit, ...): run when a config is built
    (``resolve``) and when a trainer gets one."""
    check_keys(cfg, run_schema(cfg), " (in the resolved config)")
    check_values("", cfg, TOP_RULES)
    t = cfg["train"]
    check_values("train", t, TRAIN_RULES)
    ks = t.get("ks", [10, 20])
    if not isinstance(ks, list) or not ks or not all(_is_int(k) and k >= 1 for k in ks):
        raise ValueError(f"train.ks must be a list of positive integers, got {ks!r}")
    from .evaluate import metric_names
    check_value("train.early_stop_metric", t.get("early_stop_metric", "ndcg@10"), tuple(metric_names(ks)))
    epochs = t.get("keep_epochs") or []
    if not isinstance(epochs, list) or not all(_is_int(e) and e >= 1 for e in epochs):
        raise ValueError(f"train.keep_epochs must be a list of positive epoch numbers, got {epochs!r}")
    check_values("model", cfg.get("model") or {}, MODEL_RULES)
    check_values("data", cfg.get("data") or {}, DATA_RULES)
    kd = dict(cfg.get("kd") or {})
    method = kd.pop("method", "none")
    check_value("kd.lambda", kd.pop("lambda", 0.0), "nonneg")
    check_value("kd.base_weight", kd.pop("base_weight", 1.0), "nonneg")
    if method != "none":
        from .kd import METHODS
        check_value("kd.method", method, tuple(METHODS))
        METHODS[method].checked(kd)


#: keys a resumed run may change: how long it runs and how it shows progress, where it runs
#: the keys that never change a finished run's result: how it is shown, where it runs, when it may pause
NOT_RESULT_KEYS = {("train", "progress"), ("train", "max_minutes"), ("train", "stop_after"), ("train", "plot"),
                   ("train", "nonfinite"), ("device",), ("threads",), ("data_dir",)}
#: the keys a resumed run may change: those, and how long it may still train
IGNORED_ON_RESUME = NOT_RESULT_KEYS | {("train", "epochs"), ("train", "patience")}


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


#: keys added after runs were recorded, with the value that is what every run before them did: a config
#: without such a key (a record or checkpoint older than the key) reads as holding that value
ADDED_KEYS = {("model", "init"): "normal"}


def config_differences(a: Dict, b: Dict, ignored=IGNORED_ON_RESUME):
    """[(dotted key, value in a, value in b)] of the leaves that differ, except the ``ignored`` keys; a key
    of :data:`ADDED_KEYS` missing on one side (of the same model) counts as its value there."""
    fa, fb = flatten(a), flatten(b)
    same_model = fa.get(("model", "name")) == fb.get(("model", "name"))
    diffs = []
    for k in sorted(set(fa) | set(fb), key=str):
        if k in ignored:
            continue
        va, vb = fa.get(k), fb.get(k)
        if same_model and k in ADDED_KEYS:
            va = ADDED_KEYS[k] if k not in fa else va
            vb = ADDED_KEYS[k] if k not in fb else vb
        if va != vb:
            diffs.append((".".join(k), fa.get(k), fb.get(k)))
    return diffs


def dump(cfg: Dict, path: str) -> None:
    from .files import write_text
    write_text(path, yaml.safe_dump(cfg, sort_keys=False), durable=True)  # a resume compares against it
