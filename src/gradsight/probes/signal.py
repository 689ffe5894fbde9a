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

Only reductions are kept (a few scalars per module call); no activation or gradient
tensor outlives its hook. Hooks are tensor hooks registered from forward hooks rather
than ``register_full_backward_hook``, which fails on modules followed by in-place
activations (pytorch/pytorch#61519); a tensor hook stays on the node that produced the
output, so it receives ∂L/∂z even after ``ReLU(inplace=True)`` overwrote z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from gradsight.probes.activations import ActivationSpec, match_activation

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
    """

    name: str
    module_type: str
    calls: int
    signal_norm: float | None
    input_signal_norm: float | None
    output_norm: float | None
    activation: ActivationStats | None

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
        self.activation: _ActivationAccumulator | None = None
        self.unit_dim = 1 if isinstance(module, _CHANNEL_FIRST) else -1

    def result(self) -> ModuleSignal:
        return ModuleSignal(
            name=self.name,
            module_type=type(self.module).__name__,
            calls=self.calls,
            signal_norm=_combine(self.out_norms),
            input_signal_norm=_combine(self.in_norms),
            output_norm=_combine(self.value_norms),
            activation=None if self.activation is None else self.activation.result(),
        )


def _combine(norms: list[torch.Tensor]) -> float | None:
    if not norms:
        return None
    vals = [float(n) for n in norms]
    return math.sqrt(math.fsum(v * v for v in vals))


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


def _differentiable(t: torch.Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


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
        activations: Record statistics of the activation following each module
            (watches torch function calls during the block).
        check_finite: Also watch every module (not only parameter owners) for
            NaN/Inf outputs and backward signals, to locate where they start.

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
        activations: bool = True,
        check_finite: bool = False,
    ) -> None:
        self.model = model
        self.activations = activations
        self.check_finite = check_finite
        self._accs: dict[int, _ModuleAccumulator] = {}
        self._order: list[_ModuleAccumulator] = []
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self._mode: _ActivationWatcher | None = None
        self._pending_owner: _ModuleAccumulator | None = None
        self._active = False
        self._events = 0
        self._nonfinite_forward: str | None = None
        self._first_bad_grad: tuple[str, str] | None = None  # (module name, "in"/"out")

    # -- lifecycle
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
                self._accs[id(module)] = acc
                self._handles.append(
                    module.register_forward_pre_hook(self._pre_hook(acc), with_kwargs=True)
                )
                self._handles.append(module.register_forward_hook(self._post_hook(acc)))
            if self.activations:
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
            # Route each differentiable input through its own view so that the tensor
            # hook sees the gradient through this module only (not, e.g., a skip path).
            # One view per distinct tensor keeps `query is key`-style checks intact.
            views: dict[int, torch.Tensor] = {}

            def wrap(obj: Any) -> Any:
                if isinstance(obj, torch.Tensor):
                    if not _differentiable(obj):
                        return obj
                    if id(obj) not in views:
                        view = obj.view_as(obj)
                        self._tensor_handles.append(view.register_hook(self._grad_hook(acc, "in")))
                        views[id(obj)] = view
                    return views[id(obj)]
                if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
                    return tuple(wrap(o) for o in obj)
                if isinstance(obj, list):
                    return [wrap(o) for o in obj]
                if isinstance(obj, dict):
                    return {k: wrap(v) for k, v in obj.items()}
                return obj

            if not any(_differentiable(t) for t in _tensors((args, kwargs))):
                return None
            return wrap(args), wrap(kwargs)

        return hook

    def _post_hook(self, acc: _ModuleAccumulator) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            for t in _tensors(output):
                if acc.owns_params and (t.is_floating_point() or t.is_complex()):
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
    def result(self) -> SignalFlow:
        """Reduce what was recorded into a :class:`SignalFlow` (forward order)."""
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
