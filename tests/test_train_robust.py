"""No lost run, no silent wrong number (issue 11, item 5): non-finite losses, the run directory's lock, a
killed run, a full disk, a permission error, a truncated checkpoint, the resume of a finished run,
duplicate seeds, temporary files unique to their writer."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_train_helpers import hold_lock, subprocess_env

from rcekd_train import files
from rcekd_train.config import resolve
from rcekd_train.files import CorruptFileError, FileWriteError
from rcekd_train.lock import RunDirInUse
from rcekd_train.models.mf import MF
from rcekd_train.runs import run_one, run_seeds
from rcekd_train.trainer import NonFiniteLossError

DATA = ["data.num_users=120", "data.num_items=90", "data.mean_items=12", "data.min_items=5", "data.max_items=40",
        "data.seed=4"]
FAST = ["train.progress=false", "train.plot=false", "train.batch_size=128", "train.patience=50", "model.dim=8"]
quiet = lambda _: None


def teacher_cfg(*extra, epochs=4):
    return resolve("synthetic", "teacher", "mf", sets=DATA + FAST + [f"train.epochs={epochs}"] + list(extra))


def history(out):
    with open(os.path.join(out, "history.json")) as f:
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in json.load(f)]


def batches_per_epoch(cfg):
    from rcekd_train.runs import get_data
    data = get_data(cfg)
    return -(-data.train.nnz // cfg["train"]["batch_size"])


def poison_steps(monkeypatch, bad_steps):
    """MF's base loss is NaN at the given 0-based step numbers of the run (counted over all epochs)."""
    calls = {"n": 0}
    real = MF.base_loss

    def base_loss(self, batch):
        loss, users, u, items = real(self, batch)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return (loss * float("nan") if step in bad_steps else loss), users, u, items

    monkeypatch.setattr(MF, "base_loss", base_loss)


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file below ``folder``."""
    out = {}
    for root, _dirs, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def temp_files(folder):
    return [n for _r, _d, names in os.walk(folder) for n in names if n.endswith(".tmp")]


# --- non-finite losses ------------------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = teacher_cfg()
    n = batches_per_epoch(cfg)
    bad = n + 2  # the third batch of the second epoch: run step n + 3 (1-based)
    poison_steps(monkeypatch, {bad, bad + 1})
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at epoch 2, step {bad + 1} \(loss nan, base"):
        run_one(cfg, out, log=quiet)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["state"]["epoch"] == 1 and ck["state"]["step"] == n  # the last good epoch, nothing of the bad one
    assert [r["epoch"] for r in history(out)] == [1]
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert temp_files(out) == []
    # the message says where to go on from; --resume (the poisoned steps gone) continues from epoch 1 and ends
    # with the same result as a run that never met them
    monkeypatch.undo()
    run_one(cfg, out, resume=True, log=quiet)
    ref = str(tmp_path / "ref")
    run_one(cfg, ref, log=quiet)
    assert history(out) == history(ref)


def test_a_nan_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    poison_steps(monkeypatch, {0})
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 .*no epoch had completed"):
        run_one(teacher_cfg(), str(tmp_path / "run"), log=quiet)


def test_skip_mode_skips_bad_steps_and_counts_them_in_the_history(tmp_path, monkeypatch):
    cfg = teacher_cfg("train.nonfinite=skip", epochs=3)
    n = batches_per_epoch(cfg)
    poison_steps(monkeypatch, {1, n + 0, n + 3})  # one in epoch 1, two in epoch 2
    out = str(tmp_path / "skip")
    res = run_one(cfg, out, log=quiet)
    assert res["status"] == "max_epochs"
    assert [r["skipped_steps"] for r in history(out)] == [1, 2, 0]
    # a skipped step takes no optimizer step: Adam counted 3n - 3 of them
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert {float(s["step"]) for s in ck["optimizer"]["state"].values()} == {3 * n - 3}
    assert ck["state"]["step"] == 3 * n  # the step numbers (the KD seeds) still count every batch
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history(out))


def test_skip_mode_refuses_an_epoch_where_every_step_was_bad(tmp_path, monkeypatch):
    cfg = teacher_cfg("train.nonfinite=skip", epochs=2)
    poison_steps(monkeypatch, set(range(batches_per_epoch(cfg))))
    with pytest.raises(NonFiniteLossError, match="every step of epoch 1"):
        run_one(cfg, str(tmp_path / "run"), log=quiet)


def test_the_finiteness_check_adds_no_host_synchronisation_per_step(tmp_path, monkeypatch):
    """The host reads of tensors (bool, float, item) during the batches of an epoch do not grow with the number
    of steps: the check reads the epoch's flags once. The skip option, which must read every step's loss, does."""
    from rcekd_train import trainer as T
    reads = {"n": 0}
    counting = {"on": False}

    def counted(name):
        real = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            if counting["on"]:
                reads["n"] += 1
            return real(self, *a, **k)
        return f

    for name in ("__bool__", "__float__", "item"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    real_batches = T.Trainer._train_batches

    def train_batches(self, live, epoch):
        counting["on"] = True
        try:
            return real_batches(self, live, epoch)
        finally:
            counting["on"] = False

    monkeypatch.setattr(T.Trainer, "_train_batches", train_batches)

    def reads_per_epoch(batch_size, *extra):
        reads["n"] = 0
        cfg = teacher_cfg(f"train.batch_size={batch_size}", *extra, epochs=1)
        run_one(cfg, str(tmp_path / f"b{batch_size}{len(extra)}"), log=quiet)
        return reads["n"], batches_per_epoch(cfg)

    (few, n_few), (many, n_many) = reads_per_epoch(512), reads_per_epoch(32)
    assert n_many > 4 * n_few and many == few  # the negatives' resampling is per epoch, not per step
    (skip_few, _), (skip_many, _) = (reads_per_epoch(b, "train.nonfinite=skip") for b in (512, 32))
    assert skip_many - skip_few == n_many - n_few  # the test sees a read per step where there is one


# --- the run directory's lock, a killed run ----------------------------------------------------------------------
def test_a_run_directory_in_use_is_refused_with_the_owners_pid(tmp_path):
    out = str(tmp_path / "busy")
    holder = hold_lock(out)
    try:
        with pytest.raises(RunDirInUse, match=rf"in use by process {holder.pid}"):
            run_one(teacher_cfg(), out, log=quiet)
        assert not os.path.exists(os.path.join(out, "config.yaml"))  # nothing written into it
    finally:
        holder.kill()
        holder.wait()
    run_one(teacher_cfg(), out, log=quiet)  # the owner died: its lock is stale and taken over
    assert not os.path.exists(os.path.join(out, ".run.lock"))


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    """A run killed (SIGKILL) in the middle of its training leaves a stale lock and maybe a temporary file; the
    same command with --resume takes the lock over, removes the temporary file and ends bit for bit like a
    run that was never killed."""
    out, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    args = ["train-teacher", "--dataset", "synthetic", "--model", "mf", "--no-progress", "--epochs", "60"]
    for s in DATA + FAST:
        args += ["--set", s]
    child = subprocess.Popen([sys.executable, "-m", "rcekd_train"] + args + ["--out", out], env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(history(out) if os.path.exists(os.path.join(out, "history.json"))
                                             else []) < 3:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL and os.path.exists(os.path.join(out, ".run.lock"))
    done = len(history(out))
    assert 3 <= done < 60, done
    open(os.path.join(out, ".checkpoint.pt.killed.tmp"), "wb").write(b"half a checkpoint")  # a write cut short
    from rcekd_train.cli import main
    assert main(args + ["--out", out, "--resume"]) == 0
    assert main(args + ["--out", ref]) == 0
    assert history(out) == history(ref) and len(history(ref)) == 60
    assert temp_files(out) == [] and not os.path.exists(os.path.join(out, ".run.lock"))


# --- a full disk, a permission error, temporary files ------------------------------------------------------------
def test_a_full_disk_names_the_file_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = teacher_cfg(epochs=4)
    out = str(tmp_path / "full")
    real = files._write_chunk
    checkpoints = []

    def write_chunk(sink, data):  # the disk fills while the second checkpoint is written
        if sink.path == os.path.join(out, "checkpoint.pt"):
            if sink.tmp not in checkpoints:
                checkpoints.append(sink.tmp)
            if len(checkpoints) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(sink, data)

    monkeypatch.setattr(files, "_write_chunk", write_chunk)
    with pytest.raises(FileWriteError, match=rf"cannot write {out}/checkpoint.pt: No space left on device") as e:
        run_one(cfg, out, log=quiet)
    assert e.value.errno == errno.ENOSPC
    assert temp_files(out) == []
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)  # the previous one, whole
    assert ck["state"]["epoch"] == 1
    monkeypatch.undo()  # space freed: --resume ends like a run that never met a full disk
    run_one(cfg, out, resume=True, log=quiet)
    ref = str(tmp_path / "ref")
    run_one(cfg, ref, log=quiet)
    assert history(out) == history(ref)


def test_a_permission_error_names_the_path(tmp_path, monkeypatch):
    # root ignores chmod, so the refusal of the folder is simulated where files are created
    out = str(tmp_path / "ro")
    real = files.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if os.path.abspath(dir) == os.path.abspath(out):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(FileWriteError, match=rf"cannot write {out}/config.yaml: Permission denied"):
        run_one(teacher_cfg(), out, log=quiet)
    assert sorted(os.listdir(out)) == []  # the lock released, nothing half-written


def test_temporary_files_are_unique_to_their_writer(tmp_path, monkeypatch):
    """Two writers of one file at once: the first is held in the middle of its write while the second writes
    and finishes; both temporary files are distinct, the file ends whole (the first writer's), no temporary
    file is left. (With one shared name `path.tmp`, the second writer truncates the first one's bytes.)"""
    path = str(tmp_path / "f.bin")
    a, b = b"A" * 100_000, b"B" * 50_000
    started, go = threading.Event(), threading.Event()
    real = files._write_chunk
    names = set()

    def write_chunk(sink, data):
        names.add(sink.tmp)
        if data[:1] == b"A" and not started.is_set():
            real(sink, data[:10])
            started.set()
            go.wait(10)
            return real(sink, data[10:]) + 10
        return real(sink, data)

    monkeypatch.setattr(files, "_write_chunk", write_chunk)
    first = threading.Thread(target=files.atomic_write, args=(path, lambda f: f.write(a)))
    first.start()
    assert started.wait(10)
    files.atomic_write(path, lambda f: f.write(b))
    assert open(path, "rb").read() == b
    go.set()
    first.join()
    assert open(path, "rb").read() == a and len(names) == 2 and temp_files(str(tmp_path)) == []


# --- a truncated checkpoint --------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_checkpoint_is_reported_on_resume(tmp_path, keep):
    cfg = teacher_cfg()
    out = str(tmp_path / "t")
    run_one(dict(cfg, train=dict(cfg["train"], stop_after=1)), out, log=quiet)
    path = os.path.join(out, "checkpoint.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])
    what = "empty" if keep == 0 else "truncated or corrupt"
    with pytest.raises(CorruptFileError, match=rf"{path}: the checkpoint is {what}"):
        run_one(cfg, out, resume=True, log=quiet)


def test_a_checkpoint_of_something_else_is_reported(tmp_path):
    cfg = teacher_cfg()
    out = str(tmp_path / "t")
    run_one(dict(cfg, train=dict(cfg["train"], stop_after=1)), out, log=quiet)
    torch.save({"model": {}}, os.path.join(out, "checkpoint.pt"))
    with pytest.raises(CorruptFileError, match="not a checkpoint of this package .*'optimizer'"):
        run_one(cfg, out, resume=True, log=quiet)


# --- the resume of a finished run, duplicate seeds ---------------------------------------------------------------
def test_resume_of_a_finished_run_changes_nothing_on_disk(tmp_path):
    out = str(tmp_path / "done")
    cfg = teacher_cfg("train.plot=true")
    res = run_one(cfg, out, log=quiet)
    before = snapshot(out)
    time.sleep(0.01)
    for more in (cfg, dict(cfg, train=dict(cfg["train"], epochs=8))):  # epochs may change on resume: still done
        again = run_one(more, out, resume=True, log=quiet)
        assert snapshot(out) == before  # same files, same bytes, not rewritten (same mtimes)
        assert again == json.load(open(os.path.join(out, "result.json"))) and again["test"] == res["test"]


def test_duplicate_seeds_are_refused(tmp_path):
    from rcekd_train.cli import main
    from rcekd_train.reproduce import Queue
    with pytest.raises(ValueError, match="seed 1 more than once"):
        run_seeds(teacher_cfg(), str(tmp_path / "s"), [0, 1, 1], log=quiet)
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(ValueError, match="seed 0 more than once"):
        Queue("synthetic", [0, 2, 0], str(tmp_path / "q"))
    assert main(["demo", "--seeds", "3", "3", "--out", str(tmp_path / "d")]) == 2
    assert not os.path.exists(tmp_path / "d")
