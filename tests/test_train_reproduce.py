"""The resumable run queue (rcekd reproduce): plan, states, time-sliced passes, restart, dependencies."""
import io
import json
import os

import pytest
from test_train_helpers import hold_lock

from rcekd_train.cli import main
from rcekd_train.lock import held_by_other
from rcekd_train.reproduce import Queue, plan, run_config, run_state, select_runs
from rcekd_train.runs import run_one

TINY = ["data.num_users=120", "data.num_items=90", "data.mean_items=12", "data.min_items=5", "data.max_items=40",
        "train.epochs=2", "train.plot=false", "teacher_topk=40", "model.dim=8", "kd.K=5", "kd.M=15", "kd.L=5",
        "train.batch_size=256"]


def test_plan_order_and_dependencies():
    runs = plan([0, 1], methods_available=["cd", "rrd", "dcd", "rcekd", "hetcomp"])
    ids = [r.id for r in runs]
    assert len(set(ids)) == len(ids)
    per_seed = [r for r in runs if r.seed == 0]
    # issue 14 item 2: the rows of Table 1, and item 3: the ablations (MF->MF)
    names = {r.name for r in per_seed}
    assert names >= {"teacher-mf", "teacher-lightgcn", "teacher-hstu", "student-mf", "student-lightgcn",
                     "student-hstu", "cd-mf-mf", "rrd-mf-mf", "dcd-mf-mf", "hetcomp-mf-mf", "rcekd-mf-mf",
                     "rcekd-lightgcn-lightgcn", "dcd-hstu-hstu", "rcekd-hstu-hstu", "rcekd-lightgcn-mf",
                     "rcekd-hstu-mf", "rcekd_no_split-mf-mf", "rcekd_l1_only-mf-mf", "rcekd_const_gamma-mf-mf",
                     "rcekd_paper-mf-mf", "rcekd_batch-mf-mf"}
    assert len(per_seed) == len(names) == 21
    for i, r in enumerate(runs):
        if r.teacher_id:  # the teacher of the same seed, earlier in the plan
            assert r.teacher_id in ids[:i] and r.teacher_id.endswith(f"seed_{r.seed}")
    assert all(r.seed == 0 for r in runs[:21])  # the whole table of seed 0 first
    assert [r.id for r in select_runs(runs, ["teacher-*/seed_1"])] == \
        ["teacher-mf/seed_1", "teacher-lightgcn/seed_1", "teacher-hstu/seed_1"]


def test_queue_time_sliced_restart_and_listing(tmp_path):
    runs_dir = str(tmp_path / "q")
    only = ["teacher-mf", "student-mf", "rcekd-mf-mf", "rcekd_l1_only-mf-mf"]
    buf = io.StringIO()
    # one epoch per run and pass (time limit 0): every run is resumed in a later pass until done
    q = Queue("synthetic", [0], runs_dir, only=only, max_minutes_per_run=0, sets=TINY, out=buf)
    assert [r.id for r in q.runs] == ["teacher-mf/seed_0", "student-mf/seed_0", "rcekd-mf-mf/seed_0",
                                      "rcekd_l1_only-mf-mf/seed_0"]
    assert q.run() == 0
    for r in q.runs:
        assert run_state(r.out(runs_dir))[0] == "done"
        res = json.load(open(os.path.join(r.out(runs_dir), "result.json")))
        assert res["epochs_run"] == 2 and res["seed"] == 0
        assert os.path.exists(os.path.join(r.out(runs_dir), "train.log"))
    log = open(os.path.join(runs_dir, "reproduce.log")).read()
    assert "time_limit" in log and "all 4 runs done" in log
    cfg = open(os.path.join(runs_dir, "rcekd_l1_only-mf-mf", "seed_0", "config.yaml")).read()
    assert "variant: l1_only" in cfg and "teacher-mf/seed_0" in cfg
    # the MF teacher keeps its trajectory for HetComp (every 10 epochs; these teachers ran 2)
    assert "keep_every: 10" in open(os.path.join(runs_dir, "teacher-mf", "seed_0", "config.yaml")).read()
    # the same result as one uninterrupted run of the same config
    ref = str(tmp_path / "ref")
    q2 = Queue("synthetic", [0], ref, only=only, sets=TINY, out=io.StringIO())
    assert q2.run() == 0
    for r in q.runs:
        a = json.load(open(os.path.join(r.out(runs_dir), "result.json")))
        b = json.load(open(os.path.join(r.out(ref), "result.json")))
        assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"], r.id
    # restarting a finished queue does nothing
    before = os.path.getmtime(os.path.join(runs_dir, "rcekd-mf-mf", "seed_0", "result.json"))
    assert Queue("synthetic", [0], runs_dir, only=only, sets=TINY, out=io.StringIO()).run() == 0
    assert os.path.getmtime(os.path.join(runs_dir, "rcekd-mf-mf", "seed_0", "result.json")) == before
    listing = q.listing()
    assert listing.count(" done ") == 4 and "todo" not in listing


def test_queue_states_and_blocked_students(tmp_path, capsys):
    runs_dir = str(tmp_path / "q")
    # a student whose teacher is not selected and not done waits; nothing else runs
    q = Queue("synthetic", [3], runs_dir, only=["rcekd-mf-mf"], sets=TINY, out=io.StringIO())
    assert q.run() == 1
    assert "its teacher teacher-mf/seed_3 is not done and is not selected" in \
        open(os.path.join(runs_dir, "reproduce.log")).read()
    # a partial run (interrupted after one epoch) is listed as partial, and resumed by the queue
    args = ["reproduce", "--dataset", "synthetic", "--seeds", "3", "--runs-dir", runs_dir, "--only", "teacher-mf"]
    for s in TINY:
        args += ["--set", s]
    q = Queue("synthetic", [3], runs_dir, only=["teacher-mf"], sets=TINY, out=io.StringIO())
    r = q.runs[0]
    cfg = run_config(r, "synthetic", runs_dir, None, 1, None, None, TINY)
    run_one(dict(cfg, train=dict(cfg["train"], stop_after=1)), r.out(runs_dir), log=lambda m: None)  # "killed"
    assert run_state(os.path.join(runs_dir, "teacher-mf", "seed_3"))[0] == "partial"
    assert main(args + ["--list"]) == 0
    out = capsys.readouterr().out
    assert "partial  teacher-mf/seed_3" in out and "1 epochs" in out
    assert main(args) == 0
    assert run_state(os.path.join(runs_dir, "teacher-mf", "seed_3"))[0] == "done"
    with pytest.raises(ValueError, match="matches no run"):
        Queue("synthetic", [3], runs_dir, only=["nothing*"])


def test_queues_share_a_runs_dir_through_run_locks(tmp_path):
    runs_dir = str(tmp_path / "q")
    out = os.path.join(runs_dir, "teacher-mf", "seed_0")
    holder = hold_lock(out)  # another live process is training the teacher
    try:
        buf = io.StringIO()
        q = Queue("synthetic", [0], runs_dir, only=["teacher-mf", "student-mf", "rcekd-mf-mf"], sets=TINY, out=buf,
                  wait_s=None)
        assert q.run() == 2          # the held teacher and its student are left; the scratch student runs
        log = open(os.path.join(runs_dir, "reproduce.log")).read()
        assert "skip   teacher-mf/seed_0: another queue is running it" in log
        assert "its teacher teacher-mf/seed_0 is being trained by another queue" in log
        assert run_state(os.path.join(runs_dir, "student-mf", "seed_0"))[0] == "done"
        assert not os.path.exists(os.path.join(runs_dir, "student-mf", "seed_0", ".run.lock"))  # released
    finally:
        holder.kill()  # the other queue dies (kill -9): its lock file stays, stale
        holder.wait()
    assert os.path.exists(os.path.join(out, ".run.lock")) and not held_by_other(out)
    with open(os.path.join(out, ".run.lock"), "w") as f:
        f.write(f"{os.getppid()} 1")  # a live pid that started at another time (a reused pid): not the owner
    assert not held_by_other(out)
    assert Queue("synthetic", [0], runs_dir, only=["teacher-mf", "rcekd-mf-mf"], sets=TINY, out=io.StringIO(),
                 wait_s=None).run() == 0
    assert "took over the stale lock" in open(os.path.join(runs_dir, "reproduce.log")).read()


def test_a_bad_set_is_refused_before_the_queue_starts(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train.lrr' \(--set train.lrr=1\); did you mean "
                                         r"'train.lr'\?"):
        Queue("synthetic", [0], str(tmp_path / "q"), only=["teacher-mf"], sets=TINY + ["train.lrr=1"])
    with pytest.raises(ValueError, match="train.lr must be a finite number > 0, got -1"):
        Queue("synthetic", [0], str(tmp_path / "q"), only=["student-mf"], sets=TINY + ["train.lr=-1"])
    assert not os.path.exists(tmp_path / "q")  # nothing started


def test_a_new_machine_continues_from_a_committed_report(tmp_path, capsys):
    """--import-from: the finished runs of a collected report are not trained again; the teacher, whose
    weights a report does not keep, is, with the same result as its record; a run whose config has changed
    since its record is trained again; what is in the runs directory is never overwritten."""
    from rcekd_train.report import table_report
    only = ["teacher-mf", "student-mf", "rcekd-mf-mf"]
    first = str(tmp_path / "first")
    assert Queue("synthetic", [0], first, only=only, sets=TINY, out=io.StringIO()).run() == 0
    report = str(tmp_path / "results")
    table_report(first, "synthetic", report)
    records = os.path.join(report, "runs")
    assert not os.path.exists(os.path.join(records, "teacher-mf", "seed_0", "best_model.pt"))
    student_rec = os.path.join(records, "rcekd-mf-mf", "seed_0", "result.json")
    # a record written before a key that never changes a result existed (here train.nonfinite) is still the run
    from rcekd_train import config as C
    cfg_path = os.path.join(records, "teacher-mf", "seed_0", "config.yaml")
    rec_cfg = C.load_yaml(cfg_path)
    del rec_cfg["train"]["nonfinite"]
    C.dump(rec_cfg, cfg_path)
    # a new machine: an empty runs directory, the committed report
    runs_dir = str(tmp_path / "new")
    q = Queue("synthetic", [0], runs_dir, only=only, sets=TINY, out=io.StringIO())
    assert q.import_records(records) == 3
    assert q.state(q.runs[0]) == ("todo", "a recorded result without its weights (best_model.pt): trained again")
    assert q.blocked(q.runs[2])  # the student waits for the weights
    assert q.state(q.runs[1])[0] == q.state(q.runs[2])[0] == "done"
    assert q.import_records(records) == 0  # never over what is here
    assert q.run() == 0
    log = open(os.path.join(runs_dir, "reproduce.log")).read()
    assert "start  teacher-mf/seed_0" in log and "start  rcekd-mf-mf/seed_0" not in log
    assert "same teacher-mf/seed_0: the result trained again against its recorded one" in log
    assert os.path.exists(os.path.join(runs_dir, "teacher-mf", "seed_0", "best_model.pt"))
    a = json.load(open(os.path.join(runs_dir, "teacher-mf", "seed_0", "result.json")))
    b = json.load(open(os.path.join(first, "teacher-mf", "seed_0", "result.json")))
    assert a["test"] == b["test"] and a["valid"] == b["valid"] and a["best_epoch"] == b["best_epoch"]
    assert open(os.path.join(runs_dir, "rcekd-mf-mf", "seed_0", "result.json")).read() == open(student_rec).read()
    # the packaged settings changed since the record (here: one more epoch): not imported, trained again
    other = str(tmp_path / "other")
    args = ["reproduce", "--dataset", "synthetic", "--seeds", "0", "--runs-dir", other, "--only", "student-mf",
            "--import-from", records, "--list"]
    for s in TINY + ["train.epochs=3"]:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "imported 0 finished run(s)" in out and "todo     student-mf/seed_0" in out
    assert "not imported student-mf/seed_0: its recorded config differs" in \
        open(os.path.join(other, "reproduce.log")).read()
    # a teacher trained again that does not give its recorded result is said so
    third = str(tmp_path / "third")
    q3 = Queue("synthetic", [0], third, only=["teacher-mf"], sets=TINY, out=io.StringIO())
    assert q3.import_records(records) == 1
    path = os.path.join(third, "teacher-mf", "seed_0", "result.json")
    res = json.load(open(path))
    res["test"]["ndcg@20"] += 0.5
    json.dump(res, open(path, "w"))
    assert q3.run() == 0
    assert "DIFFERENT teacher-mf/seed_0: the result trained again against its recorded one (record/result.json): " \
           "test ndcg@20" in open(os.path.join(third, "reproduce.log")).read()
    # a teacher's retrain interrupted (one epoch per pass, stopped after the first): the report keeps its record
    fourth = str(tmp_path / "fourth")
    q4 = Queue("synthetic", [0], fourth, only=only, sets=TINY, max_minutes_per_run=0, out=io.StringIO())
    assert q4.import_records(records) == 3
    q4.run_one(q4.runs[0])
    assert q4.state(q4.runs[0])[0] == "partial"
    rep = str(tmp_path / "rep4")
    table_report(fourth, "synthetic", rep)
    assert open(os.path.join(rep, "runs", "teacher-mf", "seed_0", "result.json")).read() == \
        open(os.path.join(records, "teacher-mf", "seed_0", "result.json")).read()
    with pytest.raises(ValueError, match="no such folder"):
        q.import_records(str(tmp_path / "nowhere"))


def test_a_result_trained_again_is_compared_with_its_record_up_to_rounding(tmp_path):
    """Equal, equal up to rounding (a metric a few units in the last place away, the best epoch the same),
    and different (a metric beyond the tolerance, or another best epoch), each said so."""
    from rcekd_train.reproduce import RECORD_RTOL, _record_verdict, _result_differences
    rec = {"best_epoch": 12, "valid": {"ndcg@10": 0.045738258054204714}, "test": {"ndcg@20": 0.01952078557029164}}
    path = str(tmp_path / "result.json")
    json.dump(rec, open(path, "w"))
    same = json.loads(json.dumps(rec))
    assert _result_differences(path, same) == ([], [])
    assert _record_verdict("t/seed_0", path, same).startswith("same t/seed_0: ")
    ulps = json.loads(json.dumps(rec))
    ulps["valid"]["ndcg@10"] = 0.04573825805420472  # 1.5e-16 relative
    assert _result_differences(path, ulps) == ([], ["valid ndcg@10 0.045738258054204714 -> 0.04573825805420472"])
    v = _record_verdict("t/seed_0", path, ulps)
    assert v.startswith("same to rounding t/seed_0: ") and "1 metric(s)" in v and "DIFFERENT" not in v
    far = json.loads(json.dumps(rec))
    far["test"]["ndcg@20"] *= 1 + 10 * RECORD_RTOL
    assert _result_differences(path, far)[0] and _record_verdict("t/seed_0", path, far).startswith("DIFFERENT")
    epoch = json.loads(json.dumps(ulps))
    epoch["best_epoch"] = 13
    real, rounding = _result_differences(path, epoch)
    assert real == ["best epoch 12 -> 13"] and len(rounding) == 1
    missing = json.loads(json.dumps(rec))
    del missing["test"]["ndcg@20"]
    assert _result_differences(path, missing)[0] == ["test ndcg@20 0.01952078557029164 -> None"]
