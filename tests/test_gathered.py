"""gathered_dot: out[b, w] = <u[b], v[idx[b, w]]> and its gradients, every backend against a
brute-force loop; repeated ids, determinism over thread counts, bad input, opcheck, compile."""
import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels.backends import native

HAS_CPP = native.load_error() is None and hasattr(native.ops(), "gathered_dot")
BACKENDS = ["reference"] + (["cpp"] if HAS_CPP else [])
need_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"the compiled extension is not loaded: {native.load_error()}")


def brute(u, v, idx, g):
    """Values and gradients by explicit loops in float64."""
    B, W = idx.shape
    out = torch.zeros(B, W, dtype=torch.float64)
    gu = torch.zeros(u.shape, dtype=torch.float64)
    gv = torch.zeros(v.shape, dtype=torch.float64)
    for b in range(B):
        for w in range(W):
            i = int(idx[b, w])
            out[b, w] = sum(float(u[b, d]) * float(v[i, d]) for d in range(u.shape[1]))
            gu[b] += float(g[b, w]) * v[i].double()
            gv[i] += float(g[b, w]) * u[b].double()
    return out, gu, gv


def case(B, W, D, N, seed, dtype=torch.float32, repeats=False):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, D, generator=gen, dtype=dtype)
    v = torch.randn(N, D, generator=gen, dtype=dtype)
    hi = min(N, 3) if repeats else N  # few distinct ids: many repeats within and across rows
    idx = torch.randint(0, hi, (B, W), generator=gen)
    g = torch.randn(B, W, generator=gen, dtype=dtype)
    return u, v, idx, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 7, 3, 11, False), (4, 9, 6, 50, True), (1, 1, 1, 1, False),
                                   (3, 0, 4, 5, False), (17, 33, 20, 200, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_brute_force(backend, shape, dtype):
    B, W, D, N, rep = shape
    u, v, idx, g = case(B, W, D, N, seed=B * 100 + W, dtype=dtype, repeats=rep)
    uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
    out = R.gathered_dot(uu, vv, idx, backend=backend)
    out.backward(g)
    want, gu, gv = brute(u, v, idx, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert out.dtype == dtype and out.shape == (B, W)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(uu.grad.double(), gu, **tol)
    torch.testing.assert_close(vv.grad.double(), gv, **tol)


@need_cpp
def test_gradcheck_cpp():
    u, v, idx, _ = case(3, 5, 4, 6, seed=1, dtype=torch.float64, repeats=True)
    u.requires_grad_()
    v.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: R.gathered_dot(a, b, idx, backend="cpp"), (u, v))


@need_cpp
def test_cpp_is_deterministic_over_threads():
    u, v, idx, g = case(300, 40, 8, 97, seed=2, repeats=False)
    idx[:, :10] = 5  # one item hit from every row
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
            R.gathered_dot(uu, vv, idx, backend="cpp").backward(g)
            res.append((uu.grad, vv.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_only_needed_gradients():
    u, v, idx, g = case(4, 6, 3, 9, seed=3)
    v.requires_grad_()
    out = R.gathered_dot(u, v, idx)
    out.backward(g)
    assert u.grad is None and v.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    u, v, idx, _ = case(3, 4, 5, 10, seed=4)
    with pytest.raises(ValueError, match="same D"):
        R.gathered_dot(u, v[:, :4], idx, backend=backend)
    with pytest.raises(TypeError, match="one dtype"):
        R.gathered_dot(u, v.double(), idx, backend=backend)
    with pytest.raises(ValueError, match="int64 of shape"):
        R.gathered_dot(u, v, idx.int(), backend=backend)
    with pytest.raises(ValueError, match="int64 of shape"):
        R.gathered_dot(u, v, idx[:2], backend=backend)
    with pytest.raises(TypeError, match="floating dtype"):
        R.gathered_dot(u.long(), v, idx, backend=backend)
    bad = idx.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"outside \[0, 10\): min \d+, max 10"):
        R.gathered_dot(u, v, bad, backend=backend)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="outside"):
        R.gathered_dot(u, v, bad, backend=backend)
    with pytest.raises(ValueError, match="does not implement gathered_dot"):
        R.gathered_dot(u, v, idx, backend="triton")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        R.gathered_dot(u, v, idx, backend="cudnn")


@need_cpp
def test_cpp_checks_ids_without_validate():
    """validate=False skips the Python read of the ids; the C++ kernel still refuses them."""
    u, v, idx, _ = case(3, 4, 5, 10, seed=5)
    idx[2, 3] = 99
    with pytest.raises(RuntimeError, match=r"outside \[0, 10\)"):
        R.gathered_dot(u, v, idx, backend="cpp", validate=False)
    with pytest.raises(RuntimeError, match=r"outside \[0, 10\)"):
        torch.ops.rcekd_C.gathered_dot(u, v, idx)
    with pytest.raises(RuntimeError, match="same shape|shape of idx"):
        torch.ops.rcekd_C.gathered_dot_bwd(torch.ones(2, 2), u, v, idx.clamp(0, 9))


def test_opcheck_and_compile():
    u, v, idx, g = case(4, 6, 3, 9, seed=6)
    u.requires_grad_()
    v.requires_grad_()
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.rcekd.gathered_dot.default, (u, v, idx, backend, True))

    def f(a, b):
        return (R.gathered_dot(a, b, idx, validate=False) * g).sum()

    want = f(u, v)
    want.backward()
    gu, gv = u.grad.clone(), v.grad.clone()
    u.grad = v.grad = None
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(u, v)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(u.grad, gu)
    torch.testing.assert_close(v.grad, gv)
