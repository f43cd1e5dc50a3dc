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
    assert main(["distill", "--dataset", "synthetic", "--student", "mf", "--kd", "rcekd"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
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


# --- every command-line error: one "rcekd: error: ..." line, exit status 2, no traceback (issue 11, item 5) ------
def cli(capsys, args):
    """(exit status, the lines of stderr) of the command in this process."""
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's errors exit
        rc = e.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def train(out, *extra):
    return ["train-teacher", "--dataset", "synthetic", "--model", "mf", "--no-progress", "--out", str(out)] + \
        TINY + list(extra)


def error_cases(tmp_path, monkeypatch):
    """(name, arguments, words of the message, a setup to run first) of one error of each kind."""
    from test_train_helpers import hold_lock

    from rcekd_train import files
    from rcekd_train.models.mf import MF
    bad_data = tmp_path / "data" / "citeulike"
    bad_data.mkdir(parents=True)
    (bad_data / "users.dat").write_text("2 1 2\n3 4 1_5 6\n")
    busy = tmp_path / "busy"
    truncated = tmp_path / "truncated"

    def truncate():
        main(train(truncated, "--stop-after", "1"))
        p = truncated / "checkpoint.pt"
        p.write_bytes(p.read_bytes()[:100])

    def full_disk():
        def no_space(sink, data):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(files, "_write_chunk", no_space)

    def nan_loss():
        real = MF.base_loss
        monkeypatch.setattr(MF, "base_loss", lambda self, b: (lambda r: (r[0] * float("nan"),) + r[1:])(real(self, b)))

    return [
        ("missing argument", ["distill", "--dataset", "synthetic"], "distill: the following arguments are required",
         None),
        ("bad choice", ["frobnicate"], "invalid choice: 'frobnicate'", None),
        ("bad number", ["train-teacher", "--dataset", "synthetic", "--model", "mf", "--epochs", "x"],
         "argument --epochs: invalid int value: 'x'", None),
        ("unknown key", train(tmp_path / "k", "--set", "train.lrr=1"), "did you mean 'train.lr'?", None),
        ("bad value", train(tmp_path / "v", "--lr", "-1"), "train.lr must be a finite number > 0, got -1.0", None),
        ("no teacher", ["distill", "--dataset", "synthetic", "--student", "mf", "--kd", "rcekd"], "needs --teacher",
         None),
        ("no data dir", ["train-teacher", "--dataset", "citeulike", "--model", "mf", "--out", str(tmp_path / "c")],
         "no data directory", None),
        ("malformed data", ["train-teacher", "--dataset", "citeulike", "--model", "mf", "--no-progress", "--data-dir",
                            str(tmp_path / "data"), "--out", str(tmp_path / "m")],
         f"{bad_data / 'users.dat'}, line 2: not an integer: '1_5'", None),
        ("duplicate seeds", train(tmp_path / "s", "--seeds", "1", "1"), "seed 1 more than once", None),
        ("directory in use", train(busy), f"{busy} is in use by process", lambda: hold_lock(busy)),
        ("truncated checkpoint", train(truncated, "--resume"), "the checkpoint is truncated or corrupt", truncate),
        ("full disk", train(tmp_path / "f"), f"cannot write {tmp_path / 'f'}/config.yaml: No space left on device",
         full_disk),
        ("non-finite loss", train(tmp_path / "n"), "non-finite loss at epoch 1, step 1", nan_loss),
    ]


@pytest.mark.parametrize("case", range(13))
def test_every_error_is_one_line_with_status_2(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("RCEKD_DATA", raising=False)
    name, args, words, setup = error_cases(tmp_path, monkeypatch)[case]
    holder = setup() if setup else None
    try:
        rc, lines = cli(capsys, args)
    finally:
        if holder is not None and hasattr(holder, "kill"):
            holder.kill()
            holder.wait()
    assert rc == 2, name
    assert len(lines) == 1 and lines[0].startswith("rcekd: error: "), (name, lines)
    assert words in lines[0], (name, lines[0])


def test_no_traceback_unless_debug(tmp_path):
    from test_train_helpers import subprocess_env
    args = [sys.executable, "-m", "rcekd_train", "train-teacher", "--dataset", "synthetic", "--model", "mf",
            "--out", str(tmp_path), "--set", "model.dim=0"]
    out = subprocess.run(args, capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 2 and out.stderr == "rcekd: error: model.dim must be a positive integer, got 0\n"
    for debug in (["--debug"] + args[3:], args[3:] + ["--debug"]):  # before or after the command
        out = subprocess.run(args[:3] + debug, capture_output=True, text=True, env=subprocess_env())
        assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr
        assert out.stderr.splitlines()[-1] == "rcekd: error: model.dim must be a positive integer, got 0"


def test_an_unexpected_error_is_one_line_too(capsys, monkeypatch):
    from rcekd_train import cli as C
    monkeypatch.setattr(C, "cmd_collect", lambda a: {}["missing"])
    rc, lines = cli(capsys, ["collect", "--out", "x"])
    assert rc == 2 and lines == ["rcekd: error: KeyError: 'missing' (unexpected: --debug shows where)"]


HUGE_PAGE_PROBE = (
    "import rcekd_train, os, torch\n"
    "x = torch.ones(64 * 2**20)  # 256 MB, touched\n"
    "huge = sum(int(l.split()[1]) for l in open('/proc/self/smaps') if l.startswith('AnonHugePages:'))\n"
    "print(os.environ['THP_MEM_ALLOC_ENABLE'], os.environ['OMP_WAIT_POLICY'], huge)\n")


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_drivers_ask_for_huge_pages_before_torch_loads():
    """Importing rcekd_train sets THP_MEM_ALLOC_ENABLE=1 and OMP_WAIT_POLICY=PASSIVE unless the user set
    them, early enough that torch's allocator puts a large tensor on huge pages (where the kernel allows
    them: not in mode `never`)."""
    from test_train_helpers import subprocess_env
    env = {k: v for k, v in subprocess_env().items() if k not in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    thp, wait, huge = out.stdout.split()
    assert (thp, wait) == ("1", "PASSIVE")
    if _thp_mode() in ("madvise", "always"):
        assert int(huge) > 0, "a 256 MB tensor got no huge page"
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True, text=True,
                         env=dict(env, THP_MEM_ALLOC_ENABLE="0", OMP_WAIT_POLICY="ACTIVE"))
    assert out.returncode == 0, out.stderr
    thp, wait, huge = out.stdout.split()
    assert (thp, wait) == ("0", "ACTIVE")  # the user's choice is kept
    if _thp_mode() == "madvise":
        assert int(huge) == 0


REUSE_PROBE = (
    "import resource, sys, torch\n"
    "from rcekd_train.memory import keep_freed_memory\n"
    "applied = keep_freed_memory() if sys.argv[1] == 'keep' else False\n"
    "x = torch.ones(64 * 2**20); del x  # 256 MB, touched, freed\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "x = torch.ones(32 * 2**20)  # 128 MB: fits in the freed block with room for its alignment\n"
    "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is a Linux matter")
def test_keep_freed_memory_reuses_pages_without_faults():
    """After keep_freed_memory() a freed 256 MB tensor's pages serve the next 128 MB one without a page
    fault; with glibc's defaults (or RCEKD_KEEP_FREED_MEMORY=0) that allocation faults every 4 KB page in
    again. Counted by the process's minor faults, huge pages off."""
    from test_train_helpers import subprocess_env
    env = dict(subprocess_env(), THP_MEM_ALLOC_ENABLE="0")
    env.pop("RCEKD_KEEP_FREED_MEMORY", None)

    def run(mode, **extra):
        out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True, text=True,
                             env=dict(env, **extra))
        assert out.returncode == 0, out.stderr
        applied, faults = out.stdout.split()
        return applied, int(faults)

    applied, faults = run("keep")
    if applied == "False":
        pytest.skip("no glibc mallopt in this process")
    assert faults < 1000, faults
    assert run("default")[1] > 30000  # 32,768 pages of 4 KB
    applied, faults = run("keep", RCEKD_KEEP_FREED_MEMORY="0")
    assert applied == "False" and faults > 30000
