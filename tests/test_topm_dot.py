"""topm_dot: the streaming top-M of user_vecs @ item_vecs.T, every backend against brute force.

* exact inputs (small integers: every product and sum is exact in float32), where every
  backend must return exactly the brute-force ids and scores of the float64 product, ties
  galore: M = 1, M = N, M > N, rows with fewer than M eligible items, exclusion lists with
  duplicates, unsorted and out-of-shard ids, item_offset != 0, empty lists, B = 1, D = 1,
  N = 0, B = 0, non-contiguous inputs;
* random float inputs against a float64 oracle, allowing only swaps of near-ties (items
  whose exact scores lie within the float32 rounding bound of the row's M-th score);
* the same output for any tile size (all backends) and any number of threads (cpp);
* bad arguments: clear errors, and direct calls of the op with bad offsets in a
  subprocess, so that a crash fails the test;
* memory: N = 2,000,000 items for B = 64 rows without anything of size B x N;
* the Triton kernels compile for sm_90 without register spills (no GPU needed).

The Triton backend runs in its interpreter on a CPU-only machine (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels.backends import Call, native, unavailable_reason, unsupported_reason
from rcekd_kernels.backends import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
topm_cpp = native.cpp  # the cpp backend's topm_dot (and its blocking knobs)
CPP_WHY = unsupported_reason("cpp", Call("topm_dot", "cpu", (torch.float32,), None, 1, 1))
needs_cpp = pytest.mark.skipif(CPP_WHY is not None, reason=f"cpp topm_dot unavailable: {CPP_WHY}")
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_WHY = unavailable_reason("triton", TRITON_DEV)
if TRITON_WHY is None:
    from rcekd_kernels.backends.triton import topm as ttd
INTERP = TRITON_WHY is None and TRITON_DEV == "cpu"

BACKENDS = ["reference"] + (["cpp"] if CPP_WHY is None else []) + (["triton"] if TRITON_WHY is None else [])


def run(backend, U, V, M, offs=None, ids=None, off=0, **kw):
    """The backend's topm_dot through the public API (checks, dispatch), on its device, results on
    the CPU; with blocking knobs (``kw``), the backend's own function."""
    dev = TRITON_DEV if backend == "triton" else "cpu"
    mv = (lambda x: None if x is None else x.to(dev))  # noqa: E731
    if kw:
        f = {"reference": ref.topm_dot, "cpp": topm_cpp.topm_dot}.get(backend) or ttd.topm_dot
        i, s = f(mv(U), mv(V), M, mv(offs), mv(ids), off, **kw)
    else:
        ex = None if offs is None else (mv(offs), mv(ids))
        i, s = R.topm_dot(mv(U), mv(V), M, exclude=ex, item_offset=off, backend=backend)
    return i.cpu(), s.cpu()


# ----------------------------------------------------------------------------- oracles
def excluded_sets(B, N, offs, ids, off):
    """Local excluded ids of each row, by explicit Python loops."""
    out = [set() for _ in range(B)]
    if offs is None:
        return out
    for b in range(B):
        for i in range(int(offs[b]), int(offs[b + 1])):
            g = int(ids[i])
            if off <= g < off + N:
                out[b].add(g - off)
    return out


def brute(U, V, M, offs=None, ids=None, off=0):
    """Exact ranking by Python's sort of (-score, id) over the eligible items of each row."""
    B, N = U.shape[0], V.shape[0]
    S = (U.double() @ V.double().T).tolist() if B and N else [[] for _ in range(B)]
    ex = excluded_sets(B, N, offs, ids, off)
    out_i = torch.full((B, M), -1, dtype=torch.int64)
    out_s = torch.full((B, M), float("-inf"), dtype=torch.float64)
    for b in range(B):
        order = sorted((j for j in range(N) if j not in ex[b]), key=lambda j: (-S[b][j], j))[:M]
        for p, j in enumerate(order):
            out_i[b, p] = j + off
            out_s[b, p] = S[b][j]
    return out_i, out_s


def csr(lists):
    offs = torch.zeros(len(lists) + 1, dtype=torch.int64)
    offs[1:] = torch.cumsum(torch.tensor([len(x) for x in lists], dtype=torch.int64), 0)
    ids = torch.tensor([v for x in lists for v in x], dtype=torch.int64)
    return offs, ids


def int_vecs(g, B, N, D, lo=-3, hi=3, dtype=torch.float32):
    U = torch.randint(lo, hi + 1, (B, D), generator=g).to(dtype)
    V = torch.randint(lo, hi + 1, (N, D), generator=g).to(dtype)
    return U, V


def random_lists(g, B, N, off, max_len, out_of_shard=True):
    """Exclusion lists: unsorted, with duplicates and (optionally) ids outside the shard."""
    lists = []
    for _ in range(B):
        n = int(torch.randint(0, max_len + 1, (1,), generator=g))
        lo, hi = (off - 5, off + N + 5) if out_of_shard else (off, off + N)
        x = torch.randint(lo, max(hi, lo + 1), (n,), generator=g).tolist()
        if n:
            x = x + x[: n // 3]  # duplicates
        lists.append(x)
    return lists


# ----------------------------------------------------------------------------- exact inputs
# (name, B, N, D, M, exclusion, item_offset, value range)
CASES = [
    ("ties", 9, 200, 4, 17, None, 0, (-1, 1)),
    ("m1", 6, 57, 3, 1, None, 0, (-3, 3)),
    ("m_eq_n", 5, 40, 6, 40, None, 0, (-3, 3)),
    ("m_gt_n", 4, 23, 5, 50, None, 0, (-3, 3)),
    ("b1_d1", 1, 90, 1, 12, None, 0, (-3, 3)),
    ("d1_many", 13, 120, 1, 30, None, 0, (-3, 3)),
    ("exclude", 11, 150, 8, 20, "random", 1000, (-3, 3)),
    ("exclude_few_left", 7, 60, 4, 50, "dense", 0, (-2, 2)),
    ("exclude_empty", 6, 80, 5, 10, "empty", 7, (-3, 3)),
    ("exclude_all_of_a_row", 4, 30, 3, 5, "row0_all", 3, (-3, 3)),
    ("n0", 3, 0, 4, 5, None, 0, (-3, 3)),
    ("d0", 4, 30, 0, 6, "random", 0, (-3, 3)),
    ("b0", 0, 20, 4, 5, "empty", 0, (-3, 3)),
    ("d64", 20, 300, 64, 40, "random", 5, (-3, 3)),
]


def make_case(name, B, N, D, M, excl, off, rng, seed=0):
    g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    U, V = int_vecs(g, B, N, D, *rng)
    offs = ids = None
    if excl == "random":
        offs, ids = csr(random_lists(g, B, N, off, max_len=N // 2))
    elif excl == "dense":  # most of each row excluded: fewer than M eligible items left
        offs, ids = csr([torch.randperm(N, generator=g)[: N - 10 - b].add(off).tolist() for b in range(B)])
    elif excl == "empty":
        offs, ids = csr([[] for _ in range(B)])
    elif excl == "row0_all":
        offs, ids = csr([list(range(off, off + N))[::-1]] + random_lists(g, B - 1, N, off, 10))
    return U, V, M, offs, ids, off


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_inputs_match_brute_force(backend, case):
    U, V, M, offs, ids, off = make_case(*case)
    got_i, got_s = run(backend, U, V, M, offs, ids, off)
    want_i, want_s = brute(U, V, M, offs, ids, off)
    assert got_i.dtype == torch.int64 and got_s.dtype == torch.float32 and got_i.shape == (U.shape[0], M)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_s.double(), want_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_inputs_noncontiguous(backend):
    g = torch.Generator().manual_seed(3)
    U, V = int_vecs(g, 10, 130, 7)
    Ut = U.t().contiguous().t()  # column-major
    Vw = torch.zeros(130, 14)
    Vw[:, ::2] = V
    Vs = Vw[:, ::2]  # every other column
    assert not Ut.is_contiguous() and not Vs.is_contiguous()
    offs, ids = csr(random_lists(g, 10, 130, 0, 40))
    ids_w = torch.stack([ids, torch.zeros_like(ids)], 1)[:, 0]  # a strided exclusion list
    assert not ids_w.is_contiguous()
    got = run(backend, Ut, Vs, 25, offs, ids_w, 0)
    want = brute(U, V, 25, offs, ids, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].double(), want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_is_returned_as_zero(backend):
    U = torch.tensor([[0.0], [1.0]])
    V = torch.tensor([[-3.0], [0.0], [-0.0]])  # row 0: scores -0, 0, -0; row 1: -3, 0, -0
    i, s = run(backend, U, V, 3)
    assert i.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert not torch.signbit(s[:, :2]).any() and s[1, 2] == -3.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_inputs_16bit(backend, dtype):
    g = torch.Generator().manual_seed(5)
    U, V = int_vecs(g, 8, 140, 16, dtype=dtype)
    offs, ids = csr(random_lists(g, 8, 140, 3, 30))
    got = run(backend, U, V, 33, offs, ids, 3)
    want = brute(U.float(), V.float(), 33, offs, ids, 3)
    assert got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].double(), want[1])


@needs_cpp
def test_cpp_exact_float64_and_larger():
    """float64 vectors, and a larger case over many user blocks and item tiles."""
    g = torch.Generator().manual_seed(11)
    U, V = int_vecs(g, 300, 3000, 24, dtype=torch.float64)
    offs, ids = csr(random_lists(g, 300, 3000, 50, 200))
    i, s = topm_cpp.topm_dot(U, V, 120, offs, ids, 50, block_users=64, tile_items=256)
    wi, ws = brute(U, V, 120, offs, ids, 50)
    assert s.dtype == torch.float64
    assert torch.equal(i, wi) and torch.equal(s, ws)
    i2, s2 = ref.topm_dot(U, V, 120, offs, ids, 50, tile=999)
    assert torch.equal(i2, wi) and torch.equal(s2, ws)


# ----------------------------------------------------------------------------- tile sizes, threads
TILINGS = {
    "reference": [dict(tile=1), dict(tile=7), dict(tile=64), dict(tile=100000)],
    "cpp": [dict(block_users=1, tile_items=1), dict(block_users=3, tile_items=17),
            dict(block_users=1000, tile_items=5000)],
    "triton": [dict(block_b=16, block_n=16, splits=3), dict(block_b=32, block_n=64, splits=1),
               dict(block_b=16, block_n=64, splits=2, cut_rows=4, merge_rows=2)],
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_size_independence(backend):
    g = torch.Generator().manual_seed(2)
    U, V = int_vecs(g, 21, 260, 3, -1, 1)  # very many ties
    offs, ids = csr(random_lists(g, 21, 260, 9, 60))
    want = brute(U, V, 37, offs, ids, 9)
    for kw in TILINGS[backend]:
        got = run(backend, U, V, 37, offs, ids, 9, **kw)
        assert torch.equal(got[0], want[0]), kw
        assert torch.equal(got[1].double(), want[1]), kw


@pytest.mark.skipif(not INTERP, reason="on a GPU these are the default shapes, run by every test")
def test_triton_gpu_cut_and_merge_shapes_in_the_interpreter():
    """One row cut back at a time and one row per merge program, as on a GPU."""
    g = torch.Generator().manual_seed(8)
    U, V = int_vecs(g, 3, 150, 5, -1, 1)
    offs, ids = csr(random_lists(g, 3, 150, 0, 50))
    want = brute(U, V, 20, offs, ids, 0)
    got = run("triton", U, V, 20, offs, ids, 0, block_b=16, block_n=32, splits=2, cut_rows=1, merge_rows=1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1].double(), want[1])


@needs_cpp
def test_cpp_thread_count_independence():
    """1 and 2 threads (2 also splits the items into segments that are merged): bit-identical
    results on random floats, and the brute-force result on exact inputs."""
    g = torch.Generator().manual_seed(4)
    U = torch.randn(100, 32, generator=g)
    V = torch.randn(20000, 32, generator=g)
    offs, ids = csr(random_lists(g, 100, 20000, 0, 300))
    Ui, Vi = int_vecs(g, 40, 4000, 5, -2, 2)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((topm_cpp.topm_dot(U, V, 150, offs, ids, 0, block_users=64),
                         topm_cpp.topm_dot(Ui, Vi, 70, block_users=64, tile_items=128)))
    finally:
        torch.set_num_threads(before)
    (f1, e1), (f2, e2) = outs
    assert torch.equal(f1[0], f2[0]) and torch.equal(f1[1], f2[1])
    want = brute(Ui, Vi, 70)
    for e in (e1, e2):
        assert torch.equal(e[0], want[0]) and torch.equal(e[1].double(), want[1])


# ----------------------------------------------------------------------------- random floats
def check_near_ties(U, V, M, offs, ids, off, got_i, got_s):
    """got against the float64 oracle: the same set up to items within the float32 rounding
    bound tol of the row's M-th exact score, scores within tol, and got in its own ranking order."""
    B, N = U.shape[0], V.shape[0]
    S = U.double() @ V.double().T
    tol = (2 * U.shape[1] * 2.0**-24 * (U.double().abs() @ V.double().abs().T)).max(dim=1).values
    ex = excluded_sets(B, N, offs, ids, off)
    for b in range(B):
        elig = torch.tensor(sorted(set(range(N)) - ex[b]), dtype=torch.int64)
        k = min(M, elig.numel())
        gi, gs = got_i[b], got_s[b].double()
        assert (gi[k:] == -1).all() and torch.isinf(gs[k:]).all()
        loc = gi[:k] - off
        assert len(set(loc.tolist())) == k and not (set(loc.tolist()) & ex[b])
        assert ((loc >= 0) & (loc < N)).all()
        exact = S[b, loc]
        assert ((gs[:k] - exact).abs() <= tol[b]).all()  # the returned scores are the products
        # ranking order of the returned scores (ties: smaller id first)
        assert all((gs[p] > gs[p + 1]) or (gs[p] == gs[p + 1] and loc[p] < loc[p + 1]) for p in range(k - 1))
        srow = S[b, elig]
        kth = torch.sort(srow, descending=True).values[k - 1]
        must = set(elig[srow > kth + 2 * tol[b]].tolist())  # clearly above the M-th: must be taken
        assert must <= set(loc.tolist())
        assert (exact >= kth - 2 * tol[b]).all()  # nothing clearly below the M-th


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_random_floats_against_float64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 is not the Triton kernels' (the refusal: test_triton_limits)")
    g = torch.Generator().manual_seed(7)
    B, N, D, M = (24, 500, 20, 40) if backend == "triton" else (50, 3000, 40, 100)
    U = torch.randn(B, D, generator=g).to(dtype)
    V = (torch.randn(N, D, generator=g) * 0.5).to(dtype)
    offs, ids = csr(random_lists(g, B, N, 100, N // 4))
    got_i, got_s = run(backend, U, V, M, offs, ids, 100)
    assert got_s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_near_ties(U, V, M, offs, ids, 100, got_i, got_s)


# ----------------------------------------------------------------------------- bad arguments
def _bad_calls():
    U, V = torch.randn(3, 4), torch.randn(10, 4)
    offs, ids = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3])
    return [
        ((torch.randn(4), V, 2), ValueError, "user_vecs must be 2-D"),
        ((U, torch.randn(10, 5), 2), ValueError, "D = 4"),
        ((U, V.double(), 2), TypeError, "one dtype"),
        ((U.int(), V.int(), 2), TypeError, "floating"),
        ((U, V, 0), ValueError, "M must be"),
        ((U, V, 2.0), ValueError, "M must be"),
        ((U, V, True), ValueError, "M must be"),
        ((U, V, 2, None, None, -1), ValueError, "item_offset"),
        ((U, V, 2, offs, None), ValueError, "together"),
        ((U, V, 2, offs[:3], ids), ValueError, r"\(B \+ 1,\)"),
        ((U, V, 2, offs.int(), ids), TypeError, "int64"),
        ((U, V, 2, offs, ids.float()), TypeError, "int64"),
        ((U, V, 2, torch.tensor([0, 2, 1, 3]), ids), ValueError, "non-decreasing"),
        ((U, V, 2, torch.tensor([0, 1, 2, 4]), ids), ValueError, r"\[0, 3\]"),
        ((U, V, 2, torch.tensor([-1, 1, 2, 3]), ids), ValueError, r"\[0, 3\]"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend):
    for args, exc, pattern in _bad_calls():
        with pytest.raises(exc, match=pattern):
            run(backend, *args)


_DIRECT = r"""
import torch, rcekd_kernels
from rcekd_kernels.backends import native
op = native.ops().topm_dot
U, V = torch.randn(3, 4), torch.randn(10, 4)
ids = torch.tensor([1, 2, 3])
bad = [
    ((U, V, 2, torch.tensor([0, 2, 1, 3]), ids, 0, 0, 0), "non-decreasing"),
    ((U, V, 2, torch.tensor([0, 1, 2, 99]), ids, 0, 0, 0), "must lie in"),
    ((U, V, 2, torch.tensor([-5, 1, 2, 3]), ids, 0, 0, 0), "must lie in"),
    ((U, V, 2, torch.tensor([0, 1, 2]), ids, 0, 0, 0), "B + 1"),
    ((U, V, 2, torch.tensor([0, 1, 2, 3], dtype=torch.int32), ids, 0, 0, 0), "int64"),
    ((U, V, 2, torch.tensor([0, 1, 2, 3]), ids.int(), 0, 0, 0), "int64"),
    ((U, V, 2, torch.tensor([0, 1, 2, 3]), None, 0, 0, 0), "together"),
    ((U, V, 0, None, None, 0, 0, 0), "M must be"),
    ((U, V, 2, None, None, -3, 0, 0), "item_offset"),
    ((U, V, 2, None, None, 2**63 - 5, 0, 0), "item_offset"),
    ((U, torch.randn(10, 5), 2, None, None, 0, 0, 0), "D = 4"),
    ((U.half(), V.half(), 2, None, None, 0, 0, 0), "float32 or float64"),
    ((U, V.double(), 2, None, None, 0, 0, 0), "one dtype"),
    ((torch.randn(3), V, 2, None, None, 0, 0, 0), "2-D"),
    ((U, V, 2, None, None, 0, -1, 0), "block_users"),
    ((U, V, 2, None, None, 0, 0, 2**40), "tile_items"),
]
for args, pattern in bad:
    try:
        op(*args)
    except RuntimeError as e:
        assert pattern in str(e), (pattern, str(e))
    else:
        raise AssertionError(f"no error for {pattern}")
i, s = op(U, V, 2, torch.tensor([0, 1, 2, 3]), torch.tensor([2**62, -2**62, 5]), 0, 0, 0)
assert i.shape == (3, 2)
print("ok")
"""


def _python(code, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@needs_cpp
def test_cpp_direct_op_calls_check_their_arguments():
    r = _python(_DIRECT)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])


# ----------------------------------------------------------------------------- memory
_MEMORY = r"""
import resource, sys, torch
from rcekd_kernels.backends import native, reference as ref
topm_cpp = native.cpp
backend = sys.argv[1]
B, N, D, M = 64, 2_000_000, 8, 100
g = torch.Generator().manual_seed(0)
# exact products: any GEMM gives the same scores; made in float32 (no temporary that would raise
# the high-water mark above what the call needs)
U = torch.randint(-3, 4, (B, D), generator=g, dtype=torch.float32)
V = torch.randint(-3, 4, (N, D), generator=g, dtype=torch.float32)
offs = torch.arange(0, B * 50 + 1, 50)
ids = torch.randint(0, N, (B * 50,), generator=g)
f = topm_cpp.topm_dot if backend == "cpp" else ref.topm_dot
f(U[:2], V[:5000], M, offs[:3], ids[:100])  # load everything once
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the high-water mark so far
i, s = f(U, V, M, offs, ids)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
top = torch.topk(U[:3] @ V.T, M, dim=1)
assert torch.equal(s[:3], top.values) and (i >= 0).all(), "wrong result"
print("extra_mb", (peak - base) / 1024, "scores_mb", B * N * 4 / 2**20)
"""


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if CPP_WHY is None else []))
def test_large_n_does_not_allocate_b_by_n(backend):
    """B = 64, N = 2e6: the (B, N) scores would be 488 MB; the peak RSS may grow by 48 MB."""
    r = subprocess.run([sys.executable, "-c", _MEMORY, backend], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    extra = float(r.stdout.split()[1])
    assert extra < 48, r.stdout


# ----------------------------------------------------------------------------- Triton for sm_90
_AOT = r"""
import os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("no AOT API:", e); sys.exit(2)
import torch
from rcekd_kernels.backends.triton import topm as TD

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def build(fn, types, consts, warps):
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

def stack_bytes(k):
    if not os.path.exists(CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    for tok in out.split():
        if tok.startswith("STACK:"):
            return int(tok[6:])
    return None

def sweep_types(dt):
    return dict(u_ptr=dt, v_ptr=dt, buf_ptr="*i64", cnt_ptr="*i32", thr_ptr="*i64", exo_ptr="*i64",
                exi_ptr="*i64", u_s0="i64", u_s1="i64", v_s0="i64", v_s1="i64")

jobs = []
for dt, tdt in (("*fp32", torch.float32), ("*bf16", torch.bfloat16), ("*fp16", torch.float16)):
    BB, BN, BD, W = TD.launch_blocks(tdt, 64)
    for ex in (True, False):  # the defaults at D = 64, M = 200: must not spill
        jobs.append((TD._sweep_kernel, sweep_types(dt), dict(HAS_EX=ex, IEEE=dt == "*fp32", BLOCK_B=BB, BLOCK_N=BN,
                     BLOCK_D=BD, CAP=512, CUT_ROWS=1, UPCAST=False), W, True))
jobs.append((TD._sweep_kernel, sweep_types("*bf16"), dict(HAS_EX=True, IEEE=False, BLOCK_B=16, BLOCK_N=16,
             BLOCK_D=16, CAP=64, CUT_ROWS=16, UPCAST=True), 4, False))  # the interpreter's shapes
for rows, lanes in ((1, 2048), (4, 512)):
    jobs.append((TD._merge_kernel, dict(buf_ptr="*i64", cnt_ptr="*i32", out_ptr="*i64"),
                 dict(CAP=512, MP=256, LANES=lanes, ROWS=rows), 4, True))
for fn, types, consts, warps, no_spill in jobs:
    try:
        k = build(fn, types, consts, warps)
    except TypeError as e:  # a changed AOT API, not a kernel error
        if "ASTSource" in repr(e) or "GPUTarget" in repr(e):
            print("AOT API changed:", e); sys.exit(2)
        raise
    st = stack_bytes(k)
    print("compiled", fn.__name__, consts, "stack", st)
    assert not (no_spill and st), f"{fn.__name__} {consts} spills registers ({st} bytes of stack)"
"""


@pytest.mark.skipif(TRITON_WHY is not None, reason=f"triton unavailable: {TRITON_WHY}")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run")
def test_triton_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 2:
        pytest.skip(r.stdout.strip()[-300:])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@pytest.mark.skipif(TRITON_WHY is not None, reason=f"triton unavailable: {TRITON_WHY}")
def test_triton_limits():
    """Lists above 1024 items and float64 vectors are not the Triton kernels': refused with the
    reason when asked for, passed on by auto."""
    U, V = torch.randn(2, 4, device=TRITON_DEV), torch.randn(2000, 4, device=TRITON_DEV)
    with pytest.raises(ValueError, match="1024"):
        R.topm_dot(U, V, 1500, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        R.topm_dot(U.double(), V.double(), 3, backend="triton")
    i, s = R.topm_dot(U.double(), V.double(), 3)  # auto: another backend
    assert s.dtype == torch.float64 and i.shape == (2, 3)
