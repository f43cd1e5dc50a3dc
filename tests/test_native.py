"""The compiled backends ("cpp" on CPU, "cuda" on GPU) against the reference.

* hundreds of random configurations of both modes: sets exactly equal (content
  and order), losses and gradients to 1e-5 relative; ties, exclusion masks,
  given / computed teacher top-K, K = M, L = M, M = N, B = 1, several dtypes,
  non-contiguous inputs; with 1 and 2 threads;
* bad inputs through the public API raise the same errors as the reference;
* the extension's loader: no extension -> silently unavailable, a broken one ->
  one warning, the package still imports;
* every .cu file compiles with nvcc (so the CUDA code cannot rot on CPU-only
  machines), and CMakeLists.txt configures and builds;
* the CUDA backend against the reference on CUDA tensors (skipped without a GPU).
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rcekd_kernels
from rcekd_kernels.backends import native
from rcekd_kernels.backends import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPP_WHY = native.cpp.available("cpu")
needs_cpp = pytest.mark.skipif(CPP_WHY is not None, reason=f"compiled CPU extension unavailable: {CPP_WHY}")
CUDA_WHY = "no CUDA device" if not torch.cuda.is_available() else native.cuda.available("cuda")
needs_cuda = pytest.mark.skipif(CUDA_WHY is not None, reason=f"CUDA backend unavailable: {CUDA_WHY}")


# ----------------------------------------------------------------- random cases
def _scores(g: torch.Generator, B: int, N: int, dtype, ties: str, contiguous: bool, device) -> torch.Tensor:
    if ties == "int":  # very many ties
        x = torch.randint(-3, 4, (B, N), generator=g).to(torch.float64)
    elif ties == "round":
        x = (torch.randn(B, N, generator=g, dtype=torch.float64) * 2).round(decimals=1)
    else:
        x = torch.randn(B, N, generator=g, dtype=torch.float64) * 3
    x = x.to(dtype).to(device)
    if not contiguous:  # column-major storage, or every other column of a wider tensor
        if int(torch.randint(0, 2, (1,), generator=g)) == 0:
            x = x.t().contiguous().t()
        else:
            wide = torch.zeros(B, 2 * N, dtype=dtype, device=device)
            wide[:, ::2] = x
            x = wide[:, ::2]
    return x


def make_case(seed: int, device="cpu"):
    """One random configuration of the loss (a dict of the backends' arguments)."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B = rnd.choice([1, 1, 2, 3, 5, 8, 17])
    N = rnd.choice([1, 2, 3, 5, 8, 13, 30, 64, 100, 257])
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
    dtype = rnd.choice([torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float16])
    t_dtype = dtype if rnd.random() < 0.85 else rnd.choice([torch.float32, torch.float64, torch.bfloat16])
    ties = rnd.choice(["none", "round", "int"])
    s = _scores(g, B, N, dtype, ties, rnd.random() < 0.7, device)
    t = _scores(g, B, N, t_dtype, rnd.choice(["none", "round", "int"]), rnd.random() < 0.7, device)
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
        teacher_topk = ref.ranked_topk(other, K, None if exclude is None else exclude.cpu()).to(device)
    if rnd.random() < 0.5:
        row_ids = torch.arange(B, device=device)
    else:
        row_ids = torch.randint(-(2**40), 2**40, (B,), generator=g).to(device)
    return dict(s=s, t=t, teacher_topk=teacher_topk, exclude=exclude, row_ids=row_ids, K=K, M=M, L=L,
                T=rnd.choice([0.5, 1.0, 3.0, 10.0, 100.0]), tau=rnd.choice([0.5, 1.0, 2.0]),
                beta=rnd.choice([0.0, 1.0, 5.0]), mode=rnd.choice(["paper", "official"]),
                seed=rnd.choice([0, 1, 12345, 2**32 - 1, -7, 2**40 + 3]))


def _tol(dtype):
    if dtype == torch.float64:  # gamma is float32 by definition: 1e-7, not 1e-15
        return dict(rtol=1e-7, atol=1e-12)
    if dtype in (torch.float16, torch.bfloat16):  # outputs rounded to a 8/11-bit mantissa
        return dict(rtol=2**-7, atol=1e-6)
    return dict(rtol=1e-5, atol=1e-6)


def _equal(name, a, b, case):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if not torch.equal(a.cpu(), b.cpu()):
        bad = (a.cpu() != b.cpu()).nonzero()[:5].tolist()
        raise AssertionError(f"{name} differs at {bad}; case K={case['K']} M={case['M']} L={case['L']} "
                             f"mode={case['mode']} dtype={case['s'].dtype}")


def _close(name, a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    torch.testing.assert_close(b.cpu().double(), a.cpu().double(), msg=lambda m: f"{name}: {m}", **_tol(dtype))


def compare_backend(backend, case, grad_seed=0):
    """Every op of ``backend`` against the reference on one case."""
    c = case
    sel_args = (c["s"], c["t"] if c["teacher_topk"] is None or grad_seed % 2 else None, c["teacher_topk"],
                c["exclude"], c["row_ids"], c["K"], c["M"], c["L"], c["T"], c["mode"], c["seed"])
    want = ref.select(*sel_args)
    got = backend.select(*sel_args)
    for name, a, b in zip(("student_topk", "sampled", "teacher_topk", "q2_mask", "counts"), want, got):
        _equal(f"select.{name}", a, b, c)

    fargs = (c["s"], c["t"], c["teacher_topk"], c["exclude"], c["row_ids"], c["K"], c["M"], c["L"], c["tau"],
             c["T"], c["beta"], c["mode"], c["seed"])
    loss_w, stats_w, idx_w, q2_w = ref.fused_fwd(*fargs)
    loss_g, stats_g, idx_g, q2_g = backend.fused_fwd(*fargs)
    _equal("fused.idx", idx_w, idx_g, c)
    _equal("fused.q2_mask", q2_w, q2_g, c)
    acc = torch.float64 if c["s"].dtype == torch.float64 else torch.float32
    _close("fused.loss", loss_w, loss_g, acc)
    _close("fused.stats", stats_w, stats_g, torch.float32)

    K, L, tau = c["K"], c["L"], c["tau"]
    gen = torch.Generator().manual_seed(grad_seed)
    grad_rows = torch.randn(c["s"].shape[0], generator=gen, dtype=acc).to(c["s"].device)
    gamma = stats_w[:, 2].contiguous()
    gw = ref.fused_bwd(grad_rows, c["s"], c["t"], idx_w, q2_w, gamma, K, L, tau)
    gg = backend.fused_bwd(grad_rows, c["s"], c["t"], idx_w, q2_w, gamma, K, L, tau)
    _close("fused_bwd", gw, gg, c["s"].dtype)

    s_g, t_g = c["s"].gather(1, idx_w), c["t"].gather(1, idx_w)
    lw, pw = ref.subset_ce_fwd(s_g, t_g, q2_w, gamma, K, L, tau)
    lg, pg = backend.subset_ce_fwd(s_g, t_g, q2_w, gamma, K, L, tau)
    _close("subset.loss", lw, lg, acc)
    _close("subset.parts", pw, pg, acc)
    dw = ref.subset_ce_bwd(grad_rows, s_g, t_g, q2_w, gamma, K, L, tau)
    dg = backend.subset_ce_bwd(grad_rows, s_g, t_g, q2_w, gamma, K, L, tau)
    _close("subset_bwd", dw, dg, acc)


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


N_CASES = 320  # per thread setting, in chunks


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("chunk", range(4))
def test_cpp_matches_reference_random(threads, chunk):
    per = N_CASES // 4
    for i in range(chunk * per, (chunk + 1) * per):
        case = make_case(1000 * threads + i)
        compare_backend(native.cpp, case, grad_seed=i)


@needs_cpp
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (4, 50, 5, 5, 5), (3, 40, 7, 40, 40), (2, 300, 100, 200, 100),
                                   (1, 1000, 3, 1000, 1), (6, 120, 60, 120, 120)])
def test_cpp_edge_shapes(mode, shape):
    """K = M, L = M, M = N, B = 1, large pools (counts above the official cap of 50)."""
    B, N, K, M, L = shape
    g = torch.Generator().manual_seed(sum(shape))
    for ties in (False, True):
        s = torch.randn(B, N, generator=g)
        t = torch.randn(B, N, generator=g)
        if ties:
            s, t = s.round(), t.round(decimals=1)
        case = dict(s=s, t=t, teacher_topk=None, exclude=None, row_ids=torch.arange(B), K=K, M=M, L=L, T=2.0,
                    tau=1.0, beta=5.0, mode=mode, seed=3)
        compare_backend(native.cpp, case)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("ties", ["none", "round", "int"])
def test_cpp_long_rows_sampled_threshold(dtype, ties):
    """Rows of N >= 4096 with K, M <= N / 8: the selection first filters each row by a threshold
    estimated from a sample of it (the float prefilter, then the exact keys). Against the
    reference with many ties, strided rows, exclusion masks, and rows where the threshold falls
    among the excluded items (most of the row excluded)."""
    g = torch.Generator().manual_seed(hash((str(dtype), ties)) % 2**31)
    B, N, K, M, L = 6, 9000, 40, 200, 50
    for contiguous in (True, False):
        s = _scores(g, B, N, dtype, ties, contiguous, "cpu")
        t = _scores(g, B, N, dtype, ties, True, "cpu")
        exclude = torch.rand(B, N, generator=g) < torch.tensor([0.0, 0.1, 0.5, 0.9, 0.97, 0.0]).unsqueeze(1)
        exclude[5, :] = False
        exclude[5, : N - 2 * M] = True  # all but 2M items excluded: the sampled threshold is an excluded key
        for ex in (None, exclude):
            case = dict(s=s, t=t, teacher_topk=None, exclude=ex, row_ids=torch.arange(B), K=K, M=M, L=L, T=2.0,
                        tau=1.0, beta=5.0, mode="official" if contiguous else "paper", seed=11)
            compare_backend(native.cpp, case)


@needs_cpp
def test_cpp_public_api_and_autograd():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 300, generator=g, dtype=torch.float64)
    t = torch.randn(6, 300, generator=g, dtype=torch.float64)
    excl = torch.rand(6, 300, generator=g) < 0.1
    out = {}
    for backend in ("reference", "cpp"):
        x = s.clone().requires_grad_(True)
        loss, diag = rcekd_kernels.rce_kd_loss(x, t, K=10, M=40, L=15, exclude=excl, seed=9, backend=backend,
                                               reduction="none", return_diagnostics=True)
        (loss * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
        sel = rcekd_kernels.select(s, t, K=10, M=40, L=15, exclude=excl, seed=9, backend=backend)
        sg = s.gather(1, sel.indices).requires_grad_(True)
        lg = rcekd_kernels.rce_kd_loss_gathered(sg, t.gather(1, sel.indices), sel, backend=backend)
        lg.backward()
        out[backend] = (loss.detach(), x.grad, sel.indices, sel.q2_mask, sel.gamma, lg.detach(), sg.grad, diag)
    a, b = out["reference"], out["cpp"]
    for i in (2, 3):
        assert torch.equal(a[i], b[i])
    for i in (0, 1, 4, 5, 6):
        torch.testing.assert_close(b[i], a[i], rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: rcekd_kernels.rce_kd_loss(x, t[:2, :50], K=3, M=8, L=4, backend="cpp", reduction="none"),
        (s[:2, :50].clone().requires_grad_(True),))


@needs_cpp
def test_cpp_empty_batch_and_auto_choice():
    s = torch.randn(0, 20)
    loss = rcekd_kernels.rce_kd_loss(s.requires_grad_(True), torch.randn(0, 20), K=2, M=4, L=3, backend="cpp")
    assert loss.item() == 0.0
    from rcekd_kernels.backends import resolve
    assert resolve("auto", torch.device("cpu")).NAME == "cpp"


# bad inputs: the same exception type and message with backend="cpp" as with the reference
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


@needs_cpp
@pytest.mark.parametrize("name,kw", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_cpp_bad_inputs_same_errors(name, kw):
    kw = dict(dict(K=3, M=8, L=4), **kw)
    errors = {}
    for backend in ("reference", "cpp"):
        with pytest.raises((ValueError, TypeError)) as e:
            rcekd_kernels.rce_kd_loss(backend=backend, **kw)
        errors[backend] = (type(e.value), str(e.value))
    assert errors["cpp"] == errors["reference"]


@needs_cpp
def test_cpp_direct_op_calls_check_their_arguments():
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    rows = torch.arange(2)
    op = torch.ops.rcekd_C
    with pytest.raises(RuntimeError, match="K, M"):
        op.select(s, t, None, None, rows, 5, 4, 2, 1.0, "paper", 0)
    with pytest.raises(RuntimeError, match="mode"):
        op.fused_fwd(s, t, None, None, rows, 2, 4, 2, 1.0, 1.0, 1.0, "nope", 0)
    with pytest.raises(RuntimeError, match="teacher_topk"):
        op.select(s, None, torch.tensor([[0, 1], [2, 99]]), None, rows, 2, 4, 2, 1.0, "paper", 0)
    with pytest.raises(RuntimeError, match="idx"):
        op.fused_bwd(torch.ones(2), s, t, torch.full((2, 6), 50), torch.zeros(2, 2, dtype=torch.bool),
                     torch.ones(2), 2, 2, 1.0)


# ------------------------------------------------------------------- the loader
def _run_py(code: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_loader_without_extension_is_silent():
    r = _run_py("""
        import importlib.util, warnings
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "rcekd_kernels._C" else real(name, *a)
        warnings.simplefilter("error")
        import torch, rcekd_kernels
        from rcekd_kernels.backends import native, available_backends
        assert native.cpp.available("cpu") is not None and "not built" in native.cpp.available("cpu")
        assert native.build_info()["loaded"] is False
        assert available_backends("cpu")["reference"] is None
        x = torch.randn(2, 30, requires_grad=True)
        rcekd_kernels.rce_kd_loss(x, torch.randn(2, 30), K=3, M=6, L=4).backward()
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_loader_with_broken_extension_warns_once():
    r = _run_py("""
        import importlib, importlib.util, warnings
        real_find, real_import = importlib.util.find_spec, importlib.import_module
        class Spec: origin = "/fake/_C.so"
        importlib.util.find_spec = lambda name, *a: Spec() if name == "rcekd_kernels._C" else real_find(name, *a)
        def fake_import(name, *a, **k):
            if name == "rcekd_kernels._C":
                raise ImportError("undefined symbol: _ZN3c10fake")
            return real_import(name, *a, **k)
        importlib.import_module = fake_import
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, rcekd_kernels
            from rcekd_kernels.backends import native, available_backends
            available_backends("cpu")
            native.cpp.available("cpu"); native.cuda.available("cuda")
        mine = [x for x in w if "rcekd_kernels" in str(x.message)]
        assert len(mine) == 1, [str(x.message) for x in w]
        assert "undefined symbol" in str(mine[0].message) and "failed to load" in str(mine[0].message)
        assert "failed to load" in native.cpp.available("cpu")
        x = torch.randn(2, 30, requires_grad=True)
        rcekd_kernels.rce_kd_loss(x, torch.randn(2, 30), K=3, M=6, L=4, backend="reference").backward()
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_cpp
def test_build_info():
    info = native.build_info()
    assert info["loaded"] and info["cpu"] is True
    for key in ("cuda", "compiler", "openmp", "torch", "path", "torch_runtime"):
        assert key in info, key
    if info["cuda"]:
        assert isinstance(info["cuda_archs"], list) and info["cuda_archs"]


# --------------------------------------------------------- builds of the sources
def _sources(part):
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        rows = [ln.split("#", 1)[0].split() for ln in f]
    return [os.path.join(ROOT, p) for kind, p in (r for r in rows if r) if kind == part]


def test_sources_list_is_complete():
    listed = set(_sources("cpu") + _sources("cuda"))
    on_disk = set(glob.glob(os.path.join(ROOT, "csrc", "**", "*.c*"), recursive=True)) - {
        os.path.join(ROOT, "csrc", "sources.txt")}
    on_disk = {p for p in on_disk if p.endswith((".cpp", ".cu", ".cc"))}
    assert listed == on_disk, f"csrc/sources.txt and csrc/ disagree: {listed ^ on_disk}"


NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC or ""), reason="nvcc not found")
@pytest.mark.parametrize("cu", [p for p in _sources("cuda") if p.endswith(".cu")] or ["none"])
def test_cuda_sources_compile_with_nvcc(cu, tmp_path):
    """The .cu files include no torch header: nvcc compiles them on a CPU-only machine."""
    arch = os.environ.get("RCEKD_TEST_NVCC_ARCH", "sm_90")
    cmd = [NVCC, "-c", "-O3", "-std=c++17", f"-arch={arch}", "-Xcompiler", "-Wall",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-I", os.path.join(ROOT, "csrc"), cu, "-o", str(tmp_path / "k.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC or "") or shutil.which("g++") is None,
                    reason="nvcc or g++ not found")
@pytest.mark.parametrize("cpp", [p for p in _sources("cuda") if p.endswith(".cpp")] or ["none"])
def test_cuda_bindings_syntax(cpp, tmp_path):
    """The CUDA bindings (torch + CUDA runtime headers) parse against the installed torch's
    headers, so they cannot rot between GPU sessions either. A CPU build of torch ships the
    c10/cuda headers but not the one CMake generates; an empty stand-in replaces it."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("")
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    from torch.utils import cpp_extension

    homes = [cpp_extension.CUDA_HOME, os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if cuda_inc is None:
        pytest.skip("cuda_runtime.h not found")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-I", str(tmp_path), "-I", inc,
           "-I", os.path.join(inc, "torch", "csrc", "api", "include"), "-I", cuda_inc,
           "-I", os.path.join(ROOT, "csrc"), "-DRCEKD_WITH_CUDA=1", cpp]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_configures_and_builds(tmp_path):
    """CMakeLists.txt builds the CPU sources against the installed torch; the library loads and runs."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *gen, f"-DPython3_EXECUTABLE={sys.executable}",
                        "-DCMAKE_BUILD_TYPE=Release"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = os.environ.get("MAX_JOBS", "2")
    r = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    libs = glob.glob(str(build / "_C*"))
    assert libs, os.listdir(build)
    # load it in a fresh process in which the package does not load its own _C (same op library)
    r = _run_py(f"""
        import os
        os.environ["RCEKD_DISABLE_EXTENSION"] = "1"
        import torch
        torch.ops.load_library({libs[0]!r})
        from rcekd_kernels.backends import reference as ref
        s, t = torch.randn(3, 40), torch.randn(3, 40)
        rows = torch.arange(3)
        a = ref.select(s, t, None, None, rows, 3, 9, 4, 10.0, "paper", 1)
        b = torch.ops.rcekd_C.select(s, t, None, None, rows, 3, 9, 4, 10.0, "paper", 1)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        print("ok", torch.ops.rcekd_C.build_info())
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("chunk", range(4))
def test_cuda_matches_reference_random(chunk):
    for i in range(chunk * 80, (chunk + 1) * 80):
        compare_backend(native.cuda, make_case(7000 + i, device="cuda"), grad_seed=i)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("shape,dtype", [
    ((64, 50000, 100, 200, 100), torch.float32),     # long rows split across blocks
    ((3, 200000, 20, 500, 50), torch.bfloat16),      # few rows, many blocks per row
    ((4, 20000, 50, 100, 100), torch.float16),
    ((2, 30000, 2048, 4096, 1000), torch.float32),   # pool too big for shared memory: global scratch
    ((2, 3000, 100, 3000, 3000), torch.float64),     # M = N, L = M
    ((1, 7, 7, 7, 7), torch.float32),
])
def test_cuda_large_shapes(mode, shape, dtype):
    B, N, K, M, L = shape
    g = torch.Generator().manual_seed(N + K)
    for ties in (False, True):
        s = torch.randn(B, N, generator=g)
        t = torch.randn(B, N, generator=g)
        if ties:
            s, t = s.round(decimals=1), t.round(decimals=1)
        exclude = (torch.rand(B, N, generator=g) < 0.05) if N - M > N // 10 else None
        case = dict(s=s.to(dtype).cuda(), t=t.to(dtype).cuda(), teacher_topk=None,
                    exclude=None if exclude is None else exclude.cuda(), row_ids=torch.arange(B).cuda(), K=K, M=M,
                    L=L, T=10.0, tau=1.0, beta=5.0, mode=mode, seed=11)
        compare_backend(native.cuda, case)


@needs_cuda
@pytest.mark.gpu
def test_cuda_public_api_and_autograd():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(8, 1000, generator=g).cuda()
    t = torch.randn(8, 1000, generator=g).cuda()
    res = {}
    for backend in ("reference", "cuda"):
        x = s.clone().requires_grad_(True)
        loss = rcekd_kernels.rce_kd_loss(x, t, K=20, M=40, L=20, backend=backend)
        loss.backward()
        res[backend] = (loss.detach(), x.grad)
    torch.testing.assert_close(res["cuda"][0], res["reference"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["cuda"][1], res["reference"][1], rtol=1e-5, atol=1e-7)
