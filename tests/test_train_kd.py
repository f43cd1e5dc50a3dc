"""KD losses against hand-written formulas, and the item choices of each method against brute force."""
import math

import numpy as np
import pytest
import torch
from test_train_helpers import tiny_synthetic

from rcekd_kernels import select
from rcekd_train.kd import (
    CD,
    DCD,
    RCEKD,
    RRD,
    FrozenTeacher,
    VanillaCE,
    cd_rows,
    ce_rows,
    gumbel_topk,
    listwise_rows,
    mix_seed,
    ranked_topk,
    topk_from_vectors,
)
from rcekd_train.models import build_model

torch.set_default_dtype(torch.float32)


def brute_topk(row, k):
    """Items by decreasing score, ties by smaller id (plain Python sort)."""
    return sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k]


# --- the formulas ------------------------------------------------------------------------------------
def test_ce_rows_formula():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.3, 0.1, 2.0], [1.0, 1.0, 1.0]])
    for tau in (1.0, 2.5):
        got = ce_rows(s, t, tau)
        for r in range(2):
            pt = [math.exp(x / tau) for x in t[r].tolist()]
            ps = [math.exp(x / tau) for x in s[r].tolist()]
            want = -sum(pt[j] / sum(pt) * math.log(ps[j] / sum(ps)) for j in range(3))
            assert float(got[r]) == pytest.approx(want, rel=1e-5)


def test_cd_rows_formula():
    s = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    t = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    got = cd_rows(s, t)
    sig = lambda x: 1 / (1 + math.exp(-x))
    for r in range(2):
        want = 0.0
        for j in range(2):
            y, p = sig(float(t[r, j])), sig(float(s[r, j]))
            want -= y * math.log(p) + (1 - y) * math.log(1 - p)
        assert float(got[r]) == pytest.approx(want, rel=1e-5)


def test_listwise_rows_formula():
    ordered = torch.tensor([[2.0, 1.0, 0.5], [0.1, 0.2, 0.3]])
    below = torch.tensor([[0.0, -1.0], [1.0, 2.0]])
    got = listwise_rows(ordered, below)
    for r in range(2):
        o, b = ordered[r].tolist(), below[r].tolist()
        want = 0.0
        for k in range(3):
            denom = sum(math.exp(x) for x in o[k:]) + sum(math.exp(x) for x in b)
            want -= o[k] - math.log(denom)
        assert float(got[r]) == pytest.approx(want, rel=1e-5)
    # without "below" items it is the Plackett-Luce NLL of the order alone
    got = listwise_rows(ordered, ordered[:, :0])
    o = ordered[0].tolist()
    want = -sum(o[k] - math.log(sum(math.exp(x) for x in o[k:])) for k in range(3))
    assert float(got[0]) == pytest.approx(want, rel=1e-5)


# --- a tiny setting ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    data = tiny_synthetic()
    teacher_model = build_model("mf", data, dim=16, init_std=1.0)
    student = build_model("mf", data, dim=4, init_std=1.0)
    teacher = FrozenTeacher.from_model(teacher_model)
    full_t = (teacher.user_vecs @ teacher.item_vecs.T)
    teacher.topk_cache = torch.tensor([brute_topk(r, 40) for r in full_t], dtype=torch.int32)
    return data, teacher, student, full_t


def hand_rcekd(s_row, t_row, qs, a, qt, beta, K, tau, mode):
    """Spec section 5 written out for one row (sets given): returns (loss, gamma)."""
    qs, a, qt = list(qs), list(a), list(qt)
    q1 = set(qt) & set(qs)
    q2 = [i for i in qt if i not in qs]
    U = list(dict.fromkeys(a + q2))  # A union Q2, each item once

    def ce(items):
        tt = torch.stack([t_row[j] for j in items]) / tau
        ss = torch.stack([s_row[j] for j in items]) / tau
        return -(torch.softmax(tt, 0) * torch.log_softmax(ss, 0)).sum()

    n = len(q1) if mode == "paper" else len(set(qt) & set(a))
    gamma = math.exp(-beta * n / K)
    return (1 - gamma) * ce(qs) + gamma * ce(U), gamma


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_rcekd_per_epoch_matches_hand_formula(setting, mode):
    data, teacher, student, full_t = setting
    K, M, L, beta, tau = 6, 15, 5, 3.0, 2.0
    kd = RCEKD(teacher, data, seed=5, K=K, M=M, L=L, beta=beta, tau=tau, mode=mode, reduction="sum")
    kd.on_epoch_start(student, 0)
    users = torch.tensor([3, 7, 7, 50, 119])
    uv, iv = student.represent(users)
    loss, diag = kd.batch_loss(users, uv, iv, step=0)
    loss.backward()
    got_grad = student.user_emb.weight.grad.clone()
    student.zero_grad()

    uv, iv = student.represent(users)
    s_full = uv @ iv.T
    sel = kd.selection
    want, gammas = 0.0, []
    for r, u in enumerate(users.tolist()):
        qs, a, qt = sel.student_topk[u].tolist(), sel.sampled[u].tolist(), sel.teacher_topk[u].tolist()
        # the sets against brute force
        assert qs == brute_topk(s_full[r].detach(), K)
        assert qt == brute_topk(full_t[u], K)
        pool = set(brute_topk(s_full[r].detach(), M))
        assert len(set(a)) == L and set(a) <= pool
        l, g = hand_rcekd(s_full[r], full_t[u], qs, a, qt, beta, K, tau, mode)
        want = want + l
        gammas.append(g)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    # the epoch's diagnostics: means over all users of the epoch's sets
    assert float(diag["gamma"]) == pytest.approx(float(sel.gamma.double().mean()), rel=1e-5)
    assert float(diag["q1_frac"]) == pytest.approx(float(sel.n_q1.double().mean()) / K, rel=1e-5)
    # gamma by the hand formula of the mode, for the batch's rows
    assert gammas == pytest.approx([float(sel.gamma[u]) for u in users.tolist()], rel=1e-5)
    want.backward()
    assert torch.allclose(got_grad, student.user_emb.weight.grad, rtol=1e-4, atol=1e-5)
    student.zero_grad()


def test_rcekd_per_batch_matches_hand_formula(setting):
    data, teacher, student, full_t = setting
    K, M, L, beta = 5, 12, 4, 5.0
    kd = RCEKD(teacher, data, seed=11, K=K, M=M, L=L, beta=beta, tau=1.0, mode="paper", refresh="batch",
               reduction="mean")
    users = torch.tensor([0, 9, 33, 9])  # a repeated user: computed once, counted twice
    uv, iv = student.represent(users)
    loss, diag = kd.batch_loss(users, uv, iv, step=4)
    s_full = (uv @ iv.T).detach()
    # the sets of this step: the same seed the method uses, from the select API
    sel = select(s_full, teacher_topk=teacher.topk(users, K), K=K, M=M, L=L, T=10.0, beta=beta, mode="paper",
                 seed=mix_seed(11, 4, 2), row_ids=users)
    want = 0.0
    for r, u in enumerate(users.tolist()):
        assert sel.student_topk[r].tolist() == brute_topk(s_full[r], K)
        l, _ = hand_rcekd(s_full[r], full_t[u], sel.student_topk[r].tolist(), sel.sampled[r].tolist(),
                          sel.teacher_topk[r].tolist(), beta, K, 1.0, "paper")
        want += float(l)
    assert float(loss.detach()) == pytest.approx(want / 4, rel=1e-4)
    # |Q1|/K brute force (a mean over the distinct users)
    q1 = np.mean([len(set(brute_topk(s_full[r], K)) & set(brute_topk(full_t[u], K))) / K
                  for r, u in enumerate(users.tolist()) if r < 3])
    assert diag["q1_frac"] == pytest.approx(q1)


def test_vanilla_ce_uses_student_topk(setting):
    data, teacher, student, full_t = setting
    kd = VanillaCE(teacher, data, seed=0, K=7, tau=1.0, reduction="sum")
    kd.on_epoch_start(student, 0)
    users = torch.tensor([1, 2, 60])
    uv, iv = student.represent(users)
    loss, _ = kd.batch_loss(users, uv, iv, 0)
    s_full = (uv @ iv.T)
    want = 0.0
    for r, u in enumerate(users.tolist()):
        qs = brute_topk(s_full[r].detach(), 7)
        want += float(ce_rows(s_full[r, qs].unsqueeze(0), full_t[u, qs].unsqueeze(0))[0].detach())
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)


def test_cd_samples_from_teacher_topk(setting):
    data, teacher, student, full_t = setting
    kd = CD(teacher, data, seed=0, L=5, pool=20, T=3.0, reduction="sum")
    kd.on_epoch_start(student, 2)
    for u in range(data.num_users):
        items = kd.items[u].tolist()
        assert len(set(items)) == 5 and set(items) <= set(brute_topk(full_t[u], 20))
    users = torch.tensor([4, 5])
    uv, iv = student.represent(users)
    loss, _ = kd.batch_loss(users, uv, iv, 0)
    idx = kd.items[users]
    want = cd_rows((uv @ iv.T).gather(1, idx), full_t[users].gather(1, idx)).sum()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # rank-biased sampling: the teacher's best item is drawn far more often than its 20th
    first = (kd.items == teacher.topk_cache[:, :1].long()).any(1).float().mean()
    last = (kd.items == teacher.topk_cache[:, 19:20].long()).any(1).float().mean()
    assert first > last


def test_rrd_sets_and_loss(setting):
    data, teacher, student, full_t = setting
    kd = RRD(teacher, data, seed=1, K=6, L=8, pool=20, T=5.0, reduction="sum")
    kd.on_epoch_start(student, 0)
    for u in range(data.num_users):
        top = brute_topk(full_t[u], 20)
        inter = kd.interesting[u].tolist()
        assert set(inter) <= set(top) and len(set(inter)) == 6
        assert [top.index(i) for i in inter] == sorted(top.index(i) for i in inter)  # teacher order
        assert not set(kd.uninteresting[u].tolist()) & set(top)
    users = torch.tensor([8])
    uv, iv = student.represent(users)
    loss, _ = kd.batch_loss(users, uv, iv, 0)
    s = (uv @ iv.T)[0]
    o, b = s[kd.interesting[8]].tolist(), s[kd.uninteresting[8]].tolist()
    want = -sum(o[k] - math.log(sum(math.exp(x) for x in o[k:]) + sum(math.exp(x) for x in b)) for k in range(6))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)


def test_dcd_ranks_and_order(setting):
    data, teacher, student, full_t = setting
    scores = torch.randn(3, 30)
    items = torch.randint(0, 30, (3, 5))
    srt = torch.sort(scores, dim=1, descending=True).values
    got = DCD.ranks_sorted(srt, scores, items)
    for r in range(3):
        for c in range(5):
            assert int(got[r, c]) == int((scores[r] > scores[r, items[r, c]]).sum())
    kd = DCD(teacher, data, seed=2, L=4, pool=15, scale=5.0)
    kd.on_epoch_start(student, 0)
    s_all = (student.user_emb.weight @ student.item_emb.weight.T).detach()
    for u in (0, 5, 77):
        items = kd.items[u].tolist()
        assert len(items) == 8
        t_vals = full_t[u, items]
        assert bool((t_vals[:-1] >= t_vals[1:]).all())  # ordered by the teacher
        qt, qs = set(brute_topk(full_t[u], 15)), set(brute_topk(s_all[u], 15))
        assert set(items) <= qt | qs


# --- teacher ---------------------------------------------------------------------------------------------
def test_frozen_teacher_scores(setting):
    data, teacher, student, full_t = setting
    users = torch.tensor([0, 5, 5, 119])
    items = torch.randint(0, data.num_items, (4, 9))
    teacher_small_chunks = FrozenTeacher(teacher.user_vecs, teacher.item_vecs, chunk=3)
    assert torch.allclose(teacher_small_chunks.score_items(users, items), full_t[users].gather(1, items), atol=1e-5)
    assert torch.allclose(teacher.score_rows(users), full_t[users], atol=1e-5)
    with pytest.raises(ValueError, match="top-K cache"):
        teacher.topk(users, 41)


def test_ranked_topk_ties():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    got = ranked_topk(s, 4)
    assert got[0].tolist() == brute_topk(s[0], 4) == [1, 2, 4, 5]
    assert got[1].tolist() == [0, 1, 2, 3]


def test_gumbel_topk_distribution():
    g = torch.Generator().manual_seed(0)
    logw = torch.log(torch.tensor([[1.0, 3.0, 0.0]])).expand(20000, 3)
    pick = gumbel_topk(logw, 1, g)[:, 0]
    assert not (pick == 2).any()  # zero weight never drawn
    assert float((pick == 1).float().mean()) == pytest.approx(0.75, abs=0.02)


# --- the authors' variants of the baselines -----------------------------------------------------------
def test_cd_authors_variant(setting):
    """guide: student, draw: pairwise, exclude_train, target sigmoid((t + shift) / target_T)."""
    data, teacher, student, full_t = setting
    kd = CD(teacher, data, seed=4, L=3, pool=25, T=8.0, guide="student", draw="pairwise", exclude_train=True,
            target_T=2.0, target_shift=0.5)
    kd.on_epoch_start(student, 1)
    s_all = (student.user_emb.weight @ student.item_emb.weight.T).detach()
    for u in range(data.num_users):
        train = set(data.train.items_of(u).tolist())
        ranked = [j for j in brute_topk(s_all[u], data.num_items) if j not in train][:25]
        items = kd.items[u].tolist()
        assert len(set(items)) == 3 and set(items) <= set(ranked)
    users = torch.tensor([2, 2, 40])  # one row per occurrence (the authors' CD)
    uv, iv = student.represent(users)
    loss, _ = kd.batch_loss(users, uv, iv, 0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = 0.0
    for r, u in enumerate(users.tolist()):
        for j in kd.items[u].tolist():
            y, p = sig((float(full_t[u, j]) + 0.5) / 2.0), sig(float((uv[r] * iv[j]).sum().detach()))
            want -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)


def test_pairwise_rank_sampling_distribution():
    """Best of two draws: P(position k) = p_k^2 + 2 p_k sum_{j > k} p_j for the first item drawn."""
    from rcekd_train.kd.baselines import pairwise_rank_sampling
    g = torch.Generator().manual_seed(1)
    pos = pairwise_rank_sampling(4, 1, 2.0, g, 40000)
    w = [math.exp(-(k + 1) / 2.0) for k in range(4)]
    p = [x / sum(w) for x in w]
    want = [p[k] ** 2 + 2 * p[k] * sum(p[k + 1:]) for k in range(4)]
    got = [float((pos[:, 0] == k).float().mean()) for k in range(4)]
    assert got == pytest.approx(want, abs=0.01)
    # n distinct positions per row
    pos = pairwise_rank_sampling(6, 5, 50.0, g, 300)
    assert all(len(set(r)) == 5 for r in pos.tolist())


def test_rrd_authors_variant(setting):
    """exclude_train: the teacher's list skips training items and none is drawn as uninteresting;
    user_weight: one: a user repeated in a batch counts once."""
    data, teacher, student, full_t = setting
    kd = RRD(teacher, data, seed=1, K=6, L=8, pool=20, T=5.0, exclude_train=True, user_weight="one")
    kd.on_epoch_start(student, 0)
    for u in range(data.num_users):
        train = set(data.train.items_of(u).tolist())
        top = [j for j in brute_topk(full_t[u], data.num_items) if j not in train][:20]
        inter, unint = kd.interesting[u].tolist(), kd.uninteresting[u].tolist()
        assert set(inter) <= set(top) and [top.index(i) for i in inter] == sorted(top.index(i) for i in inter)
        assert not set(unint) & (set(top) | train)
    users = torch.tensor([8, 8, 8, 3])
    uv, iv = student.represent(users)
    loss, _ = kd.batch_loss(users, uv, iv, 0)
    want = 0.0
    for u in (8, 3):
        s = (student.user_emb.weight[u] @ student.item_emb.weight.T).detach()
        o, b = s[kd.interesting[u]].tolist(), s[kd.uninteresting[u]].tolist()
        want -= sum(o[k] - math.log(sum(math.exp(x) for x in o[k:]) + sum(math.exp(x) for x in b))
                    for k in range(6))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)


def test_dcd_authors_variant(setting):
    """over_from: teacher, order: under_over, exclude_train: both sides from the teacher's list without
    training items; the under-ranked items (d = rank_S - rank_T > 0 most likely) above the over-ranked."""
    data, teacher, student, full_t = setting
    kd = DCD(teacher, data, seed=3, L=4, pool=15, scale=3.0, floor=1e-5, over_from="teacher", order="under_over",
             exclude_train=True, user_weight="one")
    kd.on_epoch_start(student, 0)
    s_all = (student.user_emb.weight @ student.item_emb.weight.T).detach()
    exact = 0
    for u in range(data.num_users):
        train = set(data.train.items_of(u).tolist())
        t_list = [j for j in brute_topk(full_t[u], data.num_items) if j not in train][:15]
        under, over = kd.items[u].tolist(), kd.below[u].tolist()
        assert len(set(under)) == 4 and len(set(over)) == 4 and set(under) | set(over) <= set(t_list)
        # d = student rank (over all items) - position in the teacher's list
        d = {j: int((s_all[u] > s_all[u, j]).sum()) - t_list.index(j) for j in t_list}
        n_pos, n_neg = sum(v > 0 for v in d.values()), sum(v < 0 for v in d.values())
        # weights tanh(|d| / scale) >= 0.32 against the floor 1e-5: the items with the right sign come first
        exact += (sum(d[j] > 0 for j in under) == min(4, n_pos)) and (sum(d[j] < 0 for j in over) == min(4, n_neg))
    assert exact >= 0.97 * data.num_users
    users = torch.tensor([5, 5])
    uv, iv = student.represent(users)
    loss, _ = kd.batch_loss(users, uv, iv, 0)
    s = s_all[5]
    o, b = s[kd.items[5]].tolist(), s[kd.below[5]].tolist()
    want = -sum(o[k] - math.log(sum(math.exp(x) for x in o[k:]) + sum(math.exp(x) for x in b)) for k in range(4))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)


def test_dcd_student_list_skips_training_items(setting):
    """over_from: student with exclude_train: the over-ranked items come from the student's top ``pool`` items
    that are not training items (the teacher ranks those last: they would all count as over-ranked); those
    the teacher ranks lower than the student (d' = rank_T - rank_S > 0, weight >= tanh(1/3)) are drawn first."""
    data, teacher, student, full_t = setting
    pool, L = 12, 3
    kd = DCD(teacher, data, seed=5, L=L, pool=pool, scale=3.0, floor=1e-5, over_from="student", order="under_over",
             exclude_train=True, user_weight="one")
    kd.on_epoch_start(student, 0)
    s_all = (student.user_emb.weight @ student.item_emb.weight.T).detach()
    exact, n_train_in_top = 0, 0
    for u in range(data.num_users):
        train = set(data.train.items_of(u).tolist())
        s_list = [j for j in brute_topk(s_all[u], data.num_items) if j not in train][:pool]
        n_train_in_top += len(set(brute_topk(s_all[u], pool)) & train)
        t_row = full_t[u].clone()
        t_row[list(train)] = float("-inf")
        over = kd.below[u].tolist()
        assert len(set(over)) == L and set(over) <= set(s_list) and not set(over) & train
        d = {j: int((t_row > t_row[j]).sum()) - int((s_all[u] > s_all[u, j]).sum()) for j in s_list}
        exact += sum(d[j] > 0 for j in over) == min(L, sum(v > 0 for v in d.values()))
    assert n_train_in_top > 0  # the case is exercised: the student's unmasked top holds training items
    assert exact >= 0.97 * data.num_users


def test_baseline_options_are_checked(setting):
    data, teacher, student, full_t = setting
    with pytest.raises(ValueError, match="guide"):
        CD(teacher, data, guide="both")
    with pytest.raises(ValueError, match="over_from"):
        DCD(teacher, data, over_from="x")
    with pytest.raises(ValueError, match="user_weight"):
        RRD(teacher, data, user_weight="twice").batch_loss(torch.tensor([0]), *student.represent(torch.tensor([0])), 0)


# --- the ablations of the paper's Figure 3 (variants of the rcekd method) --------------------------------
def hand_variant(s_row, t_row, qs, a, qt, beta, K, tau, mode, variant, c=0.5):
    """Each variant written out for one row from its sets: full / l1_only / const_gamma / no_split."""
    qs, a, qt = list(qs), list(a), list(qt)

    def ce(items):
        tt = torch.stack([t_row[j] for j in items]) / tau
        ss = torch.stack([s_row[j] for j in items]) / tau
        return -(torch.softmax(tt, 0) * torch.log_softmax(ss, 0)).sum()

    if variant == "no_split":
        return ce(list(dict.fromkeys(a + qt)))  # X = A union QT, each item once
    q2 = [i for i in qt if i not in qs]
    U = list(dict.fromkeys(a + q2))
    n = len(set(qt) & set(qs)) if mode == "paper" else len(set(qt) & set(a))
    gamma = {"full": math.exp(-beta * n / K), "l1_only": 0.0, "const_gamma": c}[variant]
    return (1 - gamma) * ce(qs) + gamma * ce(U)


@pytest.mark.parametrize("variant", ["l1_only", "const_gamma", "no_split", "full"])
@pytest.mark.parametrize("refresh", ["epoch", "batch"])
def test_rcekd_ablation_variants_match_hand_formula(setting, variant, refresh):
    data, teacher, student, full_t = setting
    K, M, L, beta, tau, c = 6, 15, 5, 3.0, 2.0, 0.3
    kd = RCEKD(teacher, data, seed=7, K=K, M=M, L=L, beta=beta, tau=tau, mode="official", refresh=refresh,
               variant=variant, gamma=c, reduction="sum")
    kd.on_epoch_start(student, 0)
    users = torch.tensor([3, 7, 50, 119])
    uv, iv = student.represent(users)
    loss, diag = kd.batch_loss(users, uv, iv, step=2)
    loss.backward()
    got_grad = student.user_emb.weight.grad.clone()
    student.zero_grad()

    uv, iv = student.represent(users)
    s_full = uv @ iv.T
    if refresh == "epoch":
        sel = kd.selection[users]
    else:
        sel = select(s_full.detach(), teacher_topk=teacher.topk(users, K), K=K, M=M, L=L, T=10.0, beta=beta,
                     mode="official", seed=mix_seed(7, 2, 2), row_ids=users)
    want = 0.0
    for r, u in enumerate(users.tolist()):
        assert sel.student_topk[r].tolist() == brute_topk(s_full[r].detach(), K)
        want = want + hand_variant(s_full[r], full_t[u], sel.student_topk[r].tolist(), sel.sampled[r].tolist(),
                                   sel.teacher_topk[r].tolist(), beta, K, tau, "official", variant, c)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    want.backward()
    assert torch.allclose(got_grad, student.user_emb.weight.grad, rtol=1e-4, atol=1e-5)
    student.zero_grad()
    if variant == "no_split":
        assert "gamma" not in diag and "L1" not in diag
    elif variant != "full":
        assert float(diag["gamma"]) == pytest.approx({"l1_only": 0.0, "const_gamma": c}[variant])
        assert 0 < float(diag["gamma_adaptive"]) <= 1


def test_rcekd_variant_options_are_checked(setting):
    data, teacher, student, full_t = setting
    with pytest.raises(ValueError, match="variant"):
        RCEKD(teacher, data, variant="wo_sep")
    with pytest.raises(ValueError, match="gamma"):
        RCEKD(teacher, data, variant="const_gamma", gamma=1.5)


def test_masked_ce_rows_formula():
    from rcekd_train.kd.rcekd import masked_ce_rows
    s = torch.tensor([[1.0, 2.0, 0.5, 9.0]], requires_grad=True)
    t = torch.tensor([[0.3, 0.1, 2.0, -5.0]])
    mask = torch.tensor([[True, False, True, True]])
    got = masked_ce_rows(s, t, mask, 2.0)
    X = [0, 2, 3]
    pt = [math.exp(float(t[0, j]) / 2) for j in X]
    ps = [math.exp(float(s[0, j].detach()) / 2) for j in X]
    want = -sum(pt[i] / sum(pt) * math.log(ps[i] / sum(ps)) for i in range(3))
    assert float(got[0].detach()) == pytest.approx(want, rel=1e-6)
    got.sum().backward()
    assert float(s.grad[0, 1]) == 0.0 and torch.isfinite(s.grad).all()


def test_dcd_teacher_ranks_kept_across_epochs(setting):
    """over_from: teacher keeps the teacher's ranks from the first epoch: a later epoch draws exactly what a
    fresh instance computing them again draws."""
    data, teacher, student, full_t = setting
    hp = dict(L=4, pool=15, scale=3.0, over_from="teacher", order="under_over", exclude_train=True)
    kd = DCD(teacher, data, seed=3, **hp)
    kd.on_epoch_start(student, 0)
    with torch.no_grad():
        student.user_emb.weight.add_(0.3 * torch.randn_like(student.user_emb.weight))
    kd.on_epoch_start(student, 1)
    fresh = DCD(teacher, data, seed=3, **hp)
    fresh.on_epoch_start(student, 1)
    assert torch.equal(kd.items, fresh.items) and torch.equal(kd.below, fresh.below)
    for order in ("teacher",):
        a = DCD(teacher, data, seed=3, **dict(hp, order=order))
        a.on_epoch_start(student, 0)
        a.on_epoch_start(student, 1)
        b = DCD(teacher, data, seed=3, **dict(hp, order=order))
        b.on_epoch_start(student, 1)
        assert torch.equal(a.items, b.items)


# --- the loss from embeddings in the drivers (issue 12): the same sets, losses and gradients as full rows ----
@pytest.mark.parametrize("refresh", ["epoch", "batch"])
@pytest.mark.parametrize("variant", ["full", "no_split", "l1_only"])
@pytest.mark.parametrize("exclude_train", [False, True])
def test_rcekd_from_embeddings_equals_full_rows(setting, refresh, variant, exclude_train):
    """``scoring: embeddings`` (the default: top-M by topm_dot, the scores of the 2K + L items only) against
    ``scoring: dense`` (the full (B, N) score rows and the teacher's rows): identical sets, losses and gradients
    to float rounding."""
    data, teacher, student, _ = setting
    if exclude_train:  # the teacher's lists without training items (as the loss requires with the exclusion)
        teacher = FrozenTeacher(teacher.user_vecs, teacher.item_vecs,
                                topk_from_vectors(teacher.user_vecs, teacher.item_vecs, 40, data=data))
    users = torch.tensor([3, 7, 7, 50, 119, 0])
    got = {}
    for scoring in ("embeddings", "dense"):
        kd = RCEKD(teacher, data, seed=2, K=6, M=14, L=5, beta=2.0, tau=1.5, refresh=refresh, variant=variant,
                   exclude_train=exclude_train, scoring=scoring)
        kd.on_epoch_start(student, 3)
        uv, iv = student.represent(users)
        loss, diag = kd.batch_loss(users, uv, iv, step=7)
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        got[scoring] = (loss.detach(), {k: float(v) for k, v in diag.items()}, grads,
                        kd.selection.indices.clone() if refresh == "epoch" else None)
    (l_e, d_e, g_e, s_e), (l_d, d_d, g_d, s_d) = got["embeddings"], got["dense"]
    if refresh == "epoch":
        assert torch.equal(s_e, s_d)  # every user's sets
    assert float(l_e) == pytest.approx(float(l_d), rel=1e-5)
    assert d_e.keys() == d_d.keys() and d_e == pytest.approx(d_d, rel=1e-5)
    for a, b in zip(g_e, g_d):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dcd_teacher_sorted_rows_kept_across_epochs(setting, monkeypatch):
    """over_from: student keeps the teacher's sorted rows from the first epoch (several chunks of users): a
    later epoch draws exactly what an instance that sorts them again (no room to keep them) draws."""
    import rcekd_train.kd.baselines as B
    data, teacher, student, full_t = setting
    hp = dict(L=4, pool=15, scale=3.0, over_from="student", order="under_over", exclude_train=True, chunk=7)
    kd = DCD(teacher, data, seed=3, **hp)
    kd.on_epoch_start(student, 0)
    assert len(kd._t_sorted) == -(-data.num_users // 7)
    with torch.no_grad():
        student.user_emb.weight.add_(0.3 * torch.randn_like(student.user_emb.weight))
    kd.on_epoch_start(student, 1)
    monkeypatch.setattr(B, "TEACHER_SORT_CACHE_BYTES", 0)
    again = DCD(teacher, data, seed=3, **hp)
    again.on_epoch_start(student, 1)
    assert getattr(again, "_t_sorted", None) is None
    assert torch.equal(kd.items, again.items) and torch.equal(kd.below, again.below)
