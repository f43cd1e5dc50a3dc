"""One rank of a data-parallel check, spawned by tests/test_train_distributed.py with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, ...): ``python tests/dist_worker.py CHECK OUT_DIR``. Each check writes
what this rank saw to ``OUT_DIR/rank<r>.pt`` for the test to compare with its one-process oracle; an exception
is the process's exit status 1 (the test reads its stderr)."""
import os
import sys

import torch

from rcekd_train import files, lock, parallel
from rcekd_train.config import resolve
from rcekd_train.runs import get_data, run_one

#: the synthetic data of the checks (small: a few seconds per run)
DATA = ["data.num_users=300", "data.num_items=200", "data.mean_items=12", "data.min_items=5", "data.max_items=40",
        "data.seed=4"]
FAST = ["train.progress=false", "train.plot=false", "train.batch_size=128", "train.patience=50", "model.dim=8"]


def fixed_model(data, dim=8, seed=0):
    from rcekd_train.models import MF
    torch.manual_seed(seed)
    m = MF(data, dim=dim, init_std=1.0)
    return m


def check_primitives(par, out):
    """The collectives, the writer's result and error, the evaluation, RCE-KD's refresh and the teacher's top-K."""
    from rcekd_train.evaluate import evaluate_model
    from rcekd_train.kd import FrozenTeacher, build_kd, cache_topk
    got = {}
    t = torch.tensor([float(par.rank + 1), -float(par.rank)], dtype=torch.float64)
    got["sum"] = par.all_reduce(t.clone()).tolist()
    got["min"] = par.all_reduce(t.clone(), op="min").tolist()
    got["max"] = par.all_reduce(t.clone(), op="max").tolist()
    got["broadcast"] = par.broadcast({"from": par.rank, "tensor": torch.arange(3)} if par.is_writer else None)
    got["gather"] = par.all_gather(par.rank * 10)
    rows = torch.full((par.rank + 2, 3), par.rank, dtype=torch.int32)
    g = par.gather_rows(rows, [r + 2 for r in range(par.world)])
    got["gather_rows"] = None if g is None else g.tolist()
    got["writer_value"] = par.on_writer(lambda: {"rank": par.rank})
    try:
        par.on_writer(lambda: (_ for _ in ()).throw(ValueError("disk on fire")), "writing something")
        got["writer_error"] = None
    except Exception as e:  # rank 0: its own ValueError; the others: RankFailed quoting it
        got["writer_error"] = (type(e).__name__, str(e))

    cfg = resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf", sets=DATA + FAST)
    data = get_data(cfg)
    model = fixed_model(data)
    for conv in ("ours", "authors"):
        got[f"eval_{conv}"] = evaluate_model(model, data, (5, 10, 20), batch_size=32, convention=conv, par=par)

    teacher_model = fixed_model(data, dim=16, seed=1)
    topk = cache_topk(teacher_model, data, 30, out, par=par, chunk=64)
    got["topk_rows"] = topk.shape[0]

    teacher = FrozenTeacher.from_model(teacher_model, topk=None)
    teacher.topk_cache = torch.load(os.path.join(out, "teacher_topk.pt"))["topk"] if par.is_writer else None
    teacher.topk_cache = par.broadcast(teacher.topk_cache)
    kd = build_kd("rcekd", teacher, data, seed=3, K=10, M=30, L=10, chunk=40)
    shard = parallel.shard_for(model.sample_counts(data), 128, par.rank, par.world)
    kd.restrict_users(shard.lo, shard.hi)
    kd.on_epoch_start(model, 2)
    got["shard"] = (shard.lo, shard.hi, shard.steps)
    got["sel_indices"] = kd.selection.indices
    got["teacher_at_sel"] = kd.teacher_at_sel
    torch.save(got, os.path.join(out, f"rank{par.rank}.pt"))


def no_writes_off_rank_0(par):
    """Every write of the run goes through files.atomic_write and the lock through lock.try_lock: on the other
    ranks they fail the check."""
    if par.is_writer:
        return

    def refuse(*a, **k):
        raise AssertionError(f"rank {par.rank} wrote or locked {a[0] if a else ''}")
    files.atomic_write = refuse
    lock.try_lock = refuse


def check_training(par, out):
    """A short distillation with no write off rank 0; a NaN on rank 1 at a known step (every rank stops, naming
    it); the same with train.nonfinite=skip (every rank skips it)."""
    no_writes_off_rank_0(par)
    got = {}
    teacher_dir = os.path.join(out, "teacher")  # trained by the test in one process
    base = DATA + FAST + ["train.epochs=3"]
    cfg = resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf", sets=base)
    cfg["teacher_dir"] = teacher_dir
    got["result"] = run_one(cfg, os.path.join(out, "run"), log=lambda m: None)

    from rcekd_train.models.mf import MF
    real = MF.base_loss
    calls = {"n": 0}
    poisoned = {4, 5}

    def base_loss(self, batch):  # NaN at run steps 4 and 5 (0-based) of rank 1 only
        loss, users, u, items = real(self, batch)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return (loss * float("nan") if par.rank == 1 and step in poisoned else loss), users, u, items
    MF.base_loss = base_loss
    try:
        run_one(cfg, os.path.join(out, "nan"), log=lambda m: None)
        got["nan_error"] = None
    except Exception as e:
        got["nan_error"] = (type(e).__name__, str(e))
    calls["n"] = 0
    cfg_skip = resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf",
                       sets=base + ["train.nonfinite=skip"])
    cfg_skip["teacher_dir"] = teacher_dir
    got["skip_result"] = run_one(cfg_skip, os.path.join(out, "skip"), log=lambda m: None)
    MF.base_loss = real
    torch.save(got, os.path.join(out, f"rank{par.rank}.pt"))


def check_methods(par, out):
    """Every backbone as a teacher and a student, every KD method and RCE-KD's other protocol and a variant, one or
    two epochs each in 2 processes: each run ends, with the same result on both ranks."""
    got = {}
    quiet = lambda m: None
    for model in ("lightgcn", "hstu"):
        cfg = resolve("synthetic", "teacher", model, sets=DATA + FAST + ["train.epochs=2", "train.keep_every=1"])
        got[f"teacher-{model}"] = run_one(cfg, os.path.join(out, f"teacher-{model}"), log=quiet)
    runs = [("mf", "lightgcn", m, []) for m in ("ce", "cd", "rrd", "dcd")] + [("mf", "lightgcn", "hetcomp",
                                                                              ["kd.num_ckpt=2"])]
    runs += [("mf", "lightgcn", "rcekd", ["kd.refresh=batch"]), ("mf", "lightgcn", "rcekd", ["kd.variant=no_split"]),
             ("lightgcn", "lightgcn", "rcekd", []), ("hstu", "hstu", "rcekd", []), ("mf", None, "none", [])]
    for student, teacher, method, extra in runs:
        name = f"{method}-{teacher}-{student}-{len(extra) and extra[0]}"
        cfg = resolve("synthetic", "student", student, kd_method=method, teacher_model=teacher,
                      sets=DATA + FAST + ["train.epochs=1"] + extra)
        if teacher:
            cfg["teacher_dir"] = os.path.join(out, f"teacher-{teacher}")
        got[name] = run_one(cfg, os.path.join(out, name), log=quiet)
    torch.save(got, os.path.join(out, f"rank{par.rank}.pt"))


if __name__ == "__main__":
    check, out = sys.argv[1], sys.argv[2]
    with parallel.session(timeout_s=60) as par:
        assert par.world == int(os.environ["WORLD_SIZE"]) > 1
        {"primitives": check_primitives, "training": check_training, "methods": check_methods}[check](par, out)
