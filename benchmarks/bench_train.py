"""End-to-end cost of distillation in a training epoch: student alone vs student + RCE-KD.

For each backbone (MF, LightGCN) it runs a fixed number of training steps of the
student alone and of the student with RCE-KD for each refresh protocol (``epoch``:
the authors' protocol, sets refreshed once per epoch by ``select`` over all users;
``batch``: sets from the full rows of every batch) and each backend, and reports
the time of an epoch split into its parts, the peak memory and the ratio
KD / student-only. One machine, one run, medians.

    python benchmarks/bench_train.py --dataset gowalla --data-dir DIR --models mf lightgcn \\
        --protocols none epoch batch --backends auto reference --steps 30 --device cuda

epoch time = batch preparation (negatives, shuffle, move to the device; the same for all cases)
           + refresh (per-epoch select + teacher scores at the selected items)
           + steps per epoch x median step time

Parts of a step: ``base`` (the backbone's forward and base loss), ``teacher``
(teacher scores: full rows per batch in the batch protocol), ``kd`` (the RCE-KD
loss: sets and CE in the batch protocol, the gathered CE in the epoch protocol),
``gather`` (the rest of the KD forward: the student's scores at the 2K + L selected
items and the indexing of the epoch's sets in the epoch protocol, the student's full
rows in the batch protocol, the reduction),
``backward+opt`` (backward and optimizer step). The breakdown synchronises the
device between parts; the ``step`` column is timed in a separate pass without
(blocks of consecutive steps with one synchronisation per block, the median over
blocks of the time per step: the host may run ahead of the device as in an epoch).
The teacher is a randomly initialised backbone of the teacher's size (its quality
does not change the cost); its top-K cache is computed once and not counted.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "python"))

from rcekd_train import config as C  # noqa: E402
from rcekd_train.data import load_dataset  # noqa: E402
from rcekd_train.kd import FrozenTeacher, KDMethod, build_kd, topk_from_vectors  # noqa: E402
from rcekd_train.kd import rcekd as kd_rcekd  # noqa: E402
from rcekd_train.models import build_model  # noqa: E402

from bench_loss import commit, device_name  # noqa: E402

FIELDS = ["dataset", "model", "protocol", "scoring", "backend", "steps_per_epoch", "step_ms", "base_ms",
          "teacher_ms", "select_ms", "kd_ms", "gather_ms", "backward_opt_ms", "prep_s", "refresh_s", "product_s",
          "refresh_vs_product", "epoch_s", "ratio_vs_student", "peak_mb",
          "batch_size", "K",
          "M", "L", "device", "threads", "torch", "commit", "date"]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Accumulates the time of named parts (synchronising the device around each)."""

    def __init__(self, dev, on):
        self.dev, self.on, self.t = dev, on, {}

    def wrap(self, name, fn):
        def inner(*a, **k):
            if not self.on:
                return fn(*a, **k)
            sync(self.dev)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(self.dev)
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            return out
        return inner


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def settings(dataset, model):
    cfg = C.packaged(dataset) if os.path.exists(os.path.join(C.CONFIG_DIR, f"{dataset}.yaml")) else {}
    student = ((cfg.get("student") or {}).get(model) or {}).get("model", {"dim": 20})
    teacher = ((cfg.get("teacher") or {}).get(model) or {}).get("model", {"dim": 200})
    kd = dict(((cfg.get("distill") or {}).get(f"{model}->{model}") or {}).get("rcekd") or {})
    lam = float(kd.pop("lambda", 1.0))
    for k in ("tau", "T", "beta"):
        kd[k] = float(kd.get(k, {"tau": 1.0, "T": 10.0, "beta": 5.0}[k]))
    kd = {k: kd[k] for k in ("K", "M", "L", "tau", "T", "beta", "reduction") if k in kd}
    batch = int((cfg.get("train") or {}).get("batch_size", 2048))
    return student, teacher, kd, lam, batch


@torch.no_grad()
def product_time(model, dev, chunk: int = 1024) -> float:
    """Seconds of the matrix product alone over all users (``user_vecs @ item_vecs.T`` in chunks of users,
    each chunk's scores thrown away): the floor of the per-epoch refresh. Median of 3."""
    uv, iv = KDMethod.student_vectors(model)
    times = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        for s in range(0, uv.shape[0], chunk):
            uv[s:s + chunk] @ iv.T
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(data, dev, model_name, protocol, backend, teacher, a, scoring="embeddings"):
    student_hp, _, kd_hp, lam, batch_size = settings(a.dataset, model_name)
    if a.batch_size:
        batch_size = a.batch_size
    torch.manual_seed(0)
    model = build_model(model_name, data, **student_hp).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kd = None
    clock = Clock(dev, on=False)
    if protocol != "none":
        kd = build_kd("rcekd", teacher, data, 0, refresh=protocol, backend=None if backend == "auto" else backend,
                      validate=False, mode=a.mode, scoring=scoring, **kd_hp)
        # time the teacher scoring and the loss calls through wrappers
        teacher.score_rows = clock.wrap("teacher", FrozenTeacher.score_rows.__get__(teacher))
        teacher.score_items = clock.wrap("teacher", FrozenTeacher.score_items.__get__(teacher))
        kd_rcekd.rce_kd_loss = clock.wrap("kd", _orig["rce_kd_loss"])
        kd_rcekd.rce_kd_loss_gathered = clock.wrap("kd", _orig["rce_kd_loss_gathered"])
        kd_rcekd.select = clock.wrap("select", _orig["select"])
        kd_rcekd.select_embeddings = clock.wrap("select", _orig["select_embeddings"])
    gen = torch.Generator().manual_seed(0)
    # the epoch's batch preparation (negative sampling, shuffling, the move to the device), the same
    # with and without distillation: median of 3
    preps = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        batches = iter(model.batches(data, batch_size, gen))
        next(batches)
        sync(dev)
        preps.append(time.perf_counter() - t0)
    prep = statistics.median(preps)
    batches = model.batches(data, batch_size, gen)
    steps_per_epoch = len(batches)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(model.batches(data, batch_size, gen))
            return next(batches)

    # the per-epoch refresh (once warm, once timed)
    refresh = product = 0.0
    if kd is not None and protocol == "epoch":
        product = product_time(model, dev)
    if kd is not None:
        kd.on_epoch_start(model, 0)
        sync(dev)
        t0 = time.perf_counter()
        kd.on_epoch_start(model, 1)
        sync(dev)
        refresh = time.perf_counter() - t0

    def step(i, parts):
        b = next_batch()
        sync(dev) if parts is not None else None
        t0 = time.perf_counter()
        base, users, uv, iv = model.base_loss(b)
        if parts is not None:
            sync(dev)
            t1 = time.perf_counter()
            parts["base"] = parts.get("base", 0.0) + t1 - t0
        loss = base
        if kd is not None:
            kd_loss, _diag = kd.batch_loss(users, uv, iv, i)
            loss = base + lam * kd_loss
        if parts is not None:
            sync(dev)
            t2 = time.perf_counter()
            parts["kd_step"] = parts.get("kd_step", 0.0) + t2 - t1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if parts is not None:
            sync(dev)
            parts["backward+opt"] = parts.get("backward+opt", 0.0) + time.perf_counter() - t2

    for i in range(a.warmup):
        step(i, None)
    sync(dev)
    # pass 1: whole steps, no synchronisation inside: blocks of consecutive steps (as in an epoch,
    # where the host runs ahead of the device), one synchronisation per block; the step time is the
    # median over blocks of the block time / its steps
    peak_reset(dev)
    times = []
    block = max(1, a.steps // 5)
    for b0 in range(0, a.steps, block):
        n_block = min(block, a.steps - b0)
        sync(dev)
        t0 = time.perf_counter()
        for i in range(n_block):
            step(a.warmup + b0 + i, None)
        sync(dev)
        times.append((time.perf_counter() - t0) / n_block)
    peak = peak_mb(dev)
    # pass 2: the breakdown
    clock.on, clock.t = True, {}
    parts = {}
    for i in range(a.steps):
        step(a.warmup + a.steps + i, parts)
    clock.on = False
    n = a.steps
    step_ms = statistics.median(times) * 1e3
    row = dict(dataset=a.dataset, model=model_name, protocol=protocol, scoring=scoring if kd else "-",
               backend=backend if kd else "-",
               steps_per_epoch=steps_per_epoch, step_ms=round(step_ms, 3),
               base_ms=round(parts.get("base", 0.0) / n * 1e3, 3),
               teacher_ms=round(clock.t.get("teacher", 0.0) / n * 1e3, 3),
               select_ms=round(clock.t.get("select", 0.0) / n * 1e3, 3),
               kd_ms=round(clock.t.get("kd", 0.0) / n * 1e3, 3),
               # the rest of the KD part of a step: the student's scores at the selected items
               # (gathered_dot), the indexing of the epoch's sets, the reduction
               gather_ms=round(max(0.0, parts.get("kd_step", 0.0) - clock.t.get("kd", 0.0)
                                   - clock.t.get("teacher", 0.0) - clock.t.get("select", 0.0)) / n * 1e3, 3),
               backward_opt_ms=round(parts.get("backward+opt", 0.0) / n * 1e3, 3),
               prep_s=round(prep, 3), refresh_s=round(refresh, 3), product_s=round(product, 6),
               refresh_vs_product=round(refresh / product, 3) if product else "",
               epoch_s=round(prep + refresh + steps_per_epoch * step_ms / 1e3, 3),
               peak_mb=round(peak, 1), batch_size=batch_size, K=kd_hp.get("K"), M=kd_hp.get("M"),
               L=kd_hp.get("L"))
    if kd is not None:
        del teacher.score_rows, teacher.score_items
        for name, fn in _orig.items():
            setattr(kd_rcekd, name, fn)
    return row


_orig = {name: getattr(kd_rcekd, name) for name in ("rce_kd_loss", "rce_kd_loss_gathered", "select",
                                                    "select_embeddings")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla", help="gowalla, citeulike, yelp2018 or synthetic")
    p.add_argument("--data-dir", default=None, help="data directory (default: $RCEKD_DATA)")
    p.add_argument("--models", nargs="+", default=["mf", "lightgcn"])
    p.add_argument("--protocols", nargs="+", default=["none", "epoch", "batch"], choices=["none", "epoch", "batch"])
    p.add_argument("--backends", nargs="+", default=["auto"], help="loss backends for the KD runs")
    p.add_argument("--mode", default="official", choices=["paper", "official"])
    p.add_argument("--scorings", nargs="+", default=["dense", "embeddings"], choices=["dense", "embeddings"],
                   help="how RCE-KD scores: the full (B, N) rows (dense, the path before) or the loss from "
                        "embeddings (top-M by topm_dot, the 2K + L items only)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: the dataset's config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=os.path.join(HERE, "results", "train.csv"))
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    data = load_dataset(a.dataset, a.data_dir)
    meta = dict(device=device_name(a.device), threads=torch.get_num_threads(), torch=torch.__version__,
                commit=commit(), date=_dt.date.today().isoformat())
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    new = not os.path.exists(a.csv)
    if not new:
        with open(a.csv) as f:
            header = f.readline().strip().split(",")
        if header != FIELDS:
            p.error(f"{a.csv} has other columns than this version writes; give a new --csv")
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for model_name in a.models:
            _, teacher_hp, kd_hp, _, _ = settings(a.dataset, model_name)
            torch.manual_seed(1)
            t_model = build_model(model_name, data, **teacher_hp).to(dev)
            teacher = FrozenTeacher.from_model(t_model)
            del t_model
            teacher.topk_cache = topk_from_vectors(teacher.user_vecs, teacher.item_vecs, int(kd_hp.get("K", 100)))
            base_epoch = None
            for protocol in a.protocols:
                cases = [("-", "-")] if protocol == "none" else [(b, sc) for sc in a.scorings for b in a.backends]
                for backend, scoring in cases:
                    try:
                        row = run_case(data, dev, model_name, protocol, backend, teacher, a, scoring)
                    except Exception as e:  # one failing case must not lose the others
                        print(f"{model_name} {protocol} {scoring} {backend}: FAILED {type(e).__name__}: {e}",
                              flush=True)
                        continue
                    if protocol == "none":
                        base_epoch = row["epoch_s"]
                    row["ratio_vs_student"] = round(row["epoch_s"] / base_epoch, 3) if base_epoch else ""
                    row.update(meta)
                    w.writerow(row)
                    f.flush()
                    print(f"{a.dataset} {model_name:9s} {protocol:6s} {row['scoring']:10s} {row['backend']:10s} "
                          f"epoch {row['epoch_s']:9.2f} s (prep {row['prep_s']:.2f} s + refresh "
                          f"{row['refresh_s']:.2f} s + {row['steps_per_epoch']} x {row['step_ms']:.2f} ms: "
                          f"base {row['base_ms']:.2f}, teacher {row['teacher_ms']:.2f}, "
                          f"select {row['select_ms']:.2f}, kd {row['kd_ms']:.2f}, "
                          f"gather {row['gather_ms']:.2f}, "
                          f"bwd+opt {row['backward_opt_ms']:.2f}) ratio {row['ratio_vs_student']} "
                          f"peak {row['peak_mb']} MB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
