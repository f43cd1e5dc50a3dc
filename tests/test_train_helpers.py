"""Shared helpers of the training-driver tests (imported by the other tests/test_train_*.py; no tests here)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_dir(*parts):
    """The real data folder: ``$RCEKD_DATA`` when set, else ``../shared/data`` (relative to the repository
    root), or skip."""
    root = Path(os.environ["RCEKD_DATA"]) if os.environ.get("RCEKD_DATA") else SHARED_DATA
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives outside the repository)")
    return str(root)


def tiny_synthetic(**over):
    from rcekd_train.data import make_synthetic
    args = dict(num_users=120, num_items=90, dim=8, clusters=5, mean_items=12, min_items=5, max_items=40,
                seed=3)
    args.update(over)
    return make_synthetic(**args)


def subprocess_env():
    """The environment for a child Python that imports this checkout's rcekd_train and rcekd_kernels."""
    import rcekd_kernels
    import rcekd_train
    paths = [os.path.dirname(os.path.dirname(m.__file__)) for m in (rcekd_train, rcekd_kernels)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


LOCK_HOLDER = ("import sys; from rcekd_train.lock import try_lock; release = try_lock(sys.argv[1]); "
               "print('locked' if release else 'busy', flush=True); sys.stdin.read()")


def hold_lock(out):
    """Another process holding the lock of ``out`` until it is killed (or its stdin closed): the Popen."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert p.stdout.readline().strip() == "locked"
    return p
