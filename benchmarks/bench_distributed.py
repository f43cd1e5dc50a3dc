"""Benchmark of the item-sharded RCE-KD (rcekd_kernels.distributed): 1 against P processes.

For each number of processes P the script starts P workers (gloo on loopback for CPU tensors,
NCCL for CUDA with one GPU per process), each holding 1/P of the catalogue (the last shard takes
the remainder), and times, per kind of input:

``dense`` (score columns (B, N_local)):
    ``select``  ``sharded_select`` of B users (the teacher's top-K computed too): one refresh chunk;
    ``step``    ``sharded_loss_gathered`` forward + backward on the selection (per-epoch protocol);
    ``epoch``   users / B calls of ``sharded_rce_kd_loss`` forward + backward (the sets refreshed
                from every batch, the drop-in loss).
``emb`` (user vectors (B, D), the shard's item vectors (N_local, D)):
    ``select``  ``sharded_select_embeddings`` of B users (default local top-M: ``topm_matmul``);
    ``step``    ``sharded_loss_embeddings`` forward + backward (user-vector gradient summed);
    ``epoch``   the per-epoch protocol: users / B refresh chunks, then users / B steps.

With P = 1 the collective-free single-process API is timed too (provider ``plain``: ``select``,
``rce_kd_loss_gathered``, ``rce_kd_loss`` on the whole rows; for ``emb`` the dense rows
``U @ V.T`` are formed). Each timed value is the slowest process's time of the call (processes
start together after a barrier); every row also has the bytes one process sends per call
(payload: its contribution to the collectives; wire: what the ring algorithms send, see
docs/DISTRIBUTED.md) as measured by a ``CommLog``, and the model's prediction of the wire bytes.

Examples::

    python benchmarks/bench_distributed.py                                  # B 1024, N 100,000, P 1 and 2
    python benchmarks/bench_distributed.py --procs 1 2 --kinds emb --D 64 --N 100000 1000000
    python benchmarks/bench_distributed.py --device cuda --procs 1          # a GPU: the collective-free baseline

Each worker uses ``--threads`` threads (default 1: P processes on P cores). Rows go to
``benchmarks/results/distributed_<tag>.csv`` (tag: cpu, or the GPU's short name).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_loss import commit, device_name, quantiles  # noqa: E402

FIELDS = ["kind", "provider", "procs", "op", "B", "N", "M", "K", "L", "D", "users", "p20_ms", "p50_ms", "p80_ms",
          "cpu_p50_ms", "repeats", "collectives", "payload_bytes", "wire_bytes", "model_wire_bytes", "device",
          "threads", "torch", "commit", "date"]


# ------------------------------------------------------------------------- the model
def model_bytes(op: str, kind: str, *, B: int, M: int, K: int, L: int, D: int, P: int, users: int,
                value_bytes: int = 4, teacher_topk_computed: bool = True) -> int:
    """The wire bytes one process sends per call (docs/DISTRIBUTED.md): the ring all_gather of the
    candidates sends (P - 1) x its payload, the ring all-reduce 2 (P - 1) / P x the tensor.

    select: B (M + K) candidates of 8 bytes (one int64 key; 16 for float64 scores), plus the
    metadata word (25 int64, all_gathered); step: the all-reduce of 2 B (2K + L) scores (and of
    the user vectors' gradient, B x D, for ``emb``); epoch: the calls it makes."""
    per_key = 8 if value_bytes <= 4 else 16
    cand = B * (M + (K if teacher_topk_computed else 0)) * per_key
    meta = 25 * 8
    select = (P - 1) * (cand + meta)
    step = (2 * (P - 1) * 2 * B * (2 * K + L) * value_bytes) // P
    if kind == "emb":
        step += (2 * (P - 1) * B * D * value_bytes) // P
    chunks = -(-users // B)
    if op == "select":
        return select
    if op == "step":
        return step
    return chunks * (select + step)  # epoch: dense = per-batch refresh, emb = refresh + steps


# ------------------------------------------------------------------------- the worker
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int, P: int
           ) -> Tuple[List[float], List[float]]:
    """The slowest process's wall milliseconds of each repeat, and its CPU milliseconds (the CPU
    time of the process: on a shared machine the work each process does, whatever it waited)."""
    import torch.distributed as dist
    wall, cpu = [], []
    for i in range(warmup + repeats):
        dist.barrier()
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(dev)
        ms = torch.tensor([(time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3], dtype=torch.float64,
                          device=dev)
        if P > 1:
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        if i >= warmup:
            wall.append(float(ms[0]))
            cpu.append(float(ms[1]))
    return wall, cpu


def _bounds(N: int, P: int, rank: int):
    per = N // P
    off = rank * per
    return off, (N - off if rank == P - 1 else per)


def worker(a) -> None:
    import torch.distributed as dist

    import rcekd_kernels as R
    import rcekd_kernels.distributed as D
    torch.set_num_threads(a.threads)
    P, rank = a.world, a.rank
    dev = torch.device(a.device if a.device == "cpu" else f"cuda:{rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{a.port}",
                            rank=rank, world_size=P)
    rows_out: List[Dict[str, Any]] = []
    hp = dict(K=a.K, M=a.M, L=a.L, mode="official")
    for N in a.N:
        off, n = _bounds(N, P, rank)
        layout = D.shard_layout(n, device=dev)
        g = torch.Generator().manual_seed(1234)
        chunks = -(-a.users // a.B)
        for kind in a.kinds:
            res: Dict[str, Any] = {}
            log = D.CommLog()
            if kind == "dense":
                # every process builds the whole rows from one seed and keeps its columns
                s_full = torch.randn(a.B, N, generator=g)
                t_full = torch.randn(a.B, N, generator=g)
                s = s_full[:, off:off + n].contiguous().to(dev)
                t = t_full[:, off:off + n].contiguous().to(dev)
                del s_full, t_full
                rows = torch.arange(a.B, device=dev)

                def sel_fn(i=0, rows=rows):
                    return D.sharded_select(s, t, item_offset=layout.offset, seed=i, row_ids=rows, validate=False,
                                            comm_log=log, **hp)

                sel = sel_fn()
                sp = s.clone().requires_grad_()

                def step_fn():
                    D.sharded_loss_gathered(lambda ids: sp.gather(1, ids), lambda ids: t.gather(1, ids), sel,
                                            n_local=n, item_offset=layout.offset, validate=False, reduction="sum",
                                            comm_log=log).backward()

                def epoch_fn():
                    for c in range(chunks):
                        D.sharded_rce_kd_loss(sp, t, item_offset=layout.offset, seed=c, row_ids=rows + c * a.B,
                                              reduction="sum", validate=False, comm_log=log, **hp).backward()

                res["sharded"] = dict(select=sel_fn, step=step_fn, epoch=epoch_fn)
                if P == 1:
                    def p_select():
                        return R.select(s, t, seed=0, row_ids=rows, validate=False, **hp)

                    psel = p_select()

                    def p_step():
                        R.rce_kd_loss_gathered(sp.gather(1, psel.indices), t.gather(1, psel.indices), psel,
                                               reduction="sum", validate=False).backward()

                    def p_epoch():
                        for c in range(chunks):
                            R.rce_kd_loss(sp, t, seed=c, row_ids=rows + c * a.B, reduction="sum", validate=False,
                                          **hp).backward()

                    res["plain"] = dict(select=p_select, step=p_step, epoch=p_epoch)
            else:
                U = torch.randn(a.B, a.D, generator=g).to(dev)
                V_full = torch.randn(N, a.D, generator=g) / a.D ** 0.5
                Ut = torch.randn(a.B, a.D, generator=g).to(dev)
                Vt_full = torch.randn(N, a.D, generator=g) / a.D ** 0.5
                V = V_full[off:off + n].contiguous().to(dev).requires_grad_()
                Vt = Vt_full[off:off + n].contiguous().to(dev)
                Up = U.clone().requires_grad_()
                rows = torch.arange(a.B, device=dev)

                def e_select(i=0, rows=rows):
                    return D.sharded_select_embeddings(U, V.detach(), Ut, Vt, item_offset=layout.offset, seed=i,
                                                       row_ids=rows, validate=False, comm_log=log, **hp)

                esel = e_select()

                def e_step(sel=esel):
                    D.sharded_loss_embeddings(Up, V, Ut, Vt, sel, item_offset=layout.offset, validate=False,
                                              reduction="sum", comm_log=log).backward()

                def e_epoch():
                    sels = [e_select(c, rows + c * a.B) for c in range(chunks)]
                    for sel in sels:
                        e_step(sel)

                res["sharded"] = dict(select=e_select, step=e_step, epoch=e_epoch)
                if P == 1:
                    Vf = V_full.to(dev).requires_grad_()
                    Vtf = Vt_full.to(dev)

                    def pe_select(i=0, rows=rows):
                        with torch.no_grad():
                            return R.select(U @ Vf.T, Ut @ Vtf.T, seed=i, row_ids=rows, validate=False, **hp)

                    pesel = pe_select()

                    def pe_step(sel=pesel):
                        R.rce_kd_loss_gathered(R.gathered_dot(Up, Vf, sel.indices, validate=False),
                                               R.gathered_dot(Ut, Vtf, sel.indices, validate=False), sel,
                                               reduction="sum", validate=False).backward()

                    def pe_epoch():
                        sels = [pe_select(c, rows + c * a.B) for c in range(chunks)]
                        for sel in sels:
                            pe_step(sel)

                    res["plain"] = dict(select=pe_select, step=pe_step, epoch=pe_epoch)
            for provider, ops in res.items():
                for op in a.ops:
                    reps = a.epoch_repeats if op == "epoch" else a.repeats
                    log.reset()
                    ops[op]()  # one untimed call: its collectives, counted
                    _sync(dev)
                    n_coll = len(log.records)
                    payload, wire = log.payload_bytes(), log.wire_bytes()
                    times, cpu = _timed(ops[op], dev, reps, a.warmup, P)
                    q = quantiles(times)
                    rows_out.append(dict(
                        kind=kind, provider=provider, procs=P, op=op, B=a.B, N=N, M=a.M, K=a.K, L=a.L,
                        D=a.D if kind == "emb" else "", users=a.users, p20_ms=round(q[0], 3), p50_ms=round(q[1], 3),
                        p80_ms=round(q[2], 3), cpu_p50_ms=round(quantiles(cpu)[1], 3), repeats=reps,
                        collectives=n_coll, payload_bytes=payload,
                        wire_bytes=wire,
                        model_wire_bytes=model_bytes(op, kind, B=a.B, M=a.M, K=a.K, L=a.L, D=a.D, P=P,
                                                     users=a.users) if provider == "sharded" else 0))
                    if rank == 0:
                        r = rows_out[-1]
                        print(f"P={P} {kind:5s} {provider:7s} {op:6s} N={N}: p50 {r['p50_ms']:.1f} ms "
                              f"(CPU {r['cpu_p50_ms']:.1f} ms per process), "
                              f"{r['collectives']} collectives, {wire / 1e6:.3f} MB wire/process "
                              f"(model {r['model_wire_bytes'] / 1e6:.3f})", flush=True)
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump(rows_out, f)
    dist.barrier()
    gc.collect()  # what a reference cycle still holds of the group frees now, not at the interpreter's
    dist.destroy_process_group()  # exit, where freeing gloo's threads can abort (parallel.Session.close)


# ------------------------------------------------------------------------- the driver
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tag(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((k for k in ("h200", "h100", "a100", "l4", "l40s", "v100") if k in name), "gpu")


def launch(a, P: int) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), GLOO_SOCKET_IFNAME=os.environ.get(
            "GLOO_SOCKET_IFNAME", "lo"), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        args = [sys.executable, os.path.abspath(__file__), "--_worker", "--world", str(P), "--port", str(port),
                "--json", out, "--device", a.device, "--B", str(a.B), "--M", str(a.M), "--K", str(a.K),
                "--L", str(a.L), "--D", str(a.D), "--users", str(a.users), "--repeats", str(a.repeats),
                "--epoch-repeats", str(a.epoch_repeats), "--warmup", str(a.warmup), "--threads", str(a.threads),
                "--N", *map(str, a.N), "--kinds", *a.kinds, "--ops", *a.ops]
        procs = [subprocess.Popen(args + ["--rank", str(r)], env=env) for r in range(P)]
        try:
            for p in procs:
                p.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise SystemExit(f"the {P} workers did not finish within {a.timeout} s") from None
        if any(p.returncode for p in procs):
            raise SystemExit(f"a worker failed: exit codes {[p.returncode for p in procs]}")
        with open(out) as f:
            return json.load(f)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def table(path: str) -> str:
    """A markdown table of a CSV of this benchmark: per (N, kind, op) the p50 wall and CPU time of
    each (provider, P) and the wire bytes per process, with the source's provenance."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols = sorted({(r["provider"], int(r["procs"])) for r in rows}, key=lambda c: (c[0] != "plain", c[1]))
    head = " | ".join(f"{p} P={n}: wall / CPU ms" for p, n in cols)
    out = [f"| N | kind | op | {head} | wire bytes per process (P = {max(n for _, n in cols)}) |",
           "| --- " * (4 + len(cols)) + "|"]
    keys = sorted({(int(r["N"]), r["kind"], r["op"]) for r in rows}, key=lambda k: (k[0], k[1], "select step epoch"
                                                                                       .split().index(k[2])))
    for N, kind, op in keys:
        cells, wire = [], ""
        for p, n in cols:
            r = next((r for r in rows if (int(r["N"]), r["kind"], r["op"], r["provider"], int(r["procs"])) ==
                      (N, kind, op, p, n)), None)
            cells.append("" if r is None else f"{float(r['p50_ms']):.0f} / {float(r['cpu_p50_ms']):.0f}")
            if r is not None and p == "sharded":
                wire = _mb(int(r["wire_bytes"]))
        out.append(f"| {N:,} | {kind} | {op} | " + " | ".join(cells) + f" | {wire} |")
    r0 = rows[0]
    dim = next((r["D"] for r in rows if r["D"]), "-")
    out.append("")
    out.append(f"{r0['device']}, torch {r0['torch']}, commit {r0['commit']}, {r0['date']}, {r0['threads']} thread(s) "
               f"per process; B = {r0['B']}, M = {r0['M']}, K = {r0['K']}, L = {r0['L']}, D = {dim} (emb), "
               f"{r0['users']} users per epoch (source: {os.path.relpath(path, ROOT)})")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="numbers of processes to compare")
    p.add_argument("--kinds", nargs="+", default=["dense", "emb"], choices=["dense", "emb"])
    p.add_argument("--ops", nargs="+", default=["select", "step", "epoch"], choices=["select", "step", "epoch"])
    p.add_argument("--B", type=int, default=1024, help="users per call")
    p.add_argument("--N", type=int, nargs="+", default=[100_000], help="catalogue sizes")
    p.add_argument("--M", type=int, default=200)
    p.add_argument("--K", type=int, default=50)
    p.add_argument("--L", type=int, default=50)
    p.add_argument("--D", type=int, default=64, help="vector dimension (emb)")
    p.add_argument("--users", type=int, default=4096, help="users of one epoch (epoch = users / B chunks)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epoch-repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the workers are killed")
    p.add_argument("--csv", default=None, help="default: benchmarks/results/distributed_<tag>.csv")
    p.add_argument("--table", metavar="CSV", help="print the markdown table of a CSV of this benchmark and exit")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.table:
        print(table(a.table))
        return
    if a._worker:
        worker(a)
        return
    if a.device != "cpu" and max(a.procs) > torch.cuda.device_count():
        raise SystemExit(f"--procs {max(a.procs)} needs as many GPUs; {torch.cuda.device_count()} here")
    path = a.csv or os.path.join(HERE, "results", f"distributed_{_tag(a.device)}.csv")
    meta = dict(device=device_name(a.device), threads=a.threads, torch=torch.__version__, commit=commit(),
                date=_dt.date.today().isoformat())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for P in a.procs:
            for row in launch(a, P):
                w.writerow({**row, **meta})
            f.flush()
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
