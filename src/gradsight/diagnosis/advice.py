"""Remedies for a verdict's cause, ordered by evidence, never what the model already does.

A remedy is only worth reading if it changes something: advising "use a non-saturating
activation" to a ReLU network, "add normalization" to a model full of LayerNorm or
"use Adam" to an Adam user loses the reader's trust. :class:`ModelTraits` records what
the model already does, and every remedy is filtered against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from gradsight.diagnosis.chain import later_factors
from gradsight.probes import ModuleSignal

__all__ = ["SATURATING", "ModelTraits", "remedies", "traits_of", "vanishing_advice"]

#: Activations whose derivative goes to zero on both sides: they saturate.
SATURATING = ("sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid")
#: Activations whose derivative is never exactly zero on the negative side.
_LEAKY = ("leaky", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "prelu")
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
# Class names of blocks with an identity (skip) path, in torch and common model zoos.
_RESIDUAL_NAMES = (
    "residual",
    "resnet",
    "bottleneck",
    "basicblock",
    "transformerencoderlayer",
    "transformerdecoderlayer",
    "gpt2block",
    "bertlayer",
    "llamadecoderlayer",
)
_GATED = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
# Libraries whose layer and block classes of that name are residual (transformers'
# T5Block, BartEncoderLayer, ViTLayer, BloomBlock, MambaBlock; timm's Block).
_RESIDUAL_LIBRARIES = ("transformers.", "timm.")
_RESIDUAL_SUFFIXES = ("layer", "block")


@dataclass(frozen=True)
class ModelTraits:
    """What the model already does, so that advice never proposes it.

    Attributes:
        activations: Names of the activations recognised after its layers.
        has_norm: It has normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm).
        has_residual: It has blocks with a skip path (ResNet blocks, Transformer layers).
        gated_recurrent: It has LSTM/GRU layers.
        optimizer: ``"sgd"``, ``"adaptive"`` (Adam-like), ``"other"`` or None (unknown).
    """

    activations: frozenset[str] = frozenset()
    has_norm: bool = False
    has_residual: bool = False
    gated_recurrent: bool = False
    optimizer: str | None = None

    @property
    def saturating(self) -> bool:
        return any(a.startswith(SATURATING) for a in self.activations)

    @property
    def only_leaky(self) -> bool:
        return bool(self.activations) and all(a.startswith(_LEAKY) for a in self.activations)


def traits_of(
    model: nn.Module,
    activations: Sequence[str],
    optimizer: str | None = None,
    modules: Sequence[nn.Module] | None = None,
) -> ModelTraits:
    """The :class:`ModelTraits` of ``model`` (activations as the probe recognised them;
    ``modules``: ``model.modules()``, if already listed)."""
    has_norm = has_residual = gated = False
    for cls in {type(module) for module in (model.modules() if modules is None else modules)}:
        norm, residual, gate = _class_traits(cls)
        has_norm, has_residual, gated = has_norm or norm, has_residual or residual, gated or gate
    return ModelTraits(frozenset(activations), has_norm, has_residual, gated, optimizer)


_CLASS_TRAITS: dict[type, tuple[bool, bool, bool]] = {}


def _class_traits(cls: type[nn.Module]) -> tuple[bool, bool, bool]:
    """(a normalization layer, a residual block, a gated recurrent layer), by class
    (remembered: a model has few classes, and they are the same at every call)."""
    known = _CLASS_TRAITS.get(cls)
    if known is None:
        name = cls.__name__.lower()
        known = _CLASS_TRAITS[cls] = (
            issubclass(cls, _NORMS) or name.endswith(("norm", "rmsnorm")),
            any(n in name for n in _RESIDUAL_NAMES)
            or (
                cls.__module__.startswith(_RESIDUAL_LIBRARIES) and name.endswith(_RESIDUAL_SUFFIXES)
            ),
            issubclass(cls, _GATED),
        )
    return known


def vanishing_advice(
    ran: Sequence[ModuleSignal], i: int, traits: ModelTraits, alpha_spread: float
) -> tuple[str, ...]:
    """Remedies for a vanishing layer, ordered by how much of the signal loss each
    addresses: the decades lost to activation derivatives and to weights between the
    layer and the output, the saturated and dead fractions, and the spread of the
    curvature-optimal steps across layers. Curvature scales with the square of the
    signal, so that spread counts half its decades."""
    f = later_factors(ran, i)
    sat_acts = [a for a in f.activations if a.name.startswith(SATURATING)]
    act_loss = -sum(math.log10(max(a.rms_derivative, 1e-12)) for a in sat_acts)
    weight_loss = -sum(math.log10(max(w, 1e-12)) for w in f.weight_factors)
    saturated = max((a.saturation for a in f.activations), default=0.0)
    dead = max((a.dead_fraction for a in f.activations), default=0.0)
    scored: list[tuple[float, str]] = []
    depth = len(ran)
    if act_loss >= 0.1:
        names = "/".join(sorted({a.name for a in sat_acts}))
        scored.append(
            (
                act_loss,
                "Use a non-saturating activation (ReLU, GELU) with He initialization: the "
                f"{names} derivatives after this layer cost the signal {act_loss:.1f} decades. "
                f"Measured: {_measured('relu', depth)}.",
            )
        )
    if weight_loss >= 0.1:
        scored.append(
            (
                weight_loss,
                "Initialize with a variance-preserving scale (Xavier for tanh/sigmoid, He for "
                f"ReLU): the later layers' weights cost the signal {weight_loss:.1f} decades.",
            )
        )
    if not traits.has_norm and saturated >= 0.05:
        scored.append(
            (
                max(act_loss, weight_loss) * (0.5 + saturated),
                "Add normalization (LayerNorm/BatchNorm) before each activation, keeping "
                f"pre-activations where the derivative is large ({saturated:.0%} of units "
                "saturated after the later layers).",
            )
        )
    if not traits.has_residual and act_loss + weight_loss >= 0.2:
        scored.append(
            (
                0.5 * (act_loss + weight_loss),
                "Add residual connections so that the signal has an identity path back.",
            )
        )
    if alpha_spread >= 1:
        scored.append((alpha_spread / 2, _per_layer_step_advice(traits, alpha_spread, depth)))
    if dead >= 0.05 and not traits.only_leaky:
        scored.append(
            (
                10 * dead,
                f"Up to {dead:.0%} of the units after later layers are dead: use LeakyReLU/GELU "
                "or a smaller learning rate.",
            )
        )
    return tuple(text for _, text in sorted(scored, key=lambda item: -item[0]))


def _per_layer_step_advice(traits: ModelTraits, spread: float, depth: int) -> str:
    if traits.optimizer == "adaptive":
        how = (
            "precondition with the curvature itself (gradsight.optim.GaussNewton, K-FAC) or "
            "orthogonalize each layer's update (torch.optim.Muon): a per-coordinate scaling "
            "such as Adam's does not see it"
        )
    else:
        how = (
            "gradsight.optim.GaussNewton (K-FAC), or at least an orthogonalized or adaptive "
            "optimizer (torch.optim.Muon, Adam)"
        )
    return (
        f"Give each layer its own step size from its curvature — {how}: the curvature-optimal "
        f"steps span {spread:.0f} decades. Measured: {_measured('optimizer', depth)}."
    )


def _measured(remedy: str, depth: int) -> str:
    """The remedy benchmark's sentence for ``remedy`` (``"optimizer"``: GaussNewton
    against Muon; ``"relu"``: ReLU with He init) on the measured sigmoid MLP closest in
    depth (6 or 10 layers)."""
    from gradsight.optim.evidence import vanishing_remedies

    measured_depth = 10 if depth >= 8 else 6
    for line in vanishing_remedies():
        if f"{measured_depth}-layer" in line and ("ReLU" in line) == (remedy == "relu"):
            return line
    raise LookupError(f"no measured sentence for {remedy!r} at depth {measured_depth}")


_REMEDIES: dict[str, tuple[tuple[str, str | None], ...]] = {
    # (text, the trait that makes it moot: "leaky", "norm", "gated", "unsaturated" (no
    # saturating activation: the edge of chaos is a tanh/sigmoid network's), or None)
    "dead": (
        (
            "Lower the learning rate or warm it up: large steps push ReLU units into the "
            "region where they never activate.",
            None,
        ),
        ("Use LeakyReLU/GELU, whose derivative is never exactly zero.", "leaky"),
        ("Re-initialize the biases (zero or small positive) and use He initialization.", None),
    ),
    "unstable_step": (
        (
            "Lower the learning rate below 2/λmax of the layer's curvature, or give each "
            "layer its own step size (layer-wise learning rates, curvature-aware optimizers).",
            None,
        ),
        ("Clip gradients to bound the damage of an occasional unstable step.", None),
        (
            "Initialize at a smaller weight scale (at the edge of chaos, e.g. σ_w² ≈ 1.76 for "
            "tanh with σ_b² = 0.05): large weights make the early layers' curvature large.",
            "unsaturated",
        ),
    ),
    "growing_signal": (
        (
            "Initialize at a smaller, variance-preserving weight scale (He for the ReLU "
            "family, Xavier for tanh; at the edge of chaos, e.g. σ_w² ≈ 1.76 for tanh with "
            "σ_b² = 0.05) so that each layer passes the signal at about ×1.",
            None,
        ),
        ("Add normalization layers to keep the backward signal from growing.", "norm"),
        ("Clip gradients or lower the learning rate for the early layers.", None),
    ),
    "through_time": (
        (
            "Use a gated recurrent layer (LSTM/GRU), whose cell state carries the signal "
            "across many steps.",
            "gated",
        ),
        (
            "Shorten the path: truncate or chunk the sequences, or add attention or skip "
            "connections through time so that early steps reach the loss in a few hops.",
            None,
        ),
        (
            "Initialize the recurrent weights orthogonally (spectral radius ≈ 1) so that the "
            "signal neither fades nor grows from step to step.",
            None,
        ),
    ),
}


def remedies(kind: str, traits: ModelTraits) -> tuple[str, ...]:
    """The remedies for ``kind`` of problem, less those the model already applies."""
    moot = {
        "leaky": traits.only_leaky,
        "norm": traits.has_norm,
        "gated": traits.gated_recurrent,
        "unsaturated": not traits.saturating,
    }
    return tuple(text for text, trait in _REMEDIES[kind] if not (trait and moot[trait]))
