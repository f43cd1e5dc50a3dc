"""One conformance suite for every backend available on this machine (tests/conformance.py).

Parametrised over the registered backends that can run here (on CPU: reference, cpp
when built, triton in the interpreter; on a GPU: reference, triton, cuda): a new
backend gets every test by being registered. Backend-specific tests (interpreter
limits, build, long rows, threads) are in tests/test_native.py and tests/test_triton.py.
"""
import os

import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels import backends
from rcekd_kernels.backends import Call

import conformance as C

HERE = C.available_backends()
FAST = [n for n in HERE if n != "reference"]
INTERPRETED = C.DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _slow(name: str) -> bool:
    """Triton in the interpreter: small and few cases."""
    return name == "triton" and INTERPRETED


def n_cases(name: str) -> int:
    return 12 if _slow(name) else 160


def case_kwargs(name: str):
    return dict(max_B=5, max_N=100) if _slow(name) else {}


# ----------------------------------------------------------------------------- ops vs reference
@pytest.mark.parametrize("chunk", range(2))
@pytest.mark.parametrize("name", FAST)
def test_ops_match_reference(name, chunk):
    """Random configurations (every option, every dtype): each op against the reference; the
    calls the backend does not support must be refused with a reason."""
    per = n_cases(name)
    excused = rows = 0
    for i in range(chunk * per, (chunk + 1) * per):
        case = C.make_case(7000 + i, **case_kwargs(name))
        try:
            excused += C.compare_ops(name, case, grad_seed=i)
        except AssertionError as e:
            raise AssertionError(f"case {7000 + i} ({case['cfg']}, {case['s'].dtype}): {e}") from e
        rows += case["s"].shape[0]
    assert excused <= max(1, rows // 100)


@pytest.mark.parametrize("name", HERE)
def test_matches_the_oracle(name):
    """Small random configurations against the brute-force float64 oracle of the spec (the
    reference runs 240 of them in tests/test_reference.py)."""
    for i in range(4 if _slow(name) else 40):
        C.assert_matches_oracle(C.oracle_config(i), backend=name)


# ----------------------------------------------------------------------------- the public API
API_CASES = [
    dict(B=6, N=300, K=10, M=40, L=15, dtype=torch.float32, exclude=0.1, mode="paper"),
    dict(B=4, N=120, K=8, M=8, L=8, dtype=torch.bfloat16, exclude=0.0, mode="official"),
    dict(B=3, N=200, K=5, M=20, L=5, dtype=torch.float64, exclude=0.2, mode="official"),
]


def _api_case(d, seed=5):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(d["B"], d["N"], generator=g) * 2).to(d["dtype"]).to(C.DEVICE)
    t = torch.randn(d["B"], d["N"], generator=g).to(d["dtype"]).to(C.DEVICE)
    excl = (torch.rand(d["B"], d["N"], generator=g) < d["exclude"]).to(C.DEVICE) if d["exclude"] else None
    return C.case_of(s, t, exclude=excl, row_ids=torch.arange(10, 10 + d["B"], device=C.DEVICE), seed=9,
                     K=d["K"], M=d["M"], L=d["L"], mode=d["mode"], tau=0.8, T=5.0, beta=4.0)


@pytest.mark.parametrize("d", API_CASES, ids=lambda d: str(d["dtype"]).replace("torch.", ""))
@pytest.mark.parametrize("name", FAST)
def test_public_api_matches_reference(name, d):
    """rce_kd_loss (values, gradient under a non-uniform upstream gradient, diagnostics), select
    and rce_kd_loss_gathered with backend=name against backend='reference'."""
    case = _api_case(d)
    if backends.unsupported_reason(name, C.call_of("fused_fwd", case)) is not None:
        pytest.skip(f"{name} does not support {d['dtype']} (tested as a refusal in test_ops_match_reference)")
    w = torch.linspace(0.5, 2.0, d["B"], device=C.DEVICE)
    got, want = C.api_outputs(name, case, w), C.api_outputs("reference", case, w)
    exc = C.excused_rows((got["sel"].indices != want["sel"].indices).any(1), case)
    ok = ~exc
    acc = torch.float64 if d["dtype"] == torch.float64 else torch.float32
    C.assert_close("loss", got["loss"][ok], want["loss"][ok], acc)
    C.assert_close("grad", got["grad"][ok], want["grad"][ok], d["dtype"])
    for k in want["diag"]:
        if not exc.any():
            C.assert_close(f"diag.{k}", got["diag"][k], want["diag"][k], torch.float32)
    if not exc.any():
        for f in ("indices", "q2_mask", "gamma", "n_q1", "n_qt_sampled"):
            C.assert_same(f"select.{f}", getattr(got["sel"], f), getattr(want["sel"], f))
        C.assert_close("gathered", got["gathered"], want["gathered"], acc)
        C.assert_close("gathered_grad", got["gathered_grad"], want["gathered_grad"], d["dtype"])


@pytest.mark.parametrize("name", HERE)
def test_autograd_function_and_module_equal_functional(name):
    """RCEKDFunction (both argument forms) and RCEKDLoss give the functional API's values and
    gradients: one forward and one backward behind all three faces."""
    g = torch.Generator().manual_seed(10)
    s = torch.randn(4, 50, generator=g).to(C.DEVICE).requires_grad_(True)
    t = torch.randn(4, 50, generator=g).to(C.DEVICE)
    rows = torch.arange(4, device=C.DEVICE)
    cfg = R.RCEKDConfig(K=5, M=15, L=6, tau=0.9, T=10.0, beta=5.0, mode="paper")
    want = R.rce_kd_loss(s, t, config=cfg, reduction="none", seed=3, backend=name)
    (g_want,) = torch.autograd.grad((want * torch.arange(1.0, 5.0, device=C.DEVICE)).sum(), s)
    for rows_fn in (lambda: R.RCEKDFunction.apply(s, t, None, None, rows, cfg, 3, name, True),
                    lambda: R.RCEKDFunction.apply(s, t, None, None, rows, 5, 15, 6, 0.9, 10.0, 5.0, "paper", 3,
                                                  name, True)):
        got = rows_fn()
        assert torch.equal(got, want)
        (g_got,) = torch.autograd.grad((got * torch.arange(1.0, 5.0, device=C.DEVICE)).sum(), s)
        assert torch.equal(g_got, g_want)
    mod = R.RCEKDLoss(config=cfg.replace(reduction="none"), seed=3, backend=name)
    assert torch.equal(mod(s, t), want) and mod.step == 1
    assert mod.K == 5 and mod.tau == 0.9 and mod.reduction == "none"


@pytest.mark.parametrize("name", HERE)
def test_empty_batch_and_inputs_not_modified(name):
    s = torch.zeros(0, 30, device=C.DEVICE, requires_grad=True)
    loss = R.rce_kd_loss(s, torch.zeros(0, 30, device=C.DEVICE), K=3, M=6, L=2, backend=name)
    assert loss.shape == () and float(loss.detach()) == 0.0
    loss.backward()
    assert s.grad.shape == (0, 30)
    assert R.select(s, s, K=3, M=6, L=2, backend=name).indices.shape == (0, 8)
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 40, generator=g).to(C.DEVICE).requires_grad_(True)
    t = torch.randn(3, 40, generator=g).to(C.DEVICE)
    excl = (torch.rand(3, 40, generator=g) < 0.3).to(C.DEVICE)
    rows = torch.tensor([4, 5, 6], device=C.DEVICE)
    before = [x.detach().clone() for x in (s, t, excl, rows)]
    versions = [x._version for x in (s, t, excl, rows)]
    R.rce_kd_loss(s, t, K=3, M=8, L=4, exclude=excl, row_ids=rows, backend=name).backward()
    for x, b, v in zip((s, t, excl, rows), before, versions):
        assert torch.equal(x.detach(), b) and x._version == v


@pytest.mark.parametrize("name", HERE)
def test_gradcheck(name):
    """float64 gradients by finite differences, where the backend reads float64."""
    call = Call("fused_fwd", C.DEVICE, (torch.float64,), R.RCEKDConfig(K=4, M=12, L=5), 30)
    if backends.unsupported_reason(name, call) is not None:
        pytest.skip(f"{name} does not read float64 scores")
    g = torch.Generator().manual_seed(1)
    for mode in ("paper", "official"):
        s = torch.randn(3, 30, dtype=torch.float64, generator=g).to(C.DEVICE).requires_grad_(True)
        t = torch.randn(3, 30, dtype=torch.float64, generator=g).to(C.DEVICE)
        f = lambda x: R.rce_kd_loss(x, t, K=4, M=12, L=5, T=2.0, beta=3.0, tau=0.7, mode=mode,  # noqa: E731
                                    reduction="none", backend=name)
        assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    nan = s.clone()
    nan[1, 2] = float("nan")
    dup = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(3)])
    dup[1, 2] = dup[1, 0]
    many = torch.zeros(3, 20, dtype=torch.bool)
    many[2, :13] = True
    hit = torch.zeros(3, 20, dtype=torch.bool)
    hit[0, 1] = True
    return [
        ("shape", dict(student_scores=s, teacher_scores=torch.randn(3, 21))),
        ("dims", dict(student_scores=torch.randn(20), teacher_scores=torch.randn(20))),
        ("int", dict(student_scores=torch.ones(3, 20, dtype=torch.int64), teacher_scores=t)),
        ("K", dict(student_scores=s, teacher_scores=t, K=0)),
        ("M", dict(student_scores=s, teacher_scores=t, M=21)),
        ("L", dict(student_scores=s, teacher_scores=t, L=9)),
        ("tau", dict(student_scores=s, teacher_scores=t, tau=0.0)),
        ("T", dict(student_scores=s, teacher_scores=t, T=-1.0)),
        ("beta", dict(student_scores=s, teacher_scores=t, beta=-1.0)),
        ("mode", dict(student_scores=s, teacher_scores=t, mode="papers")),
        ("nan", dict(student_scores=nan, teacher_scores=t)),
        ("topk_dup", dict(student_scores=s, teacher_scores=t, teacher_topk=dup)),
        ("topk_range", dict(student_scores=s, teacher_scores=t, teacher_topk=dup.abs() + 20)),
        ("topk_dtype", dict(student_scores=s, teacher_scores=t, teacher_topk=dup.int())),
        ("few_items", dict(student_scores=s, teacher_scores=t, exclude=many)),
        ("excluded_topk", dict(student_scores=s, teacher_scores=t, teacher_topk=torch.arange(9).view(3, 3),
                               exclude=hit)),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("name", FAST)
def test_bad_inputs_same_errors(name, case):
    """Every backend answers a bad input with the reference's exception and message."""
    kw = dict(dict(K=3, M=8, L=4), **case[1])
    kw = {k: (v.to(C.DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    errors = {}
    for be in ("reference", name):
        with pytest.raises((ValueError, TypeError)) as e:
            R.rce_kd_loss(backend=be, **kw)
        errors[be] = (type(e.value), str(e.value))
    assert errors[name] == errors["reference"]


# ----------------------------------------------------------------------------- gathered_dot
@pytest.mark.parametrize("name", HERE)
def test_gathered_dot(name):
    """Backends that implement gathered_dot match the torch formulation (values and both
    gradients); the others refuse an explicit request and leave auto to another backend."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(30, 8, generator=g, dtype=torch.float64).to(C.DEVICE)
    v = torch.randn(100, 8, generator=g, dtype=torch.float64).to(C.DEVICE)
    idx = torch.randint(0, 100, (30, 17), generator=g).to(C.DEVICE)
    call = Call("gathered_dot", C.DEVICE, (u.dtype, v.dtype), None, 100)
    why = backends.unsupported_reason(name, call)
    if why is not None:
        with pytest.raises(ValueError, match="cannot run gathered_dot"):
            R.gathered_dot(u, v, idx, backend=name)
        assert backends.resolve("auto", call).NAME != name
        return
    out = {}
    for be in ("reference", name):
        uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
        o = R.gathered_dot(uu, vv, idx, backend=be)
        (o * torch.arange(17.0, dtype=torch.float64, device=C.DEVICE)).sum().backward()
        out[be] = (o.detach(), uu.grad, vv.grad)
    for a, b in zip(out[name], out["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dispatcher_refuses_with_reasons():
    """auto skips a backend that does not support a call; an explicit one says why."""
    cfg = R.RCEKDConfig(K=1100, M=1100, L=5)
    call = Call("fused_fwd", C.DEVICE, (torch.float32,), cfg, 1200)
    for name in HERE:
        why = backends.unsupported_reason(name, call)
        assert (why is None) == (name != "triton"), (name, why)
    assert backends.resolve("auto", call).NAME != "triton"
    if "triton" in HERE:
        s = torch.randn(1, 1200, device=C.DEVICE)
        with pytest.raises(ValueError, match="up to 1024.*Backends that can"):
            R.rce_kd_loss(s, s, K=1100, M=1100, L=5, backend="triton")
    assert "auto picks" in R.describe_backends(C.DEVICE, op="fused_fwd", dtype=torch.float64)
