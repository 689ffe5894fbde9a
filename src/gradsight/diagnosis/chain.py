"""The backward signal's path from the output back to a layer, in words and numbers.

By the chain rule the signal reaching layer i is the output's signal times one factor
per later layer: the derivative of the activation after each layer and the layer's
own weight factor ‖∂L/∂input‖/‖∂L/∂output‖. These helpers read those factors off the
probe's measurements of the layers that ran, in forward order, and name where the
signal changes most.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradsight._format import display_name
from gradsight.probes import ActivationStats, ModuleSignal

__all__ = ["ChainFactors", "chain_cause", "later_factors", "ratio"]


@dataclass(frozen=True)
class ChainFactors:
    """What the backward signal picks up between the output and one layer.

    Attributes:
        activations: Statistics of the activations after this layer and every later one
            but the last.
        weight_factors: The positive weight factors of every later layer.
        total: ‖δ_this‖ / ‖δ_output layer‖ (None if a norm is missing).
        worst: The two consecutive layers between which the signal falls most, and
            that fall (‖δ_j‖ / ‖δ_{j+1}‖, from layer j+1 back to layer j).
    """

    activations: list[ActivationStats]
    weight_factors: list[float]
    total: float | None
    worst: tuple[str, str, float] | None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing, non-finite, or ``b`` is zero."""
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b


def later_factors(ran: Sequence[ModuleSignal], i: int) -> ChainFactors:
    """The factors between layer ``i`` of ``ran`` (the layers that ran) and the output."""
    later = ran[i:]
    acts = [s.activation for s in later[:-1] if s.activation is not None]
    wfs = [wf for s in later[1:] if (wf := s.weight_factor) is not None and wf > 0]
    worst: tuple[str, str, float] | None = None
    for a, b in itertools.pairwise(later):
        r = ratio(a.signal_norm, b.signal_norm)
        if r is not None and (worst is None or r < worst[2]):
            worst = (a.name, b.name, r)
    total = ratio(later[0].signal_norm, later[-1].signal_norm) if len(later) >= 2 else None
    return ChainFactors(acts, wfs, total, worst)


def chain_cause(ran: Sequence[ModuleSignal], i: int) -> str:
    """Where, between layer ``i`` and the output, the backward signal changes, and why.

    An empty string when nothing lies between (layer ``i`` is the last that ran).
    """
    later = ran[i:]
    f = later_factors(ran, i)
    if len(later) < 2 or f.total is None:
        return ""
    steps = len(later) - 1
    verb = "attenuated" if f.total < 1 else "amplified"
    first, last = display_name(later[1].name), display_name(later[-1].name)
    span = f"layers {first}–{last}" if steps > 1 else f"layer {first}"
    text = (
        f"the backward signal is {verb} ×{f.total:.1e} from layer {last} back to here "
        f"(×{f.total ** (1 / steps):.2f} per layer through {span}"
    )
    causes = []
    # A layer that passes exactly nothing back stops the signal, whatever else is on the
    # way (its weight is zero, a zero-initialized or zeroed layer).
    stops = [display_name(s.name) for s in later[1:] if s.weight_factor == 0]
    if stops:
        which = f"layer {stops[0]}" if len(stops) == 1 else f"layers {', '.join(stops)}"
        causes.append(
            f"{which} pass{'es' if len(stops) == 1 else ''} nothing back (‖∂L/∂input‖ = 0)"
        )
    elif f.activations:
        names = sorted({a.name for a in f.activations})
        mean_d = sum(a.mean_derivative for a in f.activations) / len(f.activations)
        max_d = max(a.max_derivative for a in f.activations)
        sat = sum(a.saturation for a in f.activations) / len(f.activations)
        dead = max(a.dead_fraction for a in f.activations)
        c = f"{'/'.join(names)} derivatives average {mean_d:.2f} (at most {max_d:g})"
        if sat >= 0.05:
            c += f", {sat:.0%} of units saturated"
        if dead >= 0.05:
            c += f", up to {dead:.0%} of units dead"
        causes.append(c)
    if f.weight_factors and not stops:
        gm = math.exp(sum(math.log(w) for w in f.weight_factors) / len(f.weight_factors))
        causes.append(f"weights scale it ×{gm:.2f} per layer")
    text += (": " + "; ".join(causes) if causes else "") + ")"
    if steps > 1 and f.worst is not None and f.worst[2] < 0.5:
        # Amplified overall, the signal can still fall at one layer (a saturated recurrent
        # layer behind exploding ones): that fall is what a vanishing layer lost.
        a, b, r = f.worst
        text += (
            f"; {'yet ' if f.total >= 1 else ''}the largest single fall, ×{r:.1e}, is from "
            f"layer {display_name(b)} back to layer {display_name(a)}"
        )
    return text
