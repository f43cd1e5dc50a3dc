"""Collecting finished runs into a small results folder (JSON, CSV, PNG, a Markdown table)."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List, Optional

from . import config as C
from .evaluate import metric_names
from .files import atomic_write, copy_file, write_csv, write_json, write_text


def sanitize_config(cfg: Dict) -> Dict:
    """No machine paths in committed files: data_dir dropped, teacher_dir reduced to its last part."""
    cfg = dict(cfg)
    cfg["data_dir"] = None
    if cfg.get("teacher_dir"):
        parts = os.path.normpath(cfg["teacher_dir"]).split(os.sep)
        # a reproduce-queue teacher is <name>/seed_<s>: keep both parts
        cfg["teacher_dir"] = "/".join(parts[-2:]) if parts[-1].startswith("seed_") and len(parts) > 1 else parts[-1]
    return cfg


def collect(run_dirs: List[str], out: str, ks=(10, 20), write_summary: bool = True,
            names: Optional[List[str]] = None) -> List[Dict]:
    """Copies result.json, history.csv, curves.png and the (sanitised) config of each finished run into
    out/<run name>/ and writes out/summary.csv, summary.json and summary.md (test and valid metrics at
    the best valid epoch, epochs, seconds per epoch)."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for i, d in enumerate(run_dirs):
        res_path = os.path.join(d, "result.json")
        if not os.path.exists(res_path):
            continue
        name = names[i] if names else os.path.basename(os.path.normpath(d))
        target = os.path.join(out, name)
        os.makedirs(target, exist_ok=True)
        with open(res_path) as f:
            res = json.load(f)
        for fname in ("result.json", "history.csv", "curves.png"):
            if os.path.exists(os.path.join(d, fname)):
                copy_file(os.path.join(d, fname), os.path.join(target, fname))
        cfg = sanitize_config(C.load_yaml(os.path.join(d, "config.yaml")))
        C.dump(cfg, os.path.join(target, "config.yaml"))
        row = {"run": name, "role": res["role"], "model": res["model"], "kd": res["kd"],
               "teacher": cfg.get("teacher_dir") or "", "dim": cfg["model"].get("dim"),
               "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
               "s_per_epoch": round(res["mean_epoch_time_s"], 2)}
        for split in ("test", "valid"):
            for m in metric_names(ks):
                v = res[split].get(m)
                row[f"{split}_{m}"] = None if v is None else round(v, 5)
        rows.append(row)
    if rows and write_summary:
        write_csv(os.path.join(out, "summary.csv"), rows, fieldnames=list(rows[0]))
        write_json(os.path.join(out, "summary.json"), rows)
        cols = ["run", "model", "dim", "kd", "teacher"] + [f"test_{m}" for m in metric_names(ks)] + \
               ["best_epoch", "s_per_epoch"]
        write_text(os.path.join(out, "summary.md"), "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" +
                   "".join("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |\n" for r in rows))
    return rows


# --- the paper-layout report of the reproduce queue ------------------------------------------------------
#
# ``rcekd collect --runs-dir DIR --dataset citeulike --out results/citeulike`` reads the runs of
# ``rcekd reproduce`` (DIR/<name>/seed_<s>/result.json) and writes summary.{md,csv,json} and summary.png:
# the paper's Table 1 layout (mean ± std over seeds, the paper's value beside each of ours and the relative
# difference, Improv.b and a paired t-test p-value of RCE-KD against the best baseline of each pair) and the
# ablation table.

PAPER_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")   # the paper's column order
METRIC_LABEL = {"recall@10": "R@10", "ndcg@10": "N@10", "recall@20": "R@20", "ndcg@20": "N@20"}
PAIRS = ("mf->mf", "lightgcn->lightgcn", "hstu->hstu", "lightgcn->mf", "hstu->mf")
PAIR_LABEL = {"mf->mf": "MF→MF", "lightgcn->lightgcn": "LGCN→LGCN", "hstu->hstu": "HSTU→HSTU",
              "lightgcn->mf": "LGCN→MF", "hstu->mf": "HSTU→MF"}
TABLE_ROWS = ("teacher", "student", "cd", "rrd", "dcd", "hetcomp", "tarec", "rcekd")
ROW_LABEL = {"teacher": "Teacher", "student": "Student", "cd": "CD", "rrd": "RRD", "dcd": "DCD",
             "hetcomp": "HetComp", "tarec": "TARec", "rcekd": "RCE-KD"}
BASELINES = ("cd", "rrd", "dcd", "hetcomp")
ABLATION_ROWS = (("rcekd-mf-mf", "RCE-KD"), ("rcekd_no_split-mf-mf", "w/o sep (CE on QT ∪ A)"),
                 ("rcekd_l1_only-mf-mf", "w/o S (L1 only)"), ("rcekd_const_gamma-mf-mf", "w/ const (gamma 0.5)"),
                 ("rcekd_paper-mf-mf", "mode=paper"), ("rcekd_batch-mf-mf", "refresh=batch"))
FINISHED_STATUSES = ("early_stop", "max_epochs", "finished")


def betainc_reg(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, modified Lentz)."""
    import math
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc_reg: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use the symmetry
        return 1.0 - betainc_reg(b, a, 1.0 - x)
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(ln_front) * f / a


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom: P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    import math
    if df < 1:
        raise ValueError(f"t_two_sided_p: df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc_reg(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(x, y):
    """Paired t-test of x against y (same seeds): (t, df, two-sided p); None when fewer than 2 pairs."""
    import math
    if len(x) != len(y):
        raise ValueError(f"paired_t_test: {len(x)} and {len(y)} values")
    n = len(x)
    if n < 2:
        return None
    d = [a - b for a, b in zip(x, y)]
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1)
    if var == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / math.sqrt(var / n)
    return t, n - 1, (1.0 if t == 0.0 else t_two_sided_p(t, n - 1))


def mean_std(values):
    import math
    n = len(values)
    if not n:
        return None, None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def load_paper(dataset: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.yaml")
    paper = C.load_yaml(path)
    return paper.get(dataset), paper


def result_dir(d: str):
    """The folder holding a run's finished result: the run's own, else the record it was imported with and is
    being trained again from (``record/``, ``rcekd reproduce --import-from``); None when neither is finished."""
    for cand in (d, os.path.join(d, "record")):
        try:
            with open(os.path.join(cand, "result.json")) as f:
                if json.load(f).get("status") in FINISHED_STATUSES:
                    return cand
        except (OSError, ValueError):
            continue
    return None


def queue_results(runs_dir: str, seeds=None) -> Dict[str, Dict[int, Dict]]:
    """{run name: {seed: result.json}} of the finished runs of a reproduce queue."""
    out: Dict[str, Dict[int, Dict]] = {}
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"{runs_dir} is not a directory (the --runs-dir of `rcekd reproduce`)")
    for name in sorted(os.listdir(runs_dir)):
        d = os.path.join(runs_dir, name)
        if not os.path.isdir(d):
            continue
        for sub in sorted(os.listdir(d)):
            if not sub.startswith("seed_"):
                continue
            try:
                seed = int(sub[5:])
            except ValueError:
                continue
            if seeds is not None and seed not in seeds:
                continue
            src = result_dir(os.path.join(d, sub))
            if src is None:
                continue
            with open(os.path.join(src, "result.json")) as f:
                out.setdefault(name, {})[seed] = json.load(f)
    return out


def row_run_name(pair: str, row: str) -> str:
    t, s = pair.split("->")
    return {"teacher": f"teacher-{t}", "student": f"student-{s}"}.get(row, f"{row}-{t}-{s}")


def _cell(stats):
    if not stats or stats["n"] == 0:
        return "—"
    if stats["n"] == 1:  # one seed: no spread to show (the n column says so)
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _pct(x):
    return "—" if x is None else f"{100 * x:+.1f}%"


def _pval(p):
    return "—" if p is None else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def not_authors(dataset: str) -> List[Dict]:
    """The settings of the data set's packaged config marked ``# ours`` (key, value, reason), [] without one."""
    from . import config as C
    try:
        return C.marked_ours(dataset)
    except FileNotFoundError:
        return []


def table_report(runs_dir: str, dataset: str, out: str, seeds=None, copy_runs: bool = True) -> Dict:
    """The paper-layout report (see above) of the runs in ``runs_dir``; returns the JSON it writes."""
    from .data import canonical_name
    dataset = canonical_name(dataset)
    results = queue_results(runs_dir, seeds)
    if not results:
        raise ValueError(f"no finished run in {runs_dir} (expected <run>/seed_<s>/result.json of `rcekd reproduce`)")
    paper_ds, paper_meta = load_paper(dataset)
    paper_t1 = (paper_ds or {}).get("table1") or {}
    cols = list(paper_meta.get("columns", PAPER_METRICS))
    conventions = sorted({r.get("metric_convention", "ours") for runs in results.values() for r in runs.values()})
    seeds_seen = sorted({s for runs in results.values() for s in runs})

    def stats(name):
        runs = results.get(name, {})
        st = {"n": len(runs), "seeds": sorted(runs)}
        for m in PAPER_METRICS:
            vals = [runs[s]["test"][m] for s in sorted(runs)]
            mean, std = mean_std(vals)
            st[m] = {"mean": mean, "std": std, "values": vals}
        return st

    def rel(ours, paper):
        return None if ours is None or paper in (None, 0) else (ours - paper) / paper

    report = {"dataset": dataset, "runs_dir": os.path.basename(os.path.normpath(runs_dir)), "seeds": seeds_seen,
              "metric_convention": conventions, "split": "test", "paper_source": paper_meta.get("source"),
              "table1": {}, "ablation": {}, "not_authors": not_authors(dataset)}
    for pair in PAIRS:
        entry = {"rows": {}, "rcekd_vs_best": {}}
        pp = paper_t1.get(pair, {})
        for row in TABLE_ROWS:
            st = stats(row_run_name(pair, row)) if row != "tarec" else {"n": 0}
            cells = {}
            for m in PAPER_METRICS:
                pv = pp.get(row)[cols.index(m)] if pp.get(row) else None
                om = st.get(m, {}).get("mean") if st["n"] else None
                cells[m] = {"mean": om, "std": st.get(m, {}).get("std") if st["n"] else None,
                            "values": st.get(m, {}).get("values", []), "paper": pv, "rel_diff": rel(om, pv)}
            entry["rows"][row] = {"run": row_run_name(pair, row) if row != "tarec" else None, "n": st["n"],
                                  "seeds": st.get("seeds", []), "metrics": cells}
        # RCE-KD against the best baseline (highest mean of that metric among the KD baselines run; the
        # scratch student when none was run), paired over the seeds both have
        rk = results.get(row_run_name(pair, "rcekd"), {})
        for m in PAPER_METRICS:
            cands = [b for b in BASELINES if results.get(row_run_name(pair, b))] or \
                    (["student"] if results.get(row_run_name(pair, "student")) else [])
            best = max(cands, key=lambda b: entry["rows"][b]["metrics"][m]["mean"]) if cands else None
            res = {"best_baseline": best, "improv": None, "t": None, "df": None, "p_value": None, "n_pairs": 0,
                   "paper_improv": pp["improv_b"][cols.index(m)] if pp.get("improv_b") else None,
                   "paper_p_value": pp["p_value"][cols.index(m)] if pp.get("p_value") else None}
            if best and rk:
                bruns = results[row_run_name(pair, best)]
                common = sorted(set(rk) & set(bruns))
                x = [rk[s]["test"][m] for s in common]
                y = [bruns[s]["test"][m] for s in common]
                bm = entry["rows"][best]["metrics"][m]["mean"]
                res["improv"] = rel(entry["rows"]["rcekd"]["metrics"][m]["mean"], bm)
                res["n_pairs"] = len(common)
                tt = paired_t_test(x, y)
                if tt:
                    res["t"], res["df"], res["p_value"] = tt
            entry["rcekd_vs_best"][m] = res
        report["table1"][pair] = entry
    full = stats("rcekd-mf-mf")
    for name, label in ABLATION_ROWS:
        st = stats(name)
        cells = {}
        for m in PAPER_METRICS:
            cell = {"mean": st[m]["mean"], "std": st[m]["std"], "values": st[m]["values"],
                    "rel_to_full": rel(st[m]["mean"], full[m]["mean"]) if name != "rcekd-mf-mf" else None,
                    "p_vs_full": None, "paper": None}
            if name != "rcekd-mf-mf" and st["n"]:
                a, b = results.get(name, {}), results.get("rcekd-mf-mf", {})
                common = sorted(set(a) & set(b))
                tt = paired_t_test([a[s]["test"][m] for s in common], [b[s]["test"][m] for s in common])
                cell["p_vs_full"] = tt[2] if tt else None
            cells[m] = cell
        report["ablation"][name] = {"label": label, "n": st["n"], "seeds": st["seeds"], "metrics": cells}

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "summary.json"), report)
    _write_table_csv(report, os.path.join(out, "summary.csv"))
    write_text(os.path.join(out, "summary.md"), _table_markdown(report, paper_ds is not None))
    report_plot(report, os.path.join(out, "summary.png"))
    if copy_runs:
        for name, runs in results.items():
            for s in runs:
                collect([result_dir(os.path.join(runs_dir, name, f"seed_{s}"))], os.path.join(out, "runs", name),
                        write_summary=False, names=[f"seed_{s}"])
    return report


def _write_table_csv(report: Dict, path: str) -> None:
    buf = io.StringIO(newline="")
    _table_csv_rows(report, csv.writer(buf))
    write_text(path, buf.getvalue())


def _table_csv_rows(report: Dict, w) -> None:
    w.writerow(["section", "pair", "row", "metric", "n", "mean", "std", "values", "paper", "rel_diff",
                "best_baseline", "improv_vs_best", "p_value", "paper_improv", "paper_p_value"])
    for pair, e in report["table1"].items():
        for row, r in e["rows"].items():
            for m, c in r["metrics"].items():
                extra = [""] * 5
                if row == "rcekd":
                    b = e["rcekd_vs_best"][m]
                    extra = [b["best_baseline"] or "", b["improv"], b["p_value"], b["paper_improv"],
                             b["paper_p_value"]]
                w.writerow(["table1", pair, row, m, r["n"], c["mean"], c["std"],
                            ";".join(f"{v:.6f}" for v in c["values"]), c["paper"], c["rel_diff"]] + extra)
    for name, r in report["ablation"].items():
        for m, c in r["metrics"].items():
            w.writerow(["ablation", "mf->mf", name, m, r["n"], c["mean"], c["std"],
                        ";".join(f"{v:.6f}" for v in c["values"]), "", c["rel_to_full"], "rcekd-mf-mf", "",
                        c["p_vs_full"], "", ""])


def _table_markdown(report: Dict, have_paper: bool) -> str:
    conv = report["metric_convention"]
    conv_txt = ", ".join(conv)
    lines = [f"# {report['dataset']}: the paper's Table 1 and the ablations, reproduced", "",
             f"Test split, full ranking with the training items masked, best epoch by validation NDCG@10. "
             f"Ours: mean ± std (sample std) over the finished seeds (seeds {', '.join(map(str, report['seeds']))}; "
             f"n per row). Metric convention: **{conv_txt}** (`train.metric_convention`; on CiteULike every user "
             f"has test items, so test metrics are the same under both conventions). Paper: "
             f"{report['paper_source']}, mean of 5 runs. Δ = (ours − paper) / paper. Improv.b = RCE-KD against the "
             f"best baseline of the pair (the KD baseline run with the highest mean on that metric; the scratch "
             f"student when no baseline was run); p = two-sided paired t-test over the seeds both have "
             f"(the paper: over 5 runs). TARec is not implemented here (paper values only).", ""]
    hdr = ["T→S", "method"]
    for m in PAPER_METRICS:
        hdr += [METRIC_LABEL[m], "paper", "Δ"]
    hdr.append("n")
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for pair, e in report["table1"].items():
        for i, row in enumerate(TABLE_ROWS):
            r = e["rows"][row]
            if row == "tarec" and not any(c["paper"] is not None for c in r["metrics"].values()):
                continue
            line = [PAIR_LABEL[pair] if i == 0 else "", ROW_LABEL[row]]
            for m in PAPER_METRICS:
                c = r["metrics"][m]
                line += [_cell({"n": r["n"], **c}) if r["n"] else "—",
                         "—" if c["paper"] is None else f"{c['paper']:.4f}", _pct(c["rel_diff"])]
            line.append(str(r["n"]))
            lines.append("| " + " | ".join(line) + " |")
        imp = ["", "*Improv.b*"]
        pv = ["", "*p-value*"]
        for m in PAPER_METRICS:
            b = e["rcekd_vs_best"][m]
            best = ROW_LABEL.get(b["best_baseline"], "—") if b["best_baseline"] else "—"
            imp += [f"{_pct(b['improv'])} ({best})" if b["improv"] is not None else "—",
                    _pct(b["paper_improv"]), ""]
            pv += [f"{_pval(b['p_value'])} (n={b['n_pairs']})" if b["p_value"] is not None else "—",
                   _pval(b["paper_p_value"]), ""]
        lines.append("| " + " | ".join(imp + [""]) + " |")
        lines.append("| " + " | ".join(pv + [""]) + " |")
    lines += ["", "## Ablations (MF→MF)", "",
              "The paper's Figure 3 variants (defined in docs/KD_METHODS.md) and the two variants only this package "
              "offers. Each cell: mean ± std (Δ against RCE-KD); p = paired t-test against RCE-KD over the seeds "
              "both have. The paper's Figure 3 covers Gowalla and Yelp only: no published CiteULike value.", ""]
    hdr = ["variant"] + [METRIC_LABEL[m] for m in PAPER_METRICS] + ["p (R@20)", "p (N@20)", "n"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for r in report["ablation"].values():
        line = [r["label"]]
        for m in PAPER_METRICS:
            c = r["metrics"][m]
            cell = _cell({"n": r["n"], **c}) if r["n"] else "—"
            if c["rel_to_full"] is not None:
                cell += f" ({_pct(c['rel_to_full'])})"
            line.append(cell)
        line += [_pval(r["metrics"]["recall@20"]["p_vs_full"]), _pval(r["metrics"]["ndcg@20"]["p_vs_full"]),
                 str(r["n"])]
        lines.append("| " + " | ".join(line) + " |")
    if report.get("not_authors"):
        lines += ["", "## Settings that are not the authors'", "",
                  f"Every hyperparameter is the value of the authors' configs except these (marked `# ours` in "
                  f"`python/rcekd_train/configs/{report['dataset']}.yaml`):", ""]
        lines += [f"* `{r['key']}: {r['value']}`: {r['why']}" for r in report["not_authors"]]
    lines += ["", "![NDCG@20 per pair and ablation](summary.png)", ""]
    return "\n".join(lines)


def report_plot(report: Dict, path: str, metric: str = "ndcg@20") -> bool:
    """Bars of ours (mean ± std) and markers of the paper's value per pair, and the ablations."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = list(report["table1"].items()) + [("ablation", None)]
    for ax, (pair, e) in zip(axes.flat, panels):
        if pair == "ablation":
            rows = [(r["label"], r["metrics"][metric], r["n"]) for r in report["ablation"].values()]
            title = "MF→MF ablations"
        else:
            rows = [(ROW_LABEL[k], r["metrics"][metric], r["n"]) for k, r in e["rows"].items()
                    if r["n"] or r["metrics"][metric]["paper"] is not None]
            title = PAIR_LABEL[pair]
        x = list(range(len(rows)))
        means = [c["mean"] if n else 0.0 for _, c, n in rows]
        stds = [c["std"] if n else 0.0 for _, c, n in rows]
        ax.bar(x, means, yerr=stds, color="tab:blue", alpha=0.8, capsize=3, label="ours (mean ± std)")
        px = [i for i, (_, c, _) in enumerate(rows) if c.get("paper") is not None]
        if px:
            ax.scatter(px, [rows[i][1]["paper"] for i in px], color="black", marker="_", s=300, zorder=3,
                       label="paper")
        ax.set_xticks(x)
        ax.set_xticklabels([r[0] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(metric.replace("ndcg", "NDCG").replace("recall", "Recall"))
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['dataset']}: test {metric} (metric convention: {', '.join(report['metric_convention'])})")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), durable=False)
    plt.close(fig)
    return True


def plot_history(history, path: str, title: str = "") -> bool:
    """Learning curves (loss, metrics, KD diagnostics) to a PNG; False when matplotlib is missing."""
    if not history:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    ep = [r["epoch"] for r in history]
    has_diag = any("gamma" in r for r in history)
    n = 3 if has_diag else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6))
    ax = axes[0]
    ax.plot(ep, [r["base_loss"] for r in history], label="base")
    if any(r.get("kd_loss") for r in history):
        ax2 = ax.twinx()
        ax2.plot(ep, [r.get("kd_loss", 0) for r in history], color="tab:red", label="kd")
        ax2.set_ylabel("kd loss", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("base loss")
    ax.set_title("training loss")
    ax = axes[1]
    for key, style in (("valid_ndcg@20", "-"), ("test_ndcg@20", "-"), ("valid_recall@20", "--"),
                       ("test_recall@20", "--")):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    ax.set_xlabel("epoch")
    ax.set_title("metrics")
    ax.legend(fontsize=7)
    if has_diag:
        ax = axes[2]
        for key in ("gamma", "q1_frac"):
            pts = [(r["epoch"], r[key]) for r in history if key in r]
            if pts:
                ax.plot(*zip(*pts), label="|Q1|/K" if key == "q1_frac" else key)
        ax.set_xlabel("epoch")
        ax.set_title("RCE-KD diagnostics")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), durable=False)
    plt.close(fig)
    return True
