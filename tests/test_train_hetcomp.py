"""HetComp: the discrepancy, both losses, the checkpoint choice and the curriculum against hand-written
formulas and brute force; end to end from a teacher's kept trajectory, resume included."""
import json
import math
import os

import pytest
import torch
from test_train_helpers import tiny_synthetic

from rcekd_train.config import resolve
from rcekd_train.kd.hetcomp import (
    HetComp,
    choose_checkpoints,
    hetcomp_overall_rows,
    hetcomp_rank_rows,
    ndcg_discrepancy,
)
from rcekd_train.runs import run_one


def brute_D(student, target, lam, relevance):
    K = len(target)
    gain = [2 ** math.exp(-r / lam) - 1 for r in range(K)]
    idcg = sum(gain[r] / math.log2(r + 2) for r in range(K))
    dcg = 0.0
    for t, item in enumerate(student):
        if item in target:
            g = gain[target.index(item)] if relevance == "teacher_rank" else gain[t]
            dcg += g / math.log2(t + 2)
    return 1 - dcg / idcg


@pytest.mark.parametrize("relevance", ["teacher_rank", "student_position"])
def test_ndcg_discrepancy_brute_force(relevance):
    g = torch.Generator().manual_seed(0)
    students = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(30)])
    targets = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(30)])
    got = ndcg_discrepancy(students, targets, 3.0, relevance)
    for r in range(30):
        assert float(got[r]) == pytest.approx(brute_D(students[r].tolist(), targets[r].tolist(), 3.0, relevance))
    same = ndcg_discrepancy(targets, targets, 3.0, relevance)
    assert torch.allclose(same, torch.zeros(30, dtype=torch.float64), atol=1e-12)


def hand_rows(s, train, targets, pos, stage):
    """Both losses of one row written as loops over the catalogue."""
    N = len(s)
    ex = math.exp

    def below(excl):
        return sum(ex(s[k]) for k in range(N) if k not in train and k not in excl)

    def pl(ordered, b):
        return -sum(s[o] - math.log(sum(ex(s[x]) for x in ordered[m:]) + b) for m, o in enumerate(ordered))

    if stage == "overall":
        els = below(set(targets))
        return -2 * sum(s[x] - math.log(ex(s[x]) + els) for x in pos + targets)
    K = len(targets)
    half, tenth = targets[:max(K // 2, 1)], targets[:max(K // 10, 1)]
    return pl(pos, below(set(half))) + (pl(half, below(set(half))) + pl(tenth, below(set(tenth)))) / 2


@pytest.mark.parametrize("stage", ["overall", "rank"])
def test_losses_against_hand_loops(stage):
    torch.manual_seed(1)
    N, K = 30, 10
    s = torch.randn(3, N, dtype=torch.float64) * 2
    train = [{0, 5, 7}, {1, 2}, {3, 4, 20, 21}]
    mask = torch.zeros(3, N, dtype=torch.bool)
    for r, t in enumerate(train):
        mask[r, list(t)] = True
    targets = torch.stack([torch.tensor([j for j in torch.randperm(N).tolist() if j not in train[r]][:K])
                           for r in range(3)])
    pos = torch.tensor([[5, 0], [2, 1], [21, 3]])
    fn = hetcomp_overall_rows if stage == "overall" else hetcomp_rank_rows
    s_req = s.clone().requires_grad_(True)
    got = fn(s_req, mask, targets, pos)
    for r in range(3):
        want = hand_rows(s[r].tolist(), train[r], targets[r].tolist(), pos[r].tolist(), stage)
        assert float(got[r].detach()) == pytest.approx(want, rel=1e-10)
    # gradient against central differences of the hand formula (row 0, a few coordinates)
    got[0].backward()
    for j in (0, 6, int(targets[0, 0]), int(targets[0, -1])):
        e = 1e-6
        sp, sm = s[0].tolist(), s[0].tolist()
        sp[j] += e
        sm[j] -= e
        fd = (hand_rows(sp, train[0], targets[0].tolist(), pos[0].tolist(), stage)
              - hand_rows(sm, train[0], targets[0].tolist(), pos[0].tolist(), stage)) / (2 * e)
        assert float(s_req.grad[0, j]) == pytest.approx(fd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("stage", ["overall", "rank"])
@pytest.mark.parametrize("block", [1, 3, 100])
@pytest.mark.parametrize("overlap", [False, True])
def test_losses_from_vectors_equal_the_full_rows(stage, block, overlap):
    """The block-by-block losses from the vectors (no (B, N) tensor kept) against the (B, N) formulas
    above (themselves checked by hand loops): values and both gradients, with some scores beyond the
    clamp (zero gradient there) and blocks that do not divide the batch."""
    from rcekd_train.kd.hetcomp import hetcomp_overall_from_vectors, hetcomp_rank_from_vectors

    torch.manual_seed(2)
    B, N, D, K, clamp = 7, 40, 5, 10, 3.0
    u = (torch.randn(B, D, dtype=torch.float64) * 1.5).requires_grad_(True)
    v = (torch.randn(N, D, dtype=torch.float64) * 1.5).requires_grad_(True)
    mask = torch.rand(B, N) < 0.15
    pos = torch.stack([torch.randperm(N)[:2] for _ in range(B)])
    mask[torch.arange(B)[:, None], pos] = True
    targets = torch.stack([torch.tensor([j for j in torch.randperm(N).tolist() if not mask[r, j]][:K])
                           for r in range(B)])
    if overlap:  # some targets are training items too (not so in a run, but the formulas allow it)
        mask[torch.arange(B), targets[:, K - 2]] = True
        mask[torch.arange(0, B, 2), targets[0::2, 1]] = True
    raw = u @ v.T
    assert ((raw.abs() > clamp).sum() > 10) and ((raw.abs() < clamp).sum() > 10)
    full = hetcomp_overall_rows if stage == "overall" else hetcomp_rank_rows
    want = full(raw.clamp(-clamp, clamp), mask, targets, pos)
    w = torch.rand(B, dtype=torch.float64)
    gu, gv = torch.autograd.grad((want * w).sum(), (u, v))
    fn = hetcomp_overall_from_vectors if stage == "overall" else hetcomp_rank_from_vectors
    lens = mask.sum(1)
    exclusion = (torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]), mask.nonzero()[:, 1])  # CSR
    got = fn(u, v, clamp, exclusion, targets, pos, block=block)
    hu, hv = torch.autograd.grad((got * w).sum(), (u, v))
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert torch.allclose(hu, gu, rtol=1e-10, atol=1e-12)
    assert torch.allclose(hv, gv, rtol=1e-10, atol=1e-12)


def test_choose_checkpoints():
    assert choose_checkpoints([50, 100, 150], 120, 2) == [50, 100]      # the authors' interval 50, best 120
    assert choose_checkpoints(list(range(10, 200, 10)), 90, 2) == [30, 60]
    assert choose_checkpoints([1, 2, 3], 4, 3) == [1, 2, 3]
    assert choose_checkpoints([2, 3, 9], 10, 1) == [3]                   # nearest to 10 / 2 = 5 (ties earlier)
    with pytest.raises(ValueError, match="keep-every"):
        choose_checkpoints([50, 100], 90, 2)


def test_dkc_follows_the_hand_rule():
    """The curriculum on 3 users with a 3-level trajectory and hand-made student lists."""
    data = tiny_synthetic(num_users=3, num_items=40, min_items=5, mean_items=6, max_items=8)
    kd = HetComp(None, data, K=4, num_ckpt=3, p=2, alpha=1.05, alpha_decay=1.0, lam=10.0)
    kd.perms = torch.tensor([[[0, 1, 2, 3]] * 3, [[4, 5, 6, 7]] * 3, [[8, 9, 10, 11]] * 3])
    D = lambda stu, lvl: brute_D(stu, kd.perms[lvl, 0].tolist(), 10.0, "teacher_rank")
    s0 = [[20, 21, 22, 23], [20, 21, 22, 23], [4, 21, 22, 23]]
    kd.dkc(torch.tensor(s0), 2)                       # first check: distances to level 1 stored, no move
    assert kd.v.tolist() == [0, 0, 0]
    assert kd.last_dist.tolist() == pytest.approx([D(s, 1) for s in s0])
    # user 0: no progress towards level 1 (ratio 1: stays); user 1: much closer (ratio > 1.05: moves);
    # user 2: moved away from level 1 (ratio < 1: moves)
    s1 = [[20, 21, 22, 23], [4, 5, 22, 23], [20, 21, 22, 23]]
    kd.dkc(torch.tensor(s1), 4)
    assert kd.v.tolist() == [0, 1, 1]
    want = [D(s0[0], 1), D(s1[1], 2), D(s1[2], 2)]   # the moved users now measure their next level
    assert kd.last_dist.tolist() == pytest.approx(want)
    assert kd.v_result == round(2 / 3, 2)
    # the state round-trips (the trainer's checkpoint)
    other = HetComp(None, data, K=4, num_ckpt=3, p=2)
    other.load_state_dict(kd.state_dict())
    assert other.v.tolist() == kd.v.tolist() and other.last_dist.tolist() == kd.last_dist.tolist()


DATA = ["data.num_users=120", "data.num_items=90", "data.mean_items=12", "data.min_items=5", "data.max_items=40",
        "data.seed=4"]
FAST = ["train.progress=false", "train.plot=false", "train.batch_size=256", "train.patience=50"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hc_teacher"))
    cfg = resolve("synthetic", "teacher", "mf", sets=DATA + FAST + ["train.epochs=6", "model.dim=16",
                                                                      "train.keep_every=1", "train.lr=0.02"])
    run_one(cfg, out, log=lambda m: None)
    return out


def test_hetcomp_end_to_end_and_resume(tmp_path, teacher_dir):
    sets = DATA + FAST + ["train.epochs=6", "kd.K=6", "kd.p=1", "kd.num_ckpt=3", "kd.alpha=1.01"]
    cfg = resolve("synthetic", "student", "mf", kd_method="hetcomp", teacher_model="mf", sets=sets)
    cfg["teacher_dir"] = teacher_dir
    full = str(tmp_path / "full")
    res = run_one(cfg, full, log=lambda m: None)
    assert res["status"] == "max_epochs"
    hist = json.load(open(os.path.join(full, "history.json")))
    assert all("traj_level" in r and "rank_stage" in r for r in hist)
    assert hist[-1]["traj_level"] >= hist[0]["traj_level"]
    # interrupted after 3 epochs and resumed: the same run, curriculum state included
    part = str(tmp_path / "part")
    run_one(dict(cfg, train=dict(cfg["train"], stop_after=3)), part, log=lambda m: None)
    run_one(cfg, part, resume=True, log=lambda m: None)
    strip = lambda h: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in h]
    assert strip(json.load(open(os.path.join(part, "history.json")))) == strip(hist)


def test_hetcomp_targets_from_the_kept_checkpoints(teacher_dir):
    from rcekd_train.kd import load_teacher, topk_from_vectors
    from rcekd_train.runs import get_data
    cfg = resolve("synthetic", "teacher", "mf", sets=DATA)
    data = get_data(cfg)
    teacher, _ = load_teacher(teacher_dir, data)
    assert teacher.run_dir == teacher_dir  # load_teacher says where the trajectory is
    teacher.run_dir = None                 # a teacher of unknown origin: no trajectory to read
    with pytest.raises(ValueError, match="run directory"):
        HetComp(teacher, data, K=6)
    teacher.run_dir = teacher_dir
    best = json.load(open(os.path.join(teacher_dir, "result.json")))["best_epoch"]
    kd = HetComp(teacher, data, K=6, num_ckpt=3)
    assert kd.trajectory_epochs[-1] == best and len(kd.trajectory_epochs) == 3
    assert kd.trajectory_epochs == choose_checkpoints(list(range(1, 7)), best, 2) + [best]
    # level 0 = the top-6 (training items excluded) of the checkpoint of that epoch
    snap = torch.load(os.path.join(teacher_dir, "trajectory", f"epoch_{kd.trajectory_epochs[0]:04d}.pt"),
                      weights_only=False)["state"]
    u, i = snap["user_emb.weight"], snap["item_emb.weight"]
    assert torch.equal(kd.perms[0], topk_from_vectors(u, i, 6, data=data).long())
    for row in range(data.num_users):
        assert not set(kd.perms[2, row].tolist()) & set(data.train.items_of(row).tolist())
    # observed items ordered by the final teacher
    full = teacher.user_vecs @ teacher.item_vecs.T
    P = kd.pos.shape[1]
    assert P == int(data.train.lengths().min())
    for row in (0, 7):
        items = data.train.items_of(row).tolist()
        assert kd.pos[row].tolist() == sorted(items, key=lambda j: -float(full[row, j]))[:P]
