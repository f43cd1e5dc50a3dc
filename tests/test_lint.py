"""The habits of a maintained package: lint (ruff) and the type check of the loss package
(mypy), configured in pyproject.toml, must be clean."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (requirements.txt installs it)")
def test_ruff_check_is_clean():
    r = _run("ruff", "check", ".")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed (requirements.txt installs it)")
def test_mypy_of_the_loss_package_is_clean():
    r = _run(sys.executable, "-m", "mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
