"""Shared by the small A/B benchmarks (bench_lightgcn.py, bench_hetcomp.py): variants timed interleaved
on one machine in one run, min and median per variant and the speed-up of each against the first,
printed and appended to a CSV."""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple


def parser(doc: str, repeats_help: str = "calls per variant (after one warm-up each)") -> argparse.ArgumentParser:
    """The options every one of these benchmarks has: --dataset, --data-dir, --repeats, --threads, --csv
    (each adds its own); the module's docstring as the help."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="citeulike")
    ap.add_argument("--data-dir", default=None, help="the datasets' folder (default: $RCEKD_DATA)")
    ap.add_argument("--repeats", type=int, default=5, help=repeats_help)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=None, help="append the results to this CSV file")
    return ap


def time_interleaved(variants: Sequence[Tuple[str, Callable[[], None]]], repeats: int,
                     before: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """One warm-up call of each variant, then ``repeats`` rounds calling each once (``before`` ahead of
    every timed call, not timed): {name: seconds per call}."""
    for _, f in variants:
        f()
    times: Dict[str, List[float]] = {k: [] for k, _ in variants}
    for _ in range(repeats):
        for k, f in variants:
            if before is not None:
                before()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def report(times: Dict[str, List[float]], fields: Dict, csv_path: Optional[str]) -> None:
    """Prints min / median / speed-up against the first variant; appends one row per variant to
    ``csv_path`` (with ``fields``, the date and the machine) when given."""
    names = list(times)
    base = statistics.median(times[names[0]])
    rows = []
    for k in names:
        ts = times[k]
        med = statistics.median(ts)
        rows.append(dict(date=_dt.datetime.now().isoformat(timespec="seconds"),
                         machine=platform.processor() or platform.machine(), **fields, variant=k,
                         min_s=round(min(ts), 4), median_s=round(med, 4), speedup=round(base / med, 3)))
        print(f"{k:16s} min {min(ts):.3f} s  median {med:.3f} s  speed-up {base / med:.2f}x")
    append_csv(rows, csv_path)


def append_csv(rows: List[Dict], csv_path: Optional[str]) -> None:
    """Appends ``rows`` to ``csv_path`` (the header first when the file is new); nothing without a path."""
    if csv_path:
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
