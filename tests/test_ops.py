"""The custom ops: torch.library.opcheck, torch.compile(fullgraph=True), backends."""

import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels import backends, ops
from rcekd_kernels.backends import Call


def hp(**kw):
    """The flattened configuration (the schemas' hyperparameters, ops.HPARAMS)."""
    return ops.flatten(R.RCEKDConfig(**kw))


def _inputs(B=3, N=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, generator=g, dtype=dtype), torch.randn(B, N, generator=g, dtype=dtype)


def test_opcheck_select():
    s, t = _inputs()
    excl = torch.zeros_like(s, dtype=torch.bool)
    excl[:, 0] = True
    torch.library.opcheck(torch.ops.rcekd.select.default,
                          (s, t, None, excl, torch.arange(3), *hp(K=4, M=10, L=5), 1, "reference", True))
    qt = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(b))[:4] for b in range(3)])
    torch.library.opcheck(torch.ops.rcekd.select.default,
                          (s, None, qt, None, torch.arange(3), *hp(K=4, M=10, L=5, mode="official"), 1, "reference",
                           True))


def test_opcheck_fused():
    s, t = _inputs(dtype=torch.float64)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.rcekd.fused_fwd.default,
                          (s, t, None, None, torch.arange(3), *hp(K=4, M=10, L=5, tau=0.8, beta=3.0), 1, "reference",
                           True))


def test_opcheck_subset():
    s, t = _inputs(dtype=torch.float64)
    sel = R.select(s, t, K=4, M=10, L=5)
    sg = s.gather(1, sel.indices).requires_grad_()
    tg = t.gather(1, sel.indices)
    torch.library.opcheck(torch.ops.rcekd.subset_ce_fwd.default,
                          (sg, tg, sel.q2_mask, sel.gamma, *hp(K=4, M=10, L=5), "reference"))


def test_opcheck_gathered_dot():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(30, 4, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 30, (5, 7), generator=g)
    for be in ("reference", "auto"):
        torch.library.opcheck(torch.ops.rcekd.gathered_dot.default, (u, v, idx, be, True))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()

    def step(s_param, t, rows, seed):
        s = s_param * 2.0 + 1.0  # some work around the loss, traced by the compiler
        return R.rce_kd_loss(s, t, K=4, M=10, L=5, tau=0.7, row_ids=rows, seed=seed, reduction="sum")

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    s, t = _inputs(B=4)
    rows = torch.tensor([3, 1, 4, 1])
    for seed in (1, 2):  # a new seed must not break the graph
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        la = compiled(a, t, rows, seed)
        lb = step(b, t, rows, seed)
        torch.testing.assert_close(la, lb)
        la.backward()
        lb.backward()
        torch.testing.assert_close(a.grad, b.grad)
        assert a.grad.abs().sum() > 0


def test_compile_gathered_fullgraph():
    torch._dynamo.reset()
    s, t = _inputs(B=4)
    sel = R.select(s, t, K=4, M=10, L=5)
    tg = t.gather(1, sel.indices)

    def f(x):
        return R.rce_kd_loss_gathered(x.gather(1, sel.indices), tg, sel, reduction="mean")

    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    la = torch.compile(f, fullgraph=True, backend="aot_eager")(a)
    lb = f(b)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_backend_selection(monkeypatch):
    avail = R.available_backends("cpu")
    assert avail["reference"] is None
    assert set(avail) == {"reference", "triton", "cpp", "cuda"}
    assert avail["cuda"] is not None  # never on a CPU device
    s, t = _inputs()
    want = R.rce_kd_loss(s, t, K=3, M=8, L=4, backend="reference")
    monkeypatch.setenv("RCEKD_BACKEND", "reference")
    torch.testing.assert_close(R.rce_kd_loss(s, t, K=3, M=8, L=4), want)
    monkeypatch.setenv("RCEKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RCEKD_BACKEND|backend"):
        R.rce_kd_loss(s, t, K=3, M=8, L=4)
    monkeypatch.delenv("RCEKD_BACKEND")
    with pytest.raises(ValueError, match="cannot run fused_fwd.*cuda tensors only.*Backends that can"):
        R.rce_kd_loss(s, t, K=3, M=8, L=4, backend="cuda")
    call = Call("fused_fwd", "cpu", (torch.float32,), R.RCEKDConfig(K=3, M=8, L=4), 40)
    assert backends.resolve("auto", call).NAME in ("cpp", "reference")
    assert "reference" in R.describe_backends("cpu")


def test_env_backend_applies_to_the_ops_it_implements(monkeypatch):
    """$RCEKD_BACKEND names the backend of every op it implements; gathered_dot, which the
    triton backend does not implement, goes to auto; an explicit backend= is strict."""
    monkeypatch.setenv("RCEKD_BACKEND", "triton")
    assert backends.requested(None, "gathered_dot") == "auto"
    assert backends.requested(None, "fused_fwd") == "triton"
    monkeypatch.setenv("RCEKD_BACKEND", "reference")
    assert backends.requested(None, "gathered_dot") == "reference"
    u, v = torch.randn(2, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="does not implement gathered_dot"):
        R.gathered_dot(u, v, torch.zeros(2, 2, dtype=torch.int64), backend="triton")


def test_config_is_the_one_place_for_ranges():
    cfg = R.RCEKDConfig(K=5, L=3)
    assert cfg.M == 10 and cfg.width == 13
    assert cfg.replace(K=4).M == 10
    with pytest.raises(ValueError, match="K <= M"):
        R.RCEKDConfig(K=5, M=4)
    with pytest.raises(TypeError, match="config must be an RCEKDConfig"):
        R.rce_kd_loss(torch.randn(2, 20), torch.randn(2, 20), config=dict(K=3))
    s, t = _inputs()
    a = R.rce_kd_loss(s, t, config=R.RCEKDConfig(K=3, M=8, L=4, beta=2.0), seed=4)
    b = R.rce_kd_loss(s, t, K=3, M=8, L=4, beta=2.0, seed=4)
    c = R.rce_kd_loss(s, t, config=R.RCEKDConfig(K=3, M=8, L=4), beta=2.0, seed=4)  # keywords override
    assert torch.equal(a, b) and torch.equal(a, c)
    assert ops.unflatten(ops.flatten(cfg)) == cfg.replace(reduction="mean")
