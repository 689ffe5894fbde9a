"""Cheap per-step probes: signal flow, activation saturation and dead units."""

from gradsight.probes.activations import (
    FLAT_FRACTION,
    ActivationSpec,
    match_activation,
    module_activation,
)
from gradsight.probes.signal import (
    ActivationStats,
    ModuleSignal,
    SignalFlow,
    SignalProbe,
    parameter_owners,
)

__all__ = [
    "FLAT_FRACTION",
    "ActivationSpec",
    "ActivationStats",
    "ModuleSignal",
    "SignalFlow",
    "SignalProbe",
    "match_activation",
    "module_activation",
    "parameter_owners",
]
