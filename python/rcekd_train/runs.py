"""Running one configured job (teacher or student), several seeds, and summaries."""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional

import numpy as np

from . import parallel
from .data import load_dataset
from .evaluate import metric_names
from .files import write_csv, write_json
from .kd import kd_from_config, load_teacher
from .trainer import Trainer

_DATA_CACHE: Dict = {}


def get_data(cfg: Dict):
    key = (cfg["dataset"], cfg.get("data_dir"), repr(sorted((cfg.get("data") or {}).items())))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_dataset(cfg["dataset"], cfg.get("data_dir"), **(cfg.get("data") or {}))
    return _DATA_CACHE[key]


def run_one(cfg: Dict, out: str, resume: bool = False, log=None) -> Dict:
    """Trains one configured run in ``out`` (a student's teacher loaded from ``cfg["teacher_dir"]``)."""
    data = get_data(cfg)
    kd = kd_from_config(cfg, data)  # the KD method, built once; its teacher is loaded with what it needs
    teacher = None
    if kd is not None:
        if not cfg.get("teacher_dir"):
            raise ValueError("distillation needs a teacher: --teacher RUN_DIR (a `rcekd train-teacher` output)")
        device = parallel.current().device(cfg.get("device"))  # (each process of a run: its own GPU)
        teacher, _ = load_teacher(cfg["teacher_dir"], data, device, kd.topk_needed())
    return Trainer(cfg, data, out, teacher, log=log, kd=kd).run(resume=resume)


def check_seeds(seeds) -> None:
    """Refuses a seed list with a repeated seed (its runs would share a directory and count twice)."""
    seen = set()
    for s in seeds or ():
        if s in seen:
            raise ValueError(f"--seeds lists seed {s} more than once ({' '.join(map(str, seeds))}): each seed is "
                             f"one run")
        seen.add(s)


def run_seeds(cfg: Dict, out: str, seeds: Optional[List[int]], resume: bool = False, log=None) -> Dict:
    """One run (``seeds`` None) in ``out``, or one per seed in ``out/seed_<s>`` plus ``summary.json`` /
    ``summary.csv`` (mean and std over the seeds)."""
    check_seeds(seeds)
    if not seeds:
        return run_one(cfg, out, resume, log)
    results = []
    for s in seeds:
        c = copy.deepcopy(cfg)
        c["seed"] = int(s)
        results.append(run_one(c, os.path.join(out, f"seed_{s}"), resume, log))
    done = [r for r in results if r.get("status") != "interrupted"]
    summary = summarize(done, seeds)

    def write():
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "summary.json"), summary)
        write_csv(os.path.join(out, "summary.csv"), [{"split": split, "metric": m, **v} for split in ("valid", "test")
                                                    for m, v in summary.get(split, {}).items()],
                  fieldnames=["split", "metric", "mean", "std", "n"])
    parallel.current().on_writer(write, f"writing {out}/summary.json")  # rank 0 writes (several processes)
    return summary


def summarize(results: List[Dict], seeds) -> Dict:
    out = {"seeds": list(seeds), "runs": len(results)}
    if not results:
        return out
    for split in ("valid", "test"):
        out[split] = {}
        for m in results[0][split]:
            vals = np.array([r[split][m] for r in results if r[split][m] is not None], dtype=float)
            out[split][m] = {"mean": float(vals.mean()) if len(vals) else None,
                             "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "n": int(len(vals))}
    out["mean_epoch_time_s"] = float(np.mean([r["mean_epoch_time_s"] for r in results]))
    return out


def format_table(rows: List[Dict], ks=(10, 20), split: str = "test") -> str:
    """A plain-text table: one row per (name, result) with Recall/NDCG at ks."""
    names = metric_names(ks)
    header = ["run"] + [n.replace("recall", "Recall").replace("ndcg", "NDCG") for n in names] + ["best ep", "s/epoch"]
    lines = [header]
    for r in rows:
        res = r["result"]
        vals = res.get(split, {})
        line = [r["name"]]
        for n in names:
            v = vals.get(n)
            if isinstance(v, dict):
                line.append(f"{v['mean']:.4f}±{v['std']:.4f}")
            else:
                line.append("-" if v is None else f"{v:.4f}")
        line.append(str(res.get("best_epoch", "-")))
        line.append(f"{res.get('mean_epoch_time_s', 0):.2f}")
        lines.append(line)
    widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
    fmt = lambda l: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(l, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), sep] + [fmt(l) for l in lines[1:]])
