"""The hyperparameters of RCE-KD, as one frozen, validated object.

:class:`RCEKDConfig` is the single place where the hyperparameters' ranges are
checked: it is checked once, when it is built, and then travels unchanged from
the public API to every backend. The functional API builds one from its keyword
arguments; :class:`~rcekd_kernels.RCEKDLoss` holds one; the custom ops flatten it
into their schemas with the one table of :mod:`rcekd_kernels.ops`
(:data:`rcekd_kernels.ops.HPARAMS`), and the C++ side rebuilds it as one struct
(``csrc/params.h``).

The sampling seed is not part of the configuration: it changes every step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Optional

import torch

from . import spec

__all__ = ["RCEKDConfig", "MODES", "REDUCTIONS", "MAX_KM", "check_seed"]

MODES = ("paper", "official")
REDUCTIONS = ("mean", "sum", "none")
MAX_KM = 1 << 30  # far above anything sensible; a backend states its own limit in supports()
#: tau and T lie in [MIN_TEMPERATURE, MAX_TEMPERATURE], beta in [0, MAX_BETA] (docs/LOSS.md,
#: "Numerical range"): beyond, float32 arithmetic overflows or flushes without meaning
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6
MAX_BETA = 1e6
#: with validate=True the scores must satisfy |score| / tau <= MAX_SCORE_OVER_TAU
MAX_SCORE_OVER_TAU = 1e30


def _is_int(x: Any) -> bool:
    # torch.SymInt: a value that torch.compile traces as dynamic
    return isinstance(x, (Integral, torch.SymInt)) and not isinstance(x, bool)


def _check_int(name: str, value: Any, lo: int, hi: int, rule: str) -> None:
    """An int in [lo, hi]; ``rule`` states the constraint for the message."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must satisfy {rule}, got {name} = {value}")


def _check_real(name: str, value: Any, *, positive: bool, lo: float, hi: float) -> None:
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        rng = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {rng}, got {name} = {value}")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}] (float32 arithmetic beyond is meaningless), "
                         f"got {name} = {value}")


def check_choice(name: str, value: Any, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_seed(seed: Any) -> None:
    """A seed is any int (it is taken modulo 2**32, spec section 4)."""
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


@dataclass(frozen=True)
class RCEKDConfig:
    """The hyperparameters of RCE-KD (see docs/LOSS.md), validated when built.

    Args:
        K: size of the top lists, 1 <= K <= M.
        M: size of the student's candidate pool, K <= M <= N (default 2K).
        L: number of sampled pool items, 1 <= L <= M.
        tau: logit temperature (> 0).
        T: sampling temperature (> 0); sampling weights are exp(count / T).
        beta: strength of the adaptive weight gamma (>= 0).
        mode: ``"paper"`` (the paper's equations) or ``"official"`` (the authors' code).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (applied by the functional API and the
            module; the ops return one loss per row).

    The catalogue size N is only known with the scores: :meth:`check_catalog` checks
    ``M <= N`` then.

    Example::

        cfg = RCEKDConfig(K=50, M=200, L=50, beta=3.0, mode="official", reduction="sum")
        loss = rce_kd_loss(s, t, config=cfg, seed=step, row_ids=users)
    """

    K: int = 100
    M: Optional[int] = None
    L: int = 100
    tau: float = 1.0
    T: float = 10.0
    beta: float = 5.0
    mode: str = "paper"
    reduction: str = "mean"

    def __post_init__(self) -> None:
        _check_int("K", self.K, 1, MAX_KM, "1 <= K <= M <= N (N unknown)")
        if self.M is None:
            object.__setattr__(self, "M", spec.default_m(self.K))
        M: int = self.M  # type: ignore[assignment]  # set just above
        _check_int("M", M, self.K, MAX_KM, f"K <= M <= N (K = {self.K})")
        _check_int("L", self.L, 1, M, f"1 <= L <= M (M = {M})")
        _check_real("tau", self.tau, positive=True, lo=MIN_TEMPERATURE, hi=MAX_TEMPERATURE)
        _check_real("T", self.T, positive=True, lo=MIN_TEMPERATURE, hi=MAX_TEMPERATURE)
        _check_real("beta", self.beta, positive=False, lo=0.0, hi=MAX_BETA)
        check_choice("mode", self.mode, MODES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        for name in ("tau", "T", "beta"):  # one Python type, so equal configs hash alike
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def m(self) -> int:
        """M as an int (never None once built)."""
        assert self.M is not None
        return self.M

    @property
    def width(self) -> int:
        """2K + L: the number of gathered scores per row, [QS | A | QT]."""
        return 2 * self.K + self.L

    def check_catalog(self, N: int) -> None:
        """K <= M <= N for a catalogue of N items."""
        _check_int("K", self.K, 1, N, f"1 <= K <= M <= N (N = {N})")
        _check_int("M", self.M, self.K, N, f"K <= M <= N (K = {self.K}, N = {N})")

    def replace(self, **changes: Any) -> "RCEKDConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, config: Optional["RCEKDConfig"] = None, **kwargs: Any) -> "RCEKDConfig":
        """``config`` with the given keyword arguments applied (those that are not None), or a
        new configuration from them. A ``config`` of the wrong type is a TypeError."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        if config is None:
            return cls(**given)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an RCEKDConfig, got {type(config).__name__}")
        return config.replace(**given) if given else config
