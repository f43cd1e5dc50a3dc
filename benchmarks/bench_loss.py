"""Benchmark of the RCE-KD loss: forward, backward, both, and the per-epoch select.

Times each (provider, op, shape, dtype) with warm-up and many repeats and appends
one row per case to a CSV: p20/p50/p80 in milliseconds, peak extra memory, the
achieved bandwidth against the minimal traffic (read the scores once, write the
gradient once), the device, torch version and commit.

Providers: every backend name (reference, triton, cpp, cuda) and ``compile``
(torch.compile of the reference backend's functions). Examples::

    python benchmarks/bench_loss.py --providers reference --B 256 --N 25181
    python benchmarks/bench_loss.py --providers reference compile triton --B 1024 \\
        --N 25181 40981 1000000 --dtypes float32 bfloat16 --device cuda
    python benchmarks/bench_loss.py --ops select_epoch --users 29858 --N 40981 --device cuda

The data checks are off (``validate=False``) in the timed calls: they cost one
more read of the inputs, which a training loop that has checked its data skips.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import rcekd_kernels as R  # noqa: E402
from rcekd_kernels.backends import reference as ref  # noqa: E402

OPS = ("fwd", "bwd", "fwdbwd", "select_epoch")
FIELDS = ["op", "provider", "mode", "B", "N", "K", "M", "L", "dtype", "p20_ms", "p50_ms", "p80_ms",
          "repeats", "peak_extra_mb", "grad_mb", "min_traffic_mb", "achieved_gb_s", "device", "threads",
          "torch", "commit", "date"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------- providers
_eager_keys = ref.rng.sampling_keys


#: provider variants: ``backend[variant]`` runs the backend with these environment settings
VARIANTS = {"triton[radix]": {"RCEKD_TRITON_SELECT": "radix"}, "triton[bisect]": {"RCEKD_TRITON_SELECT": "bisect"}}


def backend_of(provider: str) -> str:
    return provider.split("[", 1)[0]


@contextlib.contextmanager
def provider_env(provider: str):
    """Sets a provider variant's environment (e.g. ``triton[radix]``) for the enclosed calls."""
    if "[" in provider and provider not in VARIANTS:
        raise ValueError(f"unknown provider variant {provider!r}; known: {sorted(VARIANTS)}")
    env = VARIANTS.get(provider, {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_step(provider: str, op: str, a):
    """A callable running one timed step; ``prep`` builds fresh state outside the timing."""
    hp = dict(K=a.K, M=a.M, L=a.L, tau=1.0, T=10.0, beta=5.0, mode=a.mode)
    rows = torch.arange(a.B, device=a.device)

    if provider == "compile":
        # Inductor's C++ code generation fails on the RNG's 64-bit integer mixing (torch 2.13,
        # CPU); the hash runs eagerly (B x M elements, a graph break) and the rest is compiled.
        ref.rng.sampling_keys = torch.compiler.disable(_eager_keys)
        fwd = torch.compile(ref.fused_fwd)
        bwd = torch.compile(ref.fused_bwd)

        def forward(s, t, seed):
            return fwd(s, t, None, None, rows, a.K, a.M, a.L, 1.0, 10.0, 5.0, a.mode, seed)

        def backward(s, t, out):
            _loss, stats, idx, q2 = out
            return bwd(torch.ones(a.B, device=s.device), s, t, idx, q2, stats[:, 2].contiguous(), a.K, a.L, 1.0)

        if op == "fwd":
            return lambda s, t, seed: forward(s, t, seed)
        if op == "bwd":
            return "split", (lambda s, t, seed: forward(s, t, seed)), (lambda s, t, st: backward(s, t, st))
        return lambda s, t, seed: backward(s, t, forward(s, t, seed))

    def loss(s, t, seed):
        return R.rce_kd_loss(s, t, row_ids=rows, seed=seed, reduction="sum", backend=backend_of(provider),
                             validate=False, **hp)

    if op == "fwd":
        return lambda s, t, seed: loss(s, t, seed)
    if op == "bwd":
        return "split", (lambda s, t, seed: loss(s, t, seed)), (lambda s, t, st: st.backward())
    return lambda s, t, seed: loss(s, t, seed).backward()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    if device.startswith("cuda"):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def make_inputs(a, n_sets):
    g = torch.Generator(device="cpu").manual_seed(0)
    sets = []
    for _ in range(n_sets):
        s = torch.randn(a.B, a.N, generator=g).to(device=a.device, dtype=DTYPES[a.dtype])
        t = torch.randn(a.B, a.N, generator=g).to(device=a.device, dtype=DTYPES[a.dtype])
        sets.append((s.requires_grad_(a.op != "select_epoch"), t))
    return sets


def run_case(a):
    """Times one case; returns the list of per-repeat times (ms)."""
    if a.op == "select_epoch":
        return run_select_epoch(a)
    n_sets = 3 if a.device.startswith("cuda") else 1  # rotate inputs so the GPU cache does not help
    sets = make_inputs(a, n_sets)
    step = make_step(a.provider, a.op, a)
    times = []
    for i in range(a.warmup + a.repeats):
        s, t = sets[i % n_sets]
        s.grad = None
        if isinstance(step, tuple):  # backward alone: forward outside the timing
            _, fwd, bwd = step
            out = fwd(s, t, i)
            sync(a.device)
            ms, _ = timed(lambda: bwd(s, t, out), a.device)
        else:
            ms, _ = timed(lambda: step(s, t, i), a.device)
        if i >= a.warmup:
            times.append(ms)
    return times


def run_select_epoch(a):
    """The per-epoch select over all ``users`` rows of N items, chunk by chunk (B rows)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B = a.B
    s_chunk = torch.randn(B, a.N, generator=g).to(device=a.device, dtype=DTYPES[a.dtype])
    t_chunk = torch.randn(B, a.N, generator=g).to(device=a.device, dtype=DTYPES[a.dtype])
    topk = R.select(s_chunk, t_chunk, K=a.K, M=a.M, L=a.L, validate=False).teacher_topk  # cached teacher top-K
    times = []
    for i in range(a.warmup + a.repeats):
        def epoch():
            parts = []
            for start in range(0, a.users, B):
                n = min(B, a.users - start)
                # scores of a chunk are produced by the model; here one buffer stands for them
                parts.append(R.select(s_chunk[:n], None, topk[:n], K=a.K, M=a.M, L=a.L, mode=a.mode, seed=i,
                                      row_ids=torch.arange(start, start + n, device=a.device),
                                      backend=backend_of(a.provider), validate=False))
            return R.Selection.cat(parts)
        ms, _ = timed(epoch, a.device)
        if i >= a.warmup:
            times.append(ms)
    return times


def peak_extra_mb(a) -> float:
    """Peak memory of one step beyond its inputs (MB), the gradient included: CUDA
    allocator statistics or, on CPU (Linux), the peak RSS of a child process over one step."""
    if a.device.startswith("cuda"):
        sets = make_inputs(a, 1)
        step = make_step(a.provider, "fwdbwd" if a.op != "select_epoch" else a.op, a)
        s, t = sets[0]
        if a.op == "select_epoch":
            return float("nan")
        step(s, t, 0)  # warm (compilation, autotune)
        s.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(s, t, 1)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if a.op == "select_epoch":
        return float("nan")
    cfg = {k: getattr(a, k) for k in ("provider", "op", "B", "N", "K", "M", "L", "mode", "dtype", "device")}
    out = subprocess.run([sys.executable, __file__, "--_mem-child", json.dumps(cfg)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(out.stderr, file=sys.stderr)
        return float("nan")


def _mem_child(cfg):
    """Peak RSS growth of one forward+backward on fresh inputs (libraries warmed on a tiny case)."""
    tiny = argparse.Namespace(**{**cfg, "B": 2, "N": 2 * cfg["M"]}, warmup=0, repeats=0)
    (s, t), = make_inputs(tiny, 1)
    make_step(tiny.provider, "fwdbwd", tiny)(s, t, 0)
    a = argparse.Namespace(**cfg, warmup=0, repeats=0)
    (s, t), = make_inputs(a, 1)
    step = make_step(a.provider, "fwdbwd", a)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    step(s, t, 1)
    print((_status_kib("VmHWM") - base) / 1024)  # MiB; includes the gradient itself


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def quantiles(xs):
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return [round(float(v), 4) for v in q]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", nargs="+", default=["reference"],
                   help="backends to time (reference, triton, cpp, cuda), 'compile' (torch.compile of the "
                        "reference) and variants: triton[radix] (radix threshold search), triton[bisect]")
    p.add_argument("--ops", nargs="+", default=["fwd", "bwd", "fwdbwd"], choices=OPS)
    p.add_argument("--B", type=int, default=256, help="rows per batch (chunk size for select_epoch)")
    p.add_argument("--N", type=int, nargs="+", default=[25181], help="items per row")
    p.add_argument("--K", type=int, default=100)
    p.add_argument("--M", type=int, default=200)
    p.add_argument("--L", type=int, default=100)
    p.add_argument("--mode", default="paper", choices=["paper", "official"])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument("--users", type=int, default=29858, help="rows of the per-epoch select")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--csv", default=os.path.join(HERE, "results", "loss.csv"))
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.mem_child:
        _mem_child(json.loads(a.mem_child))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    new = not os.path.exists(a.csv)
    meta = dict(device=device_name(a.device), threads=torch.get_num_threads(), torch=torch.__version__,
                commit=commit(), date=_dt.date.today().isoformat())
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for N in a.N:
            for dtype in a.dtypes:
                for provider in a.providers:
                    for op in a.ops:
                        c = argparse.Namespace(**{**vars(a), "N": N, "dtype": dtype, "provider": provider, "op": op})
                        try:
                            with provider_env(provider):
                                times = run_case(c)
                        except Exception as e:  # one failing provider must not lose the others' rows
                            print(f"{op:12s} {provider:10s} N={N} {dtype}: FAILED {type(e).__name__}: {e}")
                            continue
                        p20, p50, p80 = quantiles(times)
                        elt = torch.empty((), dtype=DTYPES[dtype]).element_size()
                        grad_mb = c.B * N * elt / 2**20
                        traffic = {"fwd": 2 * grad_mb, "bwd": grad_mb, "fwdbwd": 3 * grad_mb,
                                   "select_epoch": a.users * N * elt / 2**20}[op]
                        with provider_env(provider):
                            mem = float("nan") if a.no_memory or op != "fwdbwd" else peak_extra_mb(c)
                        row = dict(op=op, provider=provider, mode=a.mode, B=c.B, N=N, K=a.K, M=a.M, L=a.L,
                                   dtype=dtype, p20_ms=p20, p50_ms=p50, p80_ms=p80, repeats=a.repeats,
                                   peak_extra_mb=round(mem, 2), grad_mb=round(grad_mb, 2),
                                   min_traffic_mb=round(traffic, 2),
                                   achieved_gb_s=round(traffic * 2**20 / 1e9 / (p50 / 1e3), 2), **meta)
                        w.writerow(row)
                        f.flush()
                        print(f"{op:12s} {provider:10s} N={N:<8d} {dtype:9s} p50 {p50:10.3f} ms "
                              f"[{p20:.3f}, {p80:.3f}]  {row['achieved_gb_s']:8.2f} GB/s  "
                              f"peak extra {row['peak_extra_mb']} MB (grad {row['grad_mb']} MB)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
