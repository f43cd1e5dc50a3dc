"""Data-parallel training (issue 13, item 4): 1 against N processes on this machine.

    python benchmarks/bench_ddp.py --dataset gowalla --data-dir DIR --nprocs 1 2 --epochs 3
    python benchmarks/bench_ddp.py --closeness --seeds 0 1 2 3 4

**Timing** (the default): trains a teacher once in one process (the data set's MF teacher, the authors' settings,
``--teacher-epochs`` epochs; or ``--teacher RUN``), then for each N distils the MF student with RCE-KD (the authors'
settings of the data set's ``mf->mf`` pair) for ``--epochs`` epochs in N processes launched by torchrun's launcher
(N = 1: one process, no torchrun), and appends one row per N to ``results/ddp_<tag>.csv``: the medians over the
epochs after the first of the epoch's time and its parts (training steps, the RCE-KD refresh, the evaluation) and
of the CPU time of the epoch summed over the processes (``cpu_s``: the work done, whatever share of the machine the
processes got), the
steps per epoch, the bytes DistributedDataParallel all-reduces per step (counted by a comm hook around the default
all-reduce: its gradient buckets) beside the model's parameter bytes, and the bytes of the drivers' own collectives
per refresh and per epoch (``rcekd_train.parallel``'s counters: the loss sums, the evaluation's sums, rank 0's
broadcasts). On a machine with fewer free cores than processes, N processes cannot do the work faster than one: they
share the cores and add the all-reduce of every step (their wall time can still be shorter on a machine that other
jobs load, where N processes get a larger share of the cores: compare ``cpu_s``).

**Closeness** (``--closeness``): the setting of tests/test_train_distributed.py (its synthetic data, a teacher of 6
epochs, RCE-KD students of 8 epochs), distilled for each seed in 1 and in 2 processes; writes
``results/ddp_closeness.csv`` (the test metrics of every run) and prints the spread over the seeds, from which the
test's tolerance is set.

The workers are this script itself (``--worker``), one per process under torchrun.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

from bench_loss import commit, device_name  # noqa: E402

FIELDS = ["dataset", "model", "kd", "nproc", "epochs", "steps_per_epoch", "epoch_s", "train_s", "refresh_s", "eval_s",
          "speedup_vs_1", "cpu_s", "ddp_bytes_per_step", "param_bytes", "ddp_buckets_per_step", "refresh_comm_bytes",
          "epoch_comm_bytes", "test_ndcg@20", "batch_size", "dim", "threads", "device", "torch", "commit", "date"]
CLOSE_FIELDS = ["seed", "nproc", "epochs", "best_epoch", "recall@20", "ndcg@10", "ndcg@20", "commit", "date"]

#: the setting of tests/test_train_distributed.py (kept equal to its DATA, FAST and epochs)
TEST_DATA = ["data.num_users=300", "data.num_items=200", "data.mean_items=12", "data.min_items=5",
             "data.max_items=40", "data.seed=4"]
TEST_FAST = ["train.progress=false", "train.plot=false", "train.batch_size=128", "train.patience=50", "model.dim=8"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    if os.path.exists("/sys/class/net/lo"):
        e.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return e


def run(cmd, **kw):
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p


# --- the worker: one process of a run ----------------------------------------------------------------------------
def worker(spec_path: str) -> None:
    """One rank: runs the distillation of the spec with DDP's buckets and the refresh's collectives counted; rank 0
    writes the counters beside the run."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from rcekd_train import parallel
    from rcekd_train import trainer as T
    from rcekd_train.kd import rcekd as kd_rcekd
    from rcekd_train.runs import run_one
    with open(spec_path) as f:
        spec = json.load(f)
    counts = {"ddp_bytes": 0, "ddp_buckets": 0, "refresh_bytes": 0, "refreshes": 0}

    def hook(state, bucket):
        buf = bucket.buffer()
        counts["ddp_bytes"] += buf.numel() * buf.element_size()
        counts["ddp_buckets"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    real_wrap = parallel.Distributed.wrap

    def wrap(self, model):
        ddp = real_wrap(self, model)
        ddp.register_comm_hook(None, hook)
        counts["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return ddp
    parallel.Distributed.wrap = wrap
    real_refresh = kd_rcekd.RCEKD.on_epoch_start

    def refresh(self, student, epoch):
        par = parallel.current()
        before = sum(par.comm_bytes.values()) + counts["ddp_bytes"]
        real_refresh(self, student, epoch)
        counts["refresh_bytes"] += sum(par.comm_bytes.values()) + counts["ddp_bytes"] - before
        counts["refreshes"] += 1
    kd_rcekd.RCEKD.on_epoch_start = refresh
    real_epoch = T.Trainer._epoch
    cpu = []

    def epoch(self, live):  # the CPU time of this process in each epoch (all its threads)
        c0 = time.process_time()
        out = real_epoch(self, live)
        cpu.append(time.process_time() - c0)
        return out
    T.Trainer._epoch = epoch
    with parallel.session(spec["cfg"].get("device")) as par:
        res = run_one(spec["cfg"], spec["out"], log=lambda m: None)
        counts["own_bytes"] = dict(par.comm_bytes)
        counts["cpu_s"] = [sum(x) for x in zip(*par.all_gather(cpu))]  # per epoch, summed over the processes
        if par.is_writer:
            with open(os.path.join(spec["out"], "bench_counts.json"), "w") as f:
                json.dump({"counts": counts, "result": res, "world": par.world}, f)


def launch(cfg, out, nproc, timeout):
    """The distillation of ``cfg`` in ``nproc`` processes (torchrun's launcher when > 1); the counters and history."""
    spec = os.path.join(out + ".spec.json")
    with open(spec, "w") as f:
        json.dump({"cfg": cfg, "out": out}, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", "0"] + cmd[1:]
    run(cmd, timeout=timeout)
    with open(os.path.join(out, "bench_counts.json")) as f:
        counts = json.load(f)
    with open(os.path.join(out, "history.json")) as f:
        hist = json.load(f)
    return counts, hist


def student_cfg(dataset, data_dir, teacher_dir, sets):
    from rcekd_train.config import resolve
    cfg = resolve(dataset, "student", "mf", kd_method="rcekd", teacher_model="mf", sets=sets,
                  flags={"data_dir": data_dir, "train.progress": False, "train.plot": False})
    cfg["teacher_dir"] = teacher_dir
    return cfg


def timing(a) -> None:
    from rcekd_train import parallel
    from rcekd_train.models import build_model, model_hparams
    from rcekd_train.models.base import PairBatches
    from rcekd_train.runs import get_data
    work = a.work or tempfile.mkdtemp(prefix="bench_ddp_")
    os.makedirs(work, exist_ok=True)
    teacher = a.teacher
    if teacher is None:
        teacher = os.path.join(work, "teacher")
        if not os.path.exists(os.path.join(teacher, "result.json")):
            cmd = [sys.executable, "-m", "rcekd_train", "train-teacher", "--dataset", a.dataset, "--model", "mf",
                   "--no-progress", "--epochs", str(a.teacher_epochs), "--out", teacher, "--set", "train.plot=false"]
            for kv in a.data_set:
                cmd += ["--set", kv]
            if a.data_dir:
                cmd += ["--data-dir", a.data_dir]
            print(f"teacher: {' '.join(cmd)}", flush=True)
            run(cmd, timeout=a.timeout)
    sets = [f"train.epochs={a.epochs}", f"threads={a.threads}"] + list(a.data_set) + list(a.set)
    rows, base = [], None
    for n in a.nprocs:
        cfg = student_cfg(a.dataset, a.data_dir, teacher, sets)
        out = os.path.join(work, f"student_{n}")
        t0 = time.time()
        counts, hist = launch(cfg, out, n, a.timeout)
        print(f"{n} process(es): {time.time() - t0:.0f} s", flush=True)
        c = counts["counts"]
        later = hist[1:] or hist
        med = lambda k: statistics.median(r[k] for r in later)
        data = get_data(cfg)
        if n > 1:
            steps = parallel.shard_for(data.train.lengths(), int(cfg["train"]["batch_size"]), 0, n).steps
        else:
            steps = len(PairBatches(data, int(cfg["train"]["batch_size"])))
        total_steps = steps * len(hist)
        epoch_s = med("time_epoch_s")
        if n == 1:
            base = epoch_s
        own = sum(c.get("own_bytes", {}).values())
        model = build_model("mf", data, **model_hparams(cfg))
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append({
            "dataset": a.dataset, "model": "mf", "kd": "rcekd", "nproc": n, "epochs": len(hist),
            "steps_per_epoch": steps, "epoch_s": f"{epoch_s:.3f}", "train_s": f"{med('time_train_s'):.3f}",
            "refresh_s": f"{med('time_kd_refresh_s'):.3f}", "eval_s": f"{med('time_eval_s'):.3f}",
            "speedup_vs_1": f"{base / epoch_s:.2f}" if base else "",
            "cpu_s": f"{statistics.median(c['cpu_s'][1:] or c['cpu_s']):.3f}",
            "ddp_bytes_per_step": c["ddp_bytes"] // total_steps if n > 1 else 0,
            "param_bytes": param_bytes,
            "ddp_buckets_per_step": f"{c['ddp_buckets'] / total_steps:.1f}" if n > 1 else 0,
            "refresh_comm_bytes": c["refresh_bytes"] // max(c["refreshes"], 1),
            "epoch_comm_bytes": (own - c["refresh_bytes"]) // len(hist) if n > 1 else 0,
            "test_ndcg@20": f"{counts['result']['test']['ndcg@20']:.4f}",
            "batch_size": cfg["train"]["batch_size"], "dim": cfg["model"]["dim"], "threads": a.threads,
            "device": device_name("cpu"), "torch": torch.__version__, "commit": commit(),
            "date": _dt.date.today().isoformat()})
        print(rows[-1], flush=True)
    write_rows(os.path.join(a.results, f"ddp_{a.tag}.csv"), FIELDS, rows)


def closeness(a) -> None:
    from rcekd_train.config import resolve
    from rcekd_train.runs import run_one
    work = a.work or tempfile.mkdtemp(prefix="bench_ddp_close_")
    os.makedirs(work, exist_ok=True)
    rows = []
    for seed in a.seeds:
        teacher = os.path.join(work, f"teacher_{seed}")
        run_one(resolve("synthetic", "teacher", "mf", sets=TEST_DATA + TEST_FAST + ["train.epochs=6", "model.dim=16",
                                                                                     f"seed={seed}"]),
                teacher, resume=True, log=lambda m: None)
        for n in (1, 2):
            cfg = resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf",
                          sets=TEST_DATA + TEST_FAST + ["train.epochs=8", f"seed={seed}"])
            cfg["teacher_dir"] = teacher
            counts, _ = launch(cfg, os.path.join(work, f"student_{seed}_{n}"), n, a.timeout)
            res = counts["result"]
            rows.append({"seed": seed, "nproc": n, "epochs": res["epochs_run"], "best_epoch": res["best_epoch"],
                         **{m: f"{res['test'][m]:.5f}" for m in ("recall@20", "ndcg@10", "ndcg@20")},
                         "commit": commit(), "date": _dt.date.today().isoformat()})
            print(rows[-1], flush=True)
    write_rows(os.path.join(a.results, "ddp_closeness.csv"), CLOSE_FIELDS, rows, append=False)
    for m in ("recall@20", "ndcg@10", "ndcg@20"):
        one = [float(r[m]) for r in rows if r["nproc"] == 1]
        two = [float(r[m]) for r in rows if r["nproc"] == 2]
        diffs = [abs(x - y) for x, y in zip(one, two)]
        print(f"{m}: 1 process {statistics.mean(one):.4f} ± {statistics.stdev(one):.4f}, 2 processes "
              f"{statistics.mean(two):.4f} ± {statistics.stdev(two):.4f}; |1 - 2| per seed: mean "
              f"{statistics.mean(diffs):.4f}, max {max(diffs):.4f}")


def write_rows(path, fields, rows, append=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not (append and os.path.exists(path))
    with open(path, "w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} row(s) to {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None, help="the data folder (default $RCEKD_DATA)")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=3, help="epochs of each distillation (the first one is not timed)")
    p.add_argument("--teacher", default=None, help="a trained teacher run (default: train one)")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more settings of the students")
    p.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of the data (data.*), for the teacher and the students")
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary one)")
    p.add_argument("--tag", default="cpu", help="results/ddp_<tag>.csv")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of the CSV files")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--closeness", action="store_true", help="the spread of 1 against 2 processes over seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    return closeness(a) if a.closeness else timing(a)


if __name__ == "__main__":
    main()
