"""The reference backend against the brute-force oracle of the spec (tests/oracle.py)."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels import rng, spec
from rcekd_kernels.backends import reference as ref

import oracle
from conformance import assert_matches_oracle, oracle_rows
from conformance import oracle_config as random_config
from conformance import oracle_hp as hp
from conformance import oracle_tensors as tensors

HERE = os.path.dirname(__file__)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests are about the reference: "auto" would pick a compiled backend."""
    monkeypatch.setenv("RCEKD_BACKEND", "reference")


@pytest.mark.parametrize("i", range(240))
def test_reference_vs_oracle(i):
    assert_matches_oracle(random_config(i))


def test_config_coverage():
    """The random configurations cover the corner cases they are meant to."""
    cs = [random_config(i) for i in range(240)]
    assert sum(c["K"] == c["M"] for c in cs) >= 10
    assert sum(c["L"] == c["M"] for c in cs) >= 10
    assert sum(c["M"] == c["s"].shape[1] for c in cs) >= 10
    assert sum(c["s"].shape[0] == 1 for c in cs) >= 30
    assert sum(c["excl"] is not None for c in cs) >= 30
    assert sum(c["qt"] is not None for c in cs) >= 30
    assert sum(c["mode"] == "official" for c in cs) >= 80 and sum(c["mode"] == "paper" for c in cs) >= 80
    ties = sum(len(np.unique(c["s"])) < c["s"].size for c in cs)
    assert ties >= 60


# ----------------------------------------------------------------------------- RNG
def test_rng_vectors():
    vec = json.load(open(os.path.join(HERE, "data", "rng_vectors.json")))
    assert len(vec) == 175
    for v in vec:
        assert rng.hash_int(v["seed"], v["row"], v["item"]) == v["hash"]
        assert rng.uniform_int(v["seed"], v["row"], v["item"]) == v["u"]
        assert oracle.hash3(v["seed"], v["row"], v["item"]) == v["hash"]
    for seed in sorted({v["seed"] for v in vec}):
        vs = [v for v in vec if v["seed"] == seed]
        rows = torch.tensor([v["row"] for v in vs])
        items = torch.tensor([[v["item"]] for v in vs])
        u = torch.cat([rng.uniform(seed, rows[i:i + 1], items[i:i + 1]) for i in range(len(vs))]).flatten()
        assert u.dtype == torch.float64
        assert u.tolist() == [v["u"] for v in vs]  # exact
        g = torch.cat([rng.gumbel(seed, rows[i:i + 1], items[i:i + 1]) for i in range(len(vs))]).flatten()
        torch.testing.assert_close(g, torch.tensor([v["gumbel_f64"] for v in vs], dtype=torch.float64),
                                   rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------ sampling
def _sampling_setup(mode, B):
    # N = 9 items; student order 0..8 (scores decreasing); pool M = 6, K = 3, teacher top-K = {3, 4, 7}
    N, K, M = 9, 3, 6
    s = torch.linspace(3, -3, N).repeat(B, 1)
    t = torch.zeros(B, N)
    qt = torch.tensor([[3, 4, 7]]).repeat(B, 1)
    P = list(range(M))
    c = oracle.counts_of(P, [3, 4, 7], K, mode)
    return s, t, qt, dict(K=K, M=M), P, c


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_single_draw_frequencies(mode):
    B, T = 60000, 1.0
    s, t, qt, kw, P, c = _sampling_setup(mode, B)
    w = np.array([math.exp(c[j] / T) for j in P])
    p = w / w.sum()
    assert len(set(np.round(p, 6))) >= 3  # the weights really differ
    sel = R.select(s, t, qt, L=1, T=T, mode=mode, seed=7, row_ids=torch.arange(B) * 13 + 5, **kw)
    freq = np.bincount(sel.sampled[:, 0].numpy(), minlength=9)[:6] / B
    sd = np.sqrt(p * (1 - p) / B)
    assert np.all(np.abs(freq - p) < 5 * sd + 1e-9), (freq, p)


def _inclusion_exact(w, L):
    """P(item in sample) for sequential sampling without replacement, by enumeration."""
    n = len(w)
    inc = np.zeros(n)
    for seq in itertools.permutations(range(n), L):
        pr, left = 1.0, w.sum()
        for j in seq:
            pr *= w[j] / left
            left -= w[j]
        for j in seq:
            inc[j] += pr
    return inc


@pytest.mark.parametrize("mode,L", [("paper", 2), ("official", 3), ("paper", 4)])
def test_inclusion_frequencies(mode, L):
    B, T = 40000, 1.0
    s, t, qt, kw, P, c = _sampling_setup(mode, B)
    w = np.array([math.exp(c[j] / T) for j in P])
    inc = _inclusion_exact(w, L)
    sel = R.select(s, t, qt, L=L, T=T, mode=mode, seed=123, row_ids=torch.arange(B), **kw)
    freq = np.bincount(sel.sampled.flatten().numpy(), minlength=9)[:6] / B
    sd = np.sqrt(inc * (1 - inc) / B)
    assert np.all(np.abs(freq - inc) < 5 * sd + 1e-9), (freq, inc)
    # a user's sample does not depend on the seed alone: another seed gives other samples
    other = R.select(s, t, qt, L=L, T=T, mode=mode, seed=124, row_ids=torch.arange(B), **kw)
    assert (other.sampled != sel.sampled).any()


def test_sample_depends_on_row_id_not_batch_position():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    users = torch.tensor([11, 3, 42, 7, 5, 9])
    full = R.select(s, t, K=5, M=20, L=8, seed=3, row_ids=users)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    part = R.select(s[perm], t[perm], K=5, M=20, L=8, seed=3, row_ids=users[perm])
    assert torch.equal(part.sampled, full.sampled[perm])
    default = R.select(s, t, K=5, M=20, L=8, seed=3)
    assert torch.equal(default.sampled, R.select(s, t, K=5, M=20, L=8, seed=3, row_ids=torch.arange(6)).sampled)


# ----------------------------------------------------------------------- gradients
def test_gradcheck_dense_float64():
    g = torch.Generator().manual_seed(1)
    for mode in ("paper", "official"):
        s = torch.randn(3, 30, dtype=torch.float64, generator=g, requires_grad=True)
        t = torch.randn(3, 30, dtype=torch.float64, generator=g)
        f = lambda x: R.rce_kd_loss(x, t, K=4, M=12, L=5, T=2.0, beta=3.0, tau=0.7, mode=mode,
                                    reduction="none")
        assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


def test_gradcheck_gathered_float64():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 40, dtype=torch.float64, generator=g)
    t = torch.randn(4, 40, dtype=torch.float64, generator=g)
    sel = R.select(s, t, K=5, M=15, L=6, mode="official")
    sg = s.gather(1, sel.indices).clone().requires_grad_()
    tg = t.gather(1, sel.indices)
    f = lambda x: R.rce_kd_loss_gathered(x, tg, sel, tau=1.3, reduction="none")
    assert torch.autograd.gradcheck(f, (sg,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 30, generator=g, requires_grad=True)
    t = torch.randn(5, 30, generator=g)
    kw = dict(K=4, M=10, L=5, seed=9)
    rows = R.rce_kd_loss(s, t, reduction="none", **kw)
    out = R.rce_kd_loss(s, t, reduction=reduction, **kw)
    want = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(out, want)
    up = torch.randn(out.shape, generator=g)  # non-uniform upstream gradient
    (gs,) = torch.autograd.grad(out, s, up)
    c = dict(s=s.detach().numpy(), t=t.numpy(), excl=None, qt=None, K=4, M=10, L=5, tau=1.0, T=10.0,
             beta=5.0, mode="paper", seed=9, rows=np.arange(5))
    want_rows = oracle_rows(c)
    scale = {"mean": up.expand(5) / 5, "sum": up.expand(5), "none": up}[reduction]
    w = torch.tensor([[x * float(scale[b]) for x in r["grad"]] for b, r in enumerate(want_rows)])
    torch.testing.assert_close(gs, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- the authors' get_loss
def authors_get_loss(logit_S_itemS, logit_S_itemT, logit_S_int, logit_T_itemS, logit_T_itemT, logit_T_int,
                     itemS, itemT, item_int, beta):
    """The formula of the authors' released `get_loss` (official mode), restated
    here with plain exp and raw softmax denominators as their code computes it
    (logits already divided by tau)."""
    prob_T_itemS = torch.softmax(logit_T_itemS, -1)
    loss_itemS = -(prob_T_itemS * torch.log_softmax(logit_S_itemS, -1)).sum(-1)
    in_int = (itemT.unsqueeze(2) == item_int.unsqueeze(1)).any(2)
    in_S = (itemT.unsqueeze(2) == itemS.unsqueeze(1)).any(2)
    e_T_int, e_T_T = logit_T_int.exp(), logit_T_itemT.exp() * (~in_int) * (~in_S)
    prob_T_all = torch.cat([e_T_int, e_T_T], -1) / (e_T_int.sum(-1, keepdim=True) + e_T_T.sum(-1, keepdim=True))
    e_S_T = logit_S_itemT.exp() * (~in_int) * (~in_S)
    Z_S = logit_S_int.exp().sum(-1, keepdim=True) + e_S_T.sum(-1, keepdim=True)
    loss_itemT = -(prob_T_all * (torch.cat([logit_S_int, logit_S_itemT], -1) - Z_S.log())).sum(-1)
    weight = torch.exp(-beta * in_int.float().mean(-1))
    return ((1 - weight) * loss_itemS + weight * loss_itemT).sum()


@pytest.mark.parametrize("seed", range(5))
def test_official_equals_authors_get_loss(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, K, M, L, tau, beta = 6, 120, 10, 40, 12, 0.8, 3.0
    s = torch.randn(B, N, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, N, generator=g, dtype=torch.float64)
    sel = R.select(s, t, K=K, M=M, L=L, beta=beta, mode="official", seed=seed)
    d = lambda x, ids: x.gather(1, ids) / tau
    want = authors_get_loss(d(s, sel.student_topk), d(s, sel.teacher_topk), d(s, sel.sampled),
                            d(t, sel.student_topk), d(t, sel.teacher_topk), d(t, sel.sampled),
                            sel.student_topk, sel.teacher_topk, sel.sampled, beta)
    got_dense = R.rce_kd_loss(s, t, K=K, M=M, L=L, beta=beta, tau=tau, mode="official", seed=seed,
                              reduction="sum")
    got_gathered = R.rce_kd_loss_gathered(s.gather(1, sel.indices), t.gather(1, sel.indices), sel, tau=tau,
                                          reduction="sum")
    torch.testing.assert_close(got_dense, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_gathered, want, rtol=1e-10, atol=1e-10)
    (g_want,) = torch.autograd.grad(want, s)
    (g_got,) = torch.autograd.grad(got_dense, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["integers", "all_equal", "signed_zeros", "excluded", "k_is_n", "continuous"])
def test_ranked_topk_is_a_sort_by_score_then_index(case):
    """spec.ranked_topk against Python's sort by (-score, index), excluded items never taken: rows
    whose ties straddle the k-th place (repaired in index order) and rows where topk's set is forced."""
    g = torch.Generator().manual_seed(12)
    B, N, k = 9, 37, 8
    x = torch.randint(-2, 3, (B, N), generator=g).float()
    exclude = None
    if case == "all_equal":
        x[:4] = 1.0
    elif case == "signed_zeros":
        x = torch.where(torch.rand(B, N, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        x[:, :3] = torch.tensor([1.0, -1.0, 0.5])
    elif case == "excluded":
        exclude = torch.rand(B, N, generator=g) < 0.5
    elif case == "k_is_n":
        k = N
    elif case == "continuous":
        x = torch.randn(B, N, generator=g, dtype=torch.float64)
    got = spec.ranked_topk(x, k, exclude)
    for b in range(B):
        ok = [j for j in range(N) if exclude is None or not exclude[b, j]]
        rest = [j for j in range(N) if j not in ok]  # excluded items rank below all, by index
        want = (sorted(ok, key=lambda j: (-float(x[b, j]), j)) + rest)[:k]
        assert got[b].tolist() == want, (case, b)


def test_official_counts_equal_authors_weight_matrix():
    """The authors' counts: +1 at pool positions of teacher items, reversed cumsum, min 50."""
    g = torch.Generator().manual_seed(5)
    B, N, K, M = 8, 400, 100, 200
    s, t = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    pool = spec.ranked_topk(s, M, None)
    qt = spec.ranked_topk(t, K, None)
    w = torch.zeros(B, M)
    hit = (qt.unsqueeze(1) == pool.unsqueeze(2)).any(2)  # pool position holds a teacher item
    w[hit] += 1
    want = torch.minimum(torch.cumsum(w.flip(-1), -1).flip(-1), torch.tensor(50.0))
    got = spec.pool_counts(ref._positions(pool, qt), K, M, "official")
    assert torch.equal(got.float(), want)
    assert (want == 50).any()  # the cap is exercised


# -------------------------------------------------------- protocol, dtypes, edge cases
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_per_epoch_protocol_equals_dense(mode):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(7, 90, generator=g, requires_grad=True)
    t = torch.randn(7, 90, generator=g)
    kw = dict(K=6, M=20, L=9, beta=4.0, mode=mode, seed=11)
    chunks = [R.select(s[i:i + 3], t[i:i + 3], row_ids=torch.arange(i, min(i + 3, 7)), **kw) for i in (0, 3, 6)]
    sel = R.Selection.cat(chunks)
    assert len(sel) == 7
    batch = torch.tensor([5, 1, 2])
    sb = sel[batch]
    lg = R.rce_kd_loss_gathered(s[batch].gather(1, sb.indices), t[batch].gather(1, sb.indices), sb,
                                tau=0.9, reduction="none")
    ld = R.rce_kd_loss(s[batch], t[batch], row_ids=batch, tau=0.9, reduction="none", **kw)
    torch.testing.assert_close(lg, ld)
    (g1,) = torch.autograd.grad(lg.sum(), s)
    (g2,) = torch.autograd.grad(ld.sum(), s)
    torch.testing.assert_close(g1, g2)
    ids, mask = sb.union()
    for b in range(3):
        u = set(ids[b][mask[b]].tolist())
        assert u == set(sb.sampled[b].tolist()) | (set(sb.teacher_topk[b].tolist()) - set(sb.student_topk[b].tolist()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_use_float32_arithmetic(dtype):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 200, generator=g).to(dtype).requires_grad_()
    t = torch.randn(4, 200, generator=g).to(dtype)
    kw = dict(K=10, M=30, L=10, seed=1, reduction="none")
    loss = R.rce_kd_loss(s, t, **kw)
    s32 = s.detach().float().requires_grad_()
    want = R.rce_kd_loss(s32, t.float(), **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)
    loss.sum().backward()
    want.sum().backward()
    assert s.grad.dtype == dtype
    torch.testing.assert_close(s.grad, s32.grad.to(dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    s = torch.zeros(0, 30, requires_grad=True)
    t = torch.zeros(0, 30)
    loss = R.rce_kd_loss(s, t, K=3, M=6, L=2, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and float(loss.detach()) == 0.0
    loss.sum().backward()
    assert s.grad.shape == (0, 30)
    sel = R.select(s, t, K=3, M=6, L=2)
    assert sel.indices.shape == (0, 3 + 3 + 2)


def test_inputs_not_modified():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 40, generator=g, requires_grad=True)
    t = torch.randn(3, 40, generator=g)
    excl = torch.rand(3, 40, generator=g) < 0.3
    rows = torch.tensor([4, 5, 6])
    before = [x.detach().clone() for x in (s, t, excl, rows)]
    versions = [x._version for x in (s, t, excl, rows)]
    loss = R.rce_kd_loss(s, t, K=3, M=8, L=4, exclude=excl, row_ids=rows)
    loss.backward()
    for x, b, v in zip((s, t, excl, rows), before, versions):
        assert torch.equal(x.detach(), b) and x._version == v


def test_exclusion_never_selected_and_default_none():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(4, 60, generator=g), torch.randn(4, 60, generator=g)
    excl = torch.zeros(4, 60, dtype=torch.bool)
    excl[:, :20] = True
    sel = R.select(s, t, K=5, M=30, L=10, exclude=excl)
    assert (sel.indices >= 20).all()
    a = R.select(s, t, K=5, M=30, L=10)
    b = R.select(s, t, K=5, M=30, L=10, exclude=torch.zeros_like(excl))
    assert torch.equal(a.indices, b.indices)


def test_autograd_function_and_module_match_functional():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(4, 50, generator=g, requires_grad=True)
    t = torch.randn(4, 50, generator=g)
    rows = torch.arange(4)
    kw = dict(K=5, M=15, L=6, tau=1.0, T=10.0, beta=5.0, mode="paper", seed=3)
    f_rows = R.RCEKDFunction.apply(s, t, None, None, rows, 5, 15, 6, 1.0, 10.0, 5.0, "paper", 3, None, True)
    want = R.rce_kd_loss(s, t, reduction="none", **kw)
    torch.testing.assert_close(f_rows, want)
    (g1,) = torch.autograd.grad(f_rows.sum(), s)
    (g2,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g1, g2)
    mod = R.RCEKDLoss(K=5, M=15, L=6, seed=3)
    l0 = mod(s, t)
    l1 = mod(s, t)
    assert mod.step == 2
    torch.testing.assert_close(l0, R.rce_kd_loss(s, t, **kw))
    torch.testing.assert_close(l1, R.rce_kd_loss(s, t, **{**kw, "seed": 4}))
    assert set(mod.last_diagnostics) == {"L1", "L2", "gamma", "q1_frac", "qt_in_sampled_frac"}
    mod2 = R.RCEKDLoss(K=5, M=15, L=6, seed=3)
    mod2.load_state_dict(mod.state_dict())
    assert mod2.step == 2
    mod.eval()
    mod(s, t)
    assert mod.step == 2


def test_diagnostics_match_oracle():
    c = random_config(3)
    c.update(s=np.random.default_rng(0).normal(size=(4, 30)).astype(np.float32),
             t=np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32), excl=None, qt=None, K=5, M=12, L=6,
             rows=np.arange(4))
    want = oracle_rows(c)
    s, t, excl, qt, rows = tensors(c)
    _, d = R.rce_kd_loss(s, t, row_ids=rows, tau=c["tau"], return_diagnostics=True, **hp(c))
    assert float(d["L1"]) == pytest.approx(np.mean([w["L1"] for w in want]), rel=1e-5)
    assert float(d["L2"]) == pytest.approx(np.mean([w["L2"] for w in want]), rel=1e-5)
    assert float(d["gamma"]) == pytest.approx(np.mean([w["gamma"] for w in want]), rel=1e-5)
    assert float(d["q1_frac"]) == pytest.approx(np.mean([w["n_q1"] for w in want]) / 5)
    assert float(d["qt_in_sampled_frac"]) == pytest.approx(np.mean([w["n_qt_a"] for w in want]) / 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("i", range(0, 240, 4))
def test_reference_on_cuda_matches_oracle(i):
    """The reference on CUDA tensors: same sets as the oracle, same loss and gradient."""
    c = random_config(i)
    want = oracle_rows(c)
    s, t, excl, qt, rows = tensors(c)
    cu = lambda x: None if x is None else x.detach().cuda()
    s_cu = cu(s).requires_grad_()
    sel = R.select(s_cu, cu(t), cu(qt), row_ids=cu(rows), exclude=cu(excl), backend="reference", **hp(c))
    loss = R.rce_kd_loss(s_cu, cu(t), cu(qt), row_ids=cu(rows), exclude=cu(excl), tau=c["tau"], reduction="sum",
                         backend="reference", **hp(c))
    loss.backward()
    for b, w in enumerate(want):
        assert sel.student_topk[b].tolist() == w["QS"] and sel.sampled[b].tolist() == w["A"]
    assert float(loss) == pytest.approx(sum(w["loss"] for w in want), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s_cu.grad.cpu().double(), torch.tensor([w["grad"] for w in want], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("i", range(0, 240, 6))
def test_select_from_pool_equals_select(i):
    """The sets from a pool ranked elsewhere are those of select on the dense rows (the oracle's
    configurations: ties, exclusion, given QT), and the oracle's."""
    c = random_config(i)
    s, t, excl, qt, rows = tensors(c)
    kw = dict(K=c["K"], M=c["M"], L=c["L"], T=c["T"], beta=c["beta"], mode=c["mode"], seed=c["seed"], row_ids=rows)
    want = R.select(s, t, qt, exclude=excl, **kw)
    pool = spec.ranked_topk(s.detach(), c["M"], excl)
    qt_ = spec.ranked_topk(t, c["K"], excl) if qt is None else qt
    got = R.select_from_pool(pool, qt_, **kw)
    for f in ("indices", "q2_mask", "gamma", "n_q1", "n_qt_sampled"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    for b, w in enumerate(oracle_rows(c)):
        assert got.sampled[b].tolist() == w["A"]


def test_select_from_pool_checks():
    pool = torch.tensor([[3, 1, 2, 0], [0, 1, 2, 3]])
    qt = torch.tensor([[1, 2], [0, 5]])
    R.select_from_pool(pool, qt, K=2, M=4, L=2)
    with pytest.raises(ValueError, match="pool must be int64 of shape"):
        R.select_from_pool(pool[:, :3], qt, K=2, M=4, L=2)
    with pytest.raises(ValueError, match="pool has a repeated id in row 1"):
        R.select_from_pool(torch.tensor([[3, 1, 2, 0], [0, 1, 1, 3]]), qt, K=2, M=4, L=2)
    with pytest.raises(ValueError, match="negative id"):
        R.select_from_pool(torch.tensor([[3, 1, 2, -1], [0, 1, 2, 3]]), qt, K=2, M=4, L=2)
    with pytest.raises(TypeError, match="pool"):
        R.select_from_pool(pool.tolist(), qt, K=2, M=4, L=2)
    with pytest.raises(ValueError, match="does not implement sets_from_pool"):
        R.select_from_pool(pool, qt, K=2, M=4, L=2, backend="cpp")
