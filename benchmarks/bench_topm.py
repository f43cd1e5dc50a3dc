"""Benchmark of the embedding path on the CPU (issue 12): the selection (``--op select``:
each row's first M items of U @ V.T, topm_dot) and the loss from embeddings (``--op loss``).

Providers of ``--op select`` (each (provider, N) measured in a fresh child process):

  cpp             the cpp backend's topm_dot (the fused GEMM + threshold filter)
  reference       the reference backend's topm_dot (pure PyTorch, tile by tile)
  matmul          U @ V.T alone: the matrix product, its (B, N) output allocated by the call
  matmul_chunked  the same product in chunks of 16,384 items into one reused output: the
                  arithmetic of the product without writing (B, N) scores to fresh memory
  dense           torch.topk(U @ V.T, M, dim=1): the product, then a top-M

Providers of ``--op loss`` (forward + backward, gradients to U and V; K = M / 2, L = K; the
teacher's vectors of the same shape):

  embed           rce_kd_loss_embeddings: topm_dot for the student's pool and the teacher's
                  top-K, gathered_dot at the 2K + L items, the subset cross-entropies
  dense           rce_kd_loss on U @ V.T (and the teacher's U_t @ V_t.T): (B, N) scores and
                  their (B, N) gradient
  matmul          U @ V.T forward and backward alone (three products): the floor

Timings: one child per N times every provider round-robin (call 1 of each provider, then
call 2 of each, ...), so that the load of a shared machine falls alike on all of them, and
reports medians (p20 / p80 beside them) of the calls after the first (which also faults in
fresh memory); a provider gets fewer calls when one takes long (--budget-s). Memory: one
child per (provider, N) makes the inputs, warms up on a small case, resets the peak RSS
(VmHWM) and makes one call: the peak extra memory is VmHWM minus the RSS before the call,
what the call allocates, its outputs included. matmul and dense run only
where their (B, N) scores fit in the memory of the machine (else a row with a note).
ratio_matmul is p50 / p50 of matmul at the same N (ratio_chunked: of matmul_chunked).

    python benchmarks/bench_topm.py                          # the issue's shapes, 2 threads
    python benchmarks/bench_topm.py --N 100000 --providers cpp,matmul --repeats 3
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

PROVIDERS = ("cpp", "reference", "matmul", "matmul_chunked", "dense")
LOSS_PROVIDERS = ("embed", "dense", "matmul")
FIELDS = ["op", "provider", "B", "N", "D", "M", "dtype", "threads", "repeats", "p20_ms", "p50_ms", "p80_ms",
          "ratio_matmul", "ratio_chunked", "peak_extra_mb", "scores_mb", "item_grad_mb", "note", "device", "torch",
          "commit", "date"]
CHUNK = 16384


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name() -> str:
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def mem_total_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_loss_call(provider: str, M: int):
    """A forward + backward of the loss (or of the product alone) on (U, V) with gradients."""
    import rcekd_kernels as R

    K = M // 2
    hp = dict(K=K, M=M, L=K, beta=3.0, mode="official", reduction="sum", validate=False)

    def run(U, V, Ut, Vt):
        u, v = U.detach().requires_grad_(True), V.detach().requires_grad_(True)
        if provider == "embed":
            loss = R.rce_kd_loss_embeddings(u, v, teacher_user_vecs=Ut, teacher_item_vecs=Vt, **hp)
        elif provider == "dense":
            with torch.no_grad():
                t = Ut @ Vt.T
            loss = R.rce_kd_loss(u @ v.T, t, **hp)
        elif provider == "matmul":
            s = u @ v.T
            loss = (s * s.detach()).sum()  # a backward with a dense upstream gradient: U @ V.T's three products
        else:
            raise ValueError(f"unknown loss provider {provider!r}; one of {LOSS_PROVIDERS}")
        loss.backward()
        return u.grad, v.grad

    return run


def make_call(provider: str, M: int, op: str = "select"):
    from rcekd_kernels.backends import native
    from rcekd_kernels.backends import reference as ref

    if op == "loss":
        return make_loss_call(provider, M)
    if provider == "cpp":
        return lambda U, V, *_: native.cpp.topm_dot(U, V, M, None, None, 0)
    if provider == "reference":
        return lambda U, V, *_: ref.topm_dot(U, V, M)
    if provider == "matmul":
        return lambda U, V, *_: U @ V.T
    if provider == "dense":
        return lambda U, V, *_: torch.topk(U @ V.T, M, dim=1)
    if provider == "matmul_chunked":
        def chunked(U, V, *_):
            out = torch.empty(U.shape[0], min(CHUNK, V.shape[0]), dtype=U.dtype)
            for j0 in range(0, V.shape[0], CHUNK):
                v = V[j0:j0 + CHUNK]
                o = out if v.shape[0] == out.shape[1] else out[:, :v.shape[0]]
                torch.mm(U, v.T, out=o)
            return out
        return chunked
    raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(cfg["B"], cfg["D"], generator=g)
    V = torch.randn(cfg["N"], cfg["D"], generator=g)
    if cfg.get("op") != "loss":
        return U, V, None, None
    return U, V, torch.randn(cfg["B"], cfg["D"], generator=g), torch.randn(cfg["N"], cfg["D"], generator=g)


def _warm_up(call, cfg):
    g = torch.Generator().manual_seed(1)
    n = max(cfg["M"], 2 * CHUNK)
    call(torch.randn(8, cfg["D"], generator=g), torch.randn(n, cfg["D"], generator=g),
         torch.randn(8, cfg["D"], generator=g), torch.randn(n, cfg["D"], generator=g))


def child_memory(cfg: dict) -> dict:
    """A fresh process: the peak extra memory of one call of one provider."""
    torch.set_num_threads(cfg["threads"])
    call = make_call(cfg["provider"], cfg["M"], cfg.get("op", "select"))
    _warm_up(call, cfg)
    U, V, Ut, Vt = _inputs(cfg)
    try:  # reset the peak RSS to the current RSS, so VmHWM is the peak of this call
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:
        return {"peak_extra_mb": float("nan")}
    out = call(U, V, Ut, Vt)
    peak = (_status_kib("VmHWM") - base) / 1024
    del out
    return {"peak_extra_mb": peak}


def child_times(cfg: dict) -> dict:
    """A fresh process: the times of every provider of cfg["providers"], round-robin."""
    torch.set_num_threads(cfg["threads"])
    calls = {p: make_call(p, cfg["M"], cfg.get("op", "select")) for p in cfg["providers"]}
    for call in calls.values():
        _warm_up(call, cfg)
    U, V, Ut, Vt = _inputs(cfg)
    times = {p: [] for p in calls}
    left = {p: None for p in calls}  # calls still to make (known after the first)
    while any(v is None or v > 0 for v in left.values()):
        for p, call in calls.items():
            if left[p] is not None and left[p] <= 0:
                continue
            t0 = time.perf_counter()
            out = call(U, V, Ut, Vt)
            times[p].append(time.perf_counter() - t0)
            del out
            if left[p] is None:  # after the first call: as many more as the budget allows
                left[p] = min(cfg["repeats"], int(cfg["budget_s"] / max(times[p][0], 1e-9)))
            else:
                left[p] -= 1
    # the first call also faulted in fresh memory: report the later ones where there are any
    return {p: (t[1:] if len(t) > 1 else t) for p, t in times.items()}


def quantiles(xs):
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return [round(float(v) * 1e3, 3) for v in q]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", default="25181,100000,1000000,10000000", help="comma-separated item counts")
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--M", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls at most after the first")
    p.add_argument("--budget-s", type=float, default=60.0, help="fewer repeats when one call takes long")
    p.add_argument("--op", choices=("select", "loss"), default="select",
                   help="select: topm_dot against the product; loss: the loss from embeddings, forward + backward")
    p.add_argument("--providers", default=None, help=f"select: {','.join(PROVIDERS)}; loss: {','.join(LOSS_PROVIDERS)}")
    p.add_argument("--out", default=None, help="default benchmarks/results/topm_cpu.csv (select) or "
                                               "embed_loss_cpu.csv (loss)")
    p.add_argument("--note", default="", help="appended to every row's note (e.g. 'machine shared')")
    p.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        mode, cfg = json.loads(a.child)
        print(json.dumps(child_memory(cfg) if mode == "memory" else child_times(cfg)))
        return 0
    known = LOSS_PROVIDERS if a.op == "loss" else PROVIDERS
    providers = [x for x in (a.providers or ",".join(known)).split(",") if x]
    for x in providers:
        if x not in known:
            p.error(f"unknown provider {x!r} for --op {a.op}; one of {known}")
    a.out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                  "embed_loss_cpu.csv" if a.op == "loss" else "topm_cpu.csv")
    Ns = [int(x) for x in a.N.split(",") if x]
    meta = dict(device=device_name(), torch=torch.__version__, commit=commit(), date=_dt.date.today().isoformat())
    total_mb = mem_total_mb()
    rows = []

    def spawn(mode, cfg):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps([mode, cfg])],
                           capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": ROOT})
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else str(r.returncode))
        return json.loads(r.stdout.strip().splitlines()[-1])

    for N in Ns:
        scores_mb = a.B * N * 4 / 2**20
        base = dict(B=a.B, N=N, D=a.D, M=a.M, threads=a.threads, repeats=a.repeats, budget_s=a.budget_s, op=a.op)
        run_here, by_prov = [], {}
        for prov in providers:
            row = dict(op=a.op, provider=prov, B=a.B, N=N, D=a.D, M=a.M, dtype="float32", threads=a.threads,
                       scores_mb=round(scores_mb, 1), item_grad_mb=round(N * a.D * 4 / 2**20, 1), note=a.note,
                       **meta)
            # the inputs plus the (B, N) scores (dense: and topk's copy, or the loss's gradient and the
            # teacher's scores) must fit
            copies = {"dense": 2 if a.op == "select" else 4, "matmul": 1 if a.op == "select" else 3}.get(prov, 0)
            need = scores_mb * max(copies, 1) + (N + a.B) * a.D * 4 / 2**20 * (4 if a.op == "loss" else 1)
            if prov in ("matmul", "dense") and need > 0.8 * total_mb:
                row["note"] = (f"skipped: needs {need:.0f} MB ((B, N) scores) of {total_mb:.0f} MB; "
                               + a.note).strip("; ")
                print(f"N={N} {prov}: {row['note']}", flush=True)
            else:
                try:
                    row["peak_extra_mb"] = round(spawn("memory", dict(base, provider=prov))["peak_extra_mb"], 1)
                    run_here.append(prov)
                except RuntimeError as e:
                    row["note"] = f"failed: {e}"
                    print(f"N={N} {prov}: {row['note']}", flush=True)
            by_prov[prov] = row
            rows.append(row)
        if run_here:
            times = spawn("times", dict(base, providers=run_here))
            p50 = {}
            for prov in run_here:
                q = quantiles(times[prov])
                by_prov[prov].update(repeats=len(times[prov]), p20_ms=q[0], p50_ms=q[1], p80_ms=q[2])
                p50[prov] = q[1]
            for prov in run_here:
                row = by_prov[prov]
                for key, ref_p in (("ratio_matmul", "matmul"), ("ratio_chunked", "matmul_chunked")):
                    if ref_p in p50:
                        row[key] = round(row["p50_ms"] / p50[ref_p], 3)
                print(f"N={N} {prov}: p50 {row['p50_ms']:.1f} ms over {row['repeats']}, peak extra "
                      f"{row.get('peak_extra_mb', float('nan'))} MB, x{row.get('ratio_matmul', '-')} matmul, "
                      f"x{row.get('ratio_chunked', '-')} chunked", flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in FIELDS})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
