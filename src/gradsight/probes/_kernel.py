"""The one kernel for activation statistics, and how every recorded metric reduces across ranks.

**Kernel.** :func:`activation_states` reduces ``n`` activation tensors at once to the
sufficient statistics of their derivatives: per tensor the number of entries read, the
number of flat entries, Σ|φ'|, Σφ'², and per unit whether it was ever not flat. These
*add*: over several calls of a layer, over steps, over the ranks of a process group (sums,
and a logical or of the unit masks), so the diagnosis' accumulator, the Monitor's
per-step reduction, its deferred many-steps reduction and the cross-rank reduction all
start from the same numbers. :meth:`ActivationStates.metrics` turns them into the four
recorded fractions.

**Declared reductions.** Each metric a probe or the Monitor records declares, where it is
created, how its per-rank values combine into the value of the global batch
(:func:`declare`, as torchmetrics' ``add_state(..., dist_reduce_fx=...)``); the
distributed reducer (:mod:`gradsight.monitor._distributed`) applies the declarations and
knows no metric by name.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from gradsight._errors import GradsightError
from gradsight.probes.activations import FLAT_FRACTION, ActivationSpec, ModuleActivation

__all__ = [
    "ACTIVATION_METRICS",
    "ActivationStates",
    "Reduce",
    "activation_states",
    "declare",
    "on_host",
    "reduction",
]


class Reduce(enum.Enum):
    """How a metric's values on W ranks (each on its shard of the batch) combine."""

    #: ‖∂L/∂t‖ over the batch, each rank differentiating its own loss L_r while the
    #: objective is their mean (DDP and FSDP average gradients): √(Σ_r v_r²) / W.
    BACKWARD_NORM = "backward_norm"
    #: ‖t‖ over the batch of a forward tensor t: √(Σ_r v_r²).
    FORWARD_NORM = "forward_norm"
    #: A mean over the entries read, weighted by each rank's entry count n_r.
    ENTRY_MEAN = "entry_mean"
    #: A root mean square over the entries read: √(Σ_r v_r² n_r / Σ_r n_r).
    ENTRY_RMS = "entry_rms"
    #: The fraction of units flat on every rank's entries (per-unit masks, or-reduced).
    UNITS_FLAT = "units_flat"
    #: The mean over ranks (the loss: the objective is the ranks' mean loss).
    RANK_MEAN = "rank_mean"
    #: A norm of parameters or of their gradients: the same on every rank when each holds
    #: them whole (DDP), √(Σ_r v_r²) of the shards when each holds a shard (FSDP).
    PARAMETER_NORM = "parameter_norm"
    #: The same on every rank (a learning rate, a loss scale): rank 0's value.
    REPLICATED = "replicated"


_DECLARED: dict[str, Reduce] = {}


def declare(metric: str, reduce: Reduce) -> str:
    """Declare ``metric`` and its cross-rank reduction; returns ``metric``, so that the
    declaration sits where the metric's name is first used.

    Example:
        >>> declare("signal_norm", Reduce.BACKWARD_NORM)
        'signal_norm'
    """
    known = _DECLARED.setdefault(metric, reduce)
    if known is not reduce:
        raise GradsightError(
            f"metric {metric!r} is declared twice with different reductions ({known.value} "
            f"and {reduce.value}); give the new metric another name."
        )
    return metric


def reduction(metric: str) -> Reduce:
    """The cross-rank reduction ``metric`` declared.

    Raises:
        GradsightError: for a metric nobody declared (it could not be reduced correctly).
    """
    try:
        return _DECLARED[metric]
    except KeyError:
        raise GradsightError(
            f"metric {metric!r} has no declared cross-rank reduction; declare it with "
            "gradsight.probes._kernel.declare(name, Reduce.X) where it is created."
        ) from None


#: The activation metrics, in the order of :meth:`ActivationStates.metrics`' columns.
SATURATION = declare("saturation", Reduce.ENTRY_MEAN)
DEAD_FRACTION = declare("dead_fraction", Reduce.UNITS_FLAT)
MEAN_DERIVATIVE = declare("mean_derivative", Reduce.ENTRY_MEAN)
RMS_DERIVATIVE = declare("rms_derivative", Reduce.ENTRY_RMS)
ACTIVATION_METRICS = (SATURATION, DEAD_FRACTION, MEAN_DERIVATIVE, RMS_DERIVATIVE)


@dataclass
class ActivationStates:
    """Sufficient statistics of φ' on ``n`` tensors of one shape (tensors on the device).

    Attributes:
        count: Entries read per tensor.
        flat: ``[n]`` entries where φ is flat (sum across calls and ranks).
        dsum: ``[n]`` Σ|φ'| (sum).
        dsq: ``[n]`` Σφ'² (sum).
        alive: ``[n, units]`` bool, the unit was not flat on some entry (logical or).
        rows: :meth:`host_metrics`, where the reduction ran on the host and made them.
    """

    count: int
    flat: torch.Tensor
    dsum: torch.Tensor
    dsq: torch.Tensor
    alive: torch.Tensor
    rows: list[list[float]] | None = field(default=None, repr=False, compare=False)

    def metrics(self) -> torch.Tensor:
        """``[n, 4]``: saturation, dead fraction, mean |φ'|, RMS φ' (see
        :data:`ACTIVATION_METRICS`), on the device."""
        alive = self.alive.to(self.dsum.dtype).mean(dim=1)
        return torch.stack(_fractions(self.count, self.flat, self.dsum, self.dsq, alive), dim=1)

    def host_metrics(self) -> list[list[float]]:
        """:meth:`metrics` as Python floats (in float64), from one copy to the host."""
        if self.rows is not None:
            return self.rows
        parts: tuple[torch.Tensor, ...] = (self.flat, self.dsum, self.dsq, self.alive)
        if any(t.device.type != "cpu" for t in parts):
            parts = tuple(t.cpu() for t in parts)  # (a few numbers each)
        flat, dsum, dsq = (t.numpy().tolist() for t in parts[:3])
        mask = parts[3].numpy()
        alive = (np.count_nonzero(mask, axis=1) / max(mask.shape[1], 1)).tolist()
        return [_fractions(self.count, *row) for row in zip(flat, dsum, dsq, alive, strict=True)]

    def unbind(self) -> list[ActivationStates]:
        """One :class:`ActivationStates` per tensor (``n = 1`` each)."""
        if self.flat.shape[0] == 1:
            return [self]
        return [
            ActivationStates(self.count, f, s, q, a)
            for f, s, q, a in zip(
                self.flat.split(1),
                self.dsum.split(1),
                self.dsq.split(1),
                self.alive.split(1),
                strict=True,
            )
        ]

    def add(self, other: ActivationStates) -> ActivationStates:
        """The statistics of both (the same ``n``); unit masks of another size (a shared
        module called on other shapes) keep this one's."""
        alive = self.alive | other.alive if self.alive.shape == other.alive.shape else self.alive
        return ActivationStates(
            self.count + other.count,
            self.flat + other.flat.to(self.flat),
            self.dsum + other.dsum.to(self.dsum),
            self.dsq + other.dsq.to(self.dsq),
            alive,
        )


A = TypeVar("A", torch.Tensor, np.ndarray, float)


def _fractions(count: int, flat: A, dsum: A, dsq: A, alive: A) -> list[A]:
    """The four metrics from the sufficient statistics (``alive``: the mean of the unit
    mask), on tensors or numbers alike."""
    n = float(count)
    return [flat / n, 1.0 - alive, dsum / n, (dsq / n) ** 0.5]


#: At most this many entries on the CPU are reduced with NumPy, whose per-call cost
#: on small arrays is a fraction of torch's (beyond it both are bandwidth-bound).
_HOST_ENTRIES = 1 << 16


def on_host(x: torch.Tensor) -> bool:
    """Whether :func:`activation_states` reduces ``x`` with NumPy (small, on the CPU)."""
    return x.device.type == "cpu" and x.numel() <= _HOST_ENTRIES


def activation_states(
    act: ModuleActivation | ActivationSpec, unit_dim: int, x: torch.Tensor, overwrite: bool = False
) -> ActivationStates:
    """The statistics of φ' on each of the ``n`` tensors stacked in ``x`` (``[n, *shape]``).

    ``act``: how to get φ' from ``x`` (a :class:`ModuleActivation` reads a module's output
    or input; an :class:`ActivationSpec` its pre-activation); ``unit_dim`` indexes a
    tensor's own dimensions (``0 ≤ unit_dim < len(shape)``); ``overwrite``: ``x`` may hold
    the temporaries (no allocation). Sums are in ``x``'s dtype, at least float32.

    Example:
        >>> from torch import nn
        >>> from gradsight.probes.activations import module_activation
        >>> y = torch.tensor([[[0.5, 0.99], [0.5, 0.999]]])  # one tensor, 2 samples × 2 units
        >>> states = activation_states(module_activation(nn.Sigmoid()), 1, y)
        >>> states.count, states.flat.tolist(), states.alive.tolist()
        (4, [2.0], [[True, False]])
        >>> states.metrics()[0, :2]
        tensor([0.5000, 0.5000])
    """
    if isinstance(act, ActivationSpec):
        act = _reading_input(act)
    if x.dtype in (torch.float16, torch.bfloat16):  # sums over many entries need float32
        x, overwrite = x.float(), True
    shape = x.shape[1:]
    n = x.shape[0]
    host = len(shape) > 0 and on_host(x)
    if host and act.spec.binary:
        # φ' = max·1[x > 0] on the input and on the output alike: the sign is all it takes.
        return _host_states(x.detach().numpy(), unit_dim, 0.0, binary=act.spec.max_derivative)
    threshold = FLAT_FRACTION * act.spec.max_derivative
    if host and act.from_output is None and act.spec.host is not None:
        return _host_states(act.spec.host(x.detach().numpy()), unit_dim, threshold)
    if overwrite and act.into is not None:
        d = act.into(x, x)  # elementwise, so in place is exact
    else:
        d = (act.from_output or act.spec.derivative)(x)
    # d is ours from here on: x itself only where overwrite allows it.
    if not (act.nonnegative or act.spec.nonnegative):
        d = d.abs_()
    if host:
        return _host_states(d.detach().numpy(), unit_dim, threshold)
    if len(shape) == 0:  # one entry per tensor
        flat = d <= threshold
        return ActivationStates(1, flat.to(d.dtype), d, d * d, ~flat.reshape(n, 1))
    # Alive: units not flat on some entry read, i.e. whose largest derivative is not flat.
    others = tuple(i + 1 for i in range(len(shape)) if i != unit_dim)
    peak = d.amax(dim=others) if others else d
    alive = peak > threshold
    d = d.reshape(n, -1)
    count = d.shape[1]
    dsum = d.sum(dim=1)
    if act.spec.binary:  # φ' ∈ {0, max}: flat where 0, and Σφ'² = max·Σφ'
        top = act.spec.max_derivative
        return ActivationStates(count, count - dsum / top, dsum, dsum * top, alive)
    dsq = torch.linalg.vector_norm(d, dim=1).square_()
    # Flat entries counted over d itself, in place where d is ours (float passes: faster
    # here than a bool mask): 1.0 where d > threshold, else 0.0.
    steep = d.sub_(threshold).clamp_(min=0)
    flat = count - steep.sign_().sum(dim=1)
    return ActivationStates(count, flat, dsum, dsq, alive)


@functools.lru_cache(maxsize=32)
def _reading_input(spec: ActivationSpec) -> ModuleActivation:
    """The activation read off its input (made once per spec; bounded, as parametrized
    activations make a spec per call)."""
    return ModuleActivation(spec, None)


def _host_states(
    a: np.ndarray, unit_dim: int, threshold: float, binary: float | None = None
) -> ActivationStates:
    """:func:`activation_states`' reductions of the derivatives ``a`` (``[n, *shape]``, at
    least one dimension per tensor) in NumPy: the same statistics, in ``a``'s dtype. With
    ``binary`` (a ReLU's largest derivative), ``a`` holds what φ' is read from and φ' is
    ``binary`` where it is above ``threshold``, else 0."""
    n = a.shape[0]
    if n == 1:
        return _host_states_one(a[0], unit_dim, threshold, binary)
    steep_mask = a > threshold  # NaN is not: flat, as the derivatives make it
    rows_mask = steep_mask.reshape(n, -1)
    count = rows_mask.shape[1]
    steep = np.count_nonzero(rows_mask, axis=1)
    # Alive: units steep on some entry read (the other dimensions than samples and units);
    # as the torch kernel has it, a unit with a NaN derivative is not (its peak is NaN),
    # while a ReLU's NaN input has derivative 0.
    others = tuple(i + 1 for i in range(a.ndim - 1) if i != unit_dim)
    if binary is not None:
        alive = steep_mask.any(axis=others) if others else steep_mask
        dsum = (steep * binary).astype(a.dtype)
        dsq = (steep * binary * binary).astype(a.dtype)
    else:
        alive = (a.max(axis=others) if others else a) > threshold
        rows = a.reshape(n, -1)
        dsum = rows.sum(axis=1)
        dsq = np.einsum("ij,ij->i", rows, rows)
    flat = (count - steep).astype(a.dtype)
    live = np.count_nonzero(alive, axis=1) / max(alive.shape[1], 1)
    metrics = zip(flat.tolist(), dsum.tolist(), dsq.tolist(), live.tolist(), strict=True)
    return ActivationStates(
        count,
        torch.from_numpy(flat),
        torch.from_numpy(dsum),
        torch.from_numpy(dsq),
        torch.from_numpy(alive),
        rows=[_fractions(count, *m) for m in metrics],
    )


def _host_states_one(
    a: np.ndarray, unit_dim: int, threshold: float, binary: float | None
) -> ActivationStates:
    """:func:`_host_states` of one tensor ``a`` (its own shape): whole-array reductions,
    which NumPy runs several times faster than reductions along an axis of a small array."""
    entries = a.reshape(-1)
    steep_mask = entries > threshold
    count = entries.size
    steep = int(np.count_nonzero(steep_mask))
    others = tuple(i for i in range(a.ndim) if i != unit_dim)
    if binary is not None:
        units = steep_mask.reshape(a.shape)
        alive = units.any(axis=others) if others else units
        dsum, dsq = steep * binary, steep * binary * binary
    else:
        alive = (a.max(axis=others) if others else a) > threshold
        dsum, dsq = float(entries.sum()), float(np.dot(entries, entries))
    live = np.count_nonzero(alive) / max(alive.size, 1)
    sums = torch.from_numpy(np.array([count - steep, dsum, dsq], dtype=a.dtype))
    return ActivationStates(
        count,
        sums[0:1],
        sums[1:2],
        sums[2:3],
        torch.from_numpy(alive.reshape(1, -1)),
        rows=[_fractions(count, float(count - steep), dsum, dsq, live)],
    )
