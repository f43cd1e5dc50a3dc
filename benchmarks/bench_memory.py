"""How the drivers' processes get memory (``python/rcekd_train/memory.py``): a LightGCN teacher's
training step at dim 2000 (propagation, BPR loss of a random batch, backward, the trainer's fused Adam;
the step of ``bench_lightgcn.py``, cpp backend) in child processes that alternate between two settings:

* ``defaults``: glibc's and torch's defaults (``THP_MEM_ALLOC_ENABLE=0``, ``RCEKD_KEEP_FREED_MEMORY=0``):
  every block above 32 MB mapped from the kernel and unmapped when freed, 4 KB pages;
* ``drivers``: what the ``rcekd`` command runs with (huge pages for blocks of 2 MB or more, freed memory
  kept by glibc).

The settings hold for a whole process, so each round starts one child per setting (``--rounds``), which
times ``--repeats`` steps after one warm-up and reports wall, user and system seconds and minor page
faults per step. Medians over the rounds, printed and appended to ``--csv``.

    python benchmarks/bench_memory.py --data-dir DIR --rounds 3 --repeats 8
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"defaults": {"THP_MEM_ALLOC_ENABLE": "0", "RCEKD_KEEP_FREED_MEMORY": "0"},
            "drivers": {"THP_MEM_ALLOC_ENABLE": "1", "RCEKD_KEEP_FREED_MEMORY": "1"}}


def child(a) -> None:
    """One process: the settings from the environment, then the timed steps; one JSON line."""
    import resource
    import time

    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    sys.path.insert(0, HERE)
    from rcekd_train.memory import keep_freed_memory  # sets nothing unless RCEKD_KEEP_FREED_MEMORY allows

    keep_freed_memory()
    import torch
    from bench_lightgcn import train_step

    from rcekd_kernels import graph
    from rcekd_train.data import load_dataset
    from rcekd_train.models import lightgcn as L
    from rcekd_train.trainer import make_optimizer

    torch.set_num_threads(a.threads)
    data = load_dataset(a.dataset, a.data_dir)
    model = L.LightGCN(data, dim=a.dim, layers=a.layers)
    opt = make_optimizer(model, 1e-3, 1e-7)  # the trainer's (fused) Adam
    g = torch.Generator().manual_seed(0)
    parts = [model.user_emb.weight, model.item_emb.weight]

    def step():
        train_step(data, opt, a.batch_size, g, lambda: graph.propagate(model.adj, parts, a.layers, backend="cpp"))

    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(a.repeats):
        step()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    n = a.repeats
    print(json.dumps(dict(wall_s=wall / n, user_s=(r1.ru_utime - r0.ru_utime) / n,
                          sys_s=(r1.ru_stime - r0.ru_stime) / n, minflt=(r1.ru_minflt - r0.ru_minflt) / n)))


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    from _interleaved import append_csv, parser

    ap = parser(__doc__, "timed steps per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per setting, alternated")
    ap.add_argument("--dim", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    args = [sys.executable, os.path.abspath(__file__), "--child", "--dataset", a.dataset, "--repeats", str(a.repeats),
            "--threads", str(a.threads), "--dim", str(a.dim), "--layers", str(a.layers),
            "--batch-size", str(a.batch_size)] + (["--data-dir", a.data_dir] if a.data_dir else [])
    got = {k: [] for k in SETTINGS}
    for r in range(a.rounds):
        for name, env in SETTINGS.items():
            out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **env))
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            got[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in got[name][-1].items()))
    rows = []
    base = statistics.median(x["user_s"] + x["sys_s"] for x in got["defaults"])
    for name, xs in got.items():
        med = {k: statistics.median(x[k] for x in xs) for k in xs[0]}
        cpu = statistics.median(x["user_s"] + x["sys_s"] for x in xs)
        rows.append(dict(date=_dt.datetime.now().isoformat(timespec="seconds"),
                         machine=platform.processor() or platform.machine(), threads=a.threads, dataset=a.dataset,
                         dim=a.dim, layers=a.layers, rounds=a.rounds, repeats=a.repeats, setting=name,
                         wall_s=round(med["wall_s"], 4), cpu_s=round(cpu, 4), user_s=round(med["user_s"], 4),
                         sys_s=round(med["sys_s"], 4), minflt=round(med["minflt"]), cpu_speedup=round(base / cpu, 3)))
        print(f"{name:9s} median wall {med['wall_s']:.3f} s  cpu {cpu:.3f} s  sys {med['sys_s']:.3f} s  "
              f"minor faults {med['minflt']:.0f}  cpu speed-up {base / cpu:.2f}x")
    append_csv(rows, a.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
