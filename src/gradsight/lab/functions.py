"""Test functions for the step-size lab, with their gradients and Hessians in closed form.

Each :class:`TestFunction` is ``f: ℝⁿ → ℝ`` with ``grad`` and ``hess`` (float64 numpy),
its minimizer ``x_opt`` and minimum ``f_opt``. :func:`scaled` builds the two rescalings
of the seed's argument: ``g(x) = c·f(x)`` and ``h(x) = f(x_opt + k·(x − x_opt))``, whose
good gradient-descent step sizes are ``1/c`` and ``1/k²`` times ``f``'s, while Newton's
iterates are unchanged (``c·f``) or mapped exactly onto ``f``'s (``h``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["TestFunction", "quadratic", "rosenbrock", "scaled", "softplus_bowl"]

Array = np.ndarray


@dataclass(frozen=True)
class TestFunction:
    """A smooth test function with closed-form derivatives.

    Attributes:
        name: label for tables and plots.
        f, grad, hess: value, gradient ``(n,)`` and Hessian ``(n, n)``.
        x_opt: the minimizer; f_opt: the minimum value.
        x0: the default start.
    """

    __test__ = False  # not a pytest test class, despite the name

    name: str
    f: Callable[[Array], float]
    grad: Callable[[Array], Array]
    hess: Callable[[Array], Array]
    x_opt: Array
    f_opt: float
    x0: Array


def quadratic(condition: float = 10.0, n: int = 2) -> TestFunction:
    """``f(x) = ½ xᵀ D x`` with ``D = diag`` log-spaced from 1 to ``condition``.

    Example:
        >>> import numpy as np
        >>> q = quadratic(100.0, 2)
        >>> q.hess(q.x0).diagonal().tolist(), q.f(np.zeros(2))
        ([1.0, 100.0], 0.0)
    """
    d = np.logspace(0.0, np.log10(condition), n) if n > 1 else np.array([1.0])
    return TestFunction(
        f"quadratic κ={condition:g}",
        lambda x: 0.5 * float(x @ (d * x)),
        lambda x: d * x,
        lambda x: np.diag(d),
        np.zeros(n),
        0.0,
        np.ones(n),
    )


def rosenbrock(a: float = 1.0, b: float = 100.0) -> TestFunction:
    """``f(x, y) = (a − x)² + b(y − x²)²``, minimum 0 at ``(a, a²)``, started at ``(−1.2, 1)``.

    Example:
        >>> import numpy as np
        >>> r = rosenbrock()
        >>> r.f(r.x_opt), bool(np.all(r.grad(r.x_opt) == 0))
        (0.0, True)
    """

    def f(v: Array) -> float:
        x, y = v
        return float((a - x) ** 2 + b * (y - x * x) ** 2)

    def grad(v: Array) -> Array:
        x, y = v
        return np.array([-2 * (a - x) - 4 * b * x * (y - x * x), 2 * b * (y - x * x)])

    def hess(v: Array) -> Array:
        x, y = v
        return np.array([[2 - 4 * b * (y - 3 * x * x), -4 * b * x], [-4 * b * x, 2 * b]])

    return TestFunction(
        "Rosenbrock", f, grad, hess, np.array([a, a * a]), 0.0, np.array([-1.2, 1.0])
    )


def softplus_bowl() -> TestFunction:
    """1-D ``f(x) = log(1 + eˣ) + log(1 + e⁻ˣ) − 2 log 2``: convex, minimum 0 at 0, not quadratic.

    Example:
        >>> b = softplus_bowl()
        >>> round(b.f(b.x_opt), 12), round(float(b.hess(b.x_opt)[0, 0]), 12)
        (0.0, 0.5)
    """

    def sig(x: Array) -> Array:
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|

    return TestFunction(
        "softplus bowl",
        lambda x: float(np.logaddexp(0, x[0]) + np.logaddexp(0, -x[0]) - 2 * np.log(2)),
        lambda x: np.array([sig(x[0]) - sig(-x[0])]),
        lambda x: np.array([[2 * sig(x[0]) * sig(-x[0])]]),
        np.zeros(1),
        0.0,
        np.array([3.0]),
    )


def scaled(fn: TestFunction, c: float = 1.0, k: float = 1.0) -> TestFunction:
    """``h(x) = c · f(x_opt + k·(x − x_opt))``: the seed's two rescalings at once.

    ``∇h(x) = c·k·∇f(u)`` and ``∇²h(x) = c·k²·∇²f(u)`` with ``u = x_opt + k(x − x_opt)``;
    the minimizer is unchanged and the start maps to ``x_opt + (x0 − x_opt)/k`` so that
    ``h`` starts where ``f`` did, in ``f``'s coordinates.

    Example:
        >>> import numpy as np
        >>> q = quadratic(1.0, 1)
        >>> h = scaled(q, c=4.0, k=10.0)
        >>> float(h.hess(h.x0)[0, 0]), h.f(h.x0) == 4.0 * q.f(q.x0)
        (400.0, True)
    """
    x_opt = fn.x_opt

    def u(x: Array) -> Array:
        return x_opt + k * (x - x_opt)

    return TestFunction(
        f"{c:g}·f({k:g}·(x − x*)), f = {fn.name}",
        lambda x: c * fn.f(u(x)),
        lambda x: c * k * fn.grad(u(x)),
        lambda x: c * k * k * fn.hess(u(x)),
        x_opt,
        c * fn.f_opt,
        x_opt + (fn.x0 - x_opt) / k,
    )
