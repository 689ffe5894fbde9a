"""Mean-field signal propagation: the reference the signal-flow probe is checked against.

For a wide MLP z_{l+1} = W_{l+1} φ(z_l) + b_{l+1} with W_ij ~ N(0, σ_w²/n) and
b_i ~ N(0, σ_b²), the pre-activation variance converges to a fixed point

    q* = σ_w² E[φ(√q* ξ)²] + σ_b²,   ξ ~ N(0, 1),

and at that fixed point each layer multiplies the squared backward signal by

    χ₁ = σ_w² E[φ'(√q* ξ)²]

(Poole et al. 2016, "Exponential expressivity in deep neural networks through transient
chaos"; Schoenholz et al. 2017, "Deep information propagation"). χ₁ < 1: gradients
vanish geometrically with depth; χ₁ > 1: they explode; χ₁ = 1: the edge of chaos. For
tanh with σ_b² = 0.05: χ₁ = 0.759 at σ_w² = 1, 1 at σ_w² ≈ 1.761, 1.342 at σ_w² = 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["MeanField", "mean_field"]

_ACTIVATIONS: dict[
    str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
] = {
    "tanh": (np.tanh, lambda z: 1.0 / np.cosh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float)),
    "sigmoid": (
        lambda z: 1.0 / (1.0 + np.exp(-z)),
        lambda z: np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))) ** 2,
    ),
    "linear": (lambda z: z, lambda z: np.ones_like(z)),
}


@dataclass(frozen=True)
class MeanField:
    """Mean-field fixed point of a wide MLP.

    Attributes:
        q_star: Fixed-point pre-activation variance q*.
        chi1: Per-layer factor of the squared backward signal at q*.
    """

    q_star: float
    chi1: float

    def signal_ratio(self, depth: int) -> float:
        """Expected ‖δ_first‖/‖δ_last‖ across ``depth`` layers: χ₁^(depth/2).

        Example:
            >>> round(mean_field("tanh", 1.0, 0.05).signal_ratio(10), 3)  # 0.759**5
            0.252
        """
        return math.sqrt(self.chi1) ** depth


def mean_field(
    activation: str, sigma_w2: float, sigma_b2: float, *, points: int = 200, iters: int = 1000
) -> MeanField:
    """q* and χ₁ by fixed-point iteration with Gauss-Hermite quadrature.

    Args:
        activation: ``"tanh"``, ``"relu"``, ``"sigmoid"`` or ``"linear"``.
        sigma_w2: Weight variance times fan-in, σ_w².
        sigma_b2: Bias variance σ_b².

    Example:
        >>> round(mean_field("tanh", 1.0, 0.05).chi1, 3)
        0.759
        >>> round(mean_field("tanh", 4.0, 0.05).chi1, 3)
        1.342
        >>> round(mean_field("relu", 2.0, 0.0).chi1, 6)  # He initialization is critical
        1.0
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    phi, dphi = _ACTIVATIONS[activation]
    if points % 2:
        points += 1  # an even rule has no node at 0, where the ReLU derivative jumps
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    weights = weights / weights.sum()
    q = 1.0
    for _ in range(iters):
        q_new = sigma_w2 * float(np.sum(weights * phi(math.sqrt(q) * nodes) ** 2)) + sigma_b2
        if abs(q_new - q) <= 1e-14 * max(1.0, q):
            q = q_new
            break
        q = q_new
    chi1 = sigma_w2 * float(np.sum(weights * dphi(math.sqrt(q) * nodes) ** 2))
    return MeanField(q_star=q, chi1=chi1)
