"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalization."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from gradsight._errors import GradsightError
from gradsight.curvature._operator import as_matmul

__all__ = ["LanczosResult", "lanczos"]


@dataclass(frozen=True)
class LanczosResult:
    """Ritz pairs from :func:`lanczos`.

    Attributes:
        eigenvalues: the ``k`` Ritz values, largest first (by value, or by magnitude for
            ``which="magnitude"``), float64.
        eigenvectors: matching unit Ritz vectors as columns, shape ``(D, k)``.
        errors: estimated absolute error of each Ritz value, ``min(r, r²/gap)`` with ``r``
            the residual norm ``‖A y − θ y‖`` and ``gap`` the distance to the nearest other
            Ritz value less that value's own residual (the Kato-Temple bound with an
            estimate of the gap to the rest of the spectrum).
        num_matvecs: products with ``A`` used.
        converged: whether every error estimate met ``tol`` (or the Krylov space became
            invariant, which makes the Ritz values exact).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    errors: torch.Tensor
    num_matvecs: int
    converged: bool


def lanczos(
    A: Any,
    k: int = 1,
    *,
    which: Literal["largest", "magnitude"] = "largest",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
) -> LanczosResult:
    """The ``k`` extreme eigenvalues of a symmetric ``A`` by the Lanczos method.

    Lanczos (1950) builds an orthonormal basis ``Q_j`` of the Krylov space
    ``span{v, Av, …, A^{j−1}v}`` by the three-term recurrence
    ``β_j q_{j+1} = A q_j − α_j q_j − β_{j−1} q_{j−1}``, so that ``Q_jᵀ A Q_j = T_j`` is
    tridiagonal; the eigenvalues of ``T_j`` (Ritz values) converge to the extreme
    eigenvalues of ``A`` far faster than power iteration (Kaniel-Paige-Saad bounds:
    error ∝ Chebyshev⁻²ʲ of the relative gap instead of (λ₂/λ₁)²ʲ). In floating point the
    ``q_j`` lose orthogonality as Ritz values converge; here every new vector is
    reorthogonalized against all previous ones (twice, classical Gram-Schmidt;
    Parlett 1998, *The Symmetric Eigenvalue Problem*, §13), which costs ``O(D j)`` per
    step and ``D × j`` memory for the basis.

    Iteration stops once the estimated error of each wanted Ritz value is at most
    ``tol · |θ| / 2`` (see :class:`LanczosResult`; the factor 2 because that estimate
    can fall short of the true error by a few tens of percent early on), or at
    ``max_matvecs``.

    Args:
        A: a square tensor or curvature operator, assumed symmetric.
        k: how many eigenvalues.
        which: ``"largest"`` (algebraic: the most positive curvature) or ``"magnitude"``.
        tol: relative accuracy target.
        max_matvecs: budget of products; defaults to ``min(D, max(20 k, 100))``.
        v0: start vector (random normal if ``None``).
        seed: seed of the start vector's private generator (the global RNG is untouched).

    Returns:
        A :class:`LanczosResult`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = lanczos(A, k=2, tol=1e-10)
        >>> [round(v, 8) for v in res.eigenvalues.tolist()], res.num_matvecs < 100
        ([100.0, 99.0], True)
    """
    dim, dtype, device = as_matmul(A)
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise GradsightError(
            f"k must be an integer between 1 and the operator's dimension {dim}, got {k!r}."
        )
    if which not in ("largest", "magnitude"):
        raise GradsightError(f"which must be 'largest' or 'magnitude', got {which!r}.")
    budget = min(dim, max(20 * k, 100)) if max_matvecs is None else min(dim, max_matvecs)
    if budget < k:
        raise GradsightError(
            f"max_matvecs must be at least k={k} (one product per Ritz value), got "
            f"{max_matvecs}. Raise max_matvecs."
        )
    if v0 is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        v0 = torch.randn(dim, generator=gen, dtype=dtype, device=device)
    q = v0.to(dtype=dtype, device=device).flatten()
    basis = torch.empty(budget, dim, dtype=dtype, device=device)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta = errors = vecs = torch.empty(0)
    converged = False
    j = 0
    for j in range(budget):  # j is the number of products after the loop
        w = (A @ basis[j]).to(dtype)
        alphas.append(float(basis[j] @ w))
        q_prev = basis[: j + 1]
        for _ in range(2):  # full reorthogonalization, twice is enough (Kahan–Parlett)
            w = w - q_prev.T @ (q_prev @ w)
        beta = _norm(w)
        theta, errors, vecs = _ritz(alphas, betas, beta, k, which)
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0), 1e-300)
        invariant = beta <= 1e2 * torch.finfo(dtype).eps * scale
        if len(alphas) >= k and (
            invariant or bool((2 * errors <= tol * theta.abs().clamp_min(1e-300)).all())
        ):
            converged = True
            break
        if j + 1 < budget:
            if invariant:  # found an invariant subspace before k values: restart outside it
                gen = torch.Generator(device=device).manual_seed(seed + j + 1)
                w = torch.randn(dim, generator=gen, dtype=dtype, device=device)
                for _ in range(2):
                    w = w - q_prev.T @ (q_prev @ w)
                beta_used, beta = _norm(w), 0.0
                basis[j + 1] = w / beta_used
            else:
                basis[j + 1] = w / beta
            betas.append(beta)
    m = len(alphas)
    ritz_vectors = basis[:m].T @ vecs.to(dtype)
    return LanczosResult(theta, ritz_vectors, errors, m, converged)


def _norm(w: torch.Tensor) -> float:
    """‖w‖ without overflow: its square is past float32's range from entries of 2·10¹⁹
    (the Hessian of a loss of 1e6 on weights ×100), so it is taken of ``w`` scaled by
    its largest entry."""
    top = float(w.abs().max()) if w.numel() else 0.0
    if not math.isfinite(top) or top == 0:
        return top  # NaN/Inf stays so (the caller stops on it); a zero vector is 0
    return top * float((w / top).norm())


def _ritz(
    alphas: list[float], betas: list[float], beta_next: float, k: int, which: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The wanted ``k`` Ritz values of ``T``, their error estimates and ``T``'s eigenvectors."""
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(T)
    key = vals if which == "largest" else vals.abs()
    order = torch.argsort(key, descending=True)[: min(k, m)]
    resid_all = beta_next * vecs[-1].abs()
    resid = resid_all[order]
    if m > 1:
        # Gap to the rest of the spectrum, from below: every other Ritz value θⱼ has an
        # eigenvalue within its residual rⱼ, so |θᵢ − θⱼ| − rⱼ bounds the gap better than
        # the Ritz gap itself (which overestimates it while θⱼ is unconverged).
        dist = (vals[order, None] - vals[None, :]).abs() - resid_all[None, :]
        dist[torch.arange(len(order)), order] = float("inf")
        gap = dist.min(dim=1).values
        errors = torch.where(gap > 0, torch.minimum(resid, resid**2 / gap.clamp_min(1e-300)), resid)
    else:
        errors = resid
    return vals[order], errors, vecs[:, order]
