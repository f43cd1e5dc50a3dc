"""The conformance kit: one case generator and one set of comparisons for every backend.

A backend conforms when, on every call it supports, its ops give what the reference
gives (and so, by tests/test_reference.py, what the brute-force oracle of the spec
gives): the sets exactly (ids and order), the losses, statistics and gradients to
float rounding; and when, on every call it does not support, the dispatcher says so
(an explicit ``backend=`` raises a ValueError with the backend's reason, ``auto``
passes the call on). tests/test_conformance.py runs these checks for every backend
available on the machine: a new backend gets every test by being registered.

Sampling: the Gumbel numbers are float64 on every backend and the keys float32(c/T + g),
so backends agree unless a float64 key lies within a last-bit log difference of a
float32 rounding boundary. A row whose reference keys are within a few float32 ulps
(a near-tie at the sample boundary or inside the sample) may legitimately get another
sample; such rows are excused from the exact comparison of the sample-dependent
outputs, and counted (they must be rare).
"""
from __future__ import annotations

import random
from typing import Dict, Optional

import numpy as np
import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels import backends, rng, spec
from rcekd_kernels.backends import Call
from rcekd_kernels.backends import reference as ref
from rcekd_kernels.config import RCEKDConfig

import oracle

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(device: str = DEVICE):
    """The backends that can run on ``device`` here (reference first)."""
    return [n for n, why in backends.available_backends(device).items() if why is None]


# ----------------------------------------------------------------------------- cases
def scores(g: torch.Generator, B: int, N: int, dtype, ties: str, layout: str, device) -> torch.Tensor:
    """(B, N) scores: ``ties`` none / round (many ties) / int (very many); ``layout``
    contiguous / colmajor / strided (every other column of a wider tensor)."""
    if ties == "int":
        x = torch.randint(-3, 4, (B, N), generator=g).to(torch.float64)
    elif ties == "round":
        x = (torch.randn(B, N, generator=g, dtype=torch.float64) * 2).round(decimals=1)
    else:
        x = torch.randn(B, N, generator=g, dtype=torch.float64) * 3
    x = x.to(dtype).to(device)
    if layout == "colmajor":
        x = x.t().contiguous().t()
    elif layout == "strided":
        wide = torch.zeros(B, 2 * N, dtype=dtype, device=device)
        wide[:, ::2] = x
        x = wide[:, ::2]
    return x


def make_case(seed: int, device=DEVICE, *, dtypes=(F32, F32, BF16, F64, F16), max_B: int = 17,
              max_N: int = 257) -> Dict:
    """One random configuration of the loss: the tensors and an RCEKDConfig.

    Covers K = M, L = M, M = N, B = 1, ties, exclusion masks (strided too), given or
    computed teacher top-K, row ids of any sign and size, seeds beyond 32 bits and
    negative, mixed student / teacher dtypes, non-contiguous scores."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B = rnd.choice([b for b in (1, 1, 2, 3, 5, 8, 17) if b <= max_B])
    N = rnd.choice([n for n in (1, 2, 3, 5, 8, 13, 30, 64, 100, 257) if n <= max_N])
    M = rnd.randint(1, N)
    K = rnd.randint(1, M)
    L = rnd.randint(1, M)
    r = rnd.random()
    if r < 0.12:
        K = M
    elif r < 0.24:
        L = M
    elif r < 0.36:
        M = N
        K = rnd.randint(1, M)
        L = rnd.randint(1, M)
    dtype = rnd.choice(dtypes)
    t_dtype = dtype if rnd.random() < 0.85 else rnd.choice([d for d in (F32, F64, BF16) if d in dtypes] or [dtype])
    layouts = ("contiguous", "contiguous", "colmajor", "strided")
    s = scores(g, B, N, dtype, rnd.choice(["none", "round", "int"]), rnd.choice(layouts), device)
    t = scores(g, B, N, t_dtype, rnd.choice(["none", "round", "int"]), rnd.choice(layouts), device)
    exclude = None
    if rnd.random() < 0.35 and N > M:
        n_ex = torch.randint(0, N - M + 1, (B,), generator=g)
        order = torch.argsort(torch.rand(B, N, generator=g), dim=1)
        exclude = order < n_ex.unsqueeze(1)
        if rnd.random() < 0.3:
            exclude = exclude.t().contiguous().t()
        exclude = exclude.to(device)
    teacher_topk = None
    if rnd.random() < 0.3:
        other = torch.randn(B, N, generator=g)
        teacher_topk = spec.ranked_topk(other, K, None if exclude is None else exclude.cpu()).to(device)
    if rnd.random() < 0.5:
        row_ids = torch.arange(B, device=device)
    else:
        row_ids = torch.randint(-(2**40), 2**40, (B,), generator=g).to(device)
    cfg = RCEKDConfig(K=K, M=M, L=L, T=rnd.choice([0.5, 1.0, 3.0, 10.0, 100.0]), tau=rnd.choice([0.5, 1.0, 2.0]),
                      beta=rnd.choice([0.0, 1.0, 5.0]), mode=rnd.choice(["paper", "official"]))
    seed_ = rnd.choice([0, 1, 12345, 2**32 - 1, -7, 2**40 + 3])
    return dict(s=s, t=t, teacher_topk=teacher_topk, exclude=exclude, row_ids=row_ids, cfg=cfg,
                seed=seed_ % 2**32)


def case_of(s, t, *, teacher_topk=None, exclude=None, row_ids=None, seed=0, **hp) -> Dict:
    """A case from given tensors and hyperparameters (RCEKDConfig keywords)."""
    if row_ids is None:
        row_ids = torch.arange(s.shape[0], device=s.device)
    return dict(s=s, t=t, teacher_topk=teacher_topk, exclude=exclude, row_ids=row_ids, cfg=RCEKDConfig(**hp),
                seed=seed % 2**32)


def call_of(op: str, case: Dict) -> Call:
    s, t = case["s"], case["t"]
    return Call(op, s.device.type, (s.dtype, t.dtype), case["cfg"], s.shape[1])


# ----------------------------------------------------------------------------- the oracle's configurations
def oracle_config(i):
    """A small random configuration (a dict of numpy arrays and hyperparameters) for the oracle."""
    g = np.random.default_rng(1000 + i)
    B = int(g.choice([1, 1, 2, 3, 4]))
    N = int(g.integers(2, 41))
    K = int(g.integers(1, N + 1))
    M = int(g.integers(K, N + 1))
    special = g.integers(0, 6)
    if special == 0:
        M = K
    elif special == 1:
        M = N
    L = int(g.integers(1, M + 1))
    if g.random() < 0.2:
        L = M
    ties = g.random() < 0.4
    if ties:
        s = np.round(g.normal(size=(B, N)) * 2) / 2
        t = np.round(g.normal(size=(B, N)) * 2) / 2
    else:
        s = g.normal(size=(B, N)) * g.choice([0.3, 1.0, 4.0])
        t = g.normal(size=(B, N)) * g.choice([0.3, 1.0, 4.0])
    excl = None
    if g.random() < 0.3 and M < N:
        excl = np.zeros((B, N), dtype=bool)
        for b in range(B):
            n_ex = int(g.integers(0, N - M + 1))
            excl[b, g.choice(N, n_ex, replace=False)] = True
    qt = None
    if g.random() < 0.35:
        qt = np.zeros((B, K), dtype=np.int64)
        for b in range(B):
            ok = [j for j in range(N) if excl is None or not excl[b, j]]
            qt[b] = g.choice(ok, K, replace=False)
    return dict(
        s=s.astype(np.float32), t=t.astype(np.float32), excl=excl, qt=qt, K=K, M=M, L=L,
        tau=float(g.choice([0.5, 1.0, 2.0])), T=float(g.choice([0.5, 1.0, 10.0])),
        beta=float(g.choice([0.0, 3.0, 5.0])), mode=str(g.choice(["paper", "official"])),
        seed=int(g.integers(0, 2**33)), rows=g.integers(-(2**40), 2**40, size=B).astype(np.int64))


def oracle_rows(c):
    out = []
    for b in range(c["s"].shape[0]):
        out.append(oracle.row(
            [float(x) for x in c["s"][b]], [float(x) for x in c["t"][b]],
            None if c["excl"] is None else [bool(x) for x in c["excl"][b]],
            None if c["qt"] is None else [int(x) for x in c["qt"][b]],
            K=c["K"], M=c["M"], L=c["L"], tau=c["tau"], T=c["T"], beta=c["beta"], mode=c["mode"],
            seed=c["seed"], row_id=int(c["rows"][b])))
    return out


def oracle_tensors(c, dtype=torch.float32):
    s = torch.tensor(c["s"], dtype=dtype, requires_grad=True)
    t = torch.tensor(c["t"], dtype=dtype)
    excl = None if c["excl"] is None else torch.tensor(c["excl"])
    qt = None if c["qt"] is None else torch.tensor(c["qt"])
    return s, t, excl, qt, torch.tensor(c["rows"])


def oracle_hp(c):
    return dict(K=c["K"], M=c["M"], L=c["L"], T=c["T"], beta=c["beta"], mode=c["mode"], seed=c["seed"])


def assert_matches_oracle(c, backend="reference"):
    want = oracle_rows(c)
    s, t, excl, qt, rows = oracle_tensors(c)
    sel = R.select(s, t, qt, row_ids=rows, exclude=excl, backend=backend, **oracle_hp(c))
    for b, w in enumerate(want):
        assert sel.student_topk[b].tolist() == w["QS"]
        assert sel.sampled[b].tolist() == w["A"]
        assert sel.teacher_topk[b].tolist() == w["QT"]
        assert sel.q2_mask[b].tolist() == w["q2_mask"]
        assert int(sel.n_q1[b]) == w["n_q1"] and int(sel.n_qt_sampled[b]) == w["n_qt_a"]
        assert float(sel.gamma[b]) == pytest.approx(w["gamma"], rel=1e-6)
    loss = R.rce_kd_loss(s, t, qt, row_ids=rows, exclude=excl, tau=c["tau"], reduction="none",
                         backend=backend, **oracle_hp(c))
    w_loss = torch.tensor([w["loss"] for w in want], dtype=torch.float64)
    torch.testing.assert_close(loss.double(), w_loss, rtol=1e-5, atol=1e-6)
    v = torch.linspace(0.5, 2.0, len(want))  # a non-uniform upstream gradient
    (loss * v).sum().backward()
    w_grad = torch.tensor([[x * float(v[b]) for x in w["grad"]] for b, w in enumerate(want)],
                          dtype=torch.float64)
    torch.testing.assert_close(s.grad.double(), w_grad, rtol=1e-5, atol=1e-6)



# ----------------------------------------------------------------------------- comparisons
def tolerance(dtype) -> Dict[str, float]:
    """Tolerances of outputs in ``dtype`` (the compute dtype, or the scores' for gradients)."""
    if dtype == F64:  # gamma is float32 by definition: 1e-7, not 1e-15
        return dict(rtol=1e-7, atol=1e-12)
    if dtype in (F16, BF16):  # outputs rounded to a 8/11-bit mantissa
        return dict(rtol=2**-7, atol=1e-6)
    return dict(rtol=1e-5, atol=1e-6)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{name}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    torch.testing.assert_close(got.cpu().double(), want.cpu().double(), msg=lambda m: f"{name}: {m}",
                               **tolerance(dtype))


def assert_same(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{name}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    if not torch.equal(got.cpu(), want.cpu()):
        bad = (got.cpu() != want.cpu()).nonzero()[:5].tolist()
        raise AssertionError(f"{name} differs at {bad}")


def sample_keys(case: Dict) -> torch.Tensor:
    """The reference's Gumbel keys of the pool (B, M)."""
    c, cfg = case, case["cfg"]
    pool = spec.ranked_topk(c["s"], cfg.m, c["exclude"])
    qt = spec.ranked_topk(c["t"], cfg.K, c["exclude"]) if c["teacher_topk"] is None else c["teacher_topk"]
    cnt = spec.pool_counts(ref._positions(pool, qt), cfg.K, cfg.m, cfg.mode)
    return rng.sampling_keys(cnt, cfg.T, c["seed"], c["row_ids"], pool)


def near_tie_rows(keys: torch.Tensor, L: int, rel: float = 4e-6) -> torch.Tensor:
    """Rows where two of the L + 1 largest keys are within a few float32 ulps."""
    top = keys.sort(dim=1, descending=True).values[:, :L + 1]
    if top.shape[1] < 2:
        return torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
    gap = (top[:, :-1] - top[:, 1:]).abs()
    return (gap <= rel * top[:, :-1].abs().clamp_min(1.0)).any(dim=1)


def excused_rows(differ: torch.Tensor, case: Dict) -> torch.Tensor:
    """Rows that differ must be near-ties of the reference keys; returns the excused rows
    and asserts they are rare."""
    differ = differ.to(torch.bool)
    if not differ.any():
        return differ
    bad = differ & ~near_tie_rows(sample_keys(case), case["cfg"].L)
    assert not bad.any(), f"rows {bad.nonzero()[:, 0].tolist()} differ without a near-tie of the keys"
    n = int(differ.sum())
    assert n <= max(1, differ.numel() // 50), f"{n} of {differ.numel()} rows excused: too many"
    return differ


def compare_ops(name: str, case: Dict, grad_seed: int = 0) -> int:
    """Every loss op of backend ``name`` against the reference on one case, through the
    dispatcher (``resolve``). Returns the number of excused rows. A call the backend does
    not support must be refused with its reason."""
    c, cfg, seed = case, case["cfg"], case["seed"]
    impl = backends.get(name)
    why = backends.unsupported_reason(name, call_of("fused_fwd", c))
    if why is not None:
        assert_refused(name, c, why)
        return 0
    t_sel = c["t"] if c["teacher_topk"] is None or grad_seed % 2 else None
    want = ref.select(c["s"], t_sel, c["teacher_topk"], c["exclude"], c["row_ids"], cfg, seed)
    got = impl.select(c["s"], t_sel, c["teacher_topk"], c["exclude"], c["row_ids"], cfg, seed)
    differ = torch.zeros(c["s"].shape[0], dtype=torch.bool, device=c["s"].device)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        differ |= (a != b).reshape(a.shape[0], -1).any(1)
    exc = excused_rows(differ, c)
    ok = ~exc
    for what, a, b in zip(("idx", "q2_mask", "counts"), got, want):
        assert_same(f"select.{what}", a[ok], b[ok])

    loss_w, stats_w, idx_w, q2_w = ref.fused_fwd(c["s"], c["t"], c["teacher_topk"], c["exclude"], c["row_ids"],
                                                 cfg, seed)
    loss_g, stats_g, idx_g, q2_g = impl.fused_fwd(c["s"], c["t"], c["teacher_topk"], c["exclude"], c["row_ids"],
                                                  cfg, seed)
    exc2 = excused_rows((idx_g != idx_w).any(1) | (q2_g != q2_w).any(1), c)
    ok = ~exc2
    assert_same("fused.idx", idx_g[ok], idx_w[ok])
    assert_same("fused.q2_mask", q2_g[ok], q2_w[ok])
    acc = spec.compute_dtype(c["s"])
    assert_close("fused.loss", loss_g[ok], loss_w[ok], acc)
    assert_close("fused.stats", stats_g[ok], stats_w[ok], F32)

    # backward and gathered ops on the reference's sets (independent of the sampling)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_rows = torch.randn(c["s"].shape[0], generator=gen, dtype=acc).to(c["s"].device)
    gamma = stats_w[:, 2].contiguous()
    gw = ref.fused_bwd(grad_rows, c["s"], c["t"], idx_w, q2_w, gamma, cfg)
    gg = impl.fused_bwd(grad_rows, c["s"], c["t"], idx_w, q2_w, gamma, cfg)
    assert_close("fused_bwd", gg, gw, c["s"].dtype)
    s_g, t_g = c["s"].gather(1, idx_w), c["t"].gather(1, idx_w)
    lw, pw = ref.subset_ce_fwd(s_g, t_g, q2_w, gamma, cfg)
    lg, pg = impl.subset_ce_fwd(s_g, t_g, q2_w, gamma, cfg)
    assert_close("subset.loss", lg, lw, acc)
    assert_close("subset.parts", pg, pw, acc)
    dw = ref.subset_ce_bwd(grad_rows, s_g, t_g, q2_w, gamma, cfg)
    dg = impl.subset_ce_bwd(grad_rows, s_g, t_g, q2_w, gamma, cfg)
    assert_close("subset_bwd", dg, dw, acc)
    return int((exc | exc2).sum())


def assert_refused(name: str, case: Dict, why: str) -> None:
    """An explicit backend that does not support the call raises a ValueError with its reason
    and the backends that could; ``auto`` runs it elsewhere."""
    c = case
    try:
        R.rce_kd_loss(c["s"], c["t"], c["teacher_topk"], config=c["cfg"], seed=c["seed"], row_ids=c["row_ids"],
                      exclude=c["exclude"], backend=name)
    except ValueError as e:
        assert why in str(e) and "Backends that can" in str(e), str(e)
    else:
        raise AssertionError(f"backend {name!r} ran a call it says it does not support ({why})")
    auto = backends.resolve("auto", call_of("fused_fwd", c))
    assert auto.NAME != name


def api_outputs(name: Optional[str], case: Dict, weights: torch.Tensor):
    """The public API's outputs on a case: dense loss rows and gradient (with per-row
    upstream weights), diagnostics, the selection, the gathered loss and its gradient."""
    c = case
    x = c["s"].detach().clone().requires_grad_(True)
    loss, diag = R.rce_kd_loss(x, c["t"], c["teacher_topk"], config=c["cfg"], seed=c["seed"], row_ids=c["row_ids"],
                               exclude=c["exclude"], reduction="none", backend=name, return_diagnostics=True)
    (loss * weights.to(loss.dtype)).sum().backward()
    sel = R.select(c["s"], c["t"], c["teacher_topk"], config=c["cfg"], seed=c["seed"], row_ids=c["row_ids"],
                   exclude=c["exclude"], backend=name)
    sg = c["s"].gather(1, sel.indices).detach().requires_grad_(True)
    lg = R.rce_kd_loss_gathered(sg, c["t"].gather(1, sel.indices), sel, reduction="sum", backend=name)
    lg.backward()
    return dict(loss=loss.detach(), grad=x.grad, diag=diag, sel=sel, gathered=lg.detach(), gathered_grad=sg.grad)
