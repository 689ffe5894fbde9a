"""What a :class:`~gradsight.probes.SignalProbe` returns: per-module signal-flow results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ActivationStats", "ModuleSignal", "SignalFlow"]


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


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b
