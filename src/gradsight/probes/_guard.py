"""The guard around every hook a probe registers: a failure in a hook never reaches training.

A probe's hooks run inside the user's forward and backward passes (forward hooks, tensor
hooks, a torch function mode). If one raises (an unsupported layer or dtype, a bug), the
exception would abort the user's training step. :class:`HookGuard` wraps each hook at its
registration: an exception is caught, the hook returns None (the tensor, the output or
the arguments the user's pass computes stay exactly what they would be without it), a
warning says once what stops being recorded, and from then on every hook of that *part*
returns at once. Measurements of the other parts go on.

Hooks only ever read tensors, so a discarded hook leaves the user's numbers bitwise
unchanged (tests/test_probes.py injects faults and compares parameters with a plain run).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ACTIVATIONS", "PARTS", "SIGNALS", "TIME", "HookGuard"]

F = TypeVar("F", bound=Callable[..., Any])

#: The parts a probe's hooks belong to, and what stops being recorded when one fails.
SIGNALS = "signals"
ACTIVATIONS = "activations"
TIME = "time"
PARTS = {
    SIGNALS: "per-layer signal measurements (signal_norm, input_signal_norm, output_norm, "
    "the NaN/Inf origin, and the activation statistics, which these hooks attribute to "
    "layers)",
    ACTIVATIONS: "activation statistics (saturation, dead_fraction, mean_derivative, "
    "rms_derivative, activation_signal_norm)",
    TIME: "per-time-step signal norms of recurrent layers",
}


class HookGuard:
    """Catches what a probe's hooks raise; disables the part whose hook failed.

    Example:
        >>> guard = HookGuard("SignalProbe")
        >>> hook = guard.wrap(SIGNALS, lambda grad: 1 / 0)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     hook(None), hook(None)  # the second call returns at once: no new warning
        (None, None)
        >>> len(caught), guard.failed
        (1, {'signals': 'ZeroDivisionError: division by zero'})
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: Disabled parts, and why.
        self.failed: dict[str, str] = {}

    def wrap(self, part: str, hook: F) -> F:
        """``hook``, guarded: an exception inside disables ``part`` and returns None."""
        failed = self.failed
        fail = self.fail

        def guarded(*args: Any) -> Any:
            if part in failed:
                return None
            try:
                return hook(*args)
            except Exception as exc:  # never into the user's forward or backward
                fail(part, exc)
                return None

        return guarded  # type: ignore[return-value]

    def fail(self, part: str, exc: BaseException) -> None:
        """Disable ``part`` after ``exc``, with one warning."""
        if part in self.failed:
            return
        self.failed[part] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"gradsight: a {self.owner} hook failed ({self.failed[part]}); from now on its "
            f"{PARTS.get(part, part)} are not recorded, the other measurements go on. "
            "Training is unaffected: the hook's work is discarded.",
            RuntimeWarning,
            stacklevel=3,
        )
