"""Elementwise activations gradsight recognises, with their derivatives.

Each activation φ is described by its derivative φ'(z) as a function of the
pre-activation z and by the largest value |φ'| takes. A unit is *flat* at z when
``|φ'(z)| ≤ FLAT_FRACTION · max|φ'|``: for the sigmoid that is |z| ≳ 3.6
(σ' ≤ 0.025), for tanh |z| ≳ 1.8 (tanh' ≤ 0.1), for the ReLU family the inactive
side z ≤ 0. A flat unit passes (almost) no backward signal, which is the chain-rule
mechanism of vanishing gradients: δ_l = φ'(z_l) ⊙ (W_{l+1}ᵀ δ_{l+1}).

Activations are recognised whether called as modules (``nn.Sigmoid()``) or as
functions (``torch.sigmoid``, ``F.relu``, ``x.tanh_()``), because the probe watches
torch function calls rather than module types.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FLAT_FRACTION", "ActivationSpec", "match_activation"]

#: A unit counts as flat (saturated, or inactive for the ReLU family) where its
#: derivative is at most this fraction of the activation's largest derivative.
FLAT_FRACTION = 0.1

_SQRT_2PI = math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class ActivationSpec:
    """An elementwise activation and its derivative.

    Attributes:
        name: Short name, e.g. ``"sigmoid"``.
        derivative: φ'(z), evaluated on the pre-activation.
        max_derivative: sup |φ'|, the scale the flat threshold is relative to.
        rectifier: True for the ReLU family, whose flat side is exactly zero
            (units there are *inactive*; inactive on a whole batch means *dead*).
    """

    name: str
    derivative: Callable[[torch.Tensor], torch.Tensor]
    max_derivative: float
    rectifier: bool = False

    def flat(self, z: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the units where φ is flat at ``z``."""
        return self.derivative(z).abs() <= FLAT_FRACTION * self.max_derivative


def _sigmoid_d(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _tanh_d(z: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(z) ** 2


def _relu_d(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _gelu_d(z: torch.Tensor) -> torch.Tensor:
    # d/dz [z Φ(z)] = Φ(z) + z φ(z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / _SQRT_2PI
    return cdf + z * pdf


def _silu_d(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


SIGMOID = ActivationSpec("sigmoid", _sigmoid_d, 0.25)
TANH = ActivationSpec("tanh", _tanh_d, 1.0)
RELU = ActivationSpec("relu", _relu_d, 1.0, rectifier=True)
GELU = ActivationSpec("gelu", _gelu_d, 1.1289)  # max of Φ(z)+zφ(z), at z = √2
SILU = ActivationSpec("silu", _silu_d, 1.0998)  # max at z ≈ 2.40
SOFTPLUS = ActivationSpec("softplus", torch.sigmoid, 1.0)  # d/dz log(1+e^z) = σ(z)


def _leaky(slope: float) -> ActivationSpec:
    slope = float(slope)
    return ActivationSpec(
        f"leaky_relu({slope:g})",
        lambda z: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope)),
        max(1.0, abs(slope)),
        rectifier=True,
    )


def _elu(alpha: float) -> ActivationSpec:
    alpha = float(alpha)
    return ActivationSpec(
        f"elu({alpha:g})",
        lambda z: torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(torch.clamp(z, max=0))),
        max(1.0, abs(alpha)),
        rectifier=True,
    )


def _hardtanh(lo: float, hi: float) -> ActivationSpec:
    lo, hi = float(lo), float(hi)
    return ActivationSpec(
        f"hardtanh({lo:g},{hi:g})",
        lambda z: ((z > lo) & (z < hi)).to(z.dtype),
        1.0,
        rectifier=True,
    )


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, key: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


def _fixed(spec: ActivationSpec) -> Callable[[tuple[Any, ...], dict[str, Any]], ActivationSpec]:
    return lambda args, kwargs: spec


_Resolver = Callable[[tuple[Any, ...], dict[str, Any]], ActivationSpec]

# Every public spelling of each activation: module forwards call one of these.
_TABLE: dict[Any, _Resolver] = {}
for _fn in (torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid):
    _TABLE[_fn] = _fixed(SIGMOID)
for _fn in (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh):
    _TABLE[_fn] = _fixed(TANH)
for _fn in (torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu, F.relu_):
    _TABLE[_fn] = _fixed(RELU)
for _fn in (F.gelu,):
    _TABLE[_fn] = _fixed(GELU)
for _fn in (F.silu,):
    _TABLE[_fn] = _fixed(SILU)
_TABLE[F.softplus] = _fixed(SOFTPLUS)
_TABLE[F.leaky_relu] = lambda a, k: _leaky(_arg(a, k, 1, "negative_slope", 0.01))
_TABLE[F.leaky_relu_] = _TABLE[F.leaky_relu]
_TABLE[F.elu] = lambda a, k: _elu(_arg(a, k, 1, "alpha", 1.0))
_TABLE[F.elu_] = _TABLE[F.elu]
_TABLE[F.hardtanh] = lambda a, k: _hardtanh(
    _arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)
)
_TABLE[F.hardtanh_] = _TABLE[F.hardtanh]
_TABLE[F.relu6] = lambda a, k: _hardtanh(0.0, 6.0)


def match_activation(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None
) -> ActivationSpec | None:
    """The activation that a torch function call computes, or None if it is not one.

    Example:
        >>> match_activation(torch.sigmoid, (torch.zeros(1),), None).name
        'sigmoid'
        >>> match_activation(F.leaky_relu, (torch.zeros(1), 0.2), None).name
        'leaky_relu(0.2)'
        >>> match_activation(torch.add, (), None) is None
        True
    """
    try:
        resolver = _TABLE.get(func)
    except TypeError:  # unhashable callables are never activations
        return None
    if resolver is None:
        return None
    return resolver(args, kwargs or {})
