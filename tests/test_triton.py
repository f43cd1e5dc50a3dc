"""What is particular to the Triton backend; the conformance suite
(tests/test_conformance.py) runs everything every backend must do.

On a machine without CUDA the kernels run on CPU tensors in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1): small shapes only. On CUDA the same
tests run on the GPU, plus the ``gpu_only`` ones: 1000 random configurations,
the benchmark shapes, long rows (N > 2**20, split over many programs) and a
check that fused_fwd allocates nothing of size B x N. Comparisons with the
reference (and the excused near-tie rows of the sampling) are those of
tests/conformance.py.
"""
import json
import os
import pathlib
import random
import time

import pytest
import torch

import rcekd_kernels
from rcekd_kernels import RCEKDConfig, rng, spec
from rcekd_kernels.backends import reference as ref
from rcekd_kernels.backends import unavailable_reason

import conformance as C

DEV = "cuda" if torch.cuda.is_available() else "cpu"
WHY = unavailable_reason("triton", DEV)
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"triton backend not available on {DEV}: {WHY}")
if WHY is None:
    import rcekd_kernels.backends.triton as tb
    from rcekd_kernels.backends.triton import _common
    from rcekd_kernels.backends.triton import selection as tsel

ON_GPU = DEV == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="CUDA only: too slow for the CPU interpreter")
_ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = _ROOT / "tests" / "data" / "rng_vectors.json"  # the spec's vectors, copied into the project
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


# ----------------------------------------------------------------------------- inputs
def make_case(B, N, K, M, L, *, dtype=F32, ties=False, exclude=0.0, given=False, noncontig=False,
              seed=0, t_dtype=None, device=DEV):
    """Random rows: s, t (B, N), teacher_topk or None, exclude or None, row_ids."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, generator=g)
    t = torch.randn(B, N, generator=g) * 2
    if ties:  # many equal scores (exact in every dtype)
        s = (s * 2).round() / 2
        t = (t * 2).round() / 2
    ex = None
    if exclude > 0:
        ex = torch.rand(B, N, generator=g) < exclude
        for r in range(B):  # at least M (and K) items stay in every row
            keep = torch.randperm(N, generator=g)[:M]
            ex[r, keep] = False
    topk = None
    if given:  # any K distinct non-excluded ids (not necessarily the teacher's best)
        rows = []
        for r in range(B):
            ok = torch.arange(N) if ex is None else (~ex[r]).nonzero()[:, 0]
            rows.append(ok[torch.randperm(ok.numel(), generator=g)[:K]])
        topk = torch.stack(rows)
    row_ids = torch.randint(-2**40, 2**40, (B,), generator=g)
    s = s.to(dtype)
    t = t.to(t_dtype or dtype)
    if noncontig:  # strided s, column-major t / exclude / topk
        s2 = torch.zeros(B, 2 * N, dtype=s.dtype)
        s2[:, ::2] = s
        s = s2[:, ::2]
        t = t.t().contiguous().t()
        ex = None if ex is None else ex.t().contiguous().t()
        topk = None if topk is None else topk.t().contiguous().t()
        assert not s.is_contiguous() and (B == 1 or not t.is_contiguous())  # (1, N).t().t() is contiguous
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(s), mv(t), mv(topk), mv(ex), mv(row_ids)


def case(s, t, topk, ex, rows, K, M, L, T=10.0, mode="paper", seed=0, tau=0.7, beta=3.0):
    """A conformance case from make_case's tensors."""
    return C.case_of(s, t, teacher_topk=topk, exclude=ex, row_ids=rows, seed=seed, K=K, M=M, L=L, T=T,
                     mode=mode, tau=tau, beta=beta)


def check(s, t, topk, ex, rows, K, M, L, T=10.0, mode="paper", seed=0, tau=0.7, beta=3.0) -> int:
    """Every op against the reference (tests/conformance.py); returns the excused rows."""
    return C.compare_ops("triton", case(s, t, topk, ex, rows, K, M, L, T, mode, seed, tau, beta), grad_seed=seed)


CASES = [
    # B, N, K, M, L, dict(options)
    (3, 64, 4, 8, 4, dict()),
    (3, 64, 4, 8, 4, dict(mode="official", seed=1)),
    (1, 7, 2, 7, 7, dict(seed=2)),                                   # M = N, L = M
    (5, 7, 3, 3, 2, dict(mode="official", seed=3)),                  # K = M
    (3, 300, 8, 16, 16, dict(dtype=BF16, ties=True, seed=4)),        # L = M, ties
    (3, 300, 8, 20, 10, dict(dtype=F16, ties=True, exclude=0.3, seed=5)),
    (5, 1000, 10, 30, 12, dict(ties=True, exclude=0.5, given=True, noncontig=True, mode="official",
                               seed=6, T=0.5)),
    (2, 1000, 16, 32, 16, dict(dtype=BF16, given=True, noncontig=True, seed=7, T=100.0)),
    (3, 64, 16, 64, 32, dict(seed=8, exclude=0.0)),                  # M = N
    (2, 300, 5, 40, 40, dict(mode="official", exclude=0.8, seed=9)),  # L = M, few items left
    (2, 50, 1, 1, 1, dict(seed=10)),                                  # K = M = L = 1
    (3, 200, 6, 12, 6, dict(dtype=BF16, t_dtype=F32, ties=True, seed=11)),  # mixed dtypes
]


def _split(case):
    B, N, K, M, L, o = case
    o = dict(o)
    mode = o.pop("mode", "paper")
    T = o.pop("T", 10.0)
    return B, N, K, M, L, mode, T, o


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}K{c[2]}M{c[3]}L{c[4]}")
def test_select_and_fused_match_reference(case):
    B, N, K, M, L, mode, T, o = _split(case)
    seed = o.get("seed", 0)
    s, t, topk, ex, rows = make_case(B, N, K, M, L, **o)
    s0, t0 = s.clone(), t.clone()
    check(s, t, topk, ex, rows, K, M, L, T, mode, seed)
    assert torch.equal(s, s0) and torch.equal(t, t0)  # never written


def test_constant_rows_all_ties():
    B, N, K, M, L = 2, 100, 5, 10, 5
    s = torch.zeros(B, N, device=DEV)
    s[:, 50:] = -0.0  # -0.0 and +0.0 tie
    t = torch.ones(B, N, device=DEV)
    rows = torch.arange(B, device=DEV)
    for mode in ("paper", "official"):
        check(s, t, None, None, rows, K, M, L, 10.0, mode, 5, tau=1.0, beta=5.0)


def test_select_without_teacher_scores():
    s, t, topk, ex, rows = make_case(3, 300, 6, 12, 6, given=True, exclude=0.2, seed=12)
    cfg = RCEKDConfig(K=6, M=12, L=6)
    got = tb.select(s, None, topk, ex, rows, cfg, 12)
    want = ref.select(s, None, topk, ex, rows, cfg, 12)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_row_split(monkeypatch, mode):
    """Rows longer than a chunk: phase 1 over several programs, merged in several levels."""
    monkeypatch.setattr(_common, "CHUNK", 16)
    monkeypatch.delenv("RCEKD_TRITON_CHUNK", raising=False)
    B, N, K, M, L = 3, 1000, 8, 20, 10
    ch = _common.chunk_size(M)
    assert ch < N and (N // ch) * M > ch  # >= 2 merge levels for the pool
    s, t, topk, ex, rows = make_case(B, N, K, M, L, exclude=0.3, ties=True, seed=13)
    # the first-phase keys alone are already the top-M of each row
    keys = tsel.top_keys(s, ex, M)
    items = (2**32 - 1) - (keys & 0xFFFFFFFF)
    want = spec.ranked_topk(s, M, ex)
    assert torch.equal(items.sort(1).values, want.sort(1).values)
    check(s, t, topk, ex, rows, K, M, L, 10.0, mode, 13, tau=1.0, beta=5.0)
    s, t, topk, ex, rows = make_case(2, 300, 4, 16, 8, dtype=BF16, given=True, noncontig=True, seed=14)
    check(s, t, topk, ex, rows, 4, 16, 8, 10.0, mode, 14)


def test_row_split_env_knob(monkeypatch):
    monkeypatch.setenv("RCEKD_TRITON_CHUNK", "64")
    assert _common.chunk_size(4) == 64 and _common.chunk_size(100) == 512
    s, t, topk, ex, rows = make_case(2, 500, 4, 8, 4, seed=15)
    check(s, t, topk, ex, rows, 4, 8, 4, 10.0, "paper", 15)


if WHY is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _take_top_kernel(h_ptr, out_ptr, R, NBITS: tl.constexpr, RADIX: tl.constexpr, BLOCK: tl.constexpr):
        hs = tl.load(h_ptr + tl.arange(0, BLOCK)).to(tl.uint32)
        take = _common.take_top(hs, R, NBITS, RADIX)
        tl.store(out_ptr + tl.arange(0, BLOCK), take.to(tl.int32))


@pytest.mark.parametrize("nbits", [32, 19, 16])
def test_take_top_radix_and_bisect_match_brute_force(nbits):
    """Both threshold searches of the selection's first phase give exactly the R largest lanes
    (ties at the threshold to the lowest lanes), for the value widths of float32, float16 and
    bfloat16 images, with heavy ties, all-equal blocks, R = 1 and R = the block."""
    BLOCK = 256
    g = torch.Generator().manual_seed(nbits)
    blocks = [torch.randint(0, 2**nbits, (BLOCK,), generator=g, dtype=torch.int64),
              torch.randint(0, 4, (BLOCK,), generator=g, dtype=torch.int64) << (nbits - 2),  # 4 distinct values
              torch.full((BLOCK,), 2**nbits - 1, dtype=torch.int64),                        # all equal (max)
              torch.zeros(BLOCK, dtype=torch.int64),                                        # all equal (0)
              (torch.randint(0, 2**nbits, (BLOCK,), generator=g, dtype=torch.int64) | 0xFF) ^ 0xFF]  # low digit 0
    for h in blocks:
        for R in (1, 2, 37, 128, BLOCK - 1, BLOCK):
            # brute force: lanes ordered by (value desc, lane asc), the first R taken
            order = sorted(range(BLOCK), key=lambda i: (-int(h[i]), i))[:R]
            want = torch.zeros(BLOCK, dtype=torch.int32)
            want[order] = 1
            for radix in (False, True):
                out = torch.empty(BLOCK, dtype=torch.int32, device=DEV)
                _take_top_kernel[(1,)](h.to(DEV), out, R, NBITS=nbits, RADIX=radix, BLOCK=BLOCK)
                assert torch.equal(out.cpu(), want), (nbits, R, radix, h[:8])


def test_radix_select_matches_reference(monkeypatch):
    """The whole select and fused paths with the radix threshold search (float32, bfloat16 and
    float16 rows, ties, exclusion, rows split over chunks and merged)."""
    monkeypatch.setenv("RCEKD_TRITON_SELECT", "radix")
    for case in (CASES[4], CASES[5], CASES[6]):
        B, N, K, M, L, mode, T, o = _split(case)
        s, t, topk, ex, rows = make_case(B, N, K, M, L, **o)
        check(s, t, topk, ex, rows, K, M, L, T, mode, o.get("seed", 0))
    monkeypatch.setenv("RCEKD_TRITON_CHUNK", "64")
    s, t, topk, ex, rows = make_case(3, 700, 8, 20, 10, exclude=0.3, ties=True, seed=13)
    for mode in ("paper", "official"):
        check(s, t, topk, ex, rows, 8, 20, 10, 10.0, mode, 13, tau=1.0, beta=5.0)


def test_select_algo_knob(monkeypatch):
    monkeypatch.setenv("RCEKD_TRITON_SELECT", "Radix")
    assert _common.select_algo() == "radix"
    monkeypatch.delenv("RCEKD_TRITON_SELECT")
    assert _common.select_algo() == "bisect"
    monkeypatch.setenv("RCEKD_TRITON_SELECT", "heap")
    with pytest.raises(ValueError, match="RCEKD_TRITON_SELECT must be one of"):
        _common.select_algo()


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_subset_ops_strided_inputs_and_stride0_gradient(dtype):
    """Non-contiguous gathered scores and a stride-0 upstream gradient (the mean's backward)."""
    g = torch.Generator().manual_seed(16)
    for K, L, tau in ((4, 3, 1.0), (7, 16, 0.5), (1, 1, 2.0)):
        B = 4
        cfg = RCEKDConfig(K=K, M=max(K, L), L=L, tau=tau)
        s_g = (torch.randn(B, 2 * K + L + 3, generator=g) * 3).to(dtype)[:, 3:].to(DEV)  # non-contiguous
        t_g = (torch.randn(B, 2 * K + L, generator=g) * 3).to(dtype).to(DEV)
        q2 = (torch.rand(B, K, generator=g) < 0.5).to(DEV)
        gamma = torch.rand(B, generator=g).to(DEV)
        loss, parts = tb.subset_ce_fwd(s_g, t_g, q2, gamma, cfg)
        loss_r, parts_r = ref.subset_ce_fwd(s_g, t_g, q2, gamma, cfg)
        C.assert_close("subset loss", loss, loss_r, F32)
        C.assert_close("subset parts", parts, parts_r, F32)
        gr = torch.rand(B, generator=g).to(DEV).expand(B)
        gr0 = torch.full((1,), 0.25, device=DEV).expand(B)  # a stride-0 gradient
        for w in (gr, gr0):
            d = tb.subset_ce_bwd(w, s_g, t_g, q2, gamma, cfg)
            d_r = ref.subset_ce_bwd(w, s_g, t_g, q2, gamma, cfg)
            C.assert_close("subset grad", d, d_r, F32)
            assert bool((d[:, K + L:][~q2] == 0).all())


def test_mean_reduction_stride0_grad():
    """The mean's backward hands the kernels a stride-0 upstream gradient."""
    s, t, topk, ex, rows = make_case(3, 100, 4, 8, 4, seed=18)
    grads = []
    for be in ("triton", "reference"):
        x = s.clone().requires_grad_()
        rcekd_kernels.rce_kd_loss(x, t, K=4, M=8, L=4, backend=be).backward()
        grads.append(x.grad)
    C.assert_close("grad of the mean", grads[0], grads[1], F32)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, numel, dtype) of the tensors made by allocating ops (the interpreter's
    own storage copies, aten.set_ / aten.copy_, are not allocations of the backend)."""

    ALLOC = ("empty", "zeros", "ones", "full", "clone", "_to_copy", "new_", "arange", "rand")

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if any(a in name for a in self.ALLOC):
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.made.append((name, o.numel(), o.dtype))
        return out


def test_no_row_sized_temporaries():
    B, N, K, M, L = 3, 1000, 4, 8, 4
    s, t, topk, ex, rows = make_case(B, N, K, M, L, dtype=BF16, exclude=0.2, seed=20)
    cfg = RCEKDConfig(K=K, M=M, L=L)
    with _Allocations() as fwd:
        _loss, stats, idx, q2 = tb.fused_fwd(s, t, None, ex, rows, cfg, 20)
    big = [m for m in fwd.made if m[1] >= B * N // 4]
    assert not big, f"fused_fwd allocated {big}"
    gr = torch.ones(B, device=DEV)
    with _Allocations() as bwd:
        tb.fused_bwd(gr, s, t, idx, q2, stats[:, 2].contiguous(), cfg)
    big = [m for m in bwd.made if m[1] >= B * N // 4]
    assert len(big) == 1 and big[0][2] == BF16, f"fused_bwd allocated {big} (only the bfloat16 output is expected)"


def test_what_it_does_not_support_is_refused():
    """float64 scores and sets above 1024 are not the kernels': supports() says so, auto passes
    the call on, an explicit backend="triton" raises with the reason."""
    from rcekd_kernels.backends import Call
    f64 = Call("fused_fwd", DEV, (torch.float64,), RCEKDConfig(K=3, M=6, L=3), 50)
    assert "float64" in tb.supports(f64)
    big = Call("select", DEV, (F32,), RCEKDConfig(K=1025, M=1025, L=10), 1100)
    assert "1024" in tb.supports(big)
    assert tb.supports(Call("select", DEV, (BF16, F32), RCEKDConfig(K=4, M=8, L=4), 100)) is None
    s = torch.randn(2, 50, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="float64"):
        rcekd_kernels.rce_kd_loss(s, s, K=3, M=6, L=3, backend="triton")
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: rcekd_kernels.rce_kd_loss(v, s, K=3, M=6, L=3, reduction="sum"), (x,))


def test_rng_vectors():
    vec = json.loads(SPEC.read_text())
    seeds = sorted({v["seed"] for v in vec})
    for seed in seeds:
        vs = [v for v in vec if v["seed"] == seed]
        rows = torch.tensor([v["row"] for v in vs], dtype=torch.int64, device=DEV)
        items = torch.tensor([v["item"] for v in vs], dtype=torch.int64, device=DEV)
        h, g = _common.rng_values(rng.row_keys(seed, rows), items)
        assert h.tolist() == [v["hash"] for v in vs]
        want = torch.tensor([v["gumbel_f64"] for v in vs], dtype=torch.float64)
        assert torch.allclose(g.cpu(), want, rtol=1e-13, atol=1e-13)
        mine = rng.gumbel(seed, rows, items.unsqueeze(1))[:, 0]
        assert torch.allclose(g, mine, rtol=1e-15, atol=1e-15)


def test_available():
    assert tb.available(DEV) is None
    assert isinstance(tb.available("mps"), str)
    assert tb.NAME == "triton"


_AOT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("no AOT API:", e); sys.exit(2)
from rcekd_kernels.backends.triton import _common as C, fused as F, selection as S, subset_ce as SC

def build(fn, types, consts, warps):
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

rows = dict(s_ptr="*bf16", t_ptr="*fp32", ex_ptr="*u8", pool_ptr="*i64", tq_ptr="*i64", k2_ptr="*i64",
            scr_ptr="*i64", mark_ptr="*i32", idx_ptr="*i64", q2_ptr="*u8", counts_ptr="*i64", loss_ptr="*fp32",
            stats_ptr="*fp32", T_hi="fp32", T_lo="fp32", tau="fp32", beta="fp32", K_f="fp32")
sub = dict(s_ptr="*bf16", t_ptr="*fp32", q2_ptr="*u8", gam_ptr="*fp32", gr_ptr="*fp32", loss_ptr="*fp32",
           parts_ptr="*fp32", grad_ptr="*fp32", tau="fp32")
jobs = [
    (S._chunk_top_kernel, dict(src_ptr="*fp32", ex_ptr="*u8", out_ptr="*i64"),
     dict(KEYS=False, HAS_EX=True, LOW=0, CH=4096, RADIX=False), 8),
    (S._chunk_top_kernel, dict(src_ptr="*i64", ex_ptr="*u8", out_ptr="*i64"),
     dict(KEYS=True, HAS_EX=False, LOW=16, CH=4096, RADIX=False), 8),
    (S._chunk_top_kernel, dict(src_ptr="*fp32", ex_ptr="*u8", out_ptr="*i64"),
     dict(KEYS=False, HAS_EX=True, LOW=0, CH=4096, RADIX=True), 8),
    (S._chunk_top_kernel, dict(src_ptr="*bf16", ex_ptr="*u8", out_ptr="*i64"),
     dict(KEYS=False, HAS_EX=False, LOW=16, CH=4096, RADIX=True), 8),
    (S._select_rows_kernel, rows, dict(BLOCK_K=16, BLOCK_M=32, LOG_M=6), 2),
    (F._fused_rows_kernel, rows, dict(BLOCK_K=16, BLOCK_M=32, LOG_M=6), 2),
    (SC._subset_fwd_kernel, sub, dict(BLOCK_K=16, BLOCK_L=32), 2),
    (SC._subset_bwd_kernel, sub, dict(BLOCK_K=16, BLOCK_L=32), 2),
    (F._fused_bwd_kernel, dict(gr_ptr="*fp32", s_ptr="*fp16", t_ptr="*fp32", idx_ptr="*i64", q2_ptr="*u8",
                               gam_ptr="*fp32", out_ptr="*fp16", tau="fp32"),
     dict(BLOCK_K=16, BLOCK_L=32, TILE=32), 2),
    (C._rng_kernel, dict(k2_ptr="*i64", x_ptr="*i64", h_ptr="*i64", g_ptr="*fp32"),
     dict(HASH=True, BLOCK=1024), 4),
]
for fn, types, consts, warps in jobs:
    try:
        build(fn, types, consts, warps)
    except TypeError as e:  # a changed AOT API, not a kernel error
        if "ASTSource" in repr(e) or "GPUTarget" in repr(e):
            print("AOT API changed:", e); sys.exit(2)
        raise
    print("compiled", fn.__name__, consts)
"""


@pytest.mark.skipif(ON_GPU, reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90(tmp_path):
    """Without a GPU: the kernels compile to sm_90 machine code (Triton's own LLVM and
    ptxas), which the interpreter never checks."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 2:
        pytest.skip(r.stdout.strip()[-300:])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


# ----------------------------------------------------------------------------- CUDA only
@gpu_only
def test_gumbel_exact_for_every_u():
    """All 2**24 values of u: the kernels' float64 Gumbel numbers equal torch's (CUDA)
    to the last bits, so their float32 keys agree."""
    h = torch.arange(2**24, dtype=torch.int64, device=DEV) << 8
    hh, g = _common.rng_values(torch.zeros(1, dtype=torch.int64, device=DEV), h, hash=False)
    assert torch.equal(hh, h)
    u = ((h >> 8).to(torch.float64) + 0.5) * (2.0**-24)
    want = -torch.log(-torch.log(u))
    n_bad = int((g != want).sum())
    assert torch.allclose(g, want, rtol=1e-15, atol=1e-15), f"{n_bad} of 2**24 Gumbel numbers differ"


@gpu_only
def test_random_configurations():
    """1000 random configurations (small sets, all options) against the reference."""
    rnd = random.Random(1234)
    t0 = time.time()
    n_excused = n_rows = 0
    for i in range(1000):
        K = rnd.randint(1, 16)
        M = rnd.randint(K, 16)
        L = rnd.randint(1, M)
        N = rnd.choice([M, M + 1, rnd.randint(M, 300), rnd.randint(M, 5000), rnd.randint(4000, 20000)])
        B = rnd.randint(1, 8)
        dtype = F32 if i < 800 else BF16  # (float16 in CASES; fewer kernel variants to compile)
        o = dict(dtype=dtype, ties=rnd.random() < 0.3, exclude=rnd.choice([0.0, 0.0, 0.2, 0.7]) if N > 2 * M else 0.0,
                 given=rnd.random() < 0.3, noncontig=rnd.random() < 0.2, seed=i)
        mode = rnd.choice(["paper", "official"])
        T, tau, beta = rnd.choice([0.5, 1.0, 10.0, 100.0]), rnd.choice([0.5, 1.0, 2.0]), rnd.choice([0.0, 1.0, 5.0])
        chunk = rnd.choice([None, None, None, 256])
        if chunk:
            os.environ["RCEKD_TRITON_CHUNK"] = str(chunk)
        algo = rnd.choice(["bisect", "radix"])
        os.environ["RCEKD_TRITON_SELECT"] = algo
        try:
            s, t, topk, ex, rows = make_case(B, N, K, M, L, **o)
            exc = check(s, t, topk, ex, rows, K, M, L, T, mode, i, tau=tau, beta=beta)
        except AssertionError as e:
            raise AssertionError(f"config {i}: B={B} N={N} K={K} M={M} L={L} {o} mode={mode} T={T} "
                                 f"tau={tau} beta={beta} chunk={chunk} select={algo}: {e}") from e
        finally:
            os.environ.pop("RCEKD_TRITON_CHUNK", None)
            os.environ.pop("RCEKD_TRITON_SELECT", None)
        n_excused += exc
        n_rows += B
    print(f"\n1000 random configurations in {time.time() - t0:.1f} s, {n_excused} of {n_rows} rows excused")
    assert n_excused <= max(2, n_rows // 1000)


@gpu_only
@pytest.mark.parametrize("algo", ["bisect", "radix"])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N", [25181, 40981])
def test_benchmark_shapes(dtype, N, algo, monkeypatch):
    monkeypatch.setenv("RCEKD_TRITON_SELECT", algo)
    B, K, M, L = 1024, 100, 200, 100
    for mode, given in (("paper", False), ("official", True)):
        s, t, topk, ex, rows = make_case(B, N, K, M, L, dtype=dtype, given=given, seed=N)
        rows = torch.arange(B, device=DEV)
        check(s, t, topk, ex, rows, K, M, L, 10.0, mode, 3, tau=1.0, beta=5.0)


@gpu_only
def test_fused_fwd_allocates_no_row_sized_temporary():
    B, N, K, M, L = 1024, 40981, 100, 200, 100
    s, t, topk, ex, rows = make_case(B, N, K, M, L, dtype=BF16, seed=21)
    cfg = RCEKDConfig(K=K, M=M, L=L)
    tb.fused_fwd(s, t, None, None, rows, cfg, 0)  # compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tb.fused_fwd(s, t, None, None, rows, cfg, 0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < s.numel() * s.element_size() // 2, f"fused_fwd used {extra} extra bytes"


@gpu_only
@pytest.mark.parametrize("N,B", [(2**20 + 12345, 3), (2**24 + 3, 1)])
def test_long_rows(N, B):
    K, M, L = 100, 1024, 200  # the largest pool
    s, t, topk, ex, rows = make_case(B, N, K, M, L, exclude=0.1, seed=22)
    check(s, t, topk, ex, rows, K, M, L, 10.0, "paper", 22, tau=1.0, beta=5.0)
    check(s, t, topk, ex, rows, K, 200, 100, 10.0, "official", 22, tau=1.0, beta=5.0)
