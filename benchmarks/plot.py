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


def plot(rows, out_dir, op="fwdbwd", name=None):
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
        path = os.path.join(out_dir, f"loss_{name or slug(dev)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------- roofline, end to end, tables
OP_NAMES = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd", "select_epoch": "select (epoch)"}


def copy_bandwidths(results):
    """{tag: GB/s} from the ``copy_bandwidth_<tag>.txt`` files of a results folder."""
    out = {}
    for name in os.listdir(results):
        m = re.fullmatch(r"copy_bandwidth_(.+)\.txt", name)
        if m:
            with open(os.path.join(results, name)) as f:
                g = re.search(r"copy_bandwidth_gb_s\s+([0-9.]+)", f.read())
            if g:
                out[m.group(1)] = float(g.group(1))
    return out


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None


def roofline(rows, out_dir, copy_gb_s, tag):
    """Achieved bandwidth (minimal traffic / median time) of every kernel row against the traffic,
    with the device's measured copy bandwidth (and 80% of it) as the roof."""
    plt = _plt()
    rows = [r for r in rows if r.get("achieved_gb_s") not in (None, "", "nan")]
    if plt is None or not rows:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"fwd": "o", "bwd": "s", "fwdbwd": "D", "select_epoch": "^"}
    provs = sorted({r["provider"] for r in rows})
    colors = {p: f"C{i}" for i, p in enumerate(provs)}
    seen = set()
    for r in rows:
        x, y = float(r["min_traffic_mb"]) * 2**20 / 1e9, float(r["achieved_gb_s"])
        label = None
        if (r["provider"], r["op"]) not in seen:
            seen.add((r["provider"], r["op"]))
            label = f"{r['provider']} {OP_NAMES.get(r['op'], r['op'])}"
        ax.scatter(x, y, marker=markers.get(r["op"], "x"), color=colors[r["provider"]], label=label,
                   facecolors="none" if r["dtype"] != "float32" else colors[r["provider"]], s=36)
    if copy_gb_s:
        ax.axhline(copy_gb_s, color="k", lw=1.2)
        ax.axhline(0.8 * copy_gb_s, color="k", lw=0.8, ls="--")
        ax.text(ax.get_xlim()[0], copy_gb_s, f" measured copy {copy_gb_s:.0f} GB/s", va="bottom", fontsize=8)
        ax.text(ax.get_xlim()[0], 0.8 * copy_gb_s, " 80%", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("minimal traffic per call (GB): scores read once + gradient written once")
    ax.set_ylabel("achieved GB/s (minimal traffic / median time)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="filled: float32, open: 16-bit", title_fontsize=7)
    dev = rows[0]["device"]
    ax.set_title(f"Bandwidth roofline of the RCE-KD kernels, {dev}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"roofline_{tag}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_train(rows, out_dir, tag):
    """Stacked bars per backbone: the parts of a training step (and the per-step share of the
    per-epoch refresh) for each protocol and backend, labelled with the epoch-time ratio."""
    plt = _plt()
    if plt is None or not rows:
        return []
    parts = [("base_ms", "base"), ("teacher_ms", "teacher"), ("select_ms", "select"), ("kd_ms", "kd"),
             ("gather_ms", "gather"),
             ("backward_opt_ms", "backward+opt"),
             ("refresh", "refresh (per step)"), ("prep", "batch preparation (per step)")]
    keyed = {}
    for r in rows:  # the last row of each case
        keyed[(r["dataset"], r["model"], r["protocol"], r.get("scoring", "dense"), r["backend"])] = r
    models = list(dict.fromkeys(k[1] for k in keyed))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        cases = [r for k, r in keyed.items() if k[1] == model]
        xs = list(range(len(cases)))
        bottom = [0.0] * len(cases)
        for i, (col, lab) in enumerate(parts):
            if col in ("refresh", "prep"):
                vals = [float(r.get(f"{col}_s") or 0) * 1e3 / max(float(r["steps_per_epoch"]), 1) for r in cases]
            else:
                vals = [float(r.get(col) or 0) for r in cases]
            ax.bar(xs, vals, bottom=bottom, label=lab, color=f"C{i}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, r, b in zip(xs, cases, bottom):
            if r.get("ratio_vs_student"):
                ax.text(x, b, f"{float(r['ratio_vs_student']):.2f}x", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels([("alone" if r["protocol"] == "none" else
                             f"per {r['protocol']}\n{r.get('scoring', 'dense')}\n{r['backend']}")
                            for r in cases], fontsize=7)
        ax.set_ylabel("ms per training step (parts, synchronised)")
        ax.set_title(f"{model} on {cases[0]['dataset']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Cost of RCE-KD per training step, {rows[0]['device']} (labels: epoch time, KD / student alone)",
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"train_{tag}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_topm(rows, out_dir, name):
    """Two panels against N (log-log): the p50 time and the peak extra memory of each provider of a
    ``bench_topm.py`` CSV (the selection or the loss from embeddings); the loss panel also draws the
    item gradient's size (the memory target's reference)."""
    plt = _plt()
    rows = [r for r in rows if r.get("p50_ms") not in (None, "")]
    if plt is None or not rows:
        return []
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, prov in enumerate(dict.fromkeys(r["provider"] for r in rows)):
        rs = sorted((r for r in rows if r["provider"] == prov), key=lambda r: int(r["N"]))
        ns = [int(r["N"]) for r in rs]
        ax_t.plot(ns, [float(r["p50_ms"]) / 1e3 for r in rs], "o-", color=f"C{i}", label=prov)
        mem = [(int(r["N"]), float(r["peak_extra_mb"])) for r in rs if r.get("peak_extra_mb") not in (None, "")]
        if mem:
            ax_m.plot(*zip(*mem), "o-", color=f"C{i}", label=prov)
    if rows[0].get("item_grad_mb"):
        g = sorted({(int(r["N"]), float(r["item_grad_mb"])) for r in rows})
        ax_m.plot(*zip(*g), "k--", label="item gradient")
    what = "loss forward + backward" if rows[0].get("op") == "loss" else "top-M selection"
    for ax, lab in ((ax_t, "seconds (p50)"), (ax_m, "peak extra memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items N")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{what} from embeddings, B = {r0['B']}, D = {r0['D']}, M = {r0['M']}, {r0['device']}, "
                 f"{r0['threads']} threads", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _provenance(rows, src):
    def uniq(k):
        return ", ".join(sorted({r.get(k, "") for r in rows if r.get(k)})) or "not recorded"
    return (f"Device: **{uniq('device')}**; torch {uniq('torch')}, {uniq('threads')} threads; commit {uniq('commit')}; "
            f"date {uniq('date')} (generated from `{src}` by `benchmarks/regenerate.py`).")


def loss_table(rows, copy_gb_s, src):
    """The README table of a kernel CSV: per (op, N, dtype) the providers, fastest last."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["op"], r["mode"], int(r["B"]), int(r["N"]), r["dtype"])][r["provider"]] = r
    order = {"fwdbwd": 0, "fwd": 1, "bwd": 2, "select_epoch": 3}
    shapes = sorted({(r["B"], r["K"], r["M"], r["L"], r["mode"]) for r in rows})
    out = [_provenance(rows, src), "",
           "Shapes (B, K, M, L, mode): " + "; ".join(f"{b}, {k}, {m}, {l}, {mo}" for b, k, m, l, mo in shapes)
           + (f". Measured copy bandwidth: {copy_gb_s:.0f} GB/s." if copy_gb_s else "."), "",
           "| op | B | N | dtype | provider | p50 ms | p20-p80 ms | vs reference | vs compile | GB/s"
           + (" | % of copy" if copy_gb_s else "") + " | peak extra MB (x grad) |",
           "|" + " --- |" * (11 + (1 if copy_gb_s else 0))]
    for key in sorted(by, key=lambda k: (order.get(k[0], 9), k[3], k[4], k[2])):
        op, mode, B, N, dtype = key
        ref, comp = by[key].get("reference"), by[key].get("compile")
        for prov, r in sorted(by[key].items(), key=lambda kv: -float(kv[1]["p50_ms"])):
            p50 = float(r["p50_ms"])
            vs_ref = f"{float(ref['p50_ms']) / p50:.1f}x" if ref else "-"
            vs_comp = f"{float(comp['p50_ms']) / p50:.1f}x" if comp else "-"
            gbs = float(r["achieved_gb_s"])
            pct = f" | {100 * gbs / copy_gb_s:.0f}%" if copy_gb_s else ""
            mem = r.get("peak_extra_mb", "")
            mem = "" if mem in ("", "nan") else f"{float(mem):.1f} ({float(mem) / float(r['grad_mb']):.2f}x)"
            out.append(f"| {OP_NAMES.get(op, op)} | {B} | {N:,} | {dtype} | {prov} | {p50:.3f} | "
                       f"{float(r['p20_ms']):.3f}-{float(r['p80_ms']):.3f} | {vs_ref} | {vs_comp} | "
                       f"{gbs:.3g}{pct} | {mem} |")
    return "\n".join(out)


def train_table(rows, src):
    keyed = {}
    for r in rows:
        keyed[(r["dataset"], r["model"], r["protocol"], r.get("scoring", "dense"), r["backend"])] = r
    out = [_provenance(rows, src), "",
           "| dataset | model | protocol | scoring | backend | epoch s | prep s | refresh s | refresh / product | "
           "step ms | base | teacher | select | kd | gather | backward+opt | KD / student | peak MB |",
           "|" + " --- |" * 18]
    for r in keyed.values():
        proto = "student alone" if r["protocol"] == "none" else f"per {r['protocol']}"
        ratio = f"{float(r['ratio_vs_student']):.2f}x" if r.get("ratio_vs_student") else "-"
        prep = f"{float(r['prep_s']):.2f}" if r.get("prep_s") not in (None, "") else "-"
        gather = f"{float(r['gather_ms']):.1f}" if r.get("gather_ms") not in (None, "") else "-"
        rvp = f"{float(r['refresh_vs_product']):.2f}x" if r.get("refresh_vs_product") not in (None, "") else "-"
        sel = f"{float(r['select_ms']):.1f}" if r.get("select_ms") not in (None, "") else "-"
        out.append(f"| {r['dataset']} | {r['model']} | {proto} | {r.get('scoring', 'dense')} | {r['backend']} | "
                   f"{float(r['epoch_s']):.1f} | {prep} | {float(r['refresh_s']):.2f} | {rvp} | "
                   f"{float(r['step_ms']):.1f} | {float(r['base_ms']):.1f} | "
                   f"{float(r['teacher_ms']):.1f} | {sel} | {float(r['kd_ms']):.1f} | {gather} | "
                   f"{float(r['backward_opt_ms']):.1f} | "
                   f"{ratio} | {r['peak_mb']} |")
    return "\n".join(out)


def fill_blocks(text, blocks):
    """Replaces the body of each ``<!-- BEGIN name -->`` ... ``<!-- END name -->`` block of a
    markdown text; returns (new text, names of the blocks the text lacks)."""
    missing = []
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        if not pat.search(text):
            missing.append(name)
            continue
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text, missing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=os.path.join(HERE, "results", "loss.csv"))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--copy-gb-s", type=float, default=None, help="measured device copy bandwidth, for the % column")
    a = p.parse_args(argv)
    rows = latest(load(a.csv))
    for path in plot(rows, a.out):
        print("wrote", path)
    print(loss_table(rows, a.copy_gb_s, a.csv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
