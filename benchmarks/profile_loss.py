"""Where the time of one fused forward+backward goes: device kernels against host overhead.

    python benchmarks/profile_loss.py --provider triton --B 1024 --N 25181      # on a GPU
    python benchmarks/profile_loss.py --provider cpp --B 256 --N 25181         # on the CPU

Runs warm-up steps, then profiles ``--steps`` forward+backward steps with
``torch.profiler`` and reports, per step: the wall time, the summed time of the
device kernels (CUDA), and the kernels / operators sorted by their total time, so
that a slow provider can be told apart as launch-bound (wall >> kernels) or
kernel-bound, and which kernel dominates. The report is printed and written to
``--out`` (default ``benchmarks/results/profile_<provider>_<device>.txt``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_loss  # noqa: E402


def profile(a) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    cuda = a.device.startswith("cuda")
    c = argparse.Namespace(**{**vars(a), "op": "fwdbwd", "provider": a.provider})
    (s, t), = bench_loss.make_inputs(c, 1)
    with bench_loss.provider_env(a.provider):
        step = bench_loss.make_step(a.provider, "fwdbwd", c)
        for i in range(a.warmup):
            s.grad = None
            step(s, t, i)
        bench_loss.sync(a.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        walls = []
        with tprofile(activities=acts) as prof:
            for i in range(a.steps):
                s.grad = None
                bench_loss.sync(a.device)
                t0 = time.perf_counter()
                step(s, t, a.warmup + i)
                bench_loss.sync(a.device)
                walls.append(time.perf_counter() - t0)
    events = prof.key_averages()
    walls.sort()
    wall_ms = walls[len(walls) // 2] * 1e3
    lines = [f"provider {a.provider}, device {bench_loss.device_name(a.device)}, torch {torch.__version__}, "
             f"commit {bench_loss.commit()}",
             f"B={a.B} N={a.N} K={a.K} M={a.M} L={a.L} {a.dtype} mode={a.mode}, {a.steps} profiled steps",
             f"wall per forward+backward (median): {wall_ms:.3f} ms"]
    if cuda:
        dev_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / a.steps
        lines.append(f"device time per step (sum of kernels): {dev_ms:.3f} ms = {100 * dev_ms / wall_ms:.0f}% of the "
                     f"wall time ({'launch/host-bound' if dev_ms < 0.5 * wall_ms else 'kernel-bound'})")
        lines.append("")
        lines.append(events.table(sort_by="self_device_time_total", row_limit=a.rows))
    else:
        lines.append("")
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", default="triton", help="a bench_loss.py provider (triton, triton[radix], cuda, "
                   "cpp, reference, compile)")
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--N", type=int, default=25181)
    p.add_argument("--K", type=int, default=100)
    p.add_argument("--M", type=int, default=200)
    p.add_argument("--L", type=int, default=100)
    p.add_argument("--mode", default="paper", choices=["paper", "official"])
    p.add_argument("--dtype", default="float32", choices=list(bench_loss.DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=25, help="rows of the operator table")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    report = profile(a)
    print(report)
    out = a.out or os.path.join(HERE, "results", f"profile_{bench_loss.backend_of(a.provider)}_"
                                f"{'gpu' if a.device.startswith('cuda') else 'cpu'}.txt")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(report + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
