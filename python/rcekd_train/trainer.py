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

Under torchrun (``rcekd_train.parallel``: several processes, one world) the same loop runs on every rank: each
trains the users of its block (``Shard``) through DistributedDataParallel, the epoch's loss sums are reduced once
per epoch, the evaluation is split by users and reduced, and rank 0 alone writes the run directory (its lock, the
config, the checkpoints, histories and results: :meth:`Parallel.on_writer`, which also hands rank 0's decisions and
errors to the others). The random streams of a rank (batches, negatives, dropout) are seeded from (seed, rank,
epoch) at the start of every epoch, so a resumed run is the same as an uninterrupted one with the same number of
processes.
"""
from __future__ import annotations

import contextlib
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
from . import parallel
from .evaluate import evaluate_model, metric_names
from .files import load_torch, remove_stale_temps, save_torch, write_csv, write_json
from .kd import FrozenTeacher, KDMethod, cache_topk, kd_base_weight, kd_from_config, kd_lambda, mix_seed
from .kd.teacher import TRAJECTORY_DIR, trajectory_path
from .lock import run_lock
from .models import build_model, model_hparams
from .report import plot_history

CHECKPOINT_KEYS = ("model", "optimizer", "generator", "torch_rng", "numpy_rng", "python_rng", "state")


class NonFiniteLossError(RuntimeError):
    """A training step's loss was NaN or infinite (``train.nonfinite: error``)."""


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


class EpochLosses:
    """An epoch's running sums of the losses and KD diagnostics, and each step's losses: all on the device
    (a step never waits for the host), read once, at the end of the epoch (``means``, ``first_nonfinite``)."""

    def __init__(self):
        self.sums: Dict = {"loss": 0.0, "base_loss": 0.0, "kd_loss": 0.0}
        self.diag: Dict = {}
        self.steps: list = []  # (step number, loss, base loss, KD loss) of every step taken
        self.skipped = 0

    def add(self, step: int, loss, base, kd_loss, diag: Dict) -> None:
        _accumulate(self.sums, {"loss": loss, "base_loss": base, "kd_loss": kd_loss})
        _accumulate(self.diag, diag)
        self.steps.append((step, loss.detach(), base.detach(), None if kd_loss is None else kd_loss.detach()))

    def reduce(self, par) -> None:
        """The sums of every rank, averaged over the ranks (each rank's step values are those of the whole step:
        see ``Trainer._step``): one all-reduce per epoch."""
        keys = [("sums", k) for k in sorted(self.sums)] + [("diag", k) for k in sorted(self.diag)]
        vec = torch.tensor([float(getattr(self, part)[k]) for part, k in keys], dtype=torch.float64)
        par.all_reduce(vec, what="the epoch's losses")
        for (part, k), v in zip(keys, (vec / par.world).tolist()):
            getattr(self, part)[k] = v

    def means(self) -> Dict:
        n = max(len(self.steps), 1)
        out = {k: float(v) / n for k, v in self.sums.items()}
        out.update({k: float(v) / n for k, v in self.diag.items()})
        return out

    def first_nonfinite(self):
        """(step, loss, base, kd) of the first step whose loss is NaN or infinite, or None (one host
        synchronisation for the whole epoch)."""
        if not self.steps:
            return None
        bad = ~torch.stack([torch.isfinite(s[1]) for s in self.steps])
        return self.steps[int(bad.nonzero()[0, 0])] if bool(bad.any()) else None

    def first_nonfinite_of_all(self, par):
        """:meth:`first_nonfinite` over the ranks of a run (the earliest step; its loss values as floats and the
        rank where it was), or None; only called when the reduced sums are not finite (one all-gather)."""
        bad = self.first_nonfinite()
        mine = None if bad is None else (bad[0], *(None if v is None else float(v) for v in bad[1:]), par.rank)
        found = [b for b in par.all_gather(mine) if b is not None]
        return min(found, key=lambda b: (b[0], b[-1])) if found else None  # the earliest step, then the lowest rank


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
    """What a run holds while it trains: the model, its optimizer, the batch generator and the state; ``net`` is
    what a step calls (the model, or its DistributedDataParallel)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    state: Dict
    net: Optional[torch.nn.Module] = None


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

    def show(self, loss, base) -> bool:
        """Shows the loss when a refresh is due; False when the loss it read is not finite."""
        if self.bar is not None and time.time() - self.last >= self.bar.mininterval:
            self.last = time.time()
            value = float(loss)
            self.bar.set_postfix(loss=f"{value:.4g}", base=f"{float(base):.4g}")
            return math.isfinite(value)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    def __init__(self, cfg: Dict, data, out_dir: str, teacher: Optional[FrozenTeacher] = None, log=None,
                 kd: Optional[KDMethod] = None, par: Optional[parallel.Parallel] = None):
        self.cfg, self.data, self.out = cfg, data, out_dir
        self.teacher = teacher
        self.par = par if par is not None else parallel.current()
        self.log = log or (lambda msg: print(msg, flush=True))
        if not self.par.is_writer:
            self.log = lambda msg: None  # rank 0 tells the run; the others only their errors
        self.device = torch.device(self.par.device(cfg.get("device")))
        C.check(cfg)  # the keys and values of the config (also of one changed after config.resolve)
        self.t = cfg["train"]
        self.ks = tuple(self.t.get("ks", (10, 20)))
        self.metric = self.t.get("early_stop_metric", "ndcg@10")
        self.kd = kd if kd is not None else kd_from_config(cfg, data)
        self.lam, self.base_w = kd_lambda(cfg), kd_base_weight(cfg)
        self.skip_nonfinite = self.t.get("nonfinite", "error") == "skip"
        self.shard: Optional[parallel.Shard] = None  # this rank's users and steps (several processes)
        self.scale = (1.0, 1.0)  # the factors of the base and KD losses of a rank's step (see _step)

    # --- files ----------------------------------------------------------------------------------
    def path(self, name):
        return os.path.join(self.out, name)

    def _write_history(self, history):
        write_json(self.path("history.json"), history)
        if history:
            write_csv(self.path("history.csv"), history)

    def _save_weights(self, model, epoch: int, path: str) -> None:
        """The weights after ``epoch`` in the format of best_model.pt (and of the trajectory's files)."""
        save_torch({"model": self.cfg["model"]["name"], "hparams": model_hparams(self.cfg),
                    "state": model.state_dict(), "epoch": epoch, "data_fingerprint": self.data.fingerprint()}, path)

    # --- the run --------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Dict:
        """Trains the configured run in ``out`` (continues it from its checkpoint with ``resume``) until the
        stop policy ends it; returns the result (``{"status": "interrupted", ...}`` for a stop_after). The run
        holds the directory's lock throughout (another run into it is refused)."""
        with self._run_dir():
            ck = self.par.on_writer(lambda: self._checkpoint_to_resume(resume), "reading the checkpoint")
            if ck is not None and ck["state"]["done"]:
                return self._already_finished(ck)
            live = self._start(ck)
            stop = StopPolicy.from_config(self.t)
            status = stop.before_first_epoch(live.state)
            while status is None:
                row, improved = self._epoch(live)
                status = self._end_epoch(live, row, improved, stop)
            if status == "interrupted":
                self.log(f"stopped after epoch {live.state['epoch']} (resume with --resume --out {self.out})")
                return {"status": "interrupted", "epoch": live.state["epoch"], "out": self.out}
            return self.finish(live.model, live.state, status)

    @contextlib.contextmanager
    def _run_dir(self):
        """The run directory for the block: its lock, held by rank 0 (the only writer; a second run into it is
        refused), and the temporary files of a killed writer removed. Every rank learns whether rank 0 got it."""
        with contextlib.ExitStack() as held:
            def take():
                held.enter_context(run_lock(self.out, log=self.log))
                for folder in (self.out, self.path(TRAJECTORY_DIR)):
                    remove_stale_temps(folder)  # of a writer that was killed; none is alive: we hold the lock
            self.par.on_writer(take, f"taking the lock of {self.out}")
            yield

    def _read_result(self) -> Optional[Dict]:
        try:
            with open(self.path("result.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _already_finished(self, ck: Dict) -> Dict:
        """The result of a finished run, read from its result.json: nothing on disk changes. Only when that
        file is missing or unreadable (killed right after its last checkpoint) is the result written now."""
        self.log("this run had already finished")
        res = self.par.on_writer(self._read_result, "reading result.json")
        if res is not None:
            return res
        live = self._start(ck)
        return self.finish(live.model, live.state, "finished")

    def _start(self, ck: Optional[Dict]) -> Live:
        """The config file, the model, optimizer and batch generator (seeded), the KD method's teacher, and
        the state of the checkpoint ``ck`` when the run is resumed; with several processes this rank's shard of
        the users and the model's DistributedDataParallel."""
        self.par.on_writer(lambda: C.dump(self.cfg, self.path("config.yaml")), "writing config.yaml")
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
        if ck is not None:
            self._restore(live, ck)
        live.net = model
        if self.par.distributed:
            self._shard(live)
        return live

    def _shard(self, live: Live) -> None:
        """This rank's block of users (balanced by their training samples) and steps, the KD method restricted to
        those users, the loss factors of a step, and the DistributedDataParallel of the model."""
        par = self.par
        self.shard = parallel.shard_for(live.model.sample_counts(self.data), int(self.t["batch_size"]), par.rank,
                                        par.world)
        if self.kd is not None:
            self.kd.restrict_users(self.shard.lo, self.shard.hi)
        # DDP averages the ranks' gradients; a loss summed over the batch is multiplied by the number of ranks so
        # that the gradient is that of the sum over the whole step (every rank's samples), as in one process
        kd_sum = self.kd is not None and self.kd.hp.get("reduction", "sum") == "sum"
        self.scale = (float(par.world) if live.model.base_reduction == "sum" else 1.0,
                      float(par.world) if kd_sum else 1.0)
        live.net = par.wrap(live.model)

    def _reseed(self, live: Live, epoch: int) -> None:
        """Several processes: every random stream of this rank (batches and negatives, dropout, HSTU's negatives)
        from (seed, rank, epoch), so that an epoch is the same in a resumed run as in an uninterrupted one."""
        s = mix_seed(int(self.cfg.get("seed", 0)), self.par.rank, epoch, self.par.world)
        seed_everything(s)
        live.gen.manual_seed(s)

    def _checkpoint_to_resume(self, resume: bool) -> Optional[Dict]:
        """The checkpoint to continue from: asked, present and readable (a truncated one is an error that
        says so), with the same config (up to C.IGNORED_ON_RESUME); None to start from scratch."""
        if not resume:
            return None
        if not os.path.exists(self.path("checkpoint.pt")):
            self.log(f"no checkpoint in {self.out}: starting from scratch")
            return None
        diffs = C.config_differences(C.load_yaml(self.path("config.yaml")), self.cfg)
        if diffs:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
            raise ValueError(f"--resume with a different config than {self.path('config.yaml')}:\n{lines}")
        ck = load_torch(self.path("checkpoint.pt"), "checkpoint", CHECKPOINT_KEYS)
        n = int(ck.get("processes", 1))
        if n != self.par.world:
            how = "without torchrun or --nproc" if n == 1 else f"--nproc {n}, or torchrun with {n} in all"
            raise ValueError(f"{self.path('checkpoint.pt')} was written by a run of {n} process(es), this one has "
                             f"{self.par.world}: resume it with as many ({how}); the users' split and the random "
                             f"streams depend on it")
        return ck

    def _restore(self, live: Live, ck: Dict) -> None:
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
        if self.par.distributed:
            self._reseed(live, epoch)
        if self.kd is not None:
            self.kd.on_epoch_start(live.model, epoch)
        t1 = time.time()
        losses = self._train_batches(live, epoch)
        t2 = time.time()
        row = {"epoch": epoch + 1, **losses.means()}
        if self.skip_nonfinite:
            row["skipped_steps"] = losses.skipped
        row.update(time_kd_refresh_s=t1 - t0, time_train_s=t2 - t1)
        due = (epoch + 1) % int(self.t["eval_every"]) == 0 or epoch + 1 == int(self.t["epochs"])
        improved = self._evaluate(live, row) if due else False
        row["time_eval_s"] = time.time() - t2
        row["time_epoch_s"] = time.time() - t0
        return row, improved

    def _train_batches(self, live: Live, epoch: int) -> EpochLosses:
        """The training steps of one epoch and their losses. A non-finite loss stops the run
        (NonFiniteLossError; found when the epoch's losses are read, or earlier when the progress bar reads
        one), before anything of the epoch is written: the last checkpoint is the last good epoch's."""
        live.model.train()
        losses = EpochLosses()
        par = self.par
        batches = live.model.batches(self.data, int(self.t["batch_size"]), live.gen, shard=self.shard)
        bar = Progress(batches, epoch, bool(self.t.get("progress", True)) and par.is_writer)
        with par.talking(f"a training step of epoch {epoch + 1}"):  # DDP's gradients: a rank lost mid-step
            for batch in bar:
                step = live.state["step"]
                out = self._step(live, batch)
                if out is None:
                    losses.skipped += 1
                    continue
                losses.add(step, *out)
                # (with several processes every rank takes every step: the epoch's check below stops them all)
                if not bar.show(out[0], out[1]) and not par.distributed:
                    break
        bar.close()
        if par.distributed:
            losses.reduce(par)  # a non-finite step of any rank makes the sums non-finite
            bad = None if math.isfinite(losses.sums["loss"]) else losses.first_nonfinite_of_all(par)
        else:
            bad = losses.first_nonfinite()
        if bad is not None or (losses.skipped and not losses.steps):
            raise self._nonfinite_error(epoch, bad, losses.skipped)
        return losses

    def _step(self, live: Live, batch):
        """One optimisation step on base_weight x base + lambda x KD: (loss, base loss, KD loss or None, KD
        diagnostics); None for a step skipped for its non-finite loss (``train.nonfinite: skip``: a host synchronisation
        per step)."""
        base, users, uv, iv = live.net(batch)
        kd_loss, diag = None, {}
        if self.kd is not None:
            kd_loss, diag = self.kd.batch_loss(users, uv, iv, live.state["step"])
        if self.par.distributed:
            # a rank's losses as those of the whole step (the sum over every rank's samples, or the mean): the
            # factors of _shard; DDP's average of the ranks' gradients is then the gradient of the whole step
            base = base * self.scale[0]
            kd_loss = None if kd_loss is None else kd_loss * self.scale[1]
        loss = self.base_w * base + self.lam * kd_loss if kd_loss is not None else base
        live.state["step"] += 1
        if self.skip_nonfinite and not self.par.distributed and not bool(torch.isfinite(loss)):
            return None
        live.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.skip_nonfinite and self.par.distributed:
            # every rank skips the step when one rank's loss is not finite (the gradients were averaged already)
            ok = self.par.all_reduce(torch.isfinite(loss.detach()).to(torch.int32).reshape(1), op="min",
                                     what="the step's finite check")
            if not bool(ok[0]):
                live.opt.zero_grad(set_to_none=True)
                return None
        live.opt.step()
        return loss, base, kd_loss, diag

    def _nonfinite_error(self, epoch: int, bad, skipped: int) -> NonFiniteLossError:
        last = (f"its last good checkpoint (after epoch {epoch}) is {self.path('checkpoint.pt')}: --resume continues "
                f"from it (e.g. with a lower train.lr, or --set train.nonfinite=skip to skip such steps)"
                if epoch else "no epoch had completed (nothing to resume)")
        if bad is None:
            return NonFiniteLossError(f"every step of epoch {epoch + 1} ({skipped}) had a non-finite loss and was "
                                      f"skipped; the run is stopped and {last}")
        step, loss, base, kd_loss = bad[:4]
        kd = "" if kd_loss is None else f", kd loss {float(kd_loss)}"
        where = f" on rank {bad[4]} of {self.par.world}" if len(bad) > 4 else ""
        return NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}{where} (loss {float(loss)}, "
                                  f"base loss {float(base)}{kd}); the run is stopped and {last}")

    def _evaluate(self, live: Live, row: Dict) -> bool:
        """Valid and test metrics into ``row`` (the users split over the processes); the early-stopping state;
        whether the valid metric improved (returned: best_model.pt is written with the epoch's files)."""
        res = evaluate_model(live.model, self.data, self.ks, batch_size=int(self.t.get("eval_batch_size", 1024)),
                             convention=self.t.get("metric_convention", "ours"), par=self.par)
        for split, ms in res.items():
            row.update({f"{split}_{m}": v for m, v in ms.items()})
        state = live.state
        if res["valid"][self.metric] > state["best"]:
            state.update(best=res["valid"][self.metric], best_epoch=row["epoch"], bad=0)
            return True
        state["bad"] += 1
        return False

    def _end_epoch(self, live: Live, row: Dict, improved: bool, stop: StopPolicy) -> Optional[str]:
        """Records the epoch (state; on rank 0 its files and its line in the log) and returns the stop policy's
        status after it (rank 0's, on every rank: its time limit is the run's)."""
        state = live.state
        state["history"].append(row)
        state["epoch"] = row["epoch"]
        state["elapsed_s"] += row["time_epoch_s"]
        state["done"] = stop.finished(state)

        def write() -> Optional[str]:
            self._write_epoch(live, row, improved)
            return stop.after_epoch(state)
        return self.par.on_writer(write, f"writing the files of epoch {row['epoch']}")

    def _write_epoch(self, live: Live, row: Dict, improved: bool) -> None:
        """The files of an epoch, in this order: best_model.pt when it improved, its trajectory weights, then
        checkpoint.pt (so that a resumed run never lacks one of its epochs' files), the history, the log line."""
        epoch = row["epoch"]
        if improved:
            self._save_weights(live.model, epoch, self.path("best_model.pt"))
        if kept_epoch(self.t, epoch):  # the training trajectory
            os.makedirs(os.path.dirname(trajectory_path(self.out, epoch)), exist_ok=True)
            self._save_weights(live.model, epoch, trajectory_path(self.out, epoch))
        self._checkpoint(live)
        self._write_history(live.state["history"])
        self.log(self._line(row, improved))

    def _checkpoint(self, live: Live) -> None:
        save_torch({"model": live.model.state_dict(), "optimizer": live.opt.state_dict(),
                    "generator": live.gen.get_state(), **rng_states(), "state": live.state,
                    "kd_state": self.kd.state_dict() if self.kd is not None else None,
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "processes": self.par.world},
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
        """The best epoch's weights back in ``model``; result.json (and a teacher's top-K cache, the curves). With
        several processes the teacher's top-K lists are ranked by every process for its users (rank 0 sends the
        best weights); rank 0 writes the files and every rank returns its result."""
        teacher = self.cfg["role"] == "teacher"

        def best_weights():
            best_path = self.path("best_model.pt")
            if not os.path.exists(best_path):
                return None
            return load_torch(best_path, "weights file", ("state",))["state"]
        if teacher and self.par.distributed:  # every rank ranks its users with the best weights
            best = self.par.on_writer(best_weights, "reading best_model.pt")
        else:
            best = best_weights() if self.par.is_writer else None
        if best is not None:
            model.load_state_dict(best)
        model.to(self.device)
        topk = None
        if teacher:
            topk = int(cache_topk(model, self.data, int(self.cfg.get("teacher_topk", 500)), self.out,
                                  par=self.par).shape[1])
        return self.par.on_writer(lambda: self._write_result(model, state, status, topk), "writing result.json")

    def _write_result(self, model, state, status, topk: Optional[int]) -> Dict:
        res = self._result(model, state, status)
        if topk is not None:
            res["teacher_topk"] = topk
        write_json(self.path("result.json"), res, durable=True)
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
            "processes": self.par.world,
            "data": self.data.stats(),
            "params": int(sum(p.numel() for p in model.parameters())),
        }
