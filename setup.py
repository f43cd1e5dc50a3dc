"""Build and install rcekd_kernels (the loss) and rcekd_train (the training drivers).

    pip install --no-build-isolation -e .

Environment variables:
    RCEKD_NO_EXTENSION=1   install pure Python (no compiled extension)
    RCEKD_FORCE_CUDA=1     build the CUDA sources even when torch/nvcc report no GPU
    RCEKD_STRICT_BUILD=1   make a failed build of the extension an error (default: pure Python)
    TORCH_CUDA_ARCH_LIST   CUDA architectures to build for
    MAX_JOBS               parallel compile jobs (ninja)
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """The compiled extension (see csrc/); empty when it cannot or must not be built.

    Builds ``rcekd_kernels._C`` with ninja: the CPU sources whenever a C++ compiler is
    found, plus the CUDA sources when torch has CUDA and nvcc is found (or
    RCEKD_FORCE_CUDA=1). A failed build falls back to a pure-Python install with a
    message, unless RCEKD_FORCE_CUDA=1 or RCEKD_STRICT_BUILD=1 make it an error.
    """
    import shutil
    import sys
    import sysconfig

    def _truthy(name):
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")

    def _read_sources():
        """{part: [paths]} from csrc/sources.txt, the one list shared with CMakeLists.txt."""
        parts = {}
        with open(os.path.join(ROOT, "csrc", "sources.txt"), encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    part, path = line.split()
                    parts.setdefault(part, []).append(path)
        return parts

    def note(msg):
        print(f"rcekd_kernels setup: {msg}", file=sys.stderr)

    if _truthy("RCEKD_NO_EXTENSION"):
        note("RCEKD_NO_EXTENSION is set: installing pure Python (no compiled extension)")
        return [], {}
    force_cuda = _truthy("RCEKD_FORCE_CUDA")
    strict = force_cuda or _truthy("RCEKD_STRICT_BUILD")
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - torch is a build requirement
        if strict:
            raise
        note(f"torch cannot be imported ({e}); installing pure Python")
        return [], {}

    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None and shutil.which("c++") is None:
        if strict:
            raise RuntimeError(f"no C++ compiler found ({cxx!r}) but a strict build was asked for")
        note(f"no C++ compiler found ({cxx!r}); installing pure Python")
        return [], {}

    sources = _read_sources()
    nvcc = None
    if cpp_extension.CUDA_HOME:
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    with_cuda = force_cuda or (torch.version.cuda is not None and nvcc is not None)
    if not with_cuda:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found"
        note(f"building the CPU extension only ({why}; RCEKD_FORCE_CUDA=1 forces the CUDA sources)")

    # -fno-trapping-math: no FP exception is ever observed, so loops with float->int conversions and
    # selects (the softmax exponentials) vectorise; results are unchanged (no reassociation)
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inline code: with torch's OpenMP backend it needs -fopenmp
        # here, else it runs serially (libgomp.so.1 then resolves to torch's own copy)
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    if with_cuda:
        define_macros.append(("RCEKD_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            name="rcekd_kernels._C",
            sources=sources.get("cpu", []) + sources.get("cuda", []),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="rcekd_kernels._C",
            sources=sources.get("cpu", []),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """Builds the extension; a failure falls back to pure Python unless strict."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler / linker failure
                if strict:
                    raise
                note(f"building the compiled extension FAILED ({type(e).__name__}: {e}); "
                     "installing pure Python (the 'reference' and 'triton' backends remain). "
                     "Set RCEKD_STRICT_BUILD=1 to make this an error.")

    return [ext], {"build_ext": BuildExt}


def _version() -> str:
    """The one source of the version: rcekd_kernels/_version.py."""
    scope = {}
    with open(os.path.join(ROOT, "rcekd_kernels", "_version.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


ext_modules, cmdclass = _extensions()

setup(
    name="rcekd_kernels",
    version=_version(),
    description="Fast, exact RCE-KD loss (Rejuvenated Cross-Entropy for Knowledge Distillation "
                "in recommender systems) and training drivers",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["rcekd_kernels", "rcekd_kernels.*"])
    + find_packages(where="python", include=["rcekd_train", "rcekd_train.*"]),
    package_dir={"rcekd_train": "python/rcekd_train"},
    package_data={"rcekd_kernels": ["py.typed"], "rcekd_train": ["configs/*.yaml", "paper_results.yaml"]},
    license="MIT",
    # the loss needs torch only; the training drivers (rcekd_train, the `rcekd` command) come with
    # the "train" extra: pip install "rcekd_kernels[train]"
    install_requires=["torch>=2.4"],
    extras_require={
        "train": ["numpy", "pyyaml", "tqdm", "matplotlib"],
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "dev": ["ruff", "mypy"],
    },
    entry_points={"console_scripts": ["rcekd=rcekd_train._entry:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
