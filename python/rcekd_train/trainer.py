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

A run (:meth:`Trainer.run`) is: start (config, model, optimizer, the KD method's teacher, and on
``--resume`` the checkpoint's state), then epochs (the KD refresh, the batches, the evaluation and
the best epoch, the trajectory, the checkpoint) until the :class:`StopPolicy` ends it, then the
result (:meth:`Trainer.finish`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import config as C
from .evaluate import evaluate_model, metric_names
from .kd import FrozenTeacher, KDMethod, cache_topk, kd_from_config, kd_lambda
from .kd.teacher import trajectory_path
from .models import build_model, model_hparams
from .report import plot_history


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(int(n))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_states() -> Dict:
    """Every global RNG state (a checkpoint's, restored by :func:`restore_rng_states`)."""
    return {"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}


def restore_rng_states(ck: Dict) -> None:
    torch.set_rng_state(ck["torch_rng"])
    np.random.set_state(ck["numpy_rng"])
    random.setstate(ck["python_rng"])
    if ck.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])


def make_optimizer(model, lr: float, wd: float):
    """Adam with L2 weight decay (the authors' optimiser); the fused kernel when available (several times
    faster on CPU for large embedding tables)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)


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


def kept_epoch(train_cfg: Dict, epoch: int) -> bool:
    """Whether the weights after ``epoch`` (1-based) belong to the kept trajectory."""
    every = train_cfg.get("keep_every")
    return bool(every and epoch % int(every) == 0) or epoch in (train_cfg.get("keep_epochs") or [])


def fresh_state() -> Dict:
    """The bookkeeping of a run before its first epoch (saved in every checkpoint)."""
    return {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1, "bad": 0, "history": [],
            "elapsed_s": 0.0, "done": False}


@dataclass
class StopPolicy:
    """When a run ends: after ``epochs`` epochs in all (``max_epochs``), after ``patience`` evaluations without
    a better valid metric (``early_stop``), after ``stop_after`` epochs of this invocation (``interrupted``:
    resumable, for tests) or once ``max_minutes`` of this invocation's wall time have passed
    (``time_limit``: it ends with the best epoch so far; ``--resume`` continues it)."""

    epochs: int
    patience: int
    stop_after: Optional[int] = None
    max_minutes: Optional[float] = None
    started: float = field(default_factory=time.time)
    epochs_here: int = 0

    @classmethod
    def from_config(cls, t: Dict) -> "StopPolicy":
        return cls(int(t["epochs"]), int(t["patience"]), t.get("stop_after"), t.get("max_minutes"))

    def finished(self, state: Dict) -> bool:
        """Whether the run is over for good (no --resume continues it)."""
        return state["bad"] >= self.patience or state["epoch"] >= self.epochs

    def before_first_epoch(self, state: Dict) -> Optional[str]:
        """``max_epochs`` when no epoch is left (a resumed run with fewer epochs), else None."""
        return "max_epochs" if state["epoch"] >= self.epochs else None

    def after_epoch(self, state: Dict) -> Optional[str]:
        """The status that ends the run after the epoch just recorded in ``state``, or None to go on."""
        self.epochs_here += 1
        if state["bad"] >= self.patience:
            return "early_stop"
        if state["epoch"] >= self.epochs:
            return "max_epochs"
        if self.stop_after is not None and self.epochs_here >= int(self.stop_after):
            return "interrupted"
        if self.max_minutes is not None and time.time() - self.started > 60 * float(self.max_minutes):
            return "time_limit"
        return None


@dataclass
class Live:
    """What a run holds while it trains: the model, its optimizer, the batch generator and the state."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    state: Dict


class Progress:
    """The progress bar of one epoch (tqdm; nothing when off): it reads the loss from the device at most
    once per refresh."""

    def __init__(self, batches, epoch: int, enabled: bool):
        self.batches, self.bar, self.last = batches, None, time.time()
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(batches, total=len(batches), desc=f"epoch {epoch + 1}", leave=False,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)

    def __iter__(self):
        return iter(self.bar if self.bar is not None else self.batches)

    def show(self, loss, base) -> None:
        if self.bar is not None and time.time() - self.last >= self.bar.mininterval:
            self.last = time.time()
            self.bar.set_postfix(loss=f"{float(loss):.4g}", base=f"{float(base):.4g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    def __init__(self, cfg: Dict, data, out_dir: str, teacher: Optional[FrozenTeacher] = None, log=None,
                 kd: Optional[KDMethod] = None):
        self.cfg, self.data, self.out = cfg, data, out_dir
        self.teacher = teacher
        self.log = log or (lambda msg: print(msg, flush=True))
        self.device = torch.device(cfg.get("device") or "cpu")
        self.t = cfg["train"]
        self.ks = tuple(self.t.get("ks", (10, 20)))
        self.metric = self.t.get("early_stop_metric", "ndcg@10")
        if self.metric not in metric_names(self.ks):
            raise ValueError(f"train.early_stop_metric must be one of {metric_names(self.ks)}, got {self.metric!r}")
        self.kd = kd if kd is not None else kd_from_config(cfg, data)
        self.lam = kd_lambda(cfg)

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

    def _save_weights(self, model, epoch: int, path: str) -> None:
        """The weights after ``epoch`` in the format of best_model.pt (and of the trajectory's files)."""
        _atomic_save({"model": self.cfg["model"]["name"], "hparams": model_hparams(self.cfg),
                      "state": model.state_dict(), "epoch": epoch, "data_fingerprint": self.data.fingerprint()},
                     path)

    # --- the run --------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Dict:
        """Trains the configured run in ``out`` (continues it from its checkpoint with ``resume``) until the
        stop policy ends it; returns the result (``{"status": "interrupted", ...}`` for a stop_after)."""
        live = self._start(resume)
        if live.state["done"]:
            self.log("this run had already finished")
            return self.finish(live.model, live.state, "finished")
        stop = StopPolicy.from_config(self.t)
        status = stop.before_first_epoch(live.state)
        while status is None:
            row, improved = self._epoch(live)
            self._end_epoch(live, row, improved, stop)
            status = stop.after_epoch(live.state)
        if status == "interrupted":
            self.log(f"stopped after epoch {live.state['epoch']} (resume with --resume --out {self.out})")
            return {"status": "interrupted", "epoch": live.state["epoch"], "out": self.out}
        return self.finish(live.model, live.state, status)

    def _start(self, resume: bool) -> Live:
        """The run directory and config, the model, optimizer and batch generator (seeded), the KD method's
        teacher, and with ``resume`` (when there is a checkpoint) the checkpoint's state."""
        os.makedirs(self.out, exist_ok=True)
        resume = self._can_resume(resume)
        C.dump(self.cfg, self.path("config.yaml"))
        set_threads(self.cfg.get("threads"))
        seed = int(self.cfg.get("seed", 0))
        seed_everything(seed)
        model = build_model(self.cfg["model"]["name"], self.data, **model_hparams(self.cfg)).to(self.device)
        live = Live(model, make_optimizer(model, float(self.t["lr"]), float(self.t["wd"])),
                    torch.Generator().manual_seed(seed), fresh_state())
        if self.kd is not None:
            if self.teacher is None:
                raise ValueError(f"kd method {self.kd.name!r} needs a teacher (--teacher RUN_DIR)")
            self.kd.attach(self.teacher)
        if resume:
            self._restore(live)
        return live

    def _can_resume(self, resume: bool) -> bool:
        """Whether to continue from the checkpoint: asked and present, with the same config (up to
        C.IGNORED_ON_RESUME)."""
        if not resume:
            return False
        if not os.path.exists(self.path("checkpoint.pt")):
            self.log(f"no checkpoint in {self.out}: starting from scratch")
            return False
        diffs = C.config_differences(C.load_yaml(self.path("config.yaml")), self.cfg)
        if diffs:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
            raise ValueError(f"--resume with a different config than {self.path('config.yaml')}:\n{lines}")
        return True

    def _restore(self, live: Live) -> None:
        ck = torch.load(self.path("checkpoint.pt"), map_location="cpu", weights_only=False)
        live.model.load_state_dict(ck["model"])
        live.opt.load_state_dict(ck["optimizer"])
        live.gen.set_state(ck["generator"])
        restore_rng_states(ck)
        if self.kd is not None and ck.get("kd_state"):
            self.kd.load_state_dict(ck["kd_state"])  # methods with a curriculum (HetComp) continue it
        live.state = ck["state"]
        self.log(f"resumed {self.out} after epoch {live.state['epoch']}")

    # --- one epoch ------------------------------------------------------------------------------
    def _epoch(self, live: Live) -> Tuple[Dict, bool]:
        """The KD refresh, the batches and (when due) the evaluation of one epoch, and the trajectory's
        weights: its history row and whether it is the best so far."""
        epoch = live.state["epoch"]
        t0 = time.time()
        if self.kd is not None:
            self.kd.on_epoch_start(live.model, epoch)
        t1 = time.time()
        sums, diag_sums, n_batches = self._train_batches(live, epoch)
        t2 = time.time()
        row = {"epoch": epoch + 1}
        row.update({k: float(v) / max(n_batches, 1) for k, v in sums.items()})
        row.update({k: float(v) / max(n_batches, 1) for k, v in diag_sums.items()})
        row.update(time_kd_refresh_s=t1 - t0, time_train_s=t2 - t1)
        due = (epoch + 1) % int(self.t["eval_every"]) == 0 or epoch + 1 == int(self.t["epochs"])
        improved = self._evaluate(live, row) if due else False
        if kept_epoch(self.t, epoch + 1):  # the training trajectory (before the checkpoint: resume-safe)
            os.makedirs(os.path.dirname(trajectory_path(self.out, epoch + 1)), exist_ok=True)
            self._save_weights(live.model, epoch + 1, trajectory_path(self.out, epoch + 1))
        row["time_eval_s"] = time.time() - t2
        row["time_epoch_s"] = time.time() - t0
        return row, improved

    def _train_batches(self, live: Live, epoch: int) -> Tuple[Dict, Dict, int]:
        """The training steps of one epoch: the sums of the losses and of the KD diagnostics (on the device:
        a step never waits for the host; read once, by the caller) and the number of batches."""
        live.model.train()
        sums, diag_sums, n_batches = {"loss": 0.0, "base_loss": 0.0, "kd_loss": 0.0}, {}, 0
        batches = live.model.batches(self.data, int(self.t["batch_size"]), live.gen)
        bar = Progress(batches, epoch, bool(self.t.get("progress", True)))
        for batch in bar:
            loss, base, kd_loss, diag = self._step(live, batch)
            n_batches += 1
            _accumulate(sums, {"loss": loss, "base_loss": base, "kd_loss": kd_loss})
            _accumulate(diag_sums, diag)
            bar.show(loss, base)
        bar.close()
        return sums, diag_sums, n_batches

    def _step(self, live: Live, batch):
        """One optimisation step on base + lambda x KD: (loss, base loss, KD loss or None, KD diagnostics)."""
        base, users, uv, iv = live.model.base_loss(batch)
        kd_loss, diag = None, {}
        if self.kd is not None:
            kd_loss, diag = self.kd.batch_loss(users, uv, iv, live.state["step"])
        loss = base + self.lam * kd_loss if kd_loss is not None else base
        live.opt.zero_grad(set_to_none=True)
        loss.backward()
        live.opt.step()
        live.state["step"] += 1
        return loss, base, kd_loss, diag

    def _evaluate(self, live: Live, row: Dict) -> bool:
        """Valid and test metrics into ``row``; the early-stopping state; best_model.pt when the valid metric
        improved (returned)."""
        res = evaluate_model(live.model, self.data, self.ks, batch_size=int(self.t.get("eval_batch_size", 1024)),
                             convention=self.t.get("metric_convention", "ours"))
        for split, ms in res.items():
            row.update({f"{split}_{m}": v for m, v in ms.items()})
        state = live.state
        if res["valid"][self.metric] > state["best"]:
            state.update(best=res["valid"][self.metric], best_epoch=row["epoch"], bad=0)
            self._save_weights(live.model, row["epoch"], self.path("best_model.pt"))
            return True
        state["bad"] += 1
        return False

    def _end_epoch(self, live: Live, row: Dict, improved: bool, stop: StopPolicy) -> None:
        """Records the epoch (state, checkpoint, history, its line in the log)."""
        state = live.state
        state["history"].append(row)
        state["epoch"] = row["epoch"]
        state["elapsed_s"] += row["time_epoch_s"]
        state["done"] = stop.finished(state)
        self._checkpoint(live)
        self._write_history(state["history"])
        self.log(self._line(row, improved))

    def _checkpoint(self, live: Live) -> None:
        _atomic_save({"model": live.model.state_dict(), "optimizer": live.opt.state_dict(),
                      "generator": live.gen.get_state(), **rng_states(), "state": live.state,
                      "kd_state": self.kd.state_dict() if self.kd is not None else None,
                      "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                     self.path("checkpoint.pt"))

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

    # --- the result -------------------------------------------------------------------------------
    def finish(self, model, state, status) -> Dict:
        """The best epoch's weights back in ``model``; result.json (and a teacher's top-K cache, the curves)."""
        best_path = self.path("best_model.pt")
        if os.path.exists(best_path):
            model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["state"])
        model.to(self.device)
        res = self._result(model, state, status)
        if self.cfg["role"] == "teacher":
            res["teacher_topk"] = int(cache_topk(model, self.data, int(self.cfg.get("teacher_topk", 500)),
                                                 self.out).shape[1])
        with open(self.path("result.json"), "w") as f:
            json.dump(res, f, indent=1)
        if self.t.get("plot", True):
            cfg = self.cfg
            plot_history(state["history"], self.path("curves.png"),
                         title=f"{cfg['dataset']} {cfg['role']} {cfg['model']['name']} kd={res['kd']}")
        self.log(f"best epoch {res['best_epoch']}: test " +
                 "  ".join(f"{m} {v:.4f}" for m, v in res["test"].items() if v is not None))
        return res

    def _result(self, model, state, status) -> Dict:
        cfg, hist = self.cfg, state["history"]
        best_row = next((r for r in hist if r["epoch"] == state["best_epoch"]), {})
        return {
            "status": status,
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
