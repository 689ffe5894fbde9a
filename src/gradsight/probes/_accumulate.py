"""Per-module accumulators of a :class:`~gradsight.probes.SignalProbe`, over a module's calls.

A module's norms are kept as 0-d device tensors, one per call; its activation statistics
as the kernel's summable states (:mod:`gradsight.probes._kernel`), whichever way they
were read: the function watcher reduces each call at once, the lean mode's module hooks
keep the tensor and reduce all layers of one shape together (:func:`reduce_pending`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradsight.probes._kernel import (
    ActivationStates,
    Reduce,
    activation_states,
    declare,
    on_host,
)
from gradsight.probes._results import ActivationStats, ModuleSignal
from gradsight.probes.activations import ActivationSpec, ModuleActivation

#: The probe's norm metrics, and how they reduce across ranks (the activation metrics
#: are declared by the kernel).
SIGNAL_NORM = declare("signal_norm", Reduce.BACKWARD_NORM)
INPUT_SIGNAL_NORM = declare("input_signal_norm", Reduce.BACKWARD_NORM)
ACTIVATION_SIGNAL_NORM = declare("activation_signal_norm", Reduce.BACKWARD_NORM)
OUTPUT_NORM = declare("output_norm", Reduce.FORWARD_NORM)

CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


class ActivationAccumulator:
    """The activation after one module, over its calls: the kernel's states, summed."""

    def __init__(self, spec: ActivationSpec) -> None:
        self.spec = spec
        self.states: ActivationStates | None = None
        self._metrics: list[float] | None = None  # of `states`, where already on the host

    def add(self, states: ActivationStates, metrics: list[float] | None = None) -> None:
        """Add one call's states (``metrics``: theirs, if already computed)."""
        self._metrics = metrics if self.states is None else None
        self.states = states if self.states is None else self.states.add(states)

    @torch.no_grad()
    def add_tensor(self, z: torch.Tensor, unit_dim: int) -> None:
        """One call's pre-activation ``z`` (the function watcher's path)."""
        if z.numel() == 0:
            return
        unit_dim = unit_dim % z.ndim if z.ndim else 0
        self.add(activation_states(self.spec, unit_dim, z.detach().unsqueeze(0)))

    def result(self) -> ActivationStats | None:
        s = self.states
        if s is None or s.count == 0:
            return None
        sat, dead, mean, rms = self._metrics or s.host_metrics()[0]
        return ActivationStats(
            name=self.spec.name,
            saturation=sat,
            dead_fraction=dead,
            mean_derivative=mean,
            rms_derivative=rms,
            max_derivative=self.spec.max_derivative,
        )


class ModuleAccumulator:
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
        # The tensor hooks for ∂L/∂input and ∂L/∂output (made once, not per call).
        self.in_hook: Callable[[torch.Tensor], None] | None = None
        self.out_hook: Callable[[torch.Tensor], None] | None = None
        self.activation: ActivationAccumulator | None = None
        self.unit_dim = 1 if isinstance(module, CHANNEL_FIRST) else -1
        # Lean mode: the tensor the activation module after this one saw, reduced later,
        # and the reductions of earlier calls: (spec, states of one call, its 4 metrics).
        self.pending: tuple[ModuleActivation, torch.Tensor] | None = None
        self.reduced: list[tuple[ActivationSpec, ActivationStates, tuple[torch.Tensor, ...]]] = []

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
        """Sum the reduced calls into ``activation`` (a change of activation restarts)."""
        for spec, states, _ in self.reduced:
            if self.activation is None or self.activation.spec != spec:
                self.activation = ActivationAccumulator(spec)
            self.activation.add(states)
        self.reduced.clear()

    def activation_metrics(self) -> tuple[torch.Tensor, ...]:
        """Saturation, dead fraction, mean and RMS derivative as 0-d device tensors (none
        when no activation was seen)."""
        if len(self.reduced) == 1 and self.activation is None:  # the usual case
            return self.reduced[0][2]
        self.fold_reduced()
        a = self.activation
        if a is None or a.states is None or not a.states.count:
            return ()
        return tuple(a.states.metrics()[0].unbind())

    def result(self) -> ModuleSignal:
        return ModuleSignal(
            name=self.name,
            module_type=type(self.module).__name__,
            calls=self.calls,
            signal_norm=combine(self.out_norms),
            input_signal_norm=combine(self.in_norms),
            output_norm=combine(self.value_norms),
            activation=None if self.activation is None else self.activation.result(),
            activation_signal_norm=combine(self.act_out_norms),
            time_signal_norms=combine_steps(self.time_sq),
        )


def _grouped_states(
    items: Sequence[tuple[ModuleActivation | ActivationSpec, int, torch.Tensor]],
    host_alone: bool = False,
) -> list[tuple[list[int], ActivationStates]]:
    """Activation statistics of ``(activation, unit dim, tensor)`` items, one kernel call
    per group of the same activation, unit dimension, shape, dtype and device: per group
    ``(indices into items, the stacked states)``, on the device. With ``host_alone``, a
    tensor reduced on the host goes alone (for statistics read on the host: NumPy's
    whole-array reductions of one tensor beat its reductions along an axis of a stack,
    and stacking costs a copy)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (act, unit_dim, t) in enumerate(items):
        alone = i if host_alone and t.ndim and on_host(t) else None
        key = (act, unit_dim % max(t.ndim, 1), t.shape, t.dtype, t.device, alone)
        groups.setdefault(key, []).append(i)
    out = []
    with torch.no_grad():
        for (act, unit_dim, *_), members in groups.items():
            tensors = [items[i][2] for i in members]
            x = torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)
            out.append((members, activation_states(act, unit_dim, x)))
    return out


def reduce_pending(accs: list[ModuleAccumulator]) -> None:
    """Reduce the lean mode's pending activation tensors, one group of shapes at a time.

    Layers whose activation tensors share activation, shape, dtype and device are
    stacked and reduced together by the kernel: a dozen tensor operations for the whole
    group instead of a dozen per layer, and no copy to the host.
    """
    pending = [(acc, acc.pending) for acc in accs if acc.pending is not None]
    items = [(act, acc.unit_dim, t) for acc, (act, t) in pending]
    for members, states in _grouped_states(items):
        metrics = states.metrics()
        for i, st, row in zip(members, states.unbind(), metrics.unbind(), strict=True):
            acc, (act, _) = pending[i]
            acc.reduced.append((act.spec, st, tuple(row.unbind())))
            acc.pending = None


def reduce_kept(
    kept: list[tuple[ModuleAccumulator, ActivationSpec, torch.Tensor, int]],
) -> dict[int, tuple[ActivationStates, list[float]]]:
    """Activation statistics of pre-activations kept by the function watcher, one kernel
    call per group of layers with the same activation, unit dimension, shape and dtype:
    ``{index in kept: (states, their 4 metrics)}``. A tensor changed in place since it was
    kept (its version moved on), which the statistics can no longer see, is left out."""
    live = [i for i, (_, _, z, version) in enumerate(kept) if z.numel() and z._version == version]
    items = [(kept[i][1], kept[i][0].unit_dim, kept[i][2]) for i in live]
    out: dict[int, tuple[ActivationStates, list[float]]] = {}
    for members, states in _grouped_states(items, host_alone=True):
        rows = states.host_metrics()  # one copy to the host per group
        for j, st, row in zip(members, states.unbind(), rows, strict=True):
            out[live[j]] = (st, row)
    return out


def combine(norms: list[torch.Tensor] | list[float]) -> float | None:
    """The norm over all calls: the calls' norms in quadrature."""
    if not norms:
        return None
    if len(norms) == 1:
        return abs(float(norms[0]))
    vals = [float(n) for n in norms]
    return math.sqrt(math.fsum(v * v for v in vals))


def combine_steps(squares: list[torch.Tensor]) -> tuple[float, ...] | None:
    """Per-step norms from per-step squared norms of several calls (same length only)."""
    if not squares or len({int(sq.numel()) for sq in squares}) != 1:
        return None
    total = torch.stack([sq.detach().double().cpu() for sq in squares]).sum(dim=0)
    return tuple(float(v) for v in total.sqrt())


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors(v)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in nested tuples, lists and dicts.

    A module-level function on purpose: a recursive closure refers to itself through
    its cell, a reference cycle that would keep the views it made (and the activations
    they share storage with) alive until the garbage collector runs.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def differentiable(t: torch.Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


def strided(t: torch.Tensor, unit_dim: int, entries: int) -> torch.Tensor:
    """``t`` on an evenly strided grid of every dimension but samples (0) and units."""
    dims = [d for d in range(1, t.ndim) if d != unit_dim]
    stride = math.ceil((t.numel() / entries) ** (1.0 / len(dims)))
    index: list[slice] = [slice(None)] * t.ndim
    for d in dims:
        index[d] = slice(None, None, stride)
    return t[tuple(index)]
