"""Signal-flow probe: how the backward signal travels through a model, per module.

For a chain of layers z_{l+1} = W_{l+1} φ(z_l) + b_{l+1}, the backward signal
δ_l = ∂L/∂z_l obeys the chain rule

    δ_l = φ'(z_l) ⊙ (W_{l+1}ᵀ δ_{l+1}),

so the gradient of an early layer is a product of every later layer's factors. The
probe measures, per parameter-owning module (a module with parameters of its own,
``recurse=False``), with forward hooks and tensor hooks only:

* ``signal_norm`` ‖∂L/∂output‖ (the norm of δ over the batch, all calls, all outputs);
* ``output_norm`` ‖z‖, the norm of the module's output;
* ``input_signal_norm`` ‖∂L/∂input‖ through this module alone, so that
  ``input_signal_norm / signal_norm`` is the module's *weight factor*
  (‖W_{l+1}ᵀ δ_{l+1}‖ / ‖δ_{l+1}‖ for a linear layer);
* statistics of the first activation applied after the module (module or function
  form): mean and RMS derivative, saturated fraction and dead units.

Lean mode, for monitoring every training step (:class:`gradsight.Monitor`):
``activations="modules"``, ``input_signals=False``, ``output_norms=False`` and
``activation_samples=n`` keep the hot path to one forward hook and one tensor hook per
module. Activations are then recognised only in module form (``nn.Sigmoid()``, not
``torch.sigmoid``), since watching every torch function call costs more than the step
itself; the weight factor comes from ``activation_signal_norm``, the signal at the
output of the activation before the next layer, instead of a view of each input;
activation statistics are computed once per :meth:`SignalProbe.collect` for all layers
of one shape at a time, on the first ``n`` samples of the batch, from tensors that
autograd keeps for the backward pass anyway.

Only reductions are kept (a few scalars per module call); no activation or gradient
tensor outlives its hook. Hooks are tensor hooks registered from forward hooks rather
than ``register_full_backward_hook``, which fails on modules followed by in-place
activations (pytorch/pytorch#61519); a tensor hook stays on the node that produced the
output, so it receives ∂L/∂z even after ``ReLU(inplace=True)`` overwrote z.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from gradsight._errors import GradsightError
from gradsight.probes._deferred import DeferredStatistics
from gradsight.probes.activations import (
    FLAT_FRACTION,
    GELU,
    RELU,
    SIGMOID,
    SILU,
    SOFTPLUS,
    TANH,
    ActivationSpec,
    _hardtanh,
    _leaky,
    match_activation,
)

__all__ = [
    "ActivationStats",
    "ModuleSignal",
    "SignalFlow",
    "SignalProbe",
    "parameter_owners",
]

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def parameter_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly (``recurse=False``), as named_modules() names.

    A module reached under several names is listed once, under its first name.
    """
    seen: set[int] = set()
    owners = []
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if next(module.parameters(recurse=False), None) is not None:
            owners.append((name, module))
    return owners


@dataclass(frozen=True)
class ActivationStats:
    """What the activation after a module does to the backward signal.

    Attributes:
        name: The activation, e.g. ``"sigmoid"`` or ``"relu"``.
        saturation: Fraction of (sample, unit) entries where φ is flat (saturated, or
            inactive for the ReLU family), see :data:`~gradsight.probes.activations.FLAT_FRACTION`.
        dead_fraction: Fraction of units flat on every sample of the batch: they pass
            no signal back and their incoming weights get no gradient.
        mean_derivative: Mean of |φ'(z)| over the batch.
        rms_derivative: √E[φ'(z)²], the factor the activation applies to the squared
            signal on average (the mean-field χ of the activation).
        max_derivative: The activation's largest derivative, e.g. 0.25 for the sigmoid.
    """

    name: str
    saturation: float
    dead_fraction: float
    mean_derivative: float
    rms_derivative: float
    max_derivative: float


@dataclass(frozen=True)
class ModuleSignal:
    """Signal-flow measurements of one parameter-owning module on one batch.

    Norms are Euclidean norms over the whole batch (all calls of the module, all of
    its tensor outputs/inputs); ``None`` where no gradient reached the tensor.
    ``time_signal_norms`` (recurrent layers only) holds ‖∂L/∂x_t‖ for each time step t
    of the layer's input sequence: it carries the backward signal through time, so its
    fall from the last step to the first is vanishing through time.
    """

    name: str
    module_type: str
    calls: int
    signal_norm: float | None
    input_signal_norm: float | None
    output_norm: float | None
    activation: ActivationStats | None
    activation_signal_norm: float | None = None
    time_signal_norms: tuple[float, ...] | None = None

    @property
    def sensitivity(self) -> float:
        """‖∂L/∂z‖·‖z‖: the largest first-order loss change per relative change of the
        output z. Unchanged when a ReLU layer is rescaled (z ×k, ∂L/∂z ÷k)."""
        if self.signal_norm is None or self.output_norm is None:
            return 0.0
        return self.signal_norm * self.output_norm

    @property
    def weight_factor(self) -> float | None:
        """‖∂L/∂input‖ / ‖∂L/∂output‖: how much the module itself scales the signal."""
        return _ratio(self.input_signal_norm, self.signal_norm)

    @property
    def activation_factor(self) -> float | None:
        """‖∂L/∂output‖ / ‖∂L/∂φ(output)‖: how much the activation after the module
        scales the signal on its way back (``activations="modules"`` mode only)."""
        return _ratio(self.signal_norm, self.activation_signal_norm)


@dataclass
class SignalFlow:
    """Signal-flow measurements of all parameter-owning modules, in forward order.

    Attributes:
        modules: One :class:`ModuleSignal` per parameter-owning module that ran in the
            forward pass, in the order of their first call.
        unused: Names of parameter-owning modules that did not run.
        nonfinite_forward: First module (in forward order) whose output held NaN/Inf.
        nonfinite_backward: Module where the backward signal first turned NaN/Inf
            (the last module when it was already non-finite at the model's output).
    """

    modules: list[ModuleSignal]
    unused: list[str] = field(default_factory=list)
    nonfinite_forward: str | None = None
    nonfinite_backward: str | None = None

    def __getitem__(self, name: str) -> ModuleSignal:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


# --------------------------------------------------------------------------- accumulators


class _ActivationAccumulator:
    def __init__(self, spec: ActivationSpec) -> None:
        self.spec = spec
        self.count = 0
        self.flat = torch.zeros((), dtype=torch.float64)
        self.dsum = torch.zeros((), dtype=torch.float64)
        self.dsq = torch.zeros((), dtype=torch.float64)
        self.alive: torch.Tensor | None = None  # per unit: ever non-flat

    @torch.no_grad()
    def add(self, z: torch.Tensor, unit_dim: int) -> None:
        if z.numel() == 0:
            return
        d = self.spec.derivative(z.detach()).abs()
        flat = d <= self.spec.max_derivative * 0.1
        self.count += d.numel()
        self.flat = self.flat + flat.sum().to(self.flat)
        self.dsum = self.dsum + d.sum(dtype=torch.float64).cpu()
        self.dsq = self.dsq + d.double().pow(2).sum().cpu()
        unit_dim = unit_dim % z.ndim if z.ndim else 0
        if z.ndim == 0:
            alive = ~flat.reshape(1)
        else:
            alive = ~flat.movedim(unit_dim, -1).reshape(-1, z.shape[unit_dim]).all(dim=0)
        alive = alive.cpu()
        if self.alive is None:
            self.alive = alive
        elif self.alive.shape == alive.shape:  # a shared module called on other shapes: skip
            self.alive = self.alive | alive

    def add_reduced(
        self,
        count: int,
        flat: torch.Tensor,
        dsum: torch.Tensor,
        dsq: torch.Tensor,
        alive: torch.Tensor,
    ) -> None:
        """Fold in statistics reduced elsewhere (the lean mode's batched reductions)."""
        self.count += count
        self.flat = self.flat + flat.double().cpu()
        self.dsum = self.dsum + dsum.double().cpu()
        self.dsq = self.dsq + dsq.double().cpu()
        alive = alive.cpu()
        if self.alive is None:
            self.alive = alive
        elif self.alive.shape == alive.shape:
            self.alive = self.alive | alive

    def result(self) -> ActivationStats | None:
        if self.count == 0 or self.alive is None:
            return None
        n = float(self.count)
        return ActivationStats(
            name=self.spec.name,
            saturation=float(self.flat) / n,
            dead_fraction=1.0 - float(self.alive.double().mean()),
            mean_derivative=float(self.dsum) / n,
            rms_derivative=math.sqrt(float(self.dsq) / n),
            max_derivative=self.spec.max_derivative,
        )


class _ModuleAccumulator:
    def __init__(self, name: str, module: nn.Module, owns_params: bool) -> None:
        self.name = name
        self.module = module
        self.owns_params = owns_params
        self.calls = 0
        self.out_norms: list[torch.Tensor] = []
        self.in_norms: list[torch.Tensor] = []
        self.value_norms: list[torch.Tensor] = []
        self.act_out_norms: list[torch.Tensor] = []
        self.time_sq: list[torch.Tensor] = []  # recurrent layers: per-step ‖∂L/∂x_t‖²
        # Lean mode: the tensor hook for the output of the activation after this module.
        self.act_norm_hook: Callable[[torch.Tensor], None] | None = None
        self.activation: _ActivationAccumulator | None = None
        self.unit_dim = 1 if isinstance(module, _CHANNEL_FIRST) else -1
        # Lean mode: the tensor the activation module after this one saw, reduced later,
        # and the reductions of earlier calls.
        self.pending: tuple[_ModuleActivation, torch.Tensor] | None = None
        self.reduced: list[_Reduced] = []

    def clear(self) -> None:
        self.out_norms.clear()
        self.in_norms.clear()
        self.value_norms.clear()
        self.act_out_norms.clear()
        self.time_sq.clear()
        self.activation = None
        self.pending = None
        self.reduced.clear()

    def fold_reduced(self) -> None:
        for r in self.reduced:
            if self.activation is None or self.activation.spec != r.spec:
                self.activation = _ActivationAccumulator(r.spec)
            self.activation.add_reduced(r.count, r.flat, r.dsum, r.dsq, r.alive)
        self.reduced.clear()

    def result(self) -> ModuleSignal:
        return ModuleSignal(
            name=self.name,
            module_type=type(self.module).__name__,
            calls=self.calls,
            signal_norm=_combine(self.out_norms),
            input_signal_norm=_combine(self.in_norms),
            output_norm=_combine(self.value_norms),
            activation=None if self.activation is None else self.activation.result(),
            activation_signal_norm=_combine(self.act_out_norms),
            time_signal_norms=_combine_steps(self.time_sq),
        )


def _combine(norms: list[torch.Tensor]) -> float | None:
    if not norms:
        return None
    vals = [float(n) for n in norms]
    return math.sqrt(math.fsum(v * v for v in vals))


def _combine_steps(squares: list[torch.Tensor]) -> tuple[float, ...] | None:
    """Per-step norms from per-step squared norms of several calls (same length only)."""
    if not squares or len({int(sq.numel()) for sq in squares}) != 1:
        return None
    total = torch.stack([sq.detach().double().cpu() for sq in squares]).sum(dim=0)
    return tuple(float(v) for v in total.sqrt())


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in nested tuples, lists and dicts.

    A module-level function on purpose: a recursive closure refers to itself through
    its cell, a reference cycle that would keep the views it made (and the activations
    they share storage with) alive until the garbage collector runs.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _differentiable(t: torch.Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


# --------------------------------------------------------------------------- lean mode

_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@dataclass(frozen=True, eq=False)
class _ModuleActivation:
    """An activation module and how to get φ' from what its forward hook sees.

    One shared instance per activation (see :func:`_module_activation`), compared and
    hashed by identity: it keys the per-step grouping of layers, which must be cheap.
    """

    spec: ActivationSpec
    # φ' as a function of the module's *output* y (None: use spec.derivative on the input).
    from_output: Callable[[torch.Tensor], torch.Tensor] | None
    nonnegative: bool = False  # φ' ≥ 0 as computed: no abs() needed
    # from_output writing into a given tensor (no temporary), where there is one.
    into: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _sigmoid_from_output(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addcmul(y, y, y, value=-1, out=out)  # σ' = σ(1 − σ) = y − y²


def _tanh_from_output(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addcmul(torch.ones((), dtype=y.dtype, device=y.device), y, y, value=-1, out=out)


def _relu_from_output(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.sign(y, out=out)  # y ≥ 0: 1 where y > 0, else 0


_SIGMOID_MODULE = _ModuleActivation(SIGMOID, _sigmoid_from_output, True, _sigmoid_from_output)
_TANH_MODULE = _ModuleActivation(TANH, _tanh_from_output, True, _tanh_from_output)
_RELU_MODULE = _ModuleActivation(RELU, RELU.derivative, True, _relu_from_output)
_GELU_MODULE = _ModuleActivation(GELU, None)
_SILU_MODULE = _ModuleActivation(SILU, None)
_SOFTPLUS_MODULE = _ModuleActivation(SOFTPLUS, None)


@functools.lru_cache(maxsize=64)
def _leaky_module(slope: float) -> _ModuleActivation:
    spec = _leaky(slope)
    return _ModuleActivation(spec, spec.derivative)


@functools.lru_cache(maxsize=64)
def _hardtanh_module(lo: float, hi: float) -> _ModuleActivation:
    spec = _hardtanh(lo, hi)
    return _ModuleActivation(spec, spec.derivative)


def _module_activation(module: nn.Module) -> _ModuleActivation | None:
    """The activation an ``nn`` activation module computes, or None.

    Sigmoid, tanh and the ReLU family are read off their output (which autograd keeps
    for their backward pass: no extra memory, and in-place variants are fine); GELU,
    SiLU and softplus off their input, unless the module works in place.
    """
    if isinstance(module, nn.Sigmoid):
        return _SIGMOID_MODULE
    if isinstance(module, nn.Tanh):
        return _TANH_MODULE
    if isinstance(module, nn.ReLU):  # y > 0 exactly where z > 0
        return _RELU_MODULE
    if isinstance(module, nn.LeakyReLU) and module.negative_slope >= 0:
        return _leaky_module(float(module.negative_slope))
    if isinstance(module, nn.Hardtanh):  # also ReLU6; y ∈ (lo, hi) exactly where z is
        return _hardtanh_module(float(module.min_val), float(module.max_val))
    if getattr(module, "inplace", False):
        return None
    if isinstance(module, nn.GELU):
        return _GELU_MODULE
    if isinstance(module, nn.SiLU):
        return _SILU_MODULE
    if isinstance(module, nn.Softplus) and module.beta == 1:
        return _SOFTPLUS_MODULE
    # Activation modules of other libraries (Hugging Face transformers' BERT/GPT MLP
    # blocks use these), read off their input. The tanh approximations of GELU differ
    # from its exact derivative by less than 0.02, well within the flat threshold.
    name = type(module).__name__
    if name in _GELU_MODULES:
        return _GELU_MODULE
    if name in _SILU_MODULES:
        return _SILU_MODULE
    return None


_GELU_MODULES = frozenset(
    {
        "GELUActivation",
        "NewGELUActivation",
        "FastGELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "AccurateGELUActivation",
    }
)
_SILU_MODULES = frozenset({"SiLUActivation", "SwishActivation"})


def _strided(t: torch.Tensor, unit_dim: int, entries: int) -> torch.Tensor:
    """``t`` on an evenly strided grid of every dimension but samples (0) and units."""
    dims = [d for d in range(1, t.ndim) if d != unit_dim]
    stride = math.ceil((t.numel() / entries) ** (1.0 / len(dims)))
    index: list[slice] = [slice(None)] * t.ndim
    for d in dims:
        index[d] = slice(None, None, stride)
    return t[tuple(index)]


@dataclass(frozen=True)
class _Reduced:
    """One call's activation statistics in the lean mode (0-d tensors, on device)."""

    spec: ActivationSpec
    count: int
    flat: torch.Tensor
    dsum: torch.Tensor
    dsq: torch.Tensor
    alive: torch.Tensor
    saturation: torch.Tensor
    dead_fraction: torch.Tensor
    mean_derivative: torch.Tensor
    rms_derivative: torch.Tensor


def _reduce_pending(accs: list[_ModuleAccumulator]) -> None:
    """Reduce the lean mode's pending activation tensors, one group of shapes at a time.

    Layers whose activation tensors share activation, shape, dtype and device are
    stacked and reduced together: a dozen tensor operations for the whole group instead
    of a dozen per layer, and no copy to the host.
    """
    groups: dict[tuple[Any, ...], list[_ModuleAccumulator]] = {}
    for acc in accs:
        if acc.pending is None:
            continue
        act, t = acc.pending
        key = (act, acc.unit_dim % max(t.ndim, 1), t.shape, t.dtype, t.device)
        groups.setdefault(key, []).append(acc)
    with torch.no_grad():
        for (act, unit_dim, shape, _, _), members in groups.items():
            tensors = [m.pending[1] for m in members]  # type: ignore[index]
            x = torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)
            d = (act.from_output or act.spec.derivative)(x)
            if not act.nonnegative:
                d = d.abs()
            flat = d <= FLAT_FRACTION * act.spec.max_derivative
            dims = tuple(range(1, x.ndim))
            flat_n = flat.sum(dim=dims, dtype=d.dtype) if dims else flat.to(d.dtype)
            dsum = d.sum(dim=dims) if dims else d
            dsq = torch.linalg.vector_norm(d, dim=dims).square() if dims else d.square()
            if len(shape) == 0:
                alive = ~flat.reshape(-1, 1)
            else:  # per unit (feature or channel): not flat somewhere on the batch
                units = shape[unit_dim]
                alive = (~flat).movedim(unit_dim + 1, 1).reshape(len(members), units, -1).any(2)
            count = int(math.prod(shape)) if shape else 1
            stats = zip(
                flat_n.unbind(),
                dsum.unbind(),
                dsq.unbind(),
                alive.unbind(),
                (flat_n / count).unbind(),
                (1.0 - alive.to(d.dtype).mean(dim=1)).unbind(),
                (dsum / count).unbind(),
                (dsq / count).sqrt().unbind(),
                strict=True,
            )
            for m, st in zip(members, stats, strict=True):
                m.reduced.append(_Reduced(act.spec, count, *st))
                m.pending = None


# --------------------------------------------------------------------------- the probe


class _ActivationWatcher(TorchFunctionMode):
    """Sees every torch function call in the forward pass and records activations."""

    def __init__(self, probe: SignalProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        owner = self.probe._pending_owner
        if owner is not None and args and isinstance(args[0], torch.Tensor):
            spec = match_activation(func, args, kwargs)
            if spec is not None:
                self.probe._pending_owner = None
                # The input is read before the call: in-place variants overwrite it.
                owner_acc = owner
                if owner_acc.activation is None or owner_acc.activation.spec != spec:
                    owner_acc.activation = _ActivationAccumulator(spec)
                owner_acc.activation.add(args[0], owner_acc.unit_dim)
        return func(*args, **(kwargs or {}))


class SignalProbe:
    """Context manager that records signal flow through ``model`` on forward+backward.

    Run one forward pass and one backward pass (``loss.backward()`` or
    ``torch.autograd.grad``) inside the ``with`` block, then read :meth:`result`.
    All hooks are removed on exit, also when the block raises.

    Args:
        model: The model to observe.
        activations: Record statistics of the activation following each module:
            ``True`` (or ``"functions"``) watches torch function calls during the block,
            which finds functional activations too; ``"modules"`` hooks only ``nn``
            activation modules (much cheaper, and also records
            ``activation_signal_norm``); ``False`` records none.
        check_finite: Also watch every module (not only parameter owners) for
            NaN/Inf outputs and backward signals, to locate where they start.
        input_signals: Record ‖∂L/∂input‖ through each module (one view and one tensor
            hook per input and call). Without it ``weight_factor`` is None.
        output_norms: Record ‖output‖ (one reduction per call).
        activation_samples: With ``activations="modules"``: activation statistics from
            the first this many samples (dim 0) of each call only (None: all).
        activation_entries: With ``activations="modules"``: at most about this many
            entries per call for the statistics; beyond it, tensors with dimensions
            other than samples and units (conv feature maps) are subsampled on an
            evenly strided grid of those dimensions (None: no cap).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
        >>> x = torch.randn(16, 4)
        >>> with SignalProbe(model) as probe:
        ...     model(x).pow(2).mean().backward()
        >>> flow = probe.result()
        >>> [m.name for m in flow.modules], flow["0"].activation.name
        (['0', '2'], 'sigmoid')
        >>> flow["0"].activation.max_derivative
        0.25
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        activations: bool | Literal["functions", "modules"] = True,
        check_finite: bool = False,
        input_signals: bool = True,
        output_norms: bool = True,
        activation_samples: int | None = None,
        activation_entries: int | None = None,
    ) -> None:
        if activations not in (True, False, "functions", "modules"):
            raise GradsightError(
                f"activations must be True, False, 'functions' or 'modules', got {activations!r}."
            )
        if activation_samples is not None and activation_samples < 1:
            raise GradsightError(
                f"activation_samples must be a positive int or None, got {activation_samples!r}."
            )
        self.model = model
        self.activations = activations
        self.check_finite = check_finite
        self.input_signals = input_signals
        self.output_norms = output_norms
        self.activation_samples = activation_samples
        self.activation_entries = activation_entries
        self._accs: dict[int, _ModuleAccumulator] = {}
        self._order: list[_ModuleAccumulator] = []
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        #: Leaves the probe made (inputs of recurrent layers) whose gradients it reads:
        #: pass them to torch.autograd.grad along with the parameters.
        self.extra_inputs: list[torch.Tensor] = []
        self._mode: _ActivationWatcher | None = None
        self._pending_owner: _ModuleAccumulator | None = None
        self._active = False
        self._events = 0
        self._nonfinite_forward: str | None = None
        self._first_bad_grad: tuple[str, str] | None = None  # (module name, "in"/"out")
        # collect_columns: activation tensors copied aside, reduced many steps at a time
        self._deferred = DeferredStatistics()

    # -- lifecycle
    @property
    def recording(self) -> bool:
        """Whether the hooks record; set False to pause them between measured steps."""
        return self._active

    @recording.setter
    def recording(self, on: bool) -> None:
        if self._handles:  # only while entered
            self._active = bool(on)

    def __enter__(self) -> SignalProbe:
        owners = {id(m) for _, m in parameter_owners(self.model)}
        seen: set[int] = set()
        try:
            for name, module in self.model.named_modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                owns = id(module) in owners
                if not owns and not self.check_finite:
                    continue
                acc = _ModuleAccumulator(name, module, owns)
                acc.act_norm_hook = self._norm_hook(acc.act_out_norms)
                self._accs[id(module)] = acc
                if self.input_signals or self.check_finite:
                    self._handles.append(
                        module.register_forward_pre_hook(self._pre_hook(acc), with_kwargs=True)
                    )
                if self.input_signals or self.check_finite or self.output_norms:
                    self._handles.append(module.register_forward_hook(self._post_hook(acc)))
                else:
                    self._handles.append(module.register_forward_hook(self._lean_post_hook(acc)))
            if self.activations == "modules":
                for module in self.model.modules():
                    act = _module_activation(module)
                    if act is not None and id(module) not in self._accs:
                        self._handles.append(
                            module.register_forward_hook(self._activation_hook(act))
                        )
            elif self.activations:
                self._mode = _ActivationWatcher(self)
                self._mode.__enter__()
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        self._active = False
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._pending_owner = None
        for acc in self._accs.values():
            acc.act_norm_hook = None  # it refers to the probe: no reference cycle is left

    # -- hooks
    def _pre_hook(
        self, acc: _ModuleAccumulator
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if not self._active:
                return None
            if acc.owns_params:
                self._pending_owner = None  # a new layer starts: no activation is pending
                if acc.calls == 0:
                    self._order.append(acc)
            acc.calls += 1
            if not self.input_signals:
                return None
            if isinstance(module, nn.RNNBase) and args and isinstance(args[0], torch.Tensor):
                args = (self._watch_time(module, acc, args[0]), *args[1:])
            # Route each differentiable input through its own view so that the tensor
            # hook sees the gradient through this module only (not, e.g., a skip path).
            # One view per distinct tensor keeps `query is key`-style checks intact.
            views: dict[int, torch.Tensor] = {}

            def view_of(t: torch.Tensor) -> torch.Tensor:
                if not _differentiable(t):
                    return t
                if id(t) not in views:
                    view = t.view_as(t)
                    self._tensor_handles.append(view.register_hook(self._grad_hook(acc, "in")))
                    views[id(t)] = view
                return views[id(t)]

            if not any(_differentiable(t) for t in _tensors((args, kwargs))):
                return None
            return _map_tensors(args, view_of), _map_tensors(kwargs, view_of)

        return hook

    def _watch_time(
        self, module: nn.RNNBase, acc: _ModuleAccumulator, seq: torch.Tensor
    ) -> torch.Tensor:
        """Hook the input sequence of a recurrent layer for per-time-step norms."""
        if not seq.is_floating_point() or seq.ndim < 2:
            return seq
        if seq.requires_grad:
            seq = seq.view_as(seq)
        else:
            # Data needs no gradient; a leaf copy gets one. Callers that take gradients
            # with torch.autograd.grad must ask for these leaves too (extra_inputs).
            seq = seq.detach().requires_grad_(True)
            self.extra_inputs.append(seq)
        time_dim = 1 if module.batch_first and seq.ndim == 3 else 0

        def hook(grad: torch.Tensor) -> None:
            if self._active:
                dims = [d for d in range(grad.ndim) if d != time_dim]
                acc.time_sq.append(grad.detach().pow(2).sum(dim=dims))

        self._tensor_handles.append(seq.register_hook(hook))
        return seq

    def _post_hook(self, acc: _ModuleAccumulator) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            if not self.input_signals and not self.check_finite:  # no pre-hook counted it
                if acc.owns_params and acc.calls == 0:
                    self._order.append(acc)
                acc.calls += 1
            for t in _tensors(output):
                if (
                    self.output_norms
                    and acc.owns_params
                    and (t.is_floating_point() or t.is_complex())
                ):
                    with torch.no_grad():
                        acc.value_norms.append(torch.linalg.vector_norm(t.detach()))
                if (
                    self.check_finite
                    and self._nonfinite_forward is None
                    and (t.is_floating_point() or t.is_complex())
                    and not bool(torch.isfinite(t.detach()).all())
                ):
                    self._nonfinite_forward = acc.name
                if _differentiable(t):
                    self._tensor_handles.append(t.register_hook(self._grad_hook(acc, "out")))
            if acc.owns_params:
                self._pending_owner = acc

        return hook

    def _lean_post_hook(self, acc: _ModuleAccumulator) -> Callable[[nn.Module, Any, Any], None]:
        # The hot path of the lean mode: one Python call and one tensor hook per call.
        order = self._order
        grad_hook = self._norm_hook(acc.out_norms)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active or not torch.is_grad_enabled():  # e.g. an evaluation pass
                self._pending_owner = None  # nor may the activation after it be attributed
                return
            if acc.calls == 0:
                order.append(acc)
            acc.calls += 1
            if isinstance(output, torch.Tensor):
                if output.requires_grad:
                    output.register_hook(grad_hook)
            else:
                for t in _tensors(output):
                    if _differentiable(t):
                        t.register_hook(grad_hook)
            self._pending_owner = acc

        return hook

    def _norm_hook(self, norms: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        """A tensor hook for the lean mode: the gradient's norm, taken at once while the
        gradient is in cache (measured: cheaper than keeping it for a multi-tensor norm
        later, which also holds memory and defeats the allocator's reuse)."""
        norm = torch.linalg.vector_norm

        def grad_hook(grad: torch.Tensor) -> None:
            if self._active:
                with torch.no_grad():  # half precision: a float32 result (fp16 overflows)
                    norms.append(norm(grad, dtype=_WIDE.get(grad.dtype)))

        return grad_hook

    def _activation_hook(self, act: _ModuleActivation) -> Callable[[nn.Module, Any, Any], None]:
        samples = self.activation_samples
        entries = self.activation_entries

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            owner = self._pending_owner
            if owner is None or not isinstance(output, torch.Tensor):
                return
            self._pending_owner = None
            t = output if act.from_output is not None else args[0]
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if samples is not None and t.ndim > 0 and t.shape[0] > samples:
                    t = t[:samples]
                if entries is not None and t.ndim > 2 and t.numel() > entries:
                    # Copied now, while the activation is in cache: a strided read of
                    # it at collect time costs a cache miss per entry.
                    t = _strided(t.detach(), owner.unit_dim % t.ndim, entries).contiguous()
                if owner.pending is not None:  # a second call before collect(): reduce it
                    _reduce_pending([owner])
                owner.pending = (act, t)  # read under no_grad in _reduce_pending
            if output.requires_grad:
                output.register_hook(owner.act_norm_hook)

        return hook

    def _grad_hook(self, acc: _ModuleAccumulator, where: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self._active:
                return
            with torch.no_grad():
                norm = torch.linalg.vector_norm(grad.detach())
            if acc.owns_params:
                (acc.out_norms if where == "out" else acc.in_norms).append(norm)
            if (
                self.check_finite
                and self._first_bad_grad is None
                and not bool(torch.isfinite(norm))
                and not bool(torch.isfinite(grad).all())
            ):
                self._first_bad_grad = (acc.name, where)

        return hook

    # -- result
    def collect_columns(
        self, extra: list[torch.Tensor] | tuple[()] = (), tag: Any = None
    ) -> tuple[list[tuple[str, str]], list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`collect` as columns, for the per-step hot path of a monitor.

        Returns ``(keys, values, extra_norms)``: ``values[i]`` (a 0-d tensor on the
        device) is the measurement ``keys[i] = (module, metric)``, and ``extra_norms``
        the norms of the tensors in ``extra`` (e.g. parameter gradients), taken in one
        multi-tensor reduction (the lean hooks took the signal norms during backward).

        In the usual case (one call per module since the last collect) the activation
        statistics are not among ``values``: the step's activation tensors are copied
        aside, and many steps' are reduced together later; :meth:`pop_statistics`
        returns them, labelled with ``tag``. A few tensor operations per step in all,
        whatever the depth of the model.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> lean = dict(activations="modules", input_signals=False, output_norms=False)
            >>> with SignalProbe(model, **lean) as probe:
            ...     model(torch.randn(16, 4)).sum().backward()
            ...     keys, values, norms = probe.collect_columns([model[0].weight.grad], tag=7)
            >>> len(keys) == len(values), keys[0], len(norms)
            (True, ('0', 'signal_norm'), 1)
            >>> [(tag, keys[0]) for tag, keys, _ in probe.pop_statistics(final=True)]
            [(7, ('0', 'saturation'))]
        """
        accs = [acc for acc in self._order if acc.owns_params]
        simple = all(
            not acc.reduced
            and not acc.in_norms
            and not acc.value_norms
            and len(acc.out_norms) <= 1
            and len(acc.act_out_norms) <= 1
            for acc in accs
        )
        if not simple:  # several calls per step, or the full probe: the general path
            extra_norms = list(torch._foreach_norm(list(extra))) if extra else []
            rows = self.collect()
            return [(n, m) for n, m, _ in rows], [v for _, _, v in rows], extra_norms
        with torch.no_grad():
            extra_norms = list(torch._foreach_norm(list(extra))) if extra else []
        keys: list[tuple[str, str]] = []
        scalars: list[torch.Tensor] = []
        for acc in accs:
            if acc.out_norms:
                keys.append((acc.name, "signal_norm"))
                scalars.append(acc.out_norms[0])
            if acc.act_out_norms:
                keys.append((acc.name, "activation_signal_norm"))
                scalars.append(acc.act_out_norms[0])
        self._defer_statistics(accs, tag)
        for acc in accs:
            acc.clear()
        self._pending_owner = None
        return keys, scalars, extra_norms

    def pop_statistics(
        self, final: bool = False
    ) -> list[tuple[Any, list[tuple[str, str]], torch.Tensor]]:
        """Activation statistics that :meth:`collect_columns` deferred, as ``(tag, keys,
        values)`` blocks (``values`` on the device, four per layer: ``saturation``,
        ``dead_fraction``, ``mean_derivative``, ``rms_derivative``); ``final``: also
        reduce the steps still waiting. Each block is returned once."""
        return self._deferred.pop(final)

    def _defer_statistics(self, accs: list[_ModuleAccumulator], tag: Any) -> None:
        """Hand the pending activation tensors of ``accs`` to the deferred reduction, per
        group of layers with the same activation and shape, and clear them."""
        groups: dict[tuple[Any, ...], list[_ModuleAccumulator]] = {}
        for acc in accs:
            if acc.pending is not None:
                act, t = acc.pending
                key = (act, acc.unit_dim % max(t.ndim, 1), t.shape, t.dtype, t.device)
                groups.setdefault(key, []).append(acc)
        for (act, unit_dim, _, _, _), members in groups.items():
            tensors = [m.pending[1] for m in members]  # type: ignore[index]
            self._deferred.add(tag, [m.name for m in members], act, unit_dim, tensors)
            for m in members:
                m.pending = None

    def collect(self) -> list[tuple[str, str, torch.Tensor]]:
        """Measurements since the last ``collect()``, as ``(module, metric, value)``; reset.

        For monitoring: values are 0-d tensors on the model's device (nothing is copied
        to the host, so there is no synchronisation); norms of several calls combine in
        quadrature. Metrics: ``signal_norm``, ``input_signal_norm``, ``output_norm``,
        ``activation_signal_norm`` (lean mode), ``saturation``, ``dead_fraction``,
        ``mean_derivative``, ``rms_derivative``. Absent values are left out.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
            >>> with SignalProbe(model, activations="modules", input_signals=False) as probe:
            ...     model(torch.randn(16, 4)).sum().backward()
            ...     rows = probe.collect()
            >>> sorted({metric for _, metric, _ in rows})[:3]
            ['activation_signal_norm', 'dead_fraction', 'mean_derivative']
            >>> probe.collect()
            []
        """
        _reduce_pending(self._order)
        rows: list[tuple[str, str, torch.Tensor]] = []
        for acc in self._order:
            if not acc.owns_params:
                continue
            for metric, norms in (
                ("signal_norm", acc.out_norms),
                ("input_signal_norm", acc.in_norms),
                ("output_norm", acc.value_norms),
                ("activation_signal_norm", acc.act_out_norms),
            ):
                if len(norms) == 1:
                    rows.append((acc.name, metric, norms[0]))
                elif norms:
                    rows.append((acc.name, metric, torch.linalg.vector_norm(torch.stack(norms))))
            stats: tuple[torch.Tensor, ...]
            if len(acc.reduced) == 1 and acc.activation is None:  # the usual case
                r = acc.reduced[0]
                stats = (r.saturation, r.dead_fraction, r.mean_derivative, r.rms_derivative)
            else:
                acc.fold_reduced()
                a = acc.activation
                if a is None or not a.count or a.alive is None:
                    stats = ()
                else:
                    n = float(a.count)
                    stats = (
                        a.flat / n,
                        1.0 - a.alive.double().mean(),
                        a.dsum / n,
                        (a.dsq / n).sqrt(),
                    )
            rows += [
                (acc.name, metric, value)
                for metric, value in zip(
                    ("saturation", "dead_fraction", "mean_derivative", "rms_derivative"),
                    stats,
                    strict=False,
                )
            ]
            acc.clear()
        self._pending_owner = None
        return rows

    def result(self) -> SignalFlow:
        """Reduce what was recorded into a :class:`SignalFlow` (forward order)."""
        _reduce_pending(self._order)
        for acc in self._order:
            acc.fold_reduced()
        modules = [acc.result() for acc in self._order]
        called = {id(acc.module) for acc in self._order}
        unused = [name for name, m in parameter_owners(self.model) if id(m) not in called]
        # Hooks fire in backward order, and on one tensor innermost module first, so the
        # first non-finite gradient seen belongs to the first module (walking back from
        # the loss) whose backward signal is non-finite: at its input if the module
        # itself turned it non-finite, at its output if it arrived so.
        backward_origin = None if self._first_bad_grad is None else self._first_bad_grad[0]
        return SignalFlow(
            modules=modules,
            unused=unused,
            nonfinite_forward=self._nonfinite_forward,
            nonfinite_backward=backward_origin,
        )
