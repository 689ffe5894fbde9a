"""Damped linear solves with a curvature operator, and the quantities built on them.

- :func:`damped_cg` solves ``(A + λI) x = b`` by conjugate gradients.
- :func:`damped_newton_decrement` is ``½ gᵀ(A + λI)⁻¹ g``, the decrease a damped
  Newton / Gauss-Newton step predicts (Levenberg 1944; Marquardt 1963).
- :func:`curvature_step` is the step size along the gradient that minimizes the
  quadratic model, ``α* = gᵀg / gᵀAg`` (Cauchy's steepest-descent step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradsight._errors import GradsightError
from gradsight.curvature._operator import as_matmul

__all__ = [
    "CGResult",
    "NewtonDecrement",
    "OptimalStep",
    "curvature_step",
    "damped_cg",
    "damped_newton_decrement",
]


@dataclass(frozen=True)
class CGResult:
    """Outcome of :func:`damped_cg`.

    Attributes:
        x: the approximate solution.
        iterations: CG iterations, one product with ``A`` each.
        residual: relative residual ``‖b − (A + λI)x‖ / ‖b‖`` (recurrence estimate).
        converged: whether ``residual <= tol``.
        negative_curvature: whether CG met a direction ``p`` with ``pᵀ(A + λI)p ≤ 0``
            and stopped there (``A + λI`` is not positive definite; raise ``damping`` or
            use the GGN, which is positive semi-definite).
    """

    x: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    negative_curvature: bool


def damped_cg(
    A: Any,
    b: torch.Tensor,
    damping: float = 0.0,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> CGResult:
    """Solve ``(A + λI) x = b`` by conjugate gradients (Hestenes & Stiefel 1952).

    ``A + λI`` must be symmetric positive definite; CG then minimizes the quadratic
    ``½xᵀ(A + λI)x − bᵀx`` over growing Krylov spaces, converging in about
    ``√κ · log(1/tol)`` iterations for condition number ``κ ≤ (λ_max + λ)/λ``.

    Args:
        A: a square tensor or curvature operator.
        b: right-hand side of shape ``(D,)``.
        damping: ``λ ≥ 0``.
        tol: relative residual at which to stop.
        max_iter: iteration cap; defaults to ``min(10 D, 500)``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = damped_cg(A, b, damping=1.0, tol=1e-12)
        >>> torch.allclose(res.x, torch.linalg.solve(A + torch.eye(2, dtype=A.dtype), b))
        True
    """
    dim, dtype, device = as_matmul(A)
    if not isinstance(b, torch.Tensor) or b.shape != (dim,):
        got = f"shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise GradsightError(
            f"b must be a vector of shape ({dim},), matching the operator, got {got}."
        )
    if not damping >= 0:
        raise GradsightError(f"damping must be >= 0, got {damping!r}.")
    cap = min(10 * dim, 500) if max_iter is None else max_iter
    b = b.to(dtype=dtype, device=device)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return CGResult(x, 0, 0.0, True, False)
    rr = float(r @ r)
    it = 0
    negative = False
    while it < cap and math.sqrt(rr) > tol * b_norm:
        Ap = A @ p + damping * p
        pAp = float(p @ Ap)
        it += 1
        if pAp <= 0.0:
            negative = True
            break
        step = rr / pAp
        x = x + step * p
        r = r - step * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    residual = math.sqrt(rr) / b_norm
    return CGResult(x, it, residual, residual <= tol, negative)


@dataclass(frozen=True)
class NewtonDecrement:
    """Outcome of :func:`damped_newton_decrement`.

    Attributes:
        decrement: ``½ gᵀ(A + λI)⁻¹ g``, the loss decrease the damped quadratic model
            predicts for its minimizer (``inf`` when ``A + λI`` is not positive definite
            along the CG path).
        step: the damped Newton step ``−(A + λI)⁻¹ g``.
        damping: the absolute ``λ`` used.
        cg: the :class:`CGResult` of the solve.
    """

    decrement: float
    step: torch.Tensor
    damping: float
    cg: CGResult


def damped_newton_decrement(
    A: Any,
    g: torch.Tensor,
    damping: float,
    *,
    tol: float = 1e-4,
    max_iter: int | None = None,
) -> NewtonDecrement:
    """``½ gᵀ(A + λI)⁻¹ g`` by :func:`damped_cg`, with the damped Newton step.

    Unlike ``‖g‖`` this does not change when the loss is multiplied by a constant
    together with ``λ`` (a damping relative to ``A``'s own curvature does that), nor
    under an invertible linear reparametrization of the block when ``λ = 0``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> g = torch.tensor([2.0, 1.0], dtype=torch.float64)
        >>> round(damped_newton_decrement(A, g, damping=0.0).decrement, 10)  # ½(4/4 + 1/1)
        1.0
    """
    res = damped_cg(A, g, damping, tol=tol, max_iter=max_iter)
    if res.negative_curvature:
        return NewtonDecrement(math.inf, -res.x, damping, res)
    return NewtonDecrement(0.5 * float(g.to(res.x.dtype) @ res.x), -res.x, damping, res)


@dataclass(frozen=True)
class OptimalStep:
    """The curvature-optimal step along the gradient.

    Attributes:
        alpha: ``α* = gᵀg / gᵀAg``, the step size that minimizes the quadratic model
            along ``−g``; ``inf`` if ``gᵀAg ≤ 0`` (no positive curvature along ``g``).
        grad_sq: ``gᵀg``.
        curvature: ``gᵀAg / gᵀg``, the curvature along the gradient (``1/α*``).
        decrease: ``½ (gᵀg)² / gᵀAg``, the decrease the model predicts for that step.
    """

    alpha: float
    grad_sq: float
    curvature: float
    decrease: float


def curvature_step(A: Any, g: torch.Tensor) -> OptimalStep:
    """``α* = gᵀg / gᵀAg``, the exact line-search step of the quadratic model along ``−g``.

    One product with ``A``. It sets the scale that gradient descent lacks: with loss
    ``c·L`` or variables rescaled by ``k`` the good learning rate changes, ``α*`` changes
    with it.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([2.0, 2.0], dtype=torch.float64))
        >>> curvature_step(A, torch.tensor([1.0, -3.0], dtype=torch.float64)).alpha
        0.5
    """
    dim, dtype, device = as_matmul(A)
    if not isinstance(g, torch.Tensor) or g.shape != (dim,):
        got = f"shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
        raise GradsightError(
            f"g must be a vector of shape ({dim},), matching the operator, got {got}."
        )
    g = g.to(dtype=dtype, device=device)
    gg = float(g @ g)
    if gg == 0.0:
        return OptimalStep(math.nan, 0.0, math.nan, 0.0)
    gag = float(g @ (A @ g))
    if gag <= 0.0:
        return OptimalStep(math.inf, gg, gag / gg, math.inf)
    return OptimalStep(gg / gag, gg, gag / gg, 0.5 * gg * gg / gag)
