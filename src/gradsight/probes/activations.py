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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FLAT_FRACTION",
    "ActivationSpec",
    "ModuleActivation",
    "is_activation_function",
    "match_activation",
    "module_activation",
]

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
        nonnegative: φ' ≥ 0 everywhere (no ``abs`` needed to read its size).
        binary: φ' is ``max_derivative`` where the input is above 0, else 0 (ReLU; the
            output is above 0 at the same entries): its sum alone gives the flat count
            and the sum of squares, and the sign alone gives φ'.
        host: ``derivative`` in NumPy, where there is one: small CPU tensors are reduced
            on the host, where NumPy's per-call cost is a fraction of torch's.
    """

    name: str
    derivative: Callable[[torch.Tensor], torch.Tensor]
    max_derivative: float
    rectifier: bool = False
    nonnegative: bool = False
    binary: bool = False
    host: Callable[[np.ndarray], np.ndarray] | None = None

    def flat(self, z: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the units where φ is flat at ``z``."""
        return self.derivative(z).abs() <= FLAT_FRACTION * self.max_derivative


def _sigmoid_d(z: torch.Tensor) -> torch.Tensor:
    return _sigmoid_from_output(torch.sigmoid(z))


def _tanh_d(z: torch.Tensor) -> torch.Tensor:
    return _tanh_from_output(torch.tanh(z))


def _relu_d(z: torch.Tensor) -> torch.Tensor:
    # 1 where z > 0, else 0 (NaN included); a third of the time of (z > 0).to(dtype),
    # whose bool-to-float conversion is not vectorized on CPU.
    return z.sign().clamp_(min=0).nan_to_num_(0.0)


def _gelu_d(z: torch.Tensor) -> torch.Tensor:
    # d/dz [z Φ(z)] = Φ(z) + z φ(z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / _SQRT_2PI
    return cdf + z * pdf


def _silu_d(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _tanh_d_host(z: np.ndarray) -> np.ndarray:
    t = np.tanh(z)
    return 1.0 - t * t


def _sigmoid_d_host(z: np.ndarray) -> np.ndarray:
    # σ(1 − σ) = (1 − tanh²(z/2)) / 4, without exp's overflow for large |z|
    t = np.tanh(0.5 * z)
    return 0.25 * (1.0 - t * t)


SIGMOID = ActivationSpec("sigmoid", _sigmoid_d, 0.25, nonnegative=True, host=_sigmoid_d_host)
TANH = ActivationSpec("tanh", _tanh_d, 1.0, nonnegative=True, host=_tanh_d_host)
RELU = ActivationSpec("relu", _relu_d, 1.0, rectifier=True, nonnegative=True, binary=True)
GELU = ActivationSpec("gelu", _gelu_d, 1.1289)  # max of Φ(z)+zφ(z), at z = √2
SILU = ActivationSpec("silu", _silu_d, 1.0998)  # max at z ≈ 2.40
SOFTPLUS = ActivationSpec("softplus", torch.sigmoid, 1.0, nonnegative=True)  # σ(z)


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


def _softplus(beta: float) -> ActivationSpec:
    beta = float(beta)
    if beta == 1.0:
        return SOFTPLUS
    return ActivationSpec(f"softplus({beta:g})", lambda z: torch.sigmoid(beta * z), 1.0)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, key: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


# --------------------------------------------------------------------------- the registry
#
# One row per activation: its torch function spellings (what a torch function mode sees,
# so also what modules' forwards call) and its ``nn`` module types (what a forward hook
# sees), each with how to read the activation's parameters, and how to get φ' from what
# a module's forward hook holds. :func:`match_activation` (diagnose's function watcher)
# and :func:`module_activation` (the Monitor's module hooks) are two views of it, so an
# activation is recognised by both or by neither (tests/test_probes.py checks every
# activation module of torch.nn against both).


@dataclass(frozen=True, eq=False)
class ModuleActivation:
    """An activation module and how to get φ' from what its forward hook sees.

    One shared instance per activation and parameters, compared and hashed by identity:
    it keys the per-step grouping of layers, which must be cheap.

    Attributes:
        spec: The activation.
        from_output: φ' as a function of the module's *output* y (None: use
            ``spec.derivative`` on its input).
        nonnegative: φ' ≥ 0 as computed: no ``abs()`` needed.
        into: ``from_output`` writing into a given tensor (no temporary), where there is one.
    """

    spec: ActivationSpec
    from_output: Callable[[torch.Tensor], torch.Tensor] | None
    nonnegative: bool = False
    into: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _sigmoid_from_output(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addcmul(y, y, y, value=-1, out=out)  # σ' = σ(1 − σ) = y − y²


def _tanh_from_output(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addcmul(torch.ones((), dtype=y.dtype, device=y.device), y, y, value=-1, out=out)


def _relu_from_output(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.sign(y, out=out)  # y ≥ 0: 1 where y > 0, else 0


def _by_output(fn: Callable[..., torch.Tensor]) -> Callable[..., ModuleActivation]:
    """A reader of φ' off the module's output (kept by autograd anyway; in place is fine)."""
    return lambda spec, *_: ModuleActivation(spec, fn, True, fn)


def _by_input(spec: ActivationSpec, *_: float) -> ModuleActivation:
    return ModuleActivation(spec, None)


def _by_own_derivative(spec: ActivationSpec, *_: float) -> ModuleActivation:
    """Rectifier-like activations whose φ' is the same function of y as of z."""
    return ModuleActivation(spec, spec.derivative)


def _elu_reader(spec: ActivationSpec, alpha: float) -> ModuleActivation:
    # y = α(eᶻ − 1) where z ≤ 0, so φ' = αeᶻ = y + α there (and y ≤ 0 exactly there).
    return ModuleActivation(
        spec, lambda y: torch.where(y > 0, torch.ones_like(y), y + alpha), nonnegative=True
    )


@dataclass(frozen=True)
class _Row:
    make: Callable[..., ActivationSpec]  # the spec from the activation's parameters
    functions: tuple[Any, ...]
    call_params: Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]
    modules: tuple[Any, ...]  # nn types, or class names of other libraries' modules
    module_params: Callable[[Any], tuple[Any, ...] | None]  # None: not readable
    reader: Callable[..., ModuleActivation]  # (spec, *parameters)
    reads_input: bool = False  # the reader needs the module's input (not in place)


def _none(*_: Any) -> tuple[Any, ...]:
    return ()


_GELU_NAMES = (
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "AccurateGELUActivation",
)

# The tanh approximations of GELU differ from its exact derivative by less than 0.02,
# well within the flat threshold: one spec for all of them.
_ROWS: tuple[_Row, ...] = (
    _Row(
        lambda: SIGMOID,
        (torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid),
        _none,
        (nn.Sigmoid,),
        _none,
        _by_output(_sigmoid_from_output),
    ),
    _Row(
        lambda: TANH,
        (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh),
        _none,
        (nn.Tanh,),
        _none,
        _by_output(_tanh_from_output),
    ),
    _Row(
        lambda: RELU,  # y > 0 exactly where z > 0
        (torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu, F.relu_),
        _none,
        (nn.ReLU,),
        _none,
        lambda spec: ModuleActivation(spec, spec.derivative, True, _relu_from_output),
    ),
    _Row(
        _leaky,
        (F.leaky_relu, F.leaky_relu_),
        lambda a, k: (_arg(a, k, 1, "negative_slope", 0.01),),
        (nn.LeakyReLU,),
        # A negative slope flips the sign of y: φ' is then not a function of y's sign.
        lambda m: (m.negative_slope,) if m.negative_slope >= 0 else None,
        _by_own_derivative,
    ),
    _Row(
        _elu,
        (F.elu, F.elu_),
        lambda a, k: (_arg(a, k, 1, "alpha", 1.0),),
        (nn.ELU,),
        lambda m: (m.alpha,) if m.alpha >= 0 else None,
        _elu_reader,
    ),
    _Row(
        _hardtanh,  # also ReLU6; y ∈ (lo, hi) exactly where z is
        (F.hardtanh, F.hardtanh_),
        lambda a, k: (_arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)),
        (nn.Hardtanh,),  # nn.ReLU6 is a Hardtanh(0, 6)
        lambda m: (m.min_val, m.max_val),
        _by_own_derivative,
    ),
    _Row(lambda: _hardtanh(0.0, 6.0), (F.relu6,), _none, (), _none, _by_own_derivative),
    _Row(lambda: GELU, (F.gelu,), _none, (nn.GELU, *_GELU_NAMES), _none, _by_input, True),
    _Row(
        lambda: SILU,
        (F.silu,),
        _none,
        (nn.SiLU, "SiLUActivation", "SwishActivation"),
        _none,
        _by_input,
        True,
    ),
    _Row(
        _softplus,
        (F.softplus,),
        lambda a, k: (_arg(a, k, 1, "beta", 1.0),),
        (nn.Softplus,),
        lambda m: (m.beta,),
        _by_input,
        True,
    ),
)

_Resolver = Callable[[tuple[Any, ...], dict[str, Any]], ActivationSpec]


@functools.lru_cache(maxsize=256)
def _spec(row: int, params: tuple[Any, ...]) -> ActivationSpec:
    return _ROWS[row].make(*params)


@functools.lru_cache(maxsize=256)
def _reader(row: int, params: tuple[Any, ...]) -> ModuleActivation:
    return _ROWS[row].reader(_spec(row, params), *params)


def _params(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(float(v) for v in values)


_FUNCTIONS: dict[Any, int] = {}
_MODULE_TYPES: dict[Any, int] = {}
for _i, _row in enumerate(_ROWS):
    for _fn in _row.functions:
        _FUNCTIONS[_fn] = _i
    for _m in _row.modules:
        _MODULE_TYPES[_m] = _i


def is_activation_function(func: Any) -> bool:
    """Whether ``func`` is a torch function that computes a known activation (its
    parameters aside): the cheap test a function watcher makes on every call."""
    try:
        return func in _FUNCTIONS
    except TypeError:  # unhashable callables are never activations
        return False


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
        row = _FUNCTIONS.get(func)
    except TypeError:  # unhashable callables are never activations
        return None
    if row is None:
        return None
    return _spec(row, _params(_ROWS[row].call_params(args, kwargs or {})))


def module_activation(module: nn.Module) -> ModuleActivation | None:
    """The activation an activation module computes, and how its forward hook reads φ', or
    None.

    Sigmoid, tanh and the ReLU family are read off their output (which autograd keeps
    for their backward pass: no extra memory, and in-place variants are fine); GELU,
    SiLU and softplus off their input, unless the module works in place. Subclasses of
    the ``nn`` types count; modules of other libraries (Hugging Face transformers'
    ``GELUActivation``, ...) by class name.

    Example:
        >>> module_activation(nn.ELU(0.5)).spec.name
        'elu(0.5)'
        >>> module_activation(nn.SiLU(inplace=True)) is None  # its input is overwritten
        True
    """
    row = None
    for cls in type(module).__mro__:
        row = _MODULE_TYPES.get(cls)
        if row is None:
            row = _MODULE_TYPES.get(cls.__name__)
        if row is not None:
            break
    if row is None:
        return None
    entry = _ROWS[row]
    if entry.reads_input and getattr(module, "inplace", False):
        return None
    params = entry.module_params(module)
    if params is None:
        return None
    return _reader(row, _params(params))
