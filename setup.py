"""Build and install rcekd_kernels (the loss) and rcekd_train (the training drivers).

    pip install --no-build-isolation -e .

Environment variables:
    RCEKD_NO_EXTENSION=1   install pure Python (no compiled extension)
    RCEKD_FORCE_CUDA=1     build the CUDA sources even when torch/nvcc report no GPU
    TORCH_CUDA_ARCH_LIST   CUDA architectures to build for
    MAX_JOBS               parallel compile jobs (ninja)
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """The compiled extension (see csrc/); empty when it cannot or must not be built."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="rcekd_kernels",
    version="0.1.0",
    description="Fast, exact RCE-KD loss (Rejuvenated Cross-Entropy for Knowledge Distillation "
                "in recommender systems) and training drivers",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["rcekd_kernels", "rcekd_kernels.*"])
    + find_packages(where="python", include=["rcekd_train", "rcekd_train.*"]),
    package_dir={"rcekd_train": "python/rcekd_train"},
    package_data={"rcekd_train": ["configs/*.yaml"]},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "plot": ["matplotlib"],
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["rcekd=rcekd_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
