"""Collecting finished runs into a small results folder (JSON, CSV, PNG, a Markdown table)."""
from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Dict, List

from . import config as C
from .evaluate import metric_names


def _sanitize(cfg: Dict) -> Dict:
    """No machine paths in committed files: data_dir dropped, teacher_dir reduced to its last part."""
    cfg = dict(cfg)
    cfg["data_dir"] = None
    if cfg.get("teacher_dir"):
        cfg["teacher_dir"] = os.path.basename(os.path.normpath(cfg["teacher_dir"]))
    return cfg


def collect(run_dirs: List[str], out: str, ks=(10, 20)) -> List[Dict]:
    """Copies result.json, history.csv, curves.png and the (sanitised) config of each finished run into
    out/<run name>/ and writes out/summary.csv, summary.json and summary.md (test and valid metrics at
    the best valid epoch, epochs, seconds per epoch)."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for d in run_dirs:
        res_path = os.path.join(d, "result.json")
        if not os.path.exists(res_path):
            continue
        name = os.path.basename(os.path.normpath(d))
        target = os.path.join(out, name)
        os.makedirs(target, exist_ok=True)
        with open(res_path) as f:
            res = json.load(f)
        for fname in ("result.json", "history.csv", "curves.png"):
            if os.path.exists(os.path.join(d, fname)):
                shutil.copyfile(os.path.join(d, fname), os.path.join(target, fname))
        cfg = _sanitize(C.load_yaml(os.path.join(d, "config.yaml")))
        C.dump(cfg, os.path.join(target, "config.yaml"))
        row = {"run": name, "role": res["role"], "model": res["model"], "kd": res["kd"],
               "teacher": cfg.get("teacher_dir") or "", "dim": cfg["model"].get("dim"),
               "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
               "s_per_epoch": round(res["mean_epoch_time_s"], 2)}
        for split in ("test", "valid"):
            for m in metric_names(ks):
                v = res[split].get(m)
                row[f"{split}_{m}"] = None if v is None else round(v, 5)
        rows.append(row)
    if rows:
        with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(rows, f, indent=1)
        cols = ["run", "model", "dim", "kd", "teacher"] + [f"test_{m}" for m in metric_names(ks)] + \
               ["best_epoch", "s_per_epoch"]
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for r in rows:
                f.write("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |\n")
    return rows
