"""The `rcekd` console command: checks that the drivers' own requirements (the "train" extra)
are installed before loading them, so that a missing one is one clear line, not a traceback."""
from __future__ import annotations

import importlib.util
import sys

#: modules the training drivers import (pip install "rcekd_kernels[train]")
NEEDED = {"numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm"}


def main(argv=None) -> int:
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"rcekd: error: the training drivers need {', '.join(missing)}: "
              f"pip install \"rcekd_kernels[train]\" (or pip install {' '.join(missing)})", file=sys.stderr)
        return 2
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
