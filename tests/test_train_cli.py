"""The rcekd command line: demo on a tiny setting, teacher -> distill -> evaluate, errors, help."""
import json
import os
import subprocess
import sys

import pytest
from test_train_helpers import shared_data_dir

from rcekd_train.cli import main

TINY = ["--set", "data.num_users=150", "--set", "data.num_items=100", "--set", "data.mean_items=12",
        "--set", "data.min_items=5", "--set", "data.max_items=40", "--set", "train.epochs=2",
        "--set", "train.plot=false", "--set", "teacher_topk=20"]
RCEKD = ["--set", "kd.K=5", "--set", "kd.M=15", "--set", "kd.L=5"]
BASELINE = {"ce": ["--K", "5"], "cd": ["--L", "5", "--set", "kd.pool=20"],
            "rrd": ["--K", "5", "--L", "5", "--set", "kd.pool=20"], "dcd": ["--L", "5", "--set", "kd.pool=20"]}


def test_demo_tiny(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"] + TINY + RCEKD) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith(("teacher", "student"))]
    assert len(lines) == 3 and "RCE-KD" in lines[2] and "scratch" in lines[1]
    for sub in ("teacher", "scratch", "rcekd"):
        res = json.load(open(tmp_path / sub / "result.json"))
        assert res["epochs_run"] == 2 and 0.0 <= res["test"]["ndcg@20"] <= 1.0
    assert (tmp_path / "demo_table.txt").exists()


def test_teacher_distill_evaluate(tmp_path, capsys):
    t = str(tmp_path / "t")
    common = ["--dataset", "synthetic", "--no-progress", "--epochs", "2"] + TINY
    assert main(["train-teacher", "--model", "mf", "--out", t, "--dim", "16", "--keep-every", "1"] + common) == 0
    assert sorted(os.listdir(os.path.join(t, "trajectory"))) == ["epoch_0001.pt", "epoch_0002.pt"]
    s = str(tmp_path / "s")
    assert main(["distill", "--student", "mf", "--kd", "rcekd", "--teacher", t, "--out", s, "--lambda", "2",
                 "--beta", "4", "--refresh", "batch"] + common + RCEKD) == 0
    cfg = open(os.path.join(s, "config.yaml")).read()
    assert "lambda: 2.0" in cfg and "beta: 4.0" in cfg and "refresh: batch" in cfg
    capsys.readouterr()
    assert main(["evaluate", "--run", s, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    saved = json.load(open(os.path.join(s, "result.json")))
    assert res["test"]["ndcg@20"] == pytest.approx(saved["test"]["ndcg@20"])
    # other KD methods run through the same interface
    for method, extra in BASELINE.items():
        assert main(["distill", "--student", "mf", "--kd", method, "--teacher", t, "--out", str(tmp_path / method)]
                    + extra + common) == 0, method
        assert json.load(open(tmp_path / method / "result.json"))["kd"] == method


def test_errors_are_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RCEKD_DATA", raising=False)
    with pytest.raises(SystemExit, match="needs --teacher"):
        main(["distill", "--dataset", "synthetic", "--student", "mf", "--kd", "rcekd"])
    assert main(["train-teacher", "--dataset", "citeulike", "--model", "mf", "--out", str(tmp_path)]) == 2
    assert "RCEKD_DATA" in capsys.readouterr().err
    assert main(["train-teacher", "--dataset", "synthetic", "--model", "mf", "--out", str(tmp_path),
                 "--set", "train.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_help_and_console_script():
    out = subprocess.run([sys.executable, "-m", "rcekd_train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train-teacher" in out.stdout and "distill" in out.stdout
    out = subprocess.run([sys.executable, "-m", "rcekd_train", "distill", "--help"], capture_output=True, text=True)
    assert "--lambda" in out.stdout and "--refresh" in out.stdout


def test_download_verify_on_shared_data(capsys):
    root = shared_data_dir("citeulike", "users.dat")
    assert main(["download", "citeulike", "--verify", "--data-dir", root]) == 0
    assert "users.dat: ok" in capsys.readouterr().out
