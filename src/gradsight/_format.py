"""Number and name formatting shared by every exporter (text, HTML, the report).

One place, so that the terminal table, ``Diagnosis.to_html`` and the run report print
the same number the same way, and the result objects need no renderer.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["display_name", "fmt", "jsonable", "one_decimal", "pct"]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: ``-`` for None, scientific outside [1e-2, 1e4).

    Example:
        >>> fmt(None), fmt(0.0), fmt(0.5), fmt(1.5e-7), fmt(float("inf"))
        ('-', '0', '0.5', '1.50e-07', 'inf')
    """
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.{digits - 1}e}" if not 1e-2 <= abs(value) < 1e4 else f"{value:.{digits}g}"


def one_decimal(value: float) -> str:
    """A quantity such as lr·λmax: one decimal from 0.1 to 10⁴, three significant digits
    beyond (a Hessian of weights ×100 reaches 10¹⁸), two below (not "0.0").

    Example:
        >>> one_decimal(5.88), one_decimal(7.57e18), one_decimal(2.78e-4), one_decimal(0.0)
        ('5.9', '7.57e+18', '2.8e-04', '0.0')
    """
    if 0 < abs(value) < 0.1:
        return f"{value:.1e}"
    return f"{value:.1f}" if abs(value) < 1e4 else f"{value:.3g}"


def pct(value: float | None) -> str:
    """A fraction as a whole percentage (``-`` for None)."""
    return "-" if value is None else f"{100 * value:.0f}%"


def display_name(name: str) -> str:
    """A module name for a sentence or a table: the root module (``""``) is "(model)".

    Example:
        >>> display_name(""), display_name("encoder.0")
        ('(model)', 'encoder.0')
    """
    return name or "(model)"


def jsonable(value: Any) -> Any:
    """``value`` with NaN/Inf floats turned into strings, recursively (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def number(value: Any) -> Any:
    """Inverse of :func:`jsonable` for one value: ``"nan"``/``"inf"`` back to floats."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value
