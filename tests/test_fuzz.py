"""Property-based tests (hypothesis) of every public entry point on every backend available.

* valid calls: a finite result equal to the reference's (and, for the reference, to the
  brute-force oracle of the spec), or, for a call a backend does not support, a refusal;
* invalid calls (one argument spoiled: a wrong Python type, None, a numpy array, a value out
  of range, NaN, a wrong shape or dtype): a TypeError or ValueError naming the argument,
  never another exception;
* direct calls of the registered ops with bad arguments, and validate=False with bad data,
  in a subprocess, so that a crash (a segmentation fault, an abort) fails the test instead of
  killing the run.

The examples are derandomised (the same in every run); their numbers per backend are set so
that the whole file stays within a minute or two of CI time.
"""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import rcekd_kernels as R
from rcekd_kernels import backends, spec

import conformance as C

HERE = C.available_backends()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = C.DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def examples(name: str, n: int) -> int:
    return max(4, n // 8) if name == "triton" and INTERPRETED else n


def fuzz_settings(n):
    # no shrinking: a failing example is reported as drawn (shrinking through the Triton
    # interpreter takes many minutes)
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- valid cases
@st.composite
def valid_cases(draw, small: bool = False):
    """A valid call: tensors, an RCEKDConfig and a seed (a conformance case)."""
    B = draw(st.integers(0 if not small else 1, 3 if small else 6))
    N = draw(st.integers(1, 12 if small else 60))
    M = draw(st.integers(1, N))
    K = draw(st.integers(1, M))
    L = draw(st.integers(1, M))
    dtype = torch.float32 if small else draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16,
                                                              torch.float64]))
    tau = draw(st.sampled_from([1e-6, 1e-3, 0.5, 1.0, 7.0, 1e6]))
    limit = min(1e30 * tau, 6e4 if dtype == torch.float16 else 1e30)
    kind = draw(st.sampled_from(["normal", "ties", "huge", "subnormal", "zeros"]))
    g = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        s, t = g.normal(size=(2, B, N)) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    elif kind == "ties":
        s, t = np.round(g.normal(size=(2, B, N)) * 2) / 2
    elif kind == "huge":  # up to the accepted range |score| / tau <= 1e30
        s, t = g.uniform(-1, 1, size=(2, B, N)) * limit
    elif kind == "subnormal":  # float32 / bfloat16 subnormals, signed zeros
        s, t = g.choice([1e-40, -1e-40, 3e-39, -3e-39, 0.0, -0.0, 1e-45], size=(2, B, N))
    else:
        s, t = np.zeros((B, N)), np.where(g.random((B, N)) < 0.5, -0.0, 0.0)
    s = torch.tensor(np.clip(s, -limit, limit)).to(dtype).to(C.DEVICE)
    t = torch.tensor(np.clip(t, -limit, limit)).to(dtype).to(C.DEVICE)
    exclude = None
    if N > M and draw(st.booleans()):
        order = torch.tensor(g.permutation(N * max(B, 1))[:B * N].reshape(B, N) % N) if B else torch.zeros(0, N)
        n_ex = torch.tensor(g.integers(0, N - M + 1, size=(B, 1)))
        exclude = (order < n_ex).to(C.DEVICE) if B else torch.zeros(0, N, dtype=torch.bool, device=C.DEVICE)
    teacher_topk = None
    if draw(st.booleans()) and B:
        other = torch.tensor(g.normal(size=(B, N)), dtype=torch.float32)
        teacher_topk = spec.ranked_topk(other, K, None if exclude is None else exclude.cpu()).to(C.DEVICE)
    rows = torch.tensor(g.integers(-(2**40), 2**40, size=B), dtype=torch.int64, device=C.DEVICE)
    cfg = R.RCEKDConfig(K=K, M=M, L=L, tau=tau, T=draw(st.sampled_from([1e-6, 0.1, 10.0, 1e6])),
                        beta=draw(st.sampled_from([0.0, 3.0, 1e6])), mode=draw(st.sampled_from(["paper", "official"])))
    seed = draw(st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 2**32 - 1, 2**32, -1])))
    return dict(s=s, t=t, teacher_topk=teacher_topk, exclude=exclude, row_ids=rows, cfg=cfg, seed=seed % 2**32,
                raw_seed=seed)


def _finite(*xs):
    for x in xs:
        assert bool(torch.isfinite(x.double()).all()), x


@pytest.mark.parametrize("name", HERE)
def test_valid_calls_are_finite_and_agree(name):
    """Random valid calls: finite losses and gradients; other backends equal to the reference
    (sets exactly, numbers to float rounding) or refused with a reason."""

    @fuzz_settings(examples(name, 60))
    @given(valid_cases())
    def check(case):
        if name == "reference":
            w = torch.linspace(0.5, 2.0, max(case["s"].shape[0], 1), device=C.DEVICE)[:case["s"].shape[0]]
            out = C.api_outputs("reference", dict(case, seed=case["raw_seed"]), w)
            _finite(out["loss"], out["grad"], out["gathered"], out["gathered_grad"])
        elif case["s"].shape[0]:
            C.compare_ops(name, case)

    check()


def _oracle_config(case):
    return dict(s=case["s"].cpu().float().numpy(), t=case["t"].cpu().float().numpy(),
                excl=None if case["exclude"] is None else case["exclude"].cpu().numpy(),
                qt=None if case["teacher_topk"] is None else case["teacher_topk"].cpu().numpy(),
                K=case["cfg"].K, M=case["cfg"].M, L=case["cfg"].L, tau=case["cfg"].tau, T=case["cfg"].T,
                beta=case["cfg"].beta, mode=case["cfg"].mode, seed=case["seed"],
                rows=case["row_ids"].cpu().numpy())


@fuzz_settings(40)
@given(valid_cases(small=True))
def test_reference_equals_the_oracle_on_fuzzed_inputs(case):
    """Huge, subnormal, tied and zero scores, extreme temperatures and beta: the reference is the
    oracle (sets exact, loss and gradient to 1e-5)."""
    c = _oracle_config(case)
    if c["tau"] < 1e-3 or c["T"] < 1e-3 or max(abs(float(np.abs(c["s"]).max())), 1.0) > 1e6:
        return  # the float64 oracle and the float32 reference part ways in the last bits there
    C.assert_matches_oracle(c, backend="reference")


# ----------------------------------------------------------------------------- invalid cases
def _spoilers(case):
    """(what, how the call changes, the word the message must hold): bad arguments a user might pass."""
    s, t, B, N = case["s"], case["t"], case["s"].shape[0], case["s"].shape[1]
    K = case["cfg"].K
    dev = C.DEVICE
    return [
        ("student list", dict(student_scores=s.tolist()), "student_scores"),
        ("student numpy", dict(student_scores=s.float().cpu().numpy()), "student_scores"),
        ("student None", dict(student_scores=None), "student_scores"),
        ("teacher None", dict(teacher_scores=None), "teacher_scores"),
        ("teacher str", dict(teacher_scores="t"), "teacher_scores"),
        ("teacher shape", dict(teacher_scores=t[:, :-1] if N > 1 else t[:0]), "teacher_scores"),
        ("student int", dict(student_scores=torch.ones(B, N, dtype=torch.int32, device=dev)), "student_scores"),
        ("student 1-D", dict(student_scores=s.reshape(-1)), "student_scores"),
        ("topk list", dict(teacher_topk=[[0] * K] * B), "teacher_topk"),
        ("topk int32", dict(teacher_topk=torch.zeros(B, K, dtype=torch.int32, device=dev)), "teacher_topk"),
        ("exclude float", dict(exclude=torch.zeros(B, N, device=dev)), "exclude"),
        ("exclude numpy", dict(exclude=np.zeros((B, N), dtype=bool)), "exclude"),
        ("row_ids list", dict(row_ids=list(range(B))), "row_ids"),
        ("row_ids float", dict(row_ids=torch.zeros(B, device=dev)), "row_ids"),
        ("K 0", dict(K=0), "K"),
        ("K float", dict(K=1.5), "K"),
        ("K str", dict(K="3"), "K"),
        ("M > N", dict(M=N + 1), "M"),
        ("L 0", dict(L=0), "L"),
        ("tau 0", dict(tau=0.0), "tau"),
        ("tau tiny", dict(tau=1e-40), "tau"),
        ("tau nan", dict(tau=float("nan")), "tau"),
        ("tau str", dict(tau="1"), "tau"),
        ("T huge", dict(T=1e39), "T"),
        ("beta huge", dict(beta=1e39), "beta"),
        ("beta negative", dict(beta=-1.0), "beta"),
        ("mode", dict(mode="Paper"), "mode"),
        ("mode int", dict(mode=0), "mode"),
        ("reduction", dict(reduction="avg"), "reduction"),
        ("seed float", dict(seed=1.5), "seed"),
        ("seed str", dict(seed="1"), "seed"),
        ("backend int", dict(backend=3), "backend"),
        ("backend unknown", dict(backend="cudnn"), "backend"),
        ("config dict", dict(config={"K": 3}), "config"),
    ]


_DATA_SPOILERS = [  # bad data, caught when validate=True
    ("nan score", lambda s: s.index_fill(1, torch.tensor([0], device=s.device), float("nan"))),
    ("inf score", lambda s: s.index_fill(1, torch.tensor([0], device=s.device), float("inf"))),
    ("score beyond 1e30 tau", lambda s: s.double().index_fill(1, torch.tensor([0], device=s.device), 3e38)),
]


def _call(entry: str, case, name, **over):
    kw = dict(student_scores=case["s"], teacher_scores=case["t"], teacher_topk=case["teacher_topk"],
              exclude=case["exclude"], row_ids=case["row_ids"], K=case["cfg"].K, M=case["cfg"].M, L=case["cfg"].L,
              tau=case["cfg"].tau, T=case["cfg"].T, beta=case["cfg"].beta, mode=case["cfg"].mode, seed=case["seed"],
              backend=name)
    kw.update(over)
    if entry == "rce_kd_loss":
        return R.rce_kd_loss(**kw)
    if entry == "select":
        kw.pop("reduction", None)
        return R.select(**kw)
    if entry == "module":
        hp = {k: kw.pop(k) for k in ("K", "M", "L", "tau", "T", "beta", "mode", "seed", "backend", "reduction")
              if k in kw}
        if "config" in kw:
            hp["config"] = kw.pop("config")
        mod = R.RCEKDLoss(**hp)
        return mod(kw["student_scores"], kw["teacher_scores"], kw["teacher_topk"], row_ids=kw["row_ids"],
                   exclude=kw["exclude"])
    if entry == "function":
        if "config" in kw or "reduction" in kw:
            raise ValueError("config / reduction are not RCEKDFunction arguments")  # stands for the refusal
        return R.RCEKDFunction.apply(kw["student_scores"], kw["teacher_scores"], kw["teacher_topk"], kw["exclude"],
                                     kw["row_ids"], kw["K"], kw["M"], kw["L"], kw["tau"], kw["T"], kw["beta"],
                                     kw["mode"], kw["seed"], kw["backend"], True)
    raise AssertionError(entry)


@pytest.mark.parametrize("name", HERE)
def test_invalid_calls_raise_clear_errors(name):
    """One spoiled argument, through every entry point: a TypeError or a ValueError naming the
    argument (never a schema error of the op dispatcher, never a crash)."""

    @fuzz_settings(examples(name, 80))
    @given(valid_cases(), st.data())
    def check(case, data):
        if case["s"].shape[0] == 0:
            return
        entry = data.draw(st.sampled_from(["rce_kd_loss", "select", "module", "function"]))
        what, over, word = data.draw(st.sampled_from(_spoilers(case)))
        if entry == "select" and what in ("reduction", "teacher None"):
            return  # select takes no reduction; its teacher scores are optional with teacher_topk
        with pytest.raises((TypeError, ValueError)) as e:
            _call(entry, case, name, **over)
        msg = str(e.value)
        assert word in msg or (entry == "function" and what in ("reduction", "config dict")), (entry, what, msg)

    check()


@pytest.mark.parametrize("name", HERE)
def test_bad_data_is_refused_when_validated(name):
    @fuzz_settings(examples(name, 24))
    @given(valid_cases(), st.sampled_from(_DATA_SPOILERS), st.sampled_from(["student_scores", "teacher_scores"]))
    def check(case, spoil, which):
        if case["s"].shape[0] == 0:
            return
        key = "s" if which == "student_scores" else "t"
        x = case[key]
        if spoil[0] == "score beyond 1e30 tau" and x.dtype == torch.float16:
            return  # float16 cannot hold it (it would be inf: the nan/inf spoilers cover that)
        bad = spoil[1](x).to(x.dtype)
        with pytest.raises(ValueError, match=which):
            _call("rce_kd_loss", case, name, **{which: bad})

    check()


def test_gathered_loss_and_gathered_dot_check_their_inputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 30, generator=g), torch.randn(3, 30, generator=g)
    sel = R.select(s, t, K=3, M=8, L=4)
    sg, tg = s.gather(1, sel.indices), t.gather(1, sel.indices)
    bad = [
        (dict(student_gathered=sg.clone().index_fill(1, torch.tensor([2]), float("nan"))), "student_gathered"),
        (dict(teacher_gathered=tg.clone().index_fill(1, torch.tensor([2]), float("inf"))), "teacher_gathered"),
        (dict(student_gathered=sg.tolist()), "student_gathered"),
        (dict(teacher_gathered=None), "teacher_gathered"),
        (dict(selection=R.Selection(sel.indices, sel.q2_mask, sel.gamma * 3, sel.n_q1, sel.n_qt_sampled)), "gamma"),
        (dict(selection=sel[:2]), "q2_mask"),
        (dict(tau=-1.0), "tau"),
    ]
    for over, word in bad:
        kw = dict(student_gathered=sg, teacher_gathered=tg, selection=sel)
        kw.update(over)
        with pytest.raises((TypeError, ValueError), match=word):
            R.rce_kd_loss_gathered(kw.pop("student_gathered"), kw.pop("teacher_gathered"), kw.pop("selection"), **kw)
    u, v = torch.randn(3, 4), torch.randn(10, 4)
    for args, word in (((u.tolist(), v, sel.indices), "user_vecs"), ((u, None, sel.indices), "item_vecs"),
                       ((u, v, sel.indices.numpy()), "idx")):
        with pytest.raises((TypeError, ValueError), match=word):
            R.gathered_dot(*args)


def test_seed_is_taken_modulo_2_32_whatever_its_size():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    for seed in (7, 2**40 + 7, -(2**32) + 7, 2**100 + 7):
        a = R.select(s, t, K=4, M=10, L=5, seed=seed)
        b = R.select(s, t, K=4, M=10, L=5, seed=7 % 2**32 if seed >= 0 else seed % 2**32)
        assert torch.equal(a.indices, b.indices)
    assert torch.equal(R.select(s, t, K=4, M=10, L=5, seed=2**100 + 7).indices,
                       R.select(s, t, K=4, M=10, L=5, seed=7).indices)
    mod = R.RCEKDLoss(K=4, M=10, L=5, seed=2**80)
    assert torch.equal(mod(s, t), R.rce_kd_loss(s, t, K=4, M=10, L=5, seed=2**80 % 2**32))


# ----------------------------------------------------------------------------- crashes
_CRASH_SCRIPT = r"""
import math, sys, torch
import rcekd_kernels as R
from rcekd_kernels import ops
names = sys.argv[1].split(",")
g = torch.Generator().manual_seed(0)
B, N, K, M, L = 3, 40, 4, 10, 5
hp = ops.flatten(R.RCEKDConfig(K=K, M=M, L=L))
s, t = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
rows = torch.arange(B)
n_ok = n_err = 0
def attempt(f):
    global n_ok, n_err
    try:
        out = f()
    except (RuntimeError, ValueError, TypeError, IndexError):
        n_err += 1
        return
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        if o.dtype.is_floating_point:
            assert bool(torch.isfinite(o).all()), o  # memory-safe and finite, if not refused
        elif o.dtype == torch.int64 and o.dim() == 2 and o.shape[1] in (2 * K + L,):
            assert bool(((o >= 0) & (o < N)).all()), o  # ids inside the row
    n_ok += 1
few = torch.ones(B, N, dtype=torch.bool); few[:, :M - 2] = False      # fewer than M eligible items
for name in names:
    for bad_topk in (torch.full((B, K), 10**12), torch.full((B, K), -5), torch.full((B, K), N + 3)):
        bad_topk = bad_topk + torch.arange(K)
        attempt(lambda: ops.fused_fwd(s, t, bad_topk, None, rows, *hp, 0, name, False))
        attempt(lambda: ops.select(s, None, bad_topk, None, rows, *hp, 0, name, False))
    attempt(lambda: ops.fused_fwd(s, t, None, few, rows, *hp, 0, name, False))
    attempt(lambda: ops.select(s, t, None, few, rows, *hp, 0, name, False))
    W = 2 * K + L
    for bad_idx in (torch.full((B, W), 10**12), torch.full((B, W), -1), torch.randint(0, N, (B, W))):
        attempt(lambda: ops.fused_bwd(torch.ones(B), s, t, bad_idx, torch.ones(B, K, dtype=torch.bool),
                                      torch.ones(B), *hp, name))
    # shapes that disagree with K, L and B
    attempt(lambda: ops.fused_bwd(torch.ones(B + 1), s, t, torch.zeros(B, W, dtype=torch.long),
                                  torch.ones(B, K, dtype=torch.bool), torch.ones(B), *hp, name))
    attempt(lambda: ops.fused_bwd(torch.ones(B), s, t, torch.zeros(B, W - 1, dtype=torch.long),
                                  torch.ones(B, K, dtype=torch.bool), torch.ones(B), *hp, name))
    attempt(lambda: ops.subset_ce_bwd(torch.ones(B), torch.randn(B, W + 2), torch.randn(B, W + 2),
                                      torch.ones(B, K, dtype=torch.bool), torch.ones(B), *hp, name))
    attempt(lambda: ops.subset_ce_fwd(torch.randn(B, W), torch.randn(B, W), torch.ones(B, K + 1, dtype=torch.bool),
                                      torch.ones(B), *hp, name, False))
    if name in ("reference", "cpp"):
        attempt(lambda: ops.gathered_dot(torch.randn(B, 4), torch.randn(N, 4), torch.full((B, 3), 10**12), name, False))
if "cpp" in names:
    op = torch.ops.rcekd_C
    chp = hp + (0,)
    attempt(lambda: op.select(s, t, torch.full((B, K), 10**12), None, rows, *chp))
    attempt(lambda: op.fused_bwd(torch.ones(B), s, t, torch.full((B, 2 * K + L), -9),
                                 torch.ones(B, K, dtype=torch.bool), torch.ones(B), *chp))
    attempt(lambda: op.subset_ce_fwd(torch.randn(B, 3), torch.randn(B, 3), torch.ones(B, K, dtype=torch.bool),
                                     torch.ones(B), *chp))
    attempt(lambda: op.fused_fwd(s, t, None, None, rows, 4, 3, 2, 1.0, 1.0, 1.0, "paper", 0))
    attempt(lambda: op.gathered_dot(torch.randn(B, 4), torch.randn(N, 4), torch.full((B, 3), 10**12)))
    attempt(lambda: op.gathered_dot_bwd(torch.randn(B, 2), torch.randn(B, 4), torch.randn(N, 4),
                                        torch.zeros(B, 3, dtype=torch.long)))
print("ok", n_ok, n_err)
"""


def test_direct_op_calls_and_unvalidated_bad_data_do_not_crash():
    """In a subprocess: made-up ids (10^12, negative, past N), rows with fewer than M eligible items
    under validate=False, backward ops whose shapes disagree with K, L and B, direct calls of the C++
    ops: every call raises or returns finite values and ids inside the rows; the process survives."""
    names = [n for n in HERE if n != "cuda"] if C.DEVICE == "cpu" else HERE
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASH_SCRIPT), ",".join(names)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    n_ok, n_err = map(int, r.stdout.split()[1:3])
    assert n_ok + n_err > 0


def test_rows_with_too_few_items_agree_without_validation():
    """validate=False and a row with fewer than M eligible items: every backend ranks the excluded
    items last, by id, so the sets agree (docs/LOSS.md)."""
    g = torch.Generator().manual_seed(3)
    B, N, K, M, L = 3, 40, 4, 12, 6
    s, t = torch.randn(B, N, generator=g).to(C.DEVICE), torch.randn(B, N, generator=g).to(C.DEVICE)
    ex = torch.zeros(B, N, dtype=torch.bool, device=C.DEVICE)
    ex[:, 5:] = True  # 5 eligible items < M
    cfg = R.RCEKDConfig(K=K, M=M, L=L)
    want = backends.get("reference").select(s, t, None, ex, torch.arange(B, device=C.DEVICE), cfg, 1)
    for name in HERE:
        got = backends.get(name).select(s, t, None, ex, torch.arange(B, device=C.DEVICE), cfg, 1)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b.cpu()), name
        assert math.isfinite(float(R.rce_kd_loss(s, t, config=cfg, exclude=ex, backend=name, validate=False)))


# --------------------------------------------------------------- the entry points from embeddings (issue 12)
TOPM = [n for n in HERE if backends.unsupported_reason(
    n, backends.Call("topm_dot", C.DEVICE, (torch.float32,), None, 100, 10)) is None]


@st.composite
def embedding_cases(draw):
    """A valid call from embeddings: small-integer vectors (every product exact in float32, many ties), an
    optional sparse exclusion that leaves at least M items per row, the teacher's top-K given or not."""
    B, N, D, Dt = draw(st.integers(1, 5)), draw(st.integers(2, 40)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    M = draw(st.integers(1, N))
    K, L = draw(st.integers(1, M)), draw(st.integers(1, M))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=g).to(dtype).to(C.DEVICE)
    u, v, tu, tv = ints(B, D), ints(N, D), ints(B, Dt), ints(N, Dt)
    mask = None
    if draw(st.booleans()) and N > M:
        mask = torch.zeros(B, N, dtype=torch.bool)
        for b in range(B):
            mask[b, torch.randperm(N, generator=g)[:draw(st.integers(0, N - M))]] = True
        mask = mask.to(C.DEVICE)
    qt = spec.ranked_topk(tu @ tv.T, K, mask) if draw(st.booleans()) else None
    kw = dict(K=K, M=M, L=L, tau=draw(st.sampled_from([0.3, 1.0, 4.0])), T=draw(st.sampled_from([0.5, 10.0])),
              beta=draw(st.sampled_from([0.0, 3.0])), mode=draw(st.sampled_from(["paper", "official"])),
              seed=draw(st.integers(0, 2 ** 70)))
    return dict(u=u, v=v, tu=tu, tv=tv, mask=mask, qt=qt, kw=kw)


@pytest.mark.parametrize("name", TOPM)
def test_embedding_entry_points_equal_the_dense_api(name):
    """Random valid calls of select_embeddings / rce_kd_loss_embeddings / topm_dot: the dense API's sets on
    U @ V.T exactly, its loss rows and the vectors' gradients to float rounding."""

    @fuzz_settings(examples(name, 40))
    @given(embedding_cases())
    def check(c):
        u, v, tu, tv, mask, qt, kw = c["u"], c["v"], c["tu"], c["tv"], c["mask"], c["qt"], c["kw"]
        ex = R.csr_exclusion(mask) if mask is not None else None
        cfg = {k: x for k, x in kw.items() if k != "tau"}
        if backends.unsupported_reason(name, backends.Call("topm_dot", C.DEVICE, (u.dtype,), None, 100, 10)):
            with pytest.raises(ValueError, match="cannot run topm_dot"):  # refused with the reason (triton: float64)
                R.select_embeddings(u, v, qt, teacher_user_vecs=tu, teacher_item_vecs=tv, backend=name, **cfg)
            return
        want = R.select(u @ v.T, tu @ tv.T, qt, exclude=mask, backend="reference", **cfg)
        got = R.select_embeddings(u, v, qt, teacher_user_vecs=tu, teacher_item_vecs=tv, exclude=ex, backend=name,
                                  **cfg)
        for f in ("indices", "q2_mask", "gamma", "n_q1", "n_qt_sampled"):
            assert torch.equal(getattr(got, f).cpu(), getattr(want, f).cpu()), f
        ids, scores = R.topm_dot(u, v, kw["M"], exclude=ex, backend=name)
        assert torch.equal(ids.cpu(), spec.ranked_topk((u @ v.T).float(), kw["M"], mask).cpu().long())
        uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
        rows = R.rce_kd_loss_embeddings(uu, vv, qt, teacher_user_vecs=tu, teacher_item_vecs=tv, exclude=ex,
                                        reduction="none", backend=name, **kw)
        ud, vd = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
        want_rows = R.rce_kd_loss(ud @ vd.T, tu @ tv.T, qt, exclude=mask, reduction="none", backend="reference",
                                  **kw)
        _finite(rows.detach())
        tol = dict(rtol=1e-5, atol=1e-5) if u.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(rows.detach(), want_rows.detach(), **tol)
        w = torch.linspace(0.5, 2.0, u.shape[0], dtype=u.dtype, device=u.device)
        (rows * w).sum().backward()
        (want_rows * w).sum().backward()
        torch.testing.assert_close(uu.grad, ud.grad, **tol)
        torch.testing.assert_close(vv.grad, vd.grad, **tol)

    check()


def _embedding_spoilers(c):
    u, v, qt = c["u"], c["v"], c["qt"]
    B, N = u.shape[0], v.shape[0]
    zero = torch.zeros(B + 1, dtype=torch.int64, device=u.device)
    return [
        ("user_vecs list", dict(user_vecs=u.tolist()), "user_vecs"),
        ("item_vecs numpy", dict(item_vecs=v.cpu().numpy()), "item_vecs"),
        ("item_vecs other D", dict(item_vecs=torch.cat([v, v], 1)), "D"),
        ("item_vecs other dtype", dict(item_vecs=v.to(torch.float16 if v.dtype != torch.float16 else torch.float32)),
         "dtype"),
        ("user_vecs 3-D", dict(user_vecs=u.unsqueeze(0)), "2-D"),
        ("M zero", dict(M=0), "M"),
        ("K above M", dict(K=c["kw"]["M"] + 1), "K"),
        ("exclude a mask", dict(exclude=torch.zeros(B, N, dtype=torch.bool, device=u.device)), "exclude"),
        ("exclude offsets short", dict(exclude=(zero[:-1], zero[:0])), "offsets"),
        ("exclude offsets decreasing", dict(exclude=(torch.cat([zero[:-1], zero[-1:] - 1]), zero[:0])), "offsets"),
        ("exclude ids float", dict(exclude=(zero, zero[:0].float())), "exclude"),
        ("teacher_topk float", dict(teacher_topk=torch.zeros(B, c["kw"]["K"], device=u.device)), "teacher_topk"),
        ("teacher_topk out of range", dict(teacher_topk=torch.full((B, c["kw"]["K"]), N, dtype=torch.int64,
                                                                   device=u.device)), "teacher_topk"),
        ("teacher_topk wrong rows", dict(teacher_topk=torch.zeros(B + 1, c["kw"]["K"], dtype=torch.int64,
                                                                  device=u.device)), "teacher_topk"),
        ("seed a float", dict(seed=1.5), "seed"),
        ("row_ids wrong length", dict(row_ids=torch.arange(B + 1, device=u.device)), "row_ids"),
    ] + ([("qt none and no teacher vectors", dict(teacher_topk=None, teacher_user_vecs=None), "teacher")]
         if qt is not None else [])


@pytest.mark.parametrize("name", TOPM)
def test_embedding_entry_points_raise_clear_errors(name):
    """One spoiled argument of select_embeddings / rce_kd_loss_embeddings / topm_dot: a TypeError or
    ValueError naming it (never a schema error, never a crash)."""

    @fuzz_settings(examples(name, 60))
    @given(embedding_cases(), st.data())
    def check(c, data):
        if backends.unsupported_reason(name, backends.Call("topm_dot", C.DEVICE, (c["u"].dtype,), None, 100, 10)):
            c = {k: (x.float() if k in ("u", "v", "tu", "tv") else x) for k, x in c.items()}  # triton: no float64
        what, over, word = data.draw(st.sampled_from(_embedding_spoilers(c)))
        entry = data.draw(st.sampled_from(["select_embeddings", "rce_kd_loss_embeddings", "topm_dot"]))
        args = dict(user_vecs=c["u"], item_vecs=c["v"], teacher_topk=c["qt"], teacher_user_vecs=c["tu"],
                    teacher_item_vecs=c["tv"], exclude=None, backend=name, **c["kw"])
        if "tau" in args and entry == "select_embeddings":
            args.pop("tau")
        args.update(over)
        if entry == "topm_dot":
            if not any(k in over for k in ("user_vecs", "item_vecs", "M", "exclude")):
                return
            with pytest.raises((TypeError, ValueError)) as e:
                R.topm_dot(args["user_vecs"], args["item_vecs"], args["M"], exclude=args["exclude"], backend=name)
        else:
            fn = getattr(R, entry)
            pos = [args.pop("user_vecs"), args.pop("item_vecs"), args.pop("teacher_topk")]
            with pytest.raises((TypeError, ValueError)) as e:
                fn(*pos, **args)
        assert word.lower() in str(e.value).lower(), (entry, what, str(e.value))

    check()
