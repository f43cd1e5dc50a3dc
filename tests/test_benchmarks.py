"""The benchmark pipeline (benchmarks/regenerate.py, plot.py): tables against hand-computed
ratios, README blocks, an interrupted stage keeping the committed file, and a quick end-to-end
run of every stage on tiny shapes."""
from __future__ import annotations

import csv
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import regenerate  # noqa: E402

import plot  # noqa: E402


def _row(provider, op="fwdbwd", p50=1.0, N=1000, traffic_mb=10.0, peak="", grad_mb=4.0):
    return dict(op=op, provider=provider, mode="paper", B="4", N=str(N), K="10", M="20", L="5", dtype="float32",
                p20_ms=str(p50 * 0.9), p50_ms=str(p50), p80_ms=str(p50 * 1.1), repeats="5", peak_extra_mb=peak,
                grad_mb=str(grad_mb), min_traffic_mb=str(traffic_mb),
                achieved_gb_s=str(traffic_mb * 2**20 / 1e9 / (p50 / 1e3)), device="dev X", threads="2",
                torch="9.9", commit="abc1234", date="2026-01-02")


def test_loss_table_ratios_and_provenance():
    rows = [_row("reference", p50=10.0, peak="8.0"), _row("compile", p50=4.0), _row("triton", p50=2.0, peak="5.0")]
    text = plot.loss_table(rows, copy_gb_s=100.0, src="r.csv")
    assert "dev X" in text and "abc1234" in text and "2026-01-02" in text and "torch 9.9" in text
    line = next(ln for ln in text.splitlines() if "| triton |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == "5.0x"  # 10 / 2 against the reference
    assert cells[8] == "2.0x"  # 4 / 2 against torch.compile
    gb_s = 10.0 * 2**20 / 1e9 / 2e-3
    assert cells[9] == f"{gb_s:.3g}" and cells[10] == f"{100 * gb_s / 100.0:.0f}%"
    assert cells[11] == "5.0 (1.25x)"  # peak extra 5 MB over a 4 MB gradient
    # slowest first, so the reference comes before triton
    assert text.index("| reference |") < text.index("| triton |")


def test_fill_blocks_replaces_only_the_named_blocks():
    text = "a\n<!-- BEGIN x -->\nold x\n<!-- END x -->\nb\n<!-- BEGIN y -->\nold y\n<!-- END y -->\n"
    new, missing = plot.fill_blocks(text, {"x": "NEW", "z": "never"})
    assert missing == ["z"]
    assert "old x" not in new and "NEW" in new and "old y" in new
    assert new.startswith("a\n<!-- BEGIN x -->\nNEW\n<!-- END x -->\nb\n")
    again, _ = plot.fill_blocks(new, {"x": "NEW"})
    assert again == new  # idempotent


def test_copy_bandwidths_parsed(tmp_path):
    (tmp_path / "copy_bandwidth_h100.txt").write_text("copy_bandwidth_gb_s 3010.2 (device-to-device ...) H100\n")
    (tmp_path / "other.txt").write_text("copy_bandwidth_gb_s 1\n")
    assert plot.copy_bandwidths(str(tmp_path)) == {"h100": 3010.2}


def test_failed_stage_keeps_the_committed_file(tmp_path, monkeypatch):
    committed = tmp_path / "loss_t.csv"
    committed.write_text("the committed rows\n")

    def failing_main(argv):
        with open(argv[argv.index("--csv") + 1], "a") as f:
            f.write("a partial row\n")
        return 1

    failing_main.__module__ = "bench_loss"
    with pytest.raises(SystemExit, match="failed"):
        regenerate._measure(str(committed), [["--x"]], failing_main, "cpu")
    assert committed.read_text() == "the committed rows\n"
    assert (tmp_path / "loss_t.csv.partial").read_text() == "a partial row\n"


def test_regenerate_quick_end_to_end(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# r\n<!-- BEGIN loss_quick -->\nold\n<!-- END loss_quick -->\n"
                      "<!-- BEGIN train_quick -->\nold\n<!-- END train_quick -->\n")
    assert regenerate.main(["--quick", "--results", str(tmp_path), "--readme", str(readme), "--tag", "quick",
                            "--device", "cpu"]) == 0
    with open(tmp_path / "loss_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} >= {"reference"}
    assert {r["op"] for r in rows} == {"fwd", "bwd", "fwdbwd"}
    assert all(float(r["p50_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
               for r in rows)
    with open(tmp_path / "train_quick.csv") as f:
        trows = list(csv.DictReader(f))
    assert [(r["protocol"], r["scoring"]) for r in trows] == [("none", "-"), ("epoch", "dense"),
                                                              ("epoch", "embeddings")]
    assert float(trows[0]["ratio_vs_student"]) == 1.0 and all(float(r["epoch_s"]) > 0 for r in trows[1:])
    # the refresh against the product alone, measured in the same run
    assert all(float(r["product_s"]) > 0 and float(r["refresh_vs_product"]) > 0 for r in trows[1:])
    text = readme.read_text()
    assert "old" not in text and "| reference |" in text and "| per epoch |" in text
    for name in ("loss_quick.png", "roofline_quick.png", "train_quick.png", "copy_bandwidth_quick.txt"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("*.partial"))


def test_profile_report_names_the_ops(tmp_path):
    import profile_loss

    out = tmp_path / "p.txt"
    assert profile_loss.main(["--provider", "reference", "--B", "4", "--N", "300", "--K", "10", "--M", "20",
                              "--L", "5", "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "wall per forward+backward (median)" in text
    assert "rcekd::fused_fwd" in text and "rcekd::fused_bwd" in text  # the custom ops were profiled


def test_bench_ddp_quick_end_to_end(tmp_path):
    """bench_ddp.py on a tiny synthetic setting, 1 and 2 processes: one row each, DDP's bytes per step equal to
    the model's parameter bytes in 2 processes, nothing all-reduced per refresh."""
    import bench_ddp
    data = ["data.num_users=200", "data.num_items=150", "data.mean_items=10", "data.min_items=5",
            "data.max_items=30"]
    args = ["--dataset", "synthetic", "--nprocs", "1", "2", "--epochs", "2", "--teacher-epochs", "1", "--work",
            str(tmp_path / "work"), "--results", str(tmp_path), "--tag", "quick", "--timeout", "240",
            "--set", "train.batch_size=256", "--set", "model.dim=8"]
    for kv in data:
        args += ["--data-set", kv]
    bench_ddp.main(args)
    with open(tmp_path / "ddp_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["nproc"] for r in rows] == ["1", "2"] and all(r["epochs"] == "2" for r in rows)
    two = rows[1]
    assert two["ddp_bytes_per_step"] == two["param_bytes"] == str((200 + 150) * 8 * 4)
    assert two["refresh_comm_bytes"] == "0" and int(two["epoch_comm_bytes"]) > 0
