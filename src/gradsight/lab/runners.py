"""Gradient descent and Newton's method on a :class:`TestFunction`, and the best fixed step.

- :func:`gradient_descent`: ``x ← x − ε ∇f(x)``.
- :func:`newton`: ``x ← x − t·∇²f(x)⁻¹ ∇f(x)`` with backtracking on ``t`` (Armijo) when
  the Hessian is not positive definite or the full step does not decrease ``f``; both
  rules depend only on ratios of ``f``, so the iterates are invariant to ``c·f`` and map
  exactly under ``f(k·(x − x*))``.
- :func:`best_fixed_step`: the ``ε`` on a log grid that reaches the tolerance in the
  fewest iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradsight.lab.functions import TestFunction

__all__ = ["Run", "best_fixed_step", "gradient_descent", "newton"]


@dataclass(frozen=True)
class Run:
    """Iterates of one method.

    Attributes:
        xs: ``(iterations + 1, n)`` iterates, the start first.
        gaps: ``f(x) − f_opt`` at each iterate.
        iterations_to_tol: first iteration with ``gap ≤ tol·gap₀`` (``None`` if never).
        diverged: whether ``f`` became non-finite or grew beyond ``1e6`` times its start.
    """

    xs: np.ndarray
    gaps: np.ndarray
    iterations_to_tol: int | None
    diverged: bool


def _finish(fn: TestFunction, xs: list[np.ndarray], tol: float, diverged: bool) -> Run:
    arr = np.array(xs)
    gaps = np.array([fn.f(x) - fn.f_opt for x in arr])
    hit = np.nonzero(gaps <= tol * max(gaps[0], np.finfo(float).tiny))[0]
    return Run(arr, gaps, int(hit[0]) if hit.size else None, diverged)


def gradient_descent(
    fn: TestFunction, step: float, iterations: int = 1000, tol: float = 1e-8
) -> Run:
    """Fixed-step gradient descent from ``fn.x0``; stops at the tolerance or on divergence.

    Example:
        >>> from gradsight.lab.functions import quadratic
        >>> gradient_descent(quadratic(1.0, 1), step=1.0).iterations_to_tol  # exact in one
        1
    """
    x = fn.x0.astype(np.float64).copy()
    xs, f0 = [x.copy()], fn.f(x) - fn.f_opt
    for _ in range(iterations):
        x = x - step * fn.grad(x)
        xs.append(x.copy())
        gap = fn.f(x) - fn.f_opt
        if not np.isfinite(gap) or gap > 1e6 * max(f0, 1e-300):
            return _finish(fn, xs[:-1], tol, True)
        if gap <= tol * f0:
            break
    return _finish(fn, xs, tol, False)


def newton(fn: TestFunction, iterations: int = 100, tol: float = 1e-8) -> Run:
    """Newton's method with Armijo backtracking (halving ``t`` from 1) from ``fn.x0``.

    Where the Hessian is not positive definite the step falls back to the Hessian with
    its eigenvalues replaced by their absolute values (a saddle-free Newton step), so the
    direction is always a descent direction and stays scale-covariant.

    Example:
        >>> from gradsight.lab.functions import quadratic
        >>> newton(quadratic(1e6, 5)).iterations_to_tol  # any condition number: one step
        1
    """
    x = fn.x0.astype(np.float64).copy()
    xs, f0 = [x.copy()], fn.f(x) - fn.f_opt
    for _ in range(iterations):
        g, H = fn.grad(x), fn.hess(x)
        evals, evecs = np.linalg.eigh(0.5 * (H + H.T))
        evals = np.abs(evals)
        if not np.all(evals > 0):
            break
        d = -evecs @ ((evecs.T @ g) / evals)
        fx, slope, t = fn.f(x), float(g @ d), 1.0
        while fn.f(x + t * d) > fx + 1e-4 * t * slope and t > 1e-10:
            t *= 0.5
        x = x + t * d
        xs.append(x.copy())
        if fn.f(x) - fn.f_opt <= tol * f0:
            break
    return _finish(fn, xs, tol, False)


def best_fixed_step(
    fn: TestFunction,
    steps: np.ndarray | None = None,
    iterations: int = 1000,
    tol: float = 1e-8,
) -> tuple[float | None, int | None]:
    """The grid step that reaches ``tol`` fastest and its iteration count.

    Args:
        steps: candidate ``ε`` (default ``10^[-8, 4]``, 3 per decade).

    Returns:
        ``(ε, iterations)``, or ``(None, None)`` if no step reaches the tolerance.

    Example:
        >>> from gradsight.lab.functions import quadratic, scaled
        >>> q = quadratic(1.0, 1)
        >>> best_fixed_step(q)[0], best_fixed_step(scaled(q, c=100.0))[0]
        (1.0, 0.01)
    """
    grid = np.logspace(-8, 4, 37) if steps is None else np.asarray(steps, dtype=np.float64)
    best: tuple[float | None, int | None] = (None, None)
    for eps in grid:
        run = gradient_descent(fn, float(eps), iterations, tol)
        n = run.iterations_to_tol
        if not run.diverged and n is not None and (best[1] is None or n < best[1]):
            best = (float(eps), n)
    return best
