"""One command for every benchmark table and plot: measure on this machine, then report.

    python benchmarks/regenerate.py                  # measure what this machine can, then report
    python benchmarks/regenerate.py --stages report  # plots and README tables from the committed CSVs
    python benchmarks/regenerate.py --quick --results /tmp/r --readme /tmp/r/README.md   # smoke run

Stages (``--stages``, in this order):

``copy``     the device's copy bandwidth (read + write of a large buffer, median of 20)
             -> ``results/copy_bandwidth_<tag>.txt``
``kernels``  ``bench_loss.py`` at the issues' shapes with every provider available here
             (CPU: B=256, N=25,181; GPU: B=1024, N in {25,181, 40,981, 1,000,000}, float32 and
             bfloat16, torch.compile, the per-epoch select over 29,858 x 40,981) -> ``results/loss_<tag>.csv``
``train``    ``bench_train.py``: MF and LightGCN on Gowalla, student alone and RCE-KD per protocol
             and backend (needs the data: ``--data-dir`` or ``$RCEKD_DATA``; skipped otherwise)
             -> ``results/train_<tag>.csv``
``report``   for every ``loss_*.csv`` / ``train_*.csv`` in the results folder: the time and
             bandwidth plot, the roofline plot (achieved bandwidth of each kernel against the
             measured copy bandwidth), the end-to-end plot, and the markdown tables written into
             ``benchmarks/README.md`` between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->``
             (each table names its device, torch version, commit and date).

``<tag>`` is ``cpu`` on the CPU and the GPU's model (``h100``, ``h200``, ...) on a GPU. A measuring
stage writes its rows to ``<file>.partial`` as they come and replaces the committed file only when
it completes, so an interrupted run loses nothing that was there before.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_loss  # noqa: E402
import plot  # noqa: E402

STAGES = ["copy", "kernels", "train", "report"]


def device_tag(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)  # H100, H200, A100, L40S, ...
    return (m.group(1) if m else plot.slug(name)).lower()


# ------------------------------------------------------------------------------------ copy
def copy_bandwidth(device: str, mib: int, repeats: int = 20) -> str:
    """Median read+write bandwidth of ``y.copy_(x)`` for a buffer of ``mib`` MiB, as one line."""
    dev = torch.device(device)
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=dev).fill_(1.0)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ts = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            ts.append(time.perf_counter() - t0)
    ts.sort()
    s = ts[len(ts) // 2]
    gb_s = 2 * x.numel() * 4 / s / 1e9
    return (f"copy_bandwidth_gb_s {gb_s:.1f} (copy of {mib} MiB on {device}, read + write, median of {repeats}: "
            f"{s * 1e3:.3f} ms) {bench_loss.device_name(device)}, {torch.get_num_threads()} threads")


# --------------------------------------------------------------------------------- kernels
def kernel_runs(device: str, quick: bool):
    """The bench_loss.py argument lists of this device."""
    from rcekd_kernels import available_backends

    usable = [b for b, why in available_backends(device).items() if why is None]
    if quick:
        gpu = ("triton", "cuda") if device.startswith("cuda") else ()  # Triton on a CPU: only its interpreter
        provs = [p for p in ("cpp", *gpu, "reference") if p in usable]
        return [["--providers", *provs, "--B", "8", "--N", "300", "--K", "10", "--M", "20", "--L", "5",
                 "--repeats", "3", "--warmup", "1"]]
    if device.startswith("cuda"):
        provs = [p for p in ("triton", "cuda", "reference") if p in usable]
        if "triton" in provs:  # both threshold searches of the Triton selection, side by side
            provs.insert(1, "triton[radix]")
        common = ["--B", "1024", "--K", "100", "--M", "200", "--L", "100"]
        return [
            ["--providers", *provs, *common, "--N", "25181", "40981", "1000000", "--dtypes", "float32", "bfloat16",
             "--repeats", "15", "--warmup", "3"],
            ["--providers", "compile", *common, "--N", "25181", "40981", "--ops", "fwdbwd", "--repeats", "10"],
            ["--providers", *provs, "--B", "4096", "--K", "100", "--M", "200", "--L", "100", "--ops", "select_epoch",
             "--users", "29858", "--N", "40981", "--repeats", "5", "--warmup", "1"],
        ]
    provs = [p for p in ("cpp", "reference") if p in usable] + ["compile"]
    return [["--providers", *provs, "--B", "256", "--N", "25181", "--K", "100", "--M", "200", "--L", "100",
             "--repeats", "20"]]


def train_args(device: str, quick: bool, data_dir):
    if quick:
        return ["--dataset", "synthetic", "--models", "mf", "--protocols", "none", "epoch", "--steps", "2",
                "--warmup", "1", "--batch-size", "256"]
    steps = "30" if device.startswith("cuda") else "20"
    backends = ["auto", "cuda", "reference"] if device.startswith("cuda") else ["auto", "reference"]
    args = ["--dataset", "gowalla", "--models", "mf", "lightgcn", "--protocols", "none", "epoch", "batch",
            "--backends", *backends, "--steps", steps, "--warmup", "2"]
    return args + (["--data-dir", data_dir] if data_dir else [])


def _measure(path, runs, main, device):
    """Runs ``main(args + --csv partial)`` for each argument list, then replaces ``path``."""
    partial = path + ".partial"
    if os.path.exists(partial):
        os.remove(partial)
    for args in runs:
        print("+", os.path.basename(main.__module__ + ".py"), " ".join(args), flush=True)
        rc = main([*args, "--device", device, "--csv", partial])
        if rc:
            raise SystemExit(f"{main.__module__} failed (rc={rc}); rows so far are in {partial}")
    if not os.path.exists(partial):
        raise SystemExit(f"no rows were written to {partial}")
    os.replace(partial, path)
    print("wrote", path, flush=True)


def _gowalla_present(data_dir) -> bool:
    d = data_dir or os.environ.get("RCEKD_DATA")
    return bool(d) and os.path.exists(os.path.join(d, "gowalla", "train.txt"))


# ---------------------------------------------------------------------------------- report
def report(results: str, readme: str):
    written = []
    copy_bw = plot.copy_bandwidths(results)
    blocks = {}
    for name in sorted(os.listdir(results)):
        path = os.path.join(results, name)
        tag = name.rsplit(".", 1)[0].split("_", 1)[-1]
        if name.startswith("loss_") and name.endswith(".csv"):
            rows = plot.latest(plot.load(path))
            written += plot.plot(rows, results, name=tag)
            written += plot.roofline(rows, results, copy_bw.get(tag), tag)
            rel = os.path.relpath(path, os.path.dirname(readme))
            blocks[f"loss_{tag}"] = plot.loss_table(rows, copy_bw.get(tag), rel)
        elif (name.startswith("topm_") or name.startswith("embed_loss_")) and name.endswith(".csv"):
            written += plot.plot_topm(plot.load(path), results, name.rsplit(".", 1)[0])
        elif name.startswith("train_") and name.endswith(".csv"):
            rows = plot.load(path)
            written += plot.plot_train(rows, results, tag)
            blocks[f"train_{tag}"] = plot.train_table(rows, os.path.relpath(path, os.path.dirname(readme)))
    for p in written:
        print("wrote", p)
    if os.path.exists(readme):
        text = open(readme).read()
        new, missing = plot.fill_blocks(text, blocks)
        if new != text:
            with open(readme + ".tmp", "w") as f:
                f.write(new)
            os.replace(readme + ".tmp", readme)
            print("updated the tables of", readme)
        for name in missing:
            print(f"note: {readme} has no block <!-- BEGIN {name} --> ... <!-- END {name} -->; "
                  f"its table:\n{blocks[name]}\n")
    return written, blocks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=None, help="folder with gowalla/ (default: $RCEKD_DATA)")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="CSV/PNG folder")
    p.add_argument("--readme", default=os.path.join(HERE, "README.md"), help="the markdown file with the table blocks")
    p.add_argument("--tag", default=None, help="file tag of this machine (default: cpu, h100, h200, ...)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and synthetic data: checks the pipeline in "
                   "seconds (for tests; do not commit its numbers)")
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    tag = a.tag or device_tag(a.device)
    t0 = time.time()
    if "copy" in a.stages:
        line = copy_bandwidth(a.device, 16 if a.quick else (2048 if a.device.startswith("cuda") else 512))
        print(line)
        with open(os.path.join(a.results, f"copy_bandwidth_{tag}.txt"), "w") as f:
            f.write(line + "\n")
    if "kernels" in a.stages:
        _measure(os.path.join(a.results, f"loss_{tag}.csv"), kernel_runs(a.device, a.quick), bench_loss.main,
                 a.device)
    if "train" in a.stages:
        if a.quick or _gowalla_present(a.data_dir):
            import bench_train

            _measure(os.path.join(a.results, f"train_{tag}.csv"), [train_args(a.device, a.quick, a.data_dir)],
                     bench_train.main, a.device)
        else:
            print("train: skipped (Gowalla not found: give --data-dir or set RCEKD_DATA; "
                  "`rcekd download gowalla` fetches it)")
    if "report" in a.stages:
        report(a.results, a.readme)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
