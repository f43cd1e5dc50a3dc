"""Plots and a markdown table from the benchmark CSV (benchmarks/results/loss.csv).

    python benchmarks/plot.py [--csv benchmarks/results/loss.csv] [--out benchmarks/results]

Writes, per device found in the CSV, ``loss_<device>.png`` (time and achieved
bandwidth against N, one line per provider, forward+backward) and prints a
markdown table of the median times with the speed-ups against the reference.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def latest(rows):
    """Keeps the last row of each (device, op, provider, mode, B, N, K, M, L, dtype)."""
    keep = {}
    for r in rows:
        keep[tuple(r[k] for k in ("device", "op", "provider", "mode", "B", "N", "K", "M", "L", "dtype"))] = r
    return list(keep.values())


def slug(s):
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()


def table(rows, copy_gb_s=None):
    out = []
    by = defaultdict(dict)
    for r in rows:
        by[(r["device"], r["op"], r["mode"], int(r["B"]), int(r["N"]), r["dtype"])][r["provider"]] = r
    out.append("| device | op | B | N | dtype | provider | p50 ms | p20-p80 ms | vs reference | GB/s"
               + (" | % of copy" if copy_gb_s else "") + " | peak extra MB | grad MB |")
    out.append("|" + "---|" * (12 + (1 if copy_gb_s else 0)))
    for key in sorted(by):
        dev, op, mode, B, N, dtype = key
        ref = by[key].get("reference")
        for prov, r in sorted(by[key].items(), key=lambda kv: -float(kv[1]["p50_ms"])):
            p50 = float(r["p50_ms"])
            sp = f"{float(ref['p50_ms']) / p50:.1f}x" if ref else "-"
            pct = f" | {100 * float(r['achieved_gb_s']) / copy_gb_s:.0f}%" if copy_gb_s else ""
            out.append(f"| {dev} | {op} | {B} | {N} | {dtype} | {prov} | {p50:.3f} | {r['p20_ms']}-{r['p80_ms']} | "
                       f"{sp} | {r['achieved_gb_s']}{pct} | {r['peak_extra_mb']} | {r['grad_mb']} |")
    return "\n".join(out)


def plot(rows, out_dir, op="fwdbwd"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return []
    paths = []
    for dev in sorted({r["device"] for r in rows}):
        sub = [r for r in rows if r["device"] == dev and r["op"] == op]
        if not sub:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for (prov, dtype) in sorted({(r["provider"], r["dtype"]) for r in sub}):
            pts = sorted((int(r["N"]), float(r["p50_ms"]), float(r["achieved_gb_s"]))
                         for r in sub if r["provider"] == prov and r["dtype"] == dtype)
            ns = [p[0] for p in pts]
            ax1.plot(ns, [p[1] for p in pts], marker="o", label=f"{prov} {dtype}")
            ax2.plot(ns, [p[2] for p in pts], marker="o", label=f"{prov} {dtype}")
        for ax, yl in ((ax1, "median time (ms)"), (ax2, "achieved GB/s (minimal traffic)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (items per row)")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=7)
        fig.suptitle(f"RCE-KD loss, {op}, {dev}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"loss_{slug(dev)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=os.path.join(HERE, "results", "loss.csv"))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--copy-gb-s", type=float, default=None, help="measured device copy bandwidth, for the % column")
    a = p.parse_args(argv)
    rows = latest(load(a.csv))
    for path in plot(rows, a.out):
        print("wrote", path)
    print(table(rows, a.copy_gb_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
