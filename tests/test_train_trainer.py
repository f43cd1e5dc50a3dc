"""The training loop: resume equivalence, early stopping, outputs, several seeds."""
import json
import os

import pytest
import torch

from rcekd_train.config import resolve
from rcekd_train.kd import load_teacher
from rcekd_train.runs import run_one, run_seeds

DATA = ["data.num_users=150", "data.num_items=100", "data.mean_items=12", "data.min_items=5", "data.max_items=40",
        "data.seed=2"]
FAST = ["train.progress=false", "train.plot=false", "train.batch_size=256", "train.patience=50"]


def quiet(_):
    pass


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    cfg = resolve("synthetic", "teacher", "mf", sets=DATA + FAST + ["train.epochs=3", "model.dim=16",
                                                                      "teacher_topk=30"])
    res = run_one(cfg, out, log=quiet)
    assert res["status"] == "max_epochs"
    return out


def student_cfg(method, teacher_dir, model="mf", extra=()):
    sets = DATA + FAST + ["train.epochs=4"]
    if method == "rcekd":
        sets += ["kd.K=5", "kd.M=15", "kd.L=5"]
    cfg = resolve("synthetic", "student", model, kd_method=method, teacher_model="mf", sets=sets + list(extra))
    if method != "none":
        cfg["teacher_dir"] = teacher_dir
    return cfg


def read_history(out):
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


def strip_times(hist):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in hist]


@pytest.mark.parametrize("method,model,extra", [
    ("rcekd", "mf", ()),
    ("rcekd", "mf", ("kd.refresh=batch", "kd.mode=paper")),
    ("rrd", "mf", ("kd.K=5", "kd.L=5", "kd.pool=20")),
    ("none", "hstu", ("model.max_len=10", "model.num_negatives=8", "model.blocks=1")),
    ("none", "lightgcn", ("model.dim=8",)),
])
def test_resume_gives_the_same_result(tmp_path, teacher_dir, method, model, extra):
    cfg = student_cfg(method, teacher_dir, model, extra)
    full = str(tmp_path / "full")
    res_full = run_one(cfg, full, log=quiet)
    part = str(tmp_path / "part")
    cut = dict(cfg, train=dict(cfg["train"], stop_after=2))
    res_cut = run_one(cut, part, log=quiet)
    assert res_cut["status"] == "interrupted" and res_cut["epoch"] == 2
    res_resumed = run_one(cfg, part, resume=True, log=quiet)  # stop_after is ignored when comparing configs
    assert strip_times(read_history(full)) == strip_times(read_history(part))
    assert res_full["test"] == res_resumed["test"] and res_full["best_epoch"] == res_resumed["best_epoch"]
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path, teacher_dir):
    cfg = student_cfg("none", teacher_dir)
    out = str(tmp_path / "r")
    run_one(dict(cfg, train=dict(cfg["train"], stop_after=1)), out, log=quiet)
    changed = dict(cfg, train=dict(cfg["train"], lr=0.5))
    with pytest.raises(ValueError, match="train.lr"):
        run_one(changed, out, resume=True, log=quiet)


def test_early_stopping_and_outputs(tmp_path, teacher_dir):
    cfg = student_cfg("rcekd", teacher_dir, extra=("train.epochs=30", "train.patience=2", "train.lr=0.5",
                                                   "train.plot=true"))
    out = str(tmp_path / "es")
    res = run_one(cfg, out, log=quiet)
    hist = read_history(out)
    # stops exactly `patience` evaluations after the best valid NDCG@10
    best = max(range(len(hist)), key=lambda i: (hist[i]["valid_ndcg@10"], -i))
    assert res["best_epoch"] == hist[best]["epoch"]
    if res["status"] == "early_stop":
        assert len(hist) == hist[best]["epoch"] + 2
    assert res["test"]["ndcg@10"] == hist[best]["test_ndcg@10"]
    for f in ("config.yaml", "checkpoint.pt", "best_model.pt", "history.csv", "result.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert {"gamma", "q1_frac", "time_epoch_s", "time_train_s"} <= set(hist[0])
    try:
        import matplotlib  # noqa: F401
        assert os.path.exists(os.path.join(out, "curves.png"))
    except ImportError:
        pass


def test_teacher_outputs_topk_cache(teacher_dir):
    from rcekd_train.kd import load_topk
    from rcekd_train.runs import get_data
    topk, meta = load_topk(os.path.join(teacher_dir, "teacher_topk.pt"))
    cfg = resolve("synthetic", "teacher", "mf", sets=DATA)
    data = get_data(cfg)
    assert topk.shape == (data.num_users, 30) and meta["K"] == 30
    teacher, _ = load_teacher(teacher_dir, data, need_topk=30)
    full = teacher.user_vecs @ teacher.item_vecs.T
    want = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :30]
    assert torch.equal(topk.long(), want)


def test_several_seeds_summary(tmp_path, teacher_dir):
    cfg = student_cfg("none", teacher_dir, extra=("train.epochs=2",))
    out = str(tmp_path / "seeds")
    summary = run_seeds(cfg, out, [0, 1], log=quiet)
    r = [json.load(open(os.path.join(out, f"seed_{s}", "result.json"))) for s in (0, 1)]
    vals = [x["test"]["ndcg@20"] for x in r]
    assert vals[0] != vals[1]
    assert summary["test"]["ndcg@20"]["mean"] == pytest.approx(sum(vals) / 2)
    assert summary["test"]["ndcg@20"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    assert os.path.exists(os.path.join(out, "summary.csv"))


def test_time_limit_reports_best_so_far_and_resume_continues(tmp_path, teacher_dir):
    cfg = student_cfg("none", teacher_dir)
    out = str(tmp_path / "tl")
    res = run_one(dict(cfg, train=dict(cfg["train"], max_minutes=0)), out, log=quiet)
    assert res["status"] == "time_limit" and res["epochs_run"] == 1
    assert json.load(open(os.path.join(out, "result.json")))["best_epoch"] == 1
    res = run_one(cfg, out, resume=True, log=quiet)
    assert res["epochs_run"] == 4
    assert strip_times(read_history(out)) == strip_times(read_history_of(cfg, str(tmp_path / "ref")))


def read_history_of(cfg, out):
    run_one(cfg, out, log=quiet)
    return read_history(out)


def test_teacher_keeps_its_trajectory_resume_safe(tmp_path):
    """train.keep_every / keep_epochs: weights after those epochs in trajectory/, equal to the model after the
    epoch (the checkpoint of a run stopped there), and the same files after an interrupted + resumed run."""
    from rcekd_train.kd.teacher import list_trajectory
    sets = DATA + FAST + ["train.epochs=5", "model.dim=8", "train.keep_every=2", "train.keep_epochs=[3]"]
    cfg = resolve("synthetic", "teacher", "mf", sets=sets)
    full = str(tmp_path / "full")
    run_one(cfg, full, log=quiet)
    kept = list_trajectory(full)
    assert [e for e, _ in kept] == [2, 3, 4]
    # the weights after epoch 3 = the checkpoint of the same run stopped after 3 epochs
    stop3 = str(tmp_path / "stop3")
    run_one(dict(cfg, train=dict(cfg["train"], stop_after=3)), stop3, log=quiet)
    ck = torch.load(os.path.join(stop3, "checkpoint.pt"), weights_only=False)["model"]
    snap = torch.load(dict(kept)[3], weights_only=False)
    assert snap["epoch"] == 3 and all(torch.equal(ck[k], snap["state"][k]) for k in ck)
    assert set(snap) >= {"model", "hparams", "state", "data_fingerprint"}  # best_model.pt's format
    # stopped after epoch 3 and resumed: the same trajectory, bit for bit
    run_one(cfg, stop3, resume=True, log=quiet)
    for (e1, p1), (e2, p2) in zip(kept, list_trajectory(stop3)):
        a, b = torch.load(p1, weights_only=False)["state"], torch.load(p2, weights_only=False)["state"]
        assert e1 == e2 and all(torch.equal(a[k], b[k]) for k in a)
    # no trajectory unless asked
    plain = str(tmp_path / "plain")
    run_one(resolve("synthetic", "teacher", "mf", sets=DATA + FAST + ["train.epochs=2", "model.dim=8"]), plain,
            log=quiet)
    assert list_trajectory(plain) == [] and not os.path.exists(os.path.join(plain, "trajectory"))


def test_stop_policy_rules_in_order():
    from rcekd_train.trainer import StopPolicy
    state = lambda epoch, bad: {"epoch": epoch, "bad": bad}
    p = StopPolicy(epochs=5, patience=2)
    assert p.before_first_epoch(state(5, 0)) == "max_epochs" and p.before_first_epoch(state(4, 0)) is None
    assert p.after_epoch(state(1, 0)) is None
    assert p.after_epoch(state(5, 2)) == "early_stop"      # patience before the epoch count
    assert p.after_epoch(state(5, 1)) == "max_epochs"
    assert p.finished(state(3, 2)) and p.finished(state(5, 0)) and not p.finished(state(4, 1))
    # stop_after counts the epochs of this invocation; it never hides a finished run
    p = StopPolicy(epochs=10, patience=3, stop_after=2)
    assert p.after_epoch(state(4, 0)) is None and p.after_epoch(state(5, 0)) == "interrupted"
    p = StopPolicy(epochs=3, patience=3, stop_after=1)
    assert p.after_epoch(state(3, 0)) == "max_epochs"
    # the time limit: wall time of this invocation
    p = StopPolicy(epochs=10, patience=3, max_minutes=1.0)
    assert p.after_epoch(state(1, 0)) is None
    p.started -= 61
    assert p.after_epoch(state(2, 0)) == "time_limit"


@pytest.mark.parametrize("base_weight", [0.0, 2.0])
def test_base_weight_scales_the_base_loss(tmp_path, teacher_dir, base_weight):
    """kd.base_weight: the step's loss is base_weight x base + lambda x KD (0: the KD loss alone, as the
    authors' HetComp once trained); a negative weight is refused when the config is built."""
    cfg = student_cfg("rcekd", teacher_dir, extra=("train.epochs=2", f"kd.base_weight={base_weight}"))
    lam = float(cfg["kd"]["lambda"])
    run_one(cfg, str(tmp_path / "s"), log=quiet)
    for row in read_history(str(tmp_path / "s")):
        want = base_weight * row["base_loss"] + lam * row["kd_loss"]
        assert row["loss"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="kd.base_weight"):
        student_cfg("rcekd", teacher_dir, extra=("kd.base_weight=-1",))
