"""What is particular to the compiled backends ("cpp" on CPU, "cuda" on GPU); the
conformance suite (tests/test_conformance.py) runs everything every backend must do.

* the same results with 1 and 2 threads; edge shapes; long rows (the sampled-threshold
  filter of the CPU selection); the C++ ops' own argument checks;
* the extension's loader: no extension -> silently unavailable, a broken one ->
  one warning, the package still imports;
* every .cu file compiles with nvcc (so the CUDA code cannot rot on CPU-only
  machines), and CMakeLists.txt configures and builds;
* the CUDA backend against the reference on CUDA tensors (skipped without a GPU).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rcekd_kernels
from rcekd_kernels.backends import Call, native, resolve

import conformance as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPP_WHY = native.cpp.available("cpu")
needs_cpp = pytest.mark.skipif(CPP_WHY is not None, reason=f"compiled CPU extension unavailable: {CPP_WHY}")
CUDA_WHY = "no CUDA device" if not torch.cuda.is_available() else native.cuda.available("cuda")
needs_cuda = pytest.mark.skipif(CUDA_WHY is not None, reason=f"CUDA backend unavailable: {CUDA_WHY}")


# ------------------------------------------------------- CPU-specific behaviour
@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_cpp_matches_reference_at_1_and_2_threads(threads):
    """Rows run in parallel: the results must not depend on the number of threads (the
    conformance suite runs the default count)."""
    for i in range(80):
        C.compare_ops("cpp", C.make_case(1000 * threads + i, "cpu"), grad_seed=i)


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
        C.compare_ops("cpp", C.case_of(s, t, K=K, M=M, L=L, T=2.0, tau=1.0, beta=5.0, mode=mode, seed=3))


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
        s = C.scores(g, B, N, dtype, ties, "contiguous" if contiguous else "strided", "cpu")
        t = C.scores(g, B, N, dtype, ties, "contiguous", "cpu")
        exclude = torch.rand(B, N, generator=g) < torch.tensor([0.0, 0.1, 0.5, 0.9, 0.97, 0.0]).unsqueeze(1)
        exclude[5, :] = False
        exclude[5, : N - 2 * M] = True  # all but 2M items excluded: the sampled threshold is an excluded key
        for ex in (None, exclude):
            C.compare_ops("cpp", C.case_of(s, t, exclude=ex, K=K, M=M, L=L, T=2.0, tau=1.0, beta=5.0,
                                           mode="official" if contiguous else "paper", seed=11))


@needs_cpp
def test_cpp_is_the_auto_choice_on_cpu():
    call = Call("fused_fwd", "cpu", (torch.float32,), rcekd_kernels.RCEKDConfig(K=2, M=4, L=3), 20)
    assert resolve("auto", call).NAME == "cpp"


@needs_cpp
def test_cpp_direct_op_calls_check_their_arguments():
    """The C++ ops check what memory safety needs (metadata), whatever the Python layer did."""
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    rows = torch.arange(2)
    op = torch.ops.rcekd_C
    hp = (2, 4, 2, 1.0, 1.0, 1.0, "paper", 0)  # K, M, L, tau, T, beta, mode, seed (ops.HPARAMS + seed)
    with pytest.raises(RuntimeError, match="K, M"):
        op.select(s, t, None, None, rows, 5, 4, 2, 1.0, 1.0, 1.0, "paper", 0)
    with pytest.raises(RuntimeError, match="mode"):
        op.fused_fwd(s, t, None, None, rows, 2, 4, 2, 1.0, 1.0, 1.0, "nope", 0)
    with pytest.raises(RuntimeError, match="tau"):
        op.fused_fwd(s, t, None, None, rows, 2, 4, 2, 0.0, 1.0, 1.0, "paper", 0)
    with pytest.raises(RuntimeError, match="teacher_topk"):
        op.select(s, None, torch.tensor([[0, 1], [2, 99]]), None, rows, *hp)
    with pytest.raises(RuntimeError, match="idx"):
        op.fused_bwd(torch.ones(2), s, t, torch.full((2, 6), 50), torch.zeros(2, 2, dtype=torch.bool),
                     torch.ones(2), *hp)
    with pytest.raises(RuntimeError, match="grad_rows"):
        op.fused_bwd(torch.ones(3), s, t, torch.zeros((2, 6), dtype=torch.int64),
                     torch.zeros(2, 2, dtype=torch.bool), torch.ones(2), *hp)
    with pytest.raises(RuntimeError, match="2K \\+ L"):
        op.subset_ce_fwd(torch.randn(2, 5), torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.bool),
                         torch.ones(2), *hp)


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
        from rcekd_kernels import RCEKDConfig
        from rcekd_kernels.backends import reference as ref
        s, t = torch.randn(3, 40), torch.randn(3, 40)
        rows = torch.arange(3)
        a = ref.select(s, t, None, None, rows, RCEKDConfig(K=3, M=9, L=4), 1)
        b = torch.ops.rcekd_C.select(s, t, None, None, rows, 3, 9, 4, 1.0, 10.0, 5.0, "paper", 1)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        print("ok", torch.ops.rcekd_C.build_info())
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------ CUDA
# (the random configurations and the public API run in tests/test_conformance.py on a GPU)
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
        C.compare_ops("cuda", C.case_of(s.to(dtype).cuda(), t.to(dtype).cuda(),
                                        exclude=None if exclude is None else exclude.cuda(), K=K, M=M, L=L,
                                        T=10.0, tau=1.0, beta=5.0, mode=mode, seed=11))
