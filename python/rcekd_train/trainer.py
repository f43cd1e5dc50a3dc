"""The training loop: batches, KD, evaluation, early stopping, checkpoints, resume, logs.

Files in the run directory (``--out``):

* ``config.yaml``     the resolved config;
* ``checkpoint.pt``   the state after the last complete epoch (model, optimizer, every RNG
                      state, early-stopping state, history): ``--resume`` continues from it
                      and gives the same result as an uninterrupted run;
* ``best_model.pt``   the weights of the best epoch (valid metric);
* ``history.csv`` / ``history.json``  per-epoch losses, KD diagnostics (gamma, |Q1|/K),
                      times and metrics;
* ``result.json``     the metrics of the best epoch, times, data statistics;
* ``curves.png``      learning curves (when matplotlib is installed);
* ``teacher_topk.pt`` (teachers) the cached top-K lists;
* ``trajectory/epoch_<E>.pt`` the weights after epoch E (1-based) for every E that is a multiple of
                      ``train.keep_every`` or listed in ``train.keep_epochs`` (the teacher's training
                      trajectory, which HetComp distils): the same format as ``best_model.pt``, weights
                      only (no optimizer or RNG state). Written before the epoch's ``checkpoint.pt``, so a
                      resumed run never lacks one of its epochs (a rerun epoch rewrites the same file).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

from . import config as C
from .evaluate import evaluate_model, metric_names
from .kd import FrozenTeacher, build_kd, load_topk, save_topk, topk_from_vectors
from .kd.teacher import TRAJECTORY_DIR, trajectory_path
from .models import build_model, eval_mode

IGNORED_ON_RESUME = {("train", "epochs"), ("train", "patience"), ("train", "progress"), ("train", "max_minutes"),
                     ("train", "stop_after"), ("train", "plot"), ("device",), ("threads",), ("data_dir",)}


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(int(n))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def make_optimizer(model, lr: float, wd: float):
    """Adam with L2 weight decay (the authors' optimiser); the fused kernel when available (several times
    faster on CPU for large embedding tables)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)


def model_hparams(cfg: Dict) -> Dict:
    return {k: v for k, v in cfg["model"].items() if k != "name"}


def _accumulate(sums: Dict, values: Dict) -> None:
    """Adds detached values (tensors stay on their device, no host synchronisation) into ``sums``."""
    for k, v in values.items():
        if v is None:
            continue
        v = v.detach() if isinstance(v, torch.Tensor) else v
        sums[k] = sums[k] + v if k in sums else v


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _flatten(prefix, d, out):
    for k, v in d.items():
        key = prefix + (k,)
        if isinstance(v, dict):
            _flatten(key, v, out)
        else:
            out[key] = v
    return out


def config_differences(a: Dict, b: Dict):
    fa, fb = _flatten((), a, {}), _flatten((), b, {})
    diffs = []
    for k in sorted(set(fa) | set(fb), key=str):
        if k in IGNORED_ON_RESUME:
            continue
        if fa.get(k) != fb.get(k):
            diffs.append((".".join(k), fa.get(k), fb.get(k)))
    return diffs


def kept_epoch(train_cfg: Dict, epoch: int) -> bool:
    """Whether the weights after ``epoch`` (1-based) belong to the kept trajectory."""
    every = train_cfg.get("keep_every")
    return bool(every and epoch % int(every) == 0) or epoch in (train_cfg.get("keep_epochs") or [])


def load_teacher(teacher_dir: str, data, device="cpu", need_topk: int = 0) -> (FrozenTeacher, Dict):
    """Loads a trained teacher run directory as a frozen teacher (vectors + cached top-K)."""
    cfg_path = os.path.join(teacher_dir, "config.yaml")
    model_path = os.path.join(teacher_dir, "best_model.pt")
    for p in (cfg_path, model_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: is {teacher_dir} a finished `rcekd train-teacher` run?")
    tcfg = C.load_yaml(cfg_path)
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    if saved.get("data_fingerprint") not in (None, data.fingerprint()):
        raise ValueError(f"the teacher in {teacher_dir} was trained on different data "
                         f"({saved.get('data_fingerprint')} != {data.fingerprint()})")
    model = build_model(tcfg["model"]["name"], data, **model_hparams(tcfg))
    model.load_state_dict(saved["state"])
    model.to(device)
    topk = None
    topk_path = os.path.join(teacher_dir, "teacher_topk.pt")
    teacher = FrozenTeacher.from_model(model)
    if os.path.exists(topk_path):
        topk, meta = load_topk(topk_path)
        if meta.get("exclude_train"):
            raise ValueError(f"{topk_path} excludes training items; the KD methods expect the plain top-K")
    if topk is None or topk.shape[1] < min(need_topk, data.num_items):
        topk = topk_from_vectors(teacher.user_vecs, teacher.item_vecs, max(need_topk, 1))
    teacher.topk_cache = topk.to(device)
    del model
    return teacher, tcfg


class Trainer:
    def __init__(self, cfg: Dict, data, out_dir: str, teacher: Optional[FrozenTeacher] = None, log=None):
        self.cfg, self.data, self.out = cfg, data, out_dir
        self.teacher = teacher
        self.log = log or (lambda msg: print(msg, flush=True))
        self.device = torch.device(cfg.get("device") or "cpu")
        self.t = cfg["train"]
        self.ks = tuple(self.t.get("ks", (10, 20)))
        self.metric = self.t.get("early_stop_metric", "ndcg@10")
        if self.metric not in metric_names(self.ks):
            raise ValueError(f"train.early_stop_metric must be one of {metric_names(self.ks)}, got {self.metric!r}")

    # --- files ----------------------------------------------------------------------------------
    def path(self, name):
        return os.path.join(self.out, name)

    def _write_history(self, history):
        with open(self.path("history.json"), "w") as f:
            json.dump(history, f, indent=1)
        if history:
            cols = []
            for row in history:
                cols += [k for k in row if k not in cols]
            with open(self.path("history.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(history)

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Dict:
        cfg, t = self.cfg, self.t
        os.makedirs(self.out, exist_ok=True)
        ckpt_path = self.path("checkpoint.pt")
        if resume and os.path.exists(ckpt_path):
            old = C.load_yaml(self.path("config.yaml"))
            diffs = config_differences(old, cfg)
            if diffs:
                lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
                raise ValueError(f"--resume with a different config than {self.path('config.yaml')}:\n{lines}")
        elif resume:
            self.log(f"no checkpoint in {self.out}: starting from scratch")
            resume = False
        C.dump(cfg, self.path("config.yaml"))

        set_threads(cfg.get("threads"))
        seed = int(cfg.get("seed", 0))
        seed_everything(seed)
        model = build_model(cfg["model"]["name"], self.data, **model_hparams(cfg)).to(self.device)
        opt = make_optimizer(model, float(t["lr"]), float(t["wd"]))
        gen = torch.Generator().manual_seed(seed)
        kd_cfg = dict(cfg.get("kd") or {"method": "none"})
        method = kd_cfg.pop("method", "none")
        lam = float(kd_cfg.pop("lambda", 0.0))
        kd = None
        if cfg["role"] == "student" and method != "none":
            if self.teacher is None:
                raise ValueError(f"kd method {method!r} needs a teacher (--teacher RUN_DIR)")
            kd = build_kd(method, self.teacher, self.data, seed, **kd_cfg)
        state = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1, "bad": 0, "history": [],
                 "elapsed_s": 0.0, "done": False}
        if resume:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
            random.setstate(ck["python_rng"])
            if ck.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ck["cuda_rng"])
            if kd is not None and ck.get("kd_state"):
                kd.load_state_dict(ck["kd_state"])  # methods with a curriculum (HetComp) continue it
            state = ck["state"]
            self.log(f"resumed {self.out} after epoch {state['epoch']}")
        if state["done"]:
            self.log("this run had already finished")
            return self.finish(model, state, "finished")

        progress = bool(t.get("progress", True))
        if progress:
            from tqdm.auto import tqdm
        start_wall = time.time()
        stop_after = t.get("stop_after")
        max_minutes = t.get("max_minutes")
        epochs_here = 0
        status = "max_epochs"
        while state["epoch"] < int(t["epochs"]):
            epoch = state["epoch"]
            t0 = time.time()
            if kd is not None:
                kd.on_epoch_start(model, epoch)
            t1 = time.time()
            model.train()
            # running sums stay on the device (0-dim tensors): a step never waits for the host; they are
            # read once, at the end of the epoch (and by the progress bar at most once per refresh)
            sums, diag_sums, n_batches = {"loss": 0.0, "base_loss": 0.0, "kd_loss": 0.0}, {}, 0
            last_postfix = time.time()
            batches = model.batches(self.data, int(t["batch_size"]), gen)
            bar = None
            if progress:
                bar = tqdm(batches, total=len(batches), desc=f"epoch {epoch + 1}", leave=False,
                           mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
                batches = bar
            for batch in batches:
                base, users, uv, iv = model.base_loss(batch)
                if kd is not None:
                    kd_loss, diag = kd.batch_loss(users, uv, iv, state["step"])
                    loss = base + lam * kd_loss
                else:
                    kd_loss, diag = None, {}
                    loss = base
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1
                n_batches += 1
                _accumulate(sums, {"loss": loss, "base_loss": base, "kd_loss": kd_loss})
                _accumulate(diag_sums, diag)
                if bar is not None and time.time() - last_postfix >= bar.mininterval:
                    last_postfix = time.time()
                    bar.set_postfix(loss=f"{float(loss):.4g}", base=f"{float(base):.4g}")
            if bar is not None:
                bar.close()
            t2 = time.time()
            row = {"epoch": epoch + 1}
            row.update({k: float(v) / max(n_batches, 1) for k, v in sums.items()})
            row.update({k: float(v) / max(n_batches, 1) for k, v in diag_sums.items()})
            row["time_kd_refresh_s"] = t1 - t0
            row["time_train_s"] = t2 - t1
            improved = False
            if (epoch + 1) % int(t["eval_every"]) == 0 or epoch + 1 == int(t["epochs"]):
                res = evaluate_model(model, self.data, self.ks, batch_size=int(t.get("eval_batch_size", 1024)),
                                     convention=t.get("metric_convention", "ours"))
                for split, ms in res.items():
                    row.update({f"{split}_{m}": v for m, v in ms.items()})
                cur = res["valid"][self.metric]
                if cur > state["best"]:
                    state.update(best=cur, best_epoch=epoch + 1, bad=0)
                    improved = True
                    _atomic_save({"model": cfg["model"]["name"], "hparams": model_hparams(cfg),
                                  "state": model.state_dict(), "epoch": epoch + 1,
                                  "data_fingerprint": self.data.fingerprint()}, self.path("best_model.pt"))
                else:
                    state["bad"] += 1
            if kept_epoch(t, epoch + 1):  # the training trajectory (before the checkpoint: resume-safe)
                os.makedirs(self.path(TRAJECTORY_DIR), exist_ok=True)
                _atomic_save({"model": cfg["model"]["name"], "hparams": model_hparams(cfg),
                              "state": model.state_dict(), "epoch": epoch + 1,
                              "data_fingerprint": self.data.fingerprint()}, trajectory_path(self.out, epoch + 1))
            row["time_eval_s"] = time.time() - t2
            row["time_epoch_s"] = time.time() - t0
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["elapsed_s"] += row["time_epoch_s"]
            early = state["bad"] >= int(t["patience"])
            state["done"] = early or state["epoch"] >= int(t["epochs"])
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                          "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                          "python_rng": random.getstate(), "state": state,
                          "kd_state": kd.state_dict() if kd is not None else None,
                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                         ckpt_path)
            self._write_history(state["history"])
            self.log(self._line(row, improved))
            epochs_here += 1
            if early:
                status = "early_stop"
                break
            if stop_after is not None and epochs_here >= int(stop_after) and not state["done"]:
                status = "interrupted"
                break
            if max_minutes is not None and time.time() - start_wall > 60 * float(max_minutes) and not state["done"]:
                status = "time_limit"  # finished with the best epoch so far; --resume can continue it
                break
        if status == "interrupted":
            self.log(f"stopped after epoch {state['epoch']} (resume with --resume --out {self.out})")
            return {"status": "interrupted", "epoch": state["epoch"], "out": self.out}
        return self.finish(model, state, status)

    def _line(self, row, improved):
        parts = [f"epoch {row['epoch']:4d}", f"loss {row['loss']:.4g}"]
        if row.get("kd_loss"):
            parts.append(f"kd {row['kd_loss']:.4g}")
        if "gamma" in row:
            parts.append(f"gamma {row['gamma']:.3f} |Q1|/K {row['q1_frac']:.3f}")
        for split in ("valid", "test"):
            if f"{split}_ndcg@20" in row:
                parts.append(f"{split} R@20 {row[f'{split}_recall@20']:.4f} N@20 {row[f'{split}_ndcg@20']:.4f}")
        parts.append(f"{row['time_epoch_s']:.1f}s")
        return "  ".join(parts) + (" *" if improved else "")

    def finish(self, model, state, status) -> Dict:
        cfg = self.cfg
        best_path = self.path("best_model.pt")
        if os.path.exists(best_path):
            model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["state"])
        model.to(self.device)
        hist = state["history"]
        best_row = next((r for r in hist if r["epoch"] == state["best_epoch"]), {})
        res = {
            "status": status if status != "finished" else "finished",
            "role": cfg["role"], "dataset": cfg["dataset"], "model": cfg["model"]["name"],
            "kd": (cfg.get("kd") or {}).get("method", "none"), "seed": cfg.get("seed", 0),
            "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
            "valid": {m: best_row.get(f"valid_{m}") for m in metric_names(self.ks)},
            "test": {m: best_row.get(f"test_{m}") for m in metric_names(self.ks)},
            "metric_convention": cfg["train"].get("metric_convention", "ours"),
            "mean_epoch_time_s": float(np.mean([r["time_epoch_s"] for r in hist])) if hist else 0.0,
            "mean_train_time_s": float(np.mean([r["time_train_s"] for r in hist])) if hist else 0.0,
            "total_time_s": state["elapsed_s"],
            "data": self.data.stats(),
            "params": int(sum(p.numel() for p in model.parameters())),
        }
        if cfg["role"] == "teacher":
            K = int(cfg.get("teacher_topk", 500))
            with eval_mode(model):
                u, i = model.represent_all()
            topk = topk_from_vectors(u, i, K)
            save_topk(self.path("teacher_topk.pt"), topk, {"K": topk.shape[1], "exclude_train": False,
                                                           "data_fingerprint": self.data.fingerprint()})
            res["teacher_topk"] = int(topk.shape[1])
        with open(self.path("result.json"), "w") as f:
            json.dump(res, f, indent=1)
        if self.cfg["train"].get("plot", True):
            plot_history(hist, self.path("curves.png"), title=f"{cfg['dataset']} {cfg['role']} "
                         f"{cfg['model']['name']} kd={res['kd']}")
        self.log(f"best epoch {res['best_epoch']}: test " +
                 "  ".join(f"{m} {v:.4f}" for m, v in res["test"].items() if v is not None))
        return res


def plot_history(history, path: str, title: str = "") -> bool:
    """Learning curves (loss, metrics, KD diagnostics) to a PNG; False when matplotlib is missing."""
    if not history:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    ep = [r["epoch"] for r in history]
    has_diag = any("gamma" in r for r in history)
    n = 3 if has_diag else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6))
    ax = axes[0]
    ax.plot(ep, [r["base_loss"] for r in history], label="base")
    if any(r.get("kd_loss") for r in history):
        ax2 = ax.twinx()
        ax2.plot(ep, [r.get("kd_loss", 0) for r in history], color="tab:red", label="kd")
        ax2.set_ylabel("kd loss", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("base loss")
    ax.set_title("training loss")
    ax = axes[1]
    for key, style in (("valid_ndcg@20", "-"), ("test_ndcg@20", "-"), ("valid_recall@20", "--"),
                       ("test_recall@20", "--")):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    ax.set_xlabel("epoch")
    ax.set_title("metrics")
    ax.legend(fontsize=7)
    if has_diag:
        ax = axes[2]
        for key in ("gamma", "q1_frac"):
            pts = [(r["epoch"], r[key]) for r in history if key in r]
            if pts:
                ax.plot(*zip(*pts), label="|Q1|/K" if key == "q1_frac" else key)
        ax.set_xlabel("epoch")
        ax.set_title("RCE-KD diagnostics")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
