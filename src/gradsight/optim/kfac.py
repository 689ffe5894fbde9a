"""Kronecker-factored Gauss-Newton blocks for linear layers (K-FAC, Martens & Grosse 2015).

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

from dataclasses import dataclass

import torch

__all__ = ["KroneckerFactors", "damped_inverse"]


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


@dataclass
class KroneckerFactors:
    """Running averages of one linear layer's factors ``A = E[ããᵀ]`` and ``S = Σ eeᵀ``.

    Attributes:
        A: input factor, ``(d_in + bias, d_in + bias)``.
        S: output factor, ``(d_out, d_out)``.
        steps: how many updates were averaged in.
    """

    A: torch.Tensor
    S: torch.Tensor
    steps: int = 0

    def update(self, a: torch.Tensor, e: torch.Tensor, decay: float, bias: bool) -> None:
        """Average in one batch's inputs ``a`` ``(n, d_in)`` and signals ``e`` ``(n, d_out)``.

        Uses ``min(decay, 1 − 1/(steps + 1))`` so that early estimates are plain means.
        """
        if bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        A = a.T @ a / a.shape[0]
        S = e.T @ e
        rho = min(decay, 1.0 - 1.0 / (self.steps + 1))
        self.A.mul_(rho).add_(A, alpha=1.0 - rho)
        self.S.mul_(rho).add_(S, alpha=1.0 - rho)
        self.steps += 1

    def precondition(
        self,
        grad_w: torch.Tensor,
        grad_b: torch.Tensor | None,
        gamma: float,
        gamma_input: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``S⁻¹ [∇W ∇b] A⁻¹`` with relative damping ``γ`` (``γ_input`` for ``A``)."""
        g = grad_w if grad_b is None else torch.cat([grad_w, grad_b[:, None]], dim=1)
        gamma_a = gamma if gamma_input is None else gamma_input
        d = damped_inverse(self.S, gamma) @ g @ damped_inverse(self.A, gamma_a)
        if grad_b is None:
            return d, None
        return d[:, :-1].contiguous(), d[:, -1].contiguous()
