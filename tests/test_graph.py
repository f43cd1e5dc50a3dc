"""rcekd_kernels.graph: LightGCN's layer mean over a sparse graph and its gradient, every backend,
against a float64 dense oracle (the formula) and against each other."""
import numpy as np
import pytest
import torch

from rcekd_kernels import graph
from rcekd_kernels.backends import native, reference

CPP_WHY = native.load_error() or (None if hasattr(native.ops(), "csr_layer_mean") else "no csr_layer_mean")
needs_cpp = pytest.mark.skipif(CPP_WHY is not None, reason=f"cpp layer_mean unavailable: {CPP_WHY}")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def bipartite(U=37, I=53, seed=0, density=0.12, empty_user=True):
    """A random user-item graph's normalised adjacency (CSR float32) and its dense float64 form.
    Users and items without an edge keep zero rows (as in a real split)."""
    rng = np.random.default_rng(seed)
    R = (rng.random((U, I)) < density).astype(np.float64)
    if empty_user:
        R[3] = 0  # a user without items: a zero row and column
    A = np.block([[np.zeros((U, U)), R], [R.T, np.zeros((I, I))]])
    deg = A.sum(1)
    d = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    A = d[:, None] * A * d[None, :]
    adj = torch.from_numpy(A).float().to_sparse_csr()
    return adj, torch.from_numpy(A), U


def oracle(A, x, layers, backward=False):
    """The formula in float64 with a dense matrix."""
    x = x.double()
    if backward:
        h = x / (layers + 1)
        res = h
        for _ in range(layers):
            res = h + A @ res
        return res
    total, y = x.clone(), x
    for _ in range(layers):
        y = A @ y
        total = total + y
    return total / (layers + 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 5, 8, 20, 64, 100, 136, 200])
@pytest.mark.parametrize("layers", [0, 1, 3])
@pytest.mark.parametrize("backward", [False, True])
def test_layer_mean_equals_the_formula(backend, D, layers, backward):
    """Every column-block width the kernel has (64, multiples of 16 and 8, a scalar tail) and the
    layer counts, forward and backward, against the dense float64 formula."""
    adj, A, U = bipartite()
    torch.manual_seed(D)
    x = torch.randn(A.shape[0], D)
    u, i = graph.layer_mean(adj, [x[:U], x[U:]], layers, backward=backward, backend=backend)
    assert u.shape == (U, D) and i.shape == (A.shape[0] - U, D) and u.dtype == torch.float32
    want = oracle(A, x, layers, backward)
    torch.testing.assert_close(torch.cat([u, i]).double(), want, rtol=1e-5, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("D", [20, 64, 200])
def test_cpp_equals_reference_to_rounding_and_any_thread_count(D):
    """The C++ kernel against torch's products: equal to rounding (to the bit on CPUs where torch's
    CSR product adds a row's terms by fused multiply-adds in order, as here), and the same bits
    with 1 and 2 threads (each row is computed by one thread)."""
    adj, A, U = bipartite(U=300, I=400, density=0.05, seed=1)
    torch.manual_seed(1)
    parts = [torch.randn(300, D), torch.randn(400, D)]
    for backward in (False, True):
        ref = graph.layer_mean(adj, parts, 3, backward=backward, backend="reference")
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = graph.layer_mean(adj, parts, 3, backward=backward, backend="cpp")
            torch.set_num_threads(2)
            two = graph.layer_mean(adj, parts, 3, backward=backward, backend="cpp")
        finally:
            torch.set_num_threads(old)
        for a, b, r in zip(one, two, ref):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, r, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_gradient_is_the_transposed_propagation(backend):
    """propagate is differentiable: its gradient equals autograd through the dense formula."""
    adj, A, U = bipartite()
    torch.manual_seed(0)
    xu = torch.randn(U, 70, dtype=torch.float32, requires_grad=True)
    xi = torch.randn(A.shape[0] - U, 70, requires_grad=True)
    g = torch.randn(A.shape[0], 70)
    u, i = graph.propagate(adj, [xu, xi], 3, backend=backend)
    (torch.cat([u, i]) * g).sum().backward()
    x64 = torch.cat([xu, xi]).detach().double().requires_grad_(True)
    (oracle(A, x64, 3) * g.double()).sum().backward()
    torch.testing.assert_close(torch.cat([xu.grad, xi.grad]).double(), x64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,block", [(150, 64), (8, 64), (130, 1)])
def test_reference_column_blocks_equal_layer_by_layer_products(dim, block):
    """The reference's blocked layer mean (forward and backward) gives exactly the values of
    layer-by-layer sparse products through autograd, whatever the block width (a row's sums keep
    their order)."""
    adj, A, U = bipartite()
    torch.manual_seed(0)
    x = torch.randn(A.shape[0], dim, requires_grad=True)
    g = torch.randn_like(x)
    out = torch.cat(reference.layer_mean(adj, [x.detach()[:U], x.detach()[U:]], 3, block=block))
    gx = torch.cat(reference.layer_mean(adj, [g[:U], g[U:]], 3, backward=True, block=block))

    class Sym(torch.autograd.Function):  # one node per layer
        @staticmethod
        def forward(ctx, x):
            return torch.sparse.mm(adj, x)

        @staticmethod
        def backward(ctx, grad):
            return torch.sparse.mm(adj, grad)

    total, y = x, x
    for _ in range(3):
        y = Sym.apply(y)
        total = total + y
    want = total / 4
    (want * g).sum().backward()
    assert torch.equal(out, want)
    assert torch.equal(gx, x.grad)


def test_auto_keeps_the_reference_for_narrow_matrices():
    """auto: the reference below CPP_MIN_COLUMNS (its values to the bit), the C++ kernel from it."""
    adj, A, U = bipartite()
    x = torch.randn(A.shape[0], 20)
    auto = graph.layer_mean(adj, [x[:U], x[U:]], 3)
    ref = graph.layer_mean(adj, [x[:U], x[U:]], 3, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))
    assert graph._backend(None, [x]).NAME == "reference"
    if CPP_WHY is None:
        assert graph._backend(None, [torch.zeros(2, graph.CPP_MIN_COLUMNS)]).NAME == "cpp"


def test_bad_arguments_are_clear_errors():
    adj, A, U = bipartite()
    x = torch.randn(A.shape[0], 8)
    with pytest.raises(TypeError, match="sparse COO or CSR"):
        graph.layer_mean(A.float(), [x], 1)
    with pytest.raises(TypeError, match="non-empty list"):
        graph.layer_mean(adj, x, 1)
    with pytest.raises(ValueError, match=r"must be \(10, 10\).*got \(90, 90\)"):
        graph.layer_mean(adj, [x[:10]], 1)
    with pytest.raises(ValueError, match="share"):
        graph.layer_mean(adj, [x[:U], x[U:, :4]], 1)
    with pytest.raises(TypeError, match="dtype of the parts"):
        graph.layer_mean(adj, [x.double()], 1)
    with pytest.raises(ValueError, match="layers must be an integer >= 0"):
        graph.layer_mean(adj, [x], -1)
    if CPP_WHY is None:
        with pytest.raises(ValueError, match="float32"):
            graph.layer_mean(adj.double(), [x.double()], 1, backend="cpp")


@needs_cpp
def test_the_compiled_op_checks_its_arguments():
    """A direct call of torch.ops.rcekd_C.csr_layer_mean with a bad CSR raises, never reads out of
    bounds."""
    op = native.ops().csr_layer_mean
    x = torch.randn(3, 16)
    crow = torch.tensor([0, 1, 2, 3])
    val = torch.ones(3)
    with pytest.raises(RuntimeError, match="outside"):
        op(crow, torch.tensor([0, 1, 7]), val, [x], 2, False)
    with pytest.raises(RuntimeError, match="outside"):  # 2^32 + 1 would wrap to 1 in int32
        op(crow, torch.tensor([0, 1, 2**32 + 1]), val, [x], 2, False)
    with pytest.raises(RuntimeError, match="outside"):
        op(crow, torch.tensor([0, -1, 2]), val, [x], 2, False)
    with pytest.raises(RuntimeError, match="integer tensors"):
        op(crow, torch.tensor([0.0, 1.0, 2.0]), val, [x], 2, False)
    with pytest.raises(RuntimeError, match="rows \\+ 1"):
        op(crow[:3], torch.tensor([0, 1, 2]), val, [x], 2, False)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]), val, [x], 2, False)
    with pytest.raises(RuntimeError, match="float32"):
        op(crow, torch.tensor([0, 1, 2]), val, [x.double()], 2, False)
    out = op(crow, torch.tensor([1, 0, 2]), val, [x[:2], x[2:]], 1, False)  # permutation + self loop
    want = (x + x[[1, 0, 2]]) / 2
    torch.testing.assert_close(torch.cat(out), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    """No columns, a part without rows, and a non-contiguous part give the formula's shapes and values."""
    adj, A, U = bipartite()
    x = torch.randn(A.shape[0], 0)
    u, i = graph.layer_mean(adj, [x[:U], x[U:]], 3, backend=backend)
    assert u.shape == (U, 0) and i.shape == (A.shape[0] - U, 0)
    y = torch.randn(80, A.shape[0]).T  # (rows, 80), not contiguous
    empty, whole = graph.layer_mean(adj, [y[:0], y], 2, backend=backend)
    assert empty.shape == (0, 80)
    torch.testing.assert_close(whole.double(), oracle(A, y, 2), rtol=1e-5, atol=1e-6)
