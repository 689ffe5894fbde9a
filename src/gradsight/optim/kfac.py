"""Damped inverses of Kronecker factors (K-FAC, Martens & Grosse 2015).

For a linear layer ``s = W a + b`` the GGN block is ``Σₙ (ãₙãₙᵀ) ⊗ (eₙeₙᵀ)`` with
``ã = [a; 1]`` and ``eₙ = Jₙᵀ H_out^{1/2} εₙ`` the backward signal of a vector whose
covariance is the output Hessian (Martens & Grosse 2015, §5: sample the targets from the
model's predictive distribution; here ``εₙ ~ N(0, I)`` times the exact per-sample square
root of ``H_out``, which has the same covariance). K-FAC approximates the sum by the
product of the means,

    G_l ≈ A ⊗ S,   A = E[ããᵀ],   S = Σₙ eₙeₙᵀ,

so that ``(A ⊗ S)⁻¹ vec(∇) = vec(S⁻¹ ∇ A⁻¹)`` costs two small inverses per layer. The
factors are damped relative to their own scale (factored Tikhonov damping, Martens &
Grosse 2015 §6.3, with ``π`` from the traces): ``A + γ·tr(A)/d_A·I`` and
``S + γ·tr(S)/d_S·I``. Multiplying the loss by ``c`` multiplies ``S`` and the gradient by
``c`` and leaves the direction ``S⁻¹∇A⁻¹`` unchanged; multiplying a layer's weights by
``k`` (and dividing the next layer's input scale) changes ``A``'s scale and the direction
with it, as Newton's method would.
"""

from __future__ import annotations

import torch

__all__ = [
    "damped_choleskys",
    "damped_inverse",
    "damped_inverses",
    "inverses_from_choleskys",
]


def damped_inverse(factor: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(F + γ·tr(F)/d·I)⁻¹`` for a symmetric positive semi-definite ``F``.

    The damping is relative to the mean eigenvalue ``tr(F)/d``, so ``(cF)`` gives ``1/c``
    times the result. A zero factor (no signal at all) gives the identity.

    Example:
        >>> import torch
        >>> F = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> damped_inverse(F, 0.5).diagonal()  # 1 / (diag + 0.5 · 2)
        tensor([0.2500, 0.5000], dtype=torch.float64)
    """
    d = factor.shape[0]
    scale = float(factor.diagonal().sum()) / d
    eye = torch.eye(d, dtype=factor.dtype, device=factor.device)
    if not scale > 0.0:
        return eye
    damped = factor + (gamma * scale) * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:  # not numerically positive definite: fall back to more damping
        return torch.linalg.inv(damped + scale * eye)
    return torch.cholesky_inverse(chol)


def damped_choleskys(factors: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """Lower Cholesky factors ``L`` of ``F + γ·tr(F)/d·I``, one batched factorization per size.

    A network's layers mostly share a few factor sizes, so stacking them turns a dozen
    small LAPACK calls (each with its own dispatch overhead) into two or three. A zero
    factor (no signal at all) gives the identity; one that is not numerically positive
    definite gets more damping (``+ tr(F)/d·I``), as :func:`damped_inverse` does.

    Example:
        >>> import torch
        >>> F = [torch.eye(2) * 4.0, torch.zeros(2, 2)]
        >>> [round(float(c[0, 0]) ** 2, 3) for c in damped_choleskys(F, 1.0)]  # 4 + 4; I
        [8.0, 1.0]
    """
    out: list[torch.Tensor | None] = [None] * len(factors)
    by_size: dict[int, list[int]] = {}
    for i, f in enumerate(factors):
        by_size.setdefault(f.shape[0], []).append(i)
    for d, idx in by_size.items():
        stack = torch.stack([factors[i] for i in idx])
        scale = stack.diagonal(dim1=1, dim2=2).mean(dim=1)
        eye = torch.eye(d, dtype=stack.dtype, device=stack.device)
        damped = stack + (gamma * scale)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        bad = (info != 0) | ~(scale > 0)
        for j in bad.nonzero().flatten().tolist():  # rare: no signal, or not definite
            s = float(scale[j])
            # (a non-finite factor stays non-finite, as its inverse would)
            chol[j] = torch.linalg.cholesky_ex(damped[j] + s * eye)[0] if s > 0.0 else eye
        for j, i in enumerate(idx):
            out[i] = chol[j]
    return [t for t in out if t is not None]


def inverses_from_choleskys(choleskys: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(L Lᵀ)⁻¹`` of every lower Cholesky factor, batched by size."""
    out: list[torch.Tensor | None] = [None] * len(choleskys)
    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(choleskys):
        by_size.setdefault(c.shape[0], []).append(i)
    for idx in by_size.values():
        inv = torch.cholesky_inverse(torch.stack([choleskys[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = inv[j]
    return [t for t in out if t is not None]


def damped_inverses(factors: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """:func:`damped_inverse` of every factor, one batched factorization per size.

    Example:
        >>> import torch
        >>> F = [torch.eye(2) * 4.0, torch.eye(3), torch.eye(2), torch.zeros(2, 2)]
        >>> [round(float(inv[0, 0]), 3) for inv in damped_inverses(F, 1.0)]  # 0: no signal
        [0.125, 0.5, 0.5, 1.0]
    """
    return inverses_from_choleskys(damped_choleskys(factors, gamma))
