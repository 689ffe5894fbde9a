"""From measurements to per-layer verdicts, with reasons that quote the numbers.

Every rule (:mod:`gradsight.diagnosis.rules`, a declared, ordered list) compares
quantities that do not change when the loss is multiplied by a constant, nor when a
ReLU network is reparametrized without changing its function (a layer ×k, the next ÷k):

* the *sensitivity* s_l = ‖∂L/∂z_l‖·‖z_l‖ of the loss to a relative change of the
  layer's output z_l, compared across layers (s_l / max_j s_j). When the chain rule
  crushes the backward signal on its way to layer l, s_l is a tiny fraction of the
  output layer's: that is *vanishing*, whatever the raw gradient sizes are;
* *headroom* (:mod:`gradsight.diagnosis.headroom`): the damped Newton decrement per
  layer and for the whole model as a fraction of the loss, with damping relative to
  each block's own curvature, and the held-out decrease of a Levenberg–Marquardt step.
  The model has headroom when these are not negligible or its loss is no better than
  the best constant prediction (a *plateau*). A layer the signal reaches but whose own
  Newton step would win nothing is *converged*. Without curvature, the first-order
  *scale-free gradient* G_l = (Σ_p ‖g_p‖²‖p‖²)^½ relative to the loss stands in;
* lr·λmax > 2 for a layer's block (SGD with a given ``lr``): *exploding*;
* the fraction of units after the layer whose activation is flat on the whole batch
  (*dead* when the signal reaching the layer is lost too).

A rule on raw gradient magnitudes (|g| < 1e-7 means vanishing) fails both invariances,
and cannot tell a layer at its optimum from a layer the signal does not reach.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gradsight._format import display_name, one_decimal
from gradsight.diagnosis.advice import ModelTraits
from gradsight.diagnosis.chain import ratio
from gradsight.diagnosis.headroom import BlockCurvature, ModelHeadroom, best_headroom
from gradsight.diagnosis.result import STATUSES, LayerDiagnosis, Status
from gradsight.diagnosis.rules import RULES, LayerFacts, ModelFacts, Rule, Thresholds, apply_rules
from gradsight.diagnosis.stuck import Stuck
from gradsight.diagnosis.trial import Carrier, Trial
from gradsight.probes import ActivationStats, ModuleSignal

__all__ = [
    "LayerEvidence",
    "Thresholds",
    "judge",
    "worst_status",
    "zero_gate",
    "zero_scale_weight",
]


@dataclass
class LayerEvidence:
    """What was measured on one parameter-owning module.

    ``signal`` is None when the module did not run. ``used_by`` names the module whose
    forward uses this module's parameters directly (its ``signal`` then is that
    module's); ``step`` is the step the layer gets when the optimizer's per-layer step
    is known (an adaptive optimizer's step along the gradient); ``time_input_norms``
    holds a recurrent layer's ‖x_t‖ at each time step; ``shared`` names its parameters
    that an earlier module also lists (a tied weight), counted once in model totals;
    ``tied`` names the other modules that hold every one of its trainable parameters
    (one embedding listed as ``shared``, ``encoder.embed_tokens`` and ``lm_head``).
    """

    name: str
    module_type: str
    signal: ModuleSignal | None
    grad_norms: dict[str, float] = field(default_factory=dict)  # trainable params only
    param_norms: dict[str, float] = field(default_factory=dict)
    used_by: str | None = None
    step: float | None = None
    time_input_norms: tuple[float, ...] | None = None
    shared: frozenset[str] = frozenset()  # its parameters an earlier module also lists
    tied: tuple[str, ...] = ()  # other modules holding all of its trainable parameters
    # A mixture of experts' fused expert weights ([experts, ...]): their number, and the
    # experts whose gradient is exactly zero (no token routed to them).
    experts: int = 0
    idle_experts: tuple[int, ...] = ()
    frozen: bool = field(init=False)
    grad_norm: float | None = field(init=False)  # over its trainable parameters
    relative_grad: float | None = field(init=False)  # Σ‖g_p‖·‖p‖ in quadrature
    zero_with_gradient: bool = field(init=False)

    def __post_init__(self) -> None:
        # Read-only facts of the norms it was made with, computed once.
        grads = self.grad_norms
        self.frozen = not grads
        if self.frozen:
            self.grad_norm = self.relative_grad = None
            self.zero_with_gradient = False
            return
        params = self.param_norms
        # math.hypot: the 2-norm of several numbers, accurate and without overflow.
        self.grad_norm = math.hypot(*grads.values())
        self.relative_grad = math.hypot(*[g * params[k] for k, g in grads.items()])
        #: Every trainable parameter is exactly zero while the gradient is not: a
        #: zero-initialized layer, for which the scale-free gradient says nothing.
        self.zero_with_gradient = all(params[k] == 0 for k in grads) and any(
            g > 0 for g in grads.values()
        )


def step_grad_sq(evidence: Sequence[LayerEvidence]) -> float:
    """‖g‖² of the whole step: each parameter once, a tied one included once."""
    return math.fsum(g * g for e in evidence for k, g in e.grad_norms.items() if k not in e.shared)


def worst_status(statuses: Sequence[str]) -> Status:
    """The most alarming judged status (``converged`` < ``ok`` < ...); ``frozen`` layers
    do not count. ``"frozen"`` only when every layer is frozen."""
    judged = [s for s in statuses if s != "frozen"]
    if not judged:
        return "frozen" if statuses else "ok"
    return max(judged, key=STATUSES.index)  # type: ignore[arg-type]


def judge(
    evidence: Sequence[LayerEvidence],
    *,
    loss: float,
    baseline_loss: float | None,
    lr: float | None = None,
    curvature: Mapping[str, BlockCurvature] | None = None,
    model: ModelHeadroom | None = None,
    hessian: Mapping[str, float] | None = None,
    thresholds: Thresholds | None = None,
    traits: ModelTraits | None = None,
    rules: Sequence[Rule] = RULES,
    trial: Trial | None = None,
    carriers: Mapping[str, Carrier] | None = None,
    stuck: Stuck | None = None,
) -> tuple[list[LayerDiagnosis], bool, str]:
    """Turn per-layer evidence into verdicts.

    Args:
        evidence: Per-layer measurements, forward order.
        loss: The loss on the batch.
        baseline_loss: Loss of the best constant prediction, if known.
        lr: The learning rate used in training; None to judge at the largest stable
            step for the whole model, 2/λmax.
        curvature: Per-layer curvature (by layer name), if computed.
        model: Whole-model curvature and headroom, if computed.
        hessian: The Hessian's largest eigenvalue per layer, where it was measured for
            the stability verdict (:mod:`gradsight.diagnosis.stability`).
        thresholds: Decision thresholds (defaults: :class:`Thresholds`).
        traits: What the model already does, for the advice; its ``optimizer`` says
            which step a layer gets (``"adaptive"``: each layer's ``step``).
        rules: The rules, in order of precedence.
        trial: Full-batch SGD at ``lr`` from the current weights, if it ran
            (:func:`gradsight.diagnosis.trial.sgd_trial`).
        carriers: Where the trial blew up, the layers that carry the instability and why
            (:func:`gradsight.diagnosis.trial.carriers`).
        stuck: Layers whose exactly zero gradient stayed zero over a few small gradient
            steps, and what holds them (:func:`gradsight.diagnosis.stuck.still_zero`).

    Returns:
        ``(layers, plateau, summary)``.
    """
    th = thresholds or Thresholds()
    traits = traits or ModelTraits()
    curvature = curvature or {}
    ran_ev = [e for e in evidence if e.signal is not None and e.used_by is None]
    ran = [e.signal for e in ran_ev if e.signal is not None]
    position = {e.name: i for i, e in enumerate(ran_ev)}
    s_max = max((s.sensitivity for s in ran), default=0.0)
    scale = abs(loss) if loss else 0.0
    base_ok = baseline_loss is not None and baseline_loss > 0
    plateau = bool(base_ok and loss >= (1 - th.plateau) * baseline_loss)  # type: ignore[operator]
    solved = bool(base_ok and abs(loss) <= th.solved * baseline_loss)  # type: ignore[operator]
    if model is not None:
        has_headroom = (
            plateau or model.headroom >= th.headroom or (model.realized or 0.0) >= th.headroom
        )
    else:
        g_max = max((e.relative_grad or 0.0 for e in ran_ev), default=0.0)
        has_headroom = (
            plateau
            or scale == 0
            or g_max > th.converged * scale
            # A zero-initialized layer's first update is still to come.
            or any(e.zero_with_gradient or _on_zeros(e, scale, th.converged) for e in ran_ev)
        )
    alphas = [
        c.alpha_star for c in curvature.values() if c.alpha_star > 0 and math.isfinite(c.alpha_star)
    ]
    # Zero gates that hold something back: a layer inside their module gets an exactly
    # zero gradient (DeiT's zero cls/position tokens are added, not multiplied: the patch
    # projection inside the same module learns).
    gates = frozenset(e.name for e in ran_ev if zero_gate(e) and _holds_back(e.name, evidence))
    facts = ModelFacts(
        th=th,
        loss=loss,
        baseline=baseline_loss,
        plateau=plateau,
        solved=solved,
        has_headroom=has_headroom,
        headroom=None if model is None else min(model.headroom, 1.0),
        realized=None if model is None else model.realized,
        lr=lr,
        optimizer=traits.optimizer,
        ran=ran,
        s_max=s_max,
        s_out=ran[-1].sensitivity if ran else 0.0,
        traits=traits,
        alpha_spread=math.log10(max(alphas) / min(alphas)) if len(alphas) >= 2 else 0.0,
        grad_sq=step_grad_sq(evidence),
        grad_layers=sum(1 for e in evidence if e.grad_norm),
        zero_norms=frozenset(
            e.name for e in ran_ev if "Norm" in e.module_type and zero_scale_weight(e)
        ),
        zero_gates=gates,
        frozen_zeros=frozenset(
            h for holders in (stuck.frozen_by.values() if stuck else ()) for h in holders
        ),
        trial=trial,
        carriers_measured=bool(carriers),
    )
    carriers = carriers or {}
    global_step = lr
    if global_step is None and model is not None and model.lambda_max > 0:
        global_step = 2.0 / model.lambda_max
    # Before position p, the largest sensitivity: a running maximum, once for all layers.
    upstream, peak = [], 0.0
    for sig in ran:
        upstream.append(peak)
        peak = max(peak, sig.sensitivity)
    # Layers whose trained weight is exactly zero while they get a gradient (zero-
    # initialized), by position: the backward signal stops there until their first update.
    zero = {e.name for e in ran_ev if _zero_weight(e, gates)}
    openers = [
        (i, e.name, e.grad_norm or 0.0, e.signal is not None and e.signal.output_norm == 0.0)
        for i, e in enumerate(ran_ev)
        if e.name in zero
    ]
    flat_norms = [e.name in facts.zero_norms for e in ran_ev]  # by position
    # Stuck layers whose zero weight holds a saddle, by position: what holds a stuck layer.
    stuck = stuck or Stuck(set(), set())
    holders = [(i, e.name) for i, e in enumerate(ran_ev) if e.name in stuck.saddles]
    layers = []
    for e in evidence:
        d, layer = _measure(e, facts, curvature.get(e.name), position, upstream, global_step, scale)
        blocked = _blocked_by(e, layer, openers)
        scale_zero = _zero_scale(e, layer.position, ran_ev, flat_norms)
        if blocked is not None or e.name in zero or scale_zero is not None:
            layer = dataclasses.replace(
                layer, zero_weight=e.name in zero, blocked_by=blocked, zero_scale=scale_zero
            )
        if e.name in stuck.layers:
            held = stuck.frozen_by.get(e.name) or _held_by(e.name, layer.position, holders)
            layer = dataclasses.replace(
                layer, stuck=True, stuck_by=held, unlocked=e.name in stuck.opened
            )
        if e.name in carriers:
            layer = dataclasses.replace(layer, carrier=carriers[e.name])
        if hessian and e.name in hessian:
            d.hessian_lambda_max = hessian[e.name]
            layer = dataclasses.replace(layer, lambda_max=hessian[e.name], hessian=True)
        verdict, _ = apply_rules(layer, facts, rules)
        d.status, d.reason, d.advice = verdict.status, verdict.reason, list(verdict.advice)
        layers.append(d)
    _judge_tied_once(evidence, layers)
    _shut_by_a_dead_neighbour(evidence, layers)
    return layers, plateau, _summary(layers, facts, model, curvature)


def _shut_by_a_dead_neighbour(
    evidence: Sequence[LayerEvidence], layers: Sequence[LayerDiagnosis]
) -> None:
    """A layer that gets no signal at all (exactly zero) and no gradient, in the same
    module as a dead layer (a sibling or a sibling's child): that dead layer shuts its
    branch (Qwen2-MoE's shared expert behind a sigmoid gate flat at zero on every
    token), so it is dead with it, named, rather than "converged: the loss does not
    depend on it"."""
    dead = [layer for layer in layers if layer.status == "dead"]
    if not dead:
        return
    for e, layer in zip(evidence, layers, strict=True):
        sig = e.signal
        if (
            layer.status != "converged"
            or layer.grad_norm != 0.0
            or sig is None
            or sig.signal_norm != 0.0
            or e.used_by is not None
            or e.tied  # one tensor, one verdict: its other holders decide
            or e.name.count(".") < 2  # near the top of the model: no module to share
        ):
            continue
        # Within its grandparent module (a sibling of its parent, as the gate beside the
        # expert it gates).
        depth = e.name.count(".")
        near = [d for d in dead if _shared_depth(e.name, d.name) >= depth - 1]
        if not near:
            continue
        shut = near[0]
        layer.status = "dead"
        layer.reason = (
            "no backward signal reaches it (exactly zero) and its gradient is exactly zero: "
            f"{display_name(shut.name)} beside it, which is dead, shuts its branch, so it "
            "neither learns nor passes a signal until that one passes something again."
        )
        layer.advice = list(shut.advice)


def _judge_tied_once(evidence: Sequence[LayerEvidence], layers: Sequence[LayerDiagnosis]) -> None:
    """One tensor, one verdict: the modules that hold the same parameters (a tied
    embedding listed as ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and
    ``lm_head``) take the verdict of the one whose output gets the strongest backward
    signal, where the tensor learns. Judged each by its own signal, an encoder's copy
    that gets none yet (its cross-attention's output projection zero-initialized) read
    "vanishing" while the same tensor learned through the decoder."""
    by_name = {layer.name: (e, layer) for e, layer in zip(evidence, layers, strict=True)}

    def strength(name: str) -> tuple[float, float]:
        sig = by_name[name][0].signal
        return (-1.0, -1.0) if sig is None else (sig.sensitivity, sig.signal_norm or 0.0)

    for e, layer in zip(evidence, layers, strict=True):
        group = [n for n in (e.name, *e.tied) if n in by_name]
        if len(group) < 2 or layer.status == "frozen":
            continue
        best = max(group, key=strength)
        source = by_name[best][1]
        if best == e.name or source.status == layer.status:
            continue
        own = e.signal.signal_norm if e.signal is not None else None
        gets = (
            "gets no backward signal of its own (exactly zero)"
            if own == 0.0
            else "gets a weaker backward signal"
        )
        layer.status = source.status
        layer.reason = (
            f"its weights are the same tensor as those of {display_name(best)} (tied), judged "
            f"there, where the signal is strongest (this use of them {gets}): {source.reason}"
        )
        layer.advice = list(source.advice)


def _measure(
    e: LayerEvidence,
    model: ModelFacts,
    curv: BlockCurvature | None,
    position: Mapping[str, int],
    upstream: Sequence[float],
    global_step: float | None,
    scale: float,
) -> tuple[LayerDiagnosis, LayerFacts]:
    """The layer's row of measurements and the facts its verdict is judged on
    (``upstream[p]``: the largest sensitivity of the layers before position p)."""
    sig = e.signal
    grad_norm, relative_grad = e.grad_norm, e.relative_grad
    d = LayerDiagnosis(
        name=e.name,
        module_type=e.module_type,
        status="ok",
        reason="",
        grad_norm=grad_norm,
        signal_norm=None if sig is None else sig.signal_norm,
        relative_grad=relative_grad,
        param_grad_norms=dict(e.grad_norms),
        used_by=e.used_by,
    )
    step = e.step if model.optimizer == "adaptive" else global_step
    if model.optimizer == "other":
        step = None  # its step along the gradient is not known: say nothing
    if curv is not None:
        d.headroom = min(curv.headroom, 1.0)
        d.lambda_max = curv.lambda_max
        d.optimal_step = curv.alpha_star
        if step and math.isfinite(curv.alpha_star):
            d.step_ratio = curv.alpha_star / step
    d.step_taken = step
    pos = position.get(e.used_by if e.used_by is not None else e.name)
    act = None
    if sig is not None:
        if sig.time_signal_norms is not None:
            d.time_signal_norms = list(sig.time_signal_norms)
        act = _activation_after(sig, pos if e.used_by is None else None, model.ran)
        if act is not None:
            d.activation, d.saturation, d.dead_fraction = (
                act.name,
                act.saturation,
                act.dead_fraction,
            )
        d.weight_factor = sig.weight_factor
        if e.used_by is None and pos is not None and pos + 1 < len(model.ran):
            nxt = model.ran[pos + 1]
            d.attenuation = ratio(sig.signal_norm, nxt.signal_norm)
            d.activation_factor = ratio(sig.signal_norm, nxt.input_signal_norm)
    grad_finite = all(math.isfinite(g) for g in e.grad_norms.values())
    g_rel: float | None = (relative_grad or 0.0) / scale if scale > 0 else 0.0
    if e.zero_with_gradient or (_on_zeros(e, scale, model.th.converged)):
        # Zero-initialized (all of it, or the parameters its gradient is on: a head's
        # zero bias behind an exactly zero input): no scale-free gradient.
        g_rel = None
    has_signal = sig is not None and sig.signal_norm is not None
    facts = LayerFacts(
        name=e.name,
        frozen=e.frozen,
        grad_norm=grad_norm,
        grad_finite=grad_finite,
        signal=sig,
        used_by=e.used_by,
        position=pos if has_signal else None,
        rel_sens=_relative_sensitivity(sig, model.s_max) if has_signal else None,
        g_rel=g_rel,
        headroom=d.headroom,
        lambda_max=d.lambda_max,
        step=step,
        step_ratio=d.step_ratio,
        activation=act,
        last=e.used_by is None and pos is not None and pos == len(model.ran) - 1,
        upstream_sens=_upstream(model, upstream, pos),
        time_input_norms=e.time_input_norms,
        experts=e.experts,
        idle_experts=e.idle_experts,
        stack_fade=_stack_fade(e, model.th.vanishing),
        params=tuple(e.grad_norms),
        zero_params=tuple(k for k, v in e.param_norms.items() if v == 0.0),
    )
    return d, facts


_STACKED = re.compile(r"_l(\d+)(?:_reverse)?$")


def _stack_fade(e: LayerEvidence, vanishing: float) -> tuple[int, int, float] | None:
    """For a module whose parameters are those of stacked recurrent layers
    (``weight_ih_l0``, ``weight_hh_l1``, …: ``nn.LSTM(num_layers=2)``), its layers with
    the smallest and the largest scale-free gradient and their ratio, where it is below
    ``vanishing``: the signal fades through its own stack (an LSTM at weights ×0.01: its
    layer 0 gets 1e-8 of its layer 1's, and SGD does not move it)."""
    layers: dict[int, list[float]] = {}
    for name, g in e.grad_norms.items():
        found = _STACKED.search(name)
        if found is not None:
            layers.setdefault(int(found.group(1)), []).append(g * e.param_norms.get(name, 0.0))
    if len(layers) < 2:
        return None
    rel = {k: math.hypot(*v) for k, v in layers.items()}
    low, high = min(rel, key=rel.__getitem__), max(rel, key=rel.__getitem__)
    if not rel[high] > 0 or rel[low] >= vanishing * rel[high]:
        return None
    return low, high, rel[low] / rel[high]


def _on_zeros(e: LayerEvidence, scale: float, converged: float) -> bool:
    """Its gradient is all on parameters that are exactly zero (a head's zero bias behind
    an exactly zero input) and not small against the loss (per unit of parameter: a zero
    bias at its optimum has a gradient at round-off)."""
    return e.grad_norm is not None and not e.relative_grad and e.grad_norm > converged * scale


def _relative_sensitivity(sig: ModuleSignal | None, s_max: float) -> float | None:
    """s_l / max_j s_j; None where it says nothing: an output that is exactly zero while
    a signal reaches it (a zero-initialized layer: ‖∂L/∂z‖·‖z‖ is 0 whatever the signal)."""
    if sig is None:
        return None
    s = sig.sensitivity
    if s == 0 and sig.output_norm == 0 and (sig.signal_norm or 0.0) > 0:
        return None
    return s / s_max if s_max > 0 else 0.0


#: At most this many layers named as holding a stuck layer at zero.
_HOLDERS = 3


def _held_by(name: str, pos: int | None, holders: Sequence[tuple[int, str]]) -> tuple[str, ...]:
    """The stuck zero-weight layers (``(position, name)``) that hold the stuck layer
    ``name`` at zero: itself; else those in its closest enclosing module (the longest
    shared prefix of their qualified names: a Llama MLP's gate with its block's
    post-attention norm, a Qwen3 key projection with its attention's q/k norms), which
    position alone gets wrong (the norm after a projection); in a flat model, the nearest
    one before it."""
    if any(h == name for _, h in holders):
        return (name,)
    depth, found = 0, []
    for _, h in holders:
        shared = _shared_depth(name, h)
        if shared > depth:
            depth, found = shared, [h]
        elif shared == depth and shared > 0:
            found.append(h)
    if found:  # of those, the ones nested least deep: a sibling before a sibling's child
        rest = min(h.count(".") for h in found)
        return tuple([h for h in found if h.count(".") == rest][:_HOLDERS])
    earlier = [h for i, h in holders if pos is not None and i <= pos]
    return (earlier[-1],) if earlier else ()


def _zero_weight(e: LayerEvidence, gates: Collection[str] = ()) -> bool:
    """Its trained weight is exactly zero, and scales its output by zero, while it gets a
    gradient; or it is a zero gate (among ``gates``) that gets one (:func:`_zero_gate`)."""
    return (zero_scale_weight(e) and e.grad_norms.get("weight", 0.0) > 0) or (
        e.name in gates and _zero_gate(e)
    )


def _holds_back(name: str, evidence: Sequence[LayerEvidence]) -> bool:
    """Whether a trainable layer inside module ``name`` gets an exactly zero gradient."""
    prefix = f"{name}." if name else ""
    return any(
        e.name.startswith(prefix) and e.name != name and e.grad_norm == 0.0 for e in evidence
    )


def _zero_gate(e: LayerEvidence) -> bool:
    """A zero gate (:func:`zero_gate`) that gets a gradient: the branch it gates passes no
    signal back until its first update."""
    return zero_gate(e) and any(g > 0 for g in e.grad_norms.values())


def zero_gate(e: LayerEvidence) -> bool:
    """A zero-initialized gate held as a parameter of its own (ReZero's α, the tanh gates
    of Flamingo's and Mllama's cross-attention layers): every trainable parameter of the
    module is exactly zero, none of them a weight or a bias."""
    params = e.param_norms
    return (
        bool(params)
        and all(v == 0 for v in params.values())
        and not any(k == "weight" or k.endswith("bias") for k in params)
    )


def zero_scale_weight(e: LayerEvidence) -> bool:
    """Its weight is exactly zero and scales its output by zero: the output is its bias
    alone and no signal passes back through it. A weight that is zero without scaling by
    zero (Gemma's RMSNorm multiplies by 1 + weight, zero at initialization) is told apart
    by what was measured: a backward signal that passes through the module to its input,
    or, where none arrives, an output that is not zero although the module has no bias."""
    if e.param_norms.get("weight") != 0.0:
        return False
    sig = e.signal
    if sig is None:
        return True
    if sig.signal_norm:  # a signal arrives: none may pass back through it (unmeasured: none)
        return not sig.input_signal_norm
    return not (sig.output_norm and "bias" not in e.param_norms)


def _zero_scale(
    e: LayerEvidence, pos: int | None, ran: Sequence[LayerEvidence], flat: Sequence[bool]
) -> str | None:
    """The normalization layer with an exactly zero weight that is this layer or the one
    right after it (conv → BatchNorm), if any."""
    if pos is None or e.used_by is not None:
        return None
    for i in (pos, pos + 1):
        if i < len(flat) and flat[i]:
            return ran[i].name
    return None


def _blocked_by(
    e: LayerEvidence, layer: LayerFacts, openers: Sequence[tuple[int, str, float, bool]]
) -> tuple[str, float, str] | None:
    """For a layer with an exactly zero gradient, the zero-weight layer that gets a
    gradient (see :func:`_zero_weight`) and explains it, with its gradient and where it
    is: when no backward signal arrives (``"after"``), the closest enclosing module whose
    zero gate holds the branch back, else the nearest later one; else the nearest earlier
    one whose output is exactly zero, the layer's input (``"before"``)."""
    sig, pos = e.signal, layer.position
    if pos is None or e.frozen or layer.grad_norm != 0.0 or sig is None:
        return None
    if sig.signal_norm == 0.0:
        # A gate's module encloses the branch it gates (and may run before it).
        gates = [(n, g) for _, n, g, _ in openers if n and e.name.startswith(n + ".")]
        if gates:
            name, grad = max(gates, key=lambda gate: len(gate[0]))
            return name, grad, "gating"
        later = next(((n, g, "after") for i, n, g, _ in openers if i > pos), None)
        if later is not None:
            return later
        # None later: a zero layer in the same block that gates it from before (DiT's
        # adaLN-Zero modulation, computed before the attention whose output it scales).
        near = _same_block(e.name, [(n, g) for _, n, g, _ in openers])
        return None if near is None else (*near, "gating")
    if sig.signal_norm:
        return next(((n, g, "before") for i, n, g, z in reversed(openers) if i < pos and z), None)
    return None


def _same_block(name: str, openers: Sequence[tuple[str, float]]) -> tuple[str, float] | None:
    """The opener whose qualified name shares the longest prefix with ``name`` (at least
    its first component), if any."""
    best, depth = None, 0
    for opener, grad in openers:
        shared = _shared_depth(name, opener)
        if shared > depth:
            best, depth = (opener, grad), shared
    return best


def _shared_depth(a: str, b: str) -> int:
    """How many leading components two qualified module names share."""
    shared = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        shared += 1
    return shared


def _upstream(model: ModelFacts, upstream: Sequence[float], pos: int | None) -> float | None:
    """The largest relative sensitivity of the layers that ran before position ``pos``."""
    if not pos or model.s_max <= 0:
        return None if pos is None or pos == 0 else 0.0
    return upstream[pos] / model.s_max


def _activation_after(
    sig: ModuleSignal, pos: int | None, ran: Sequence[ModuleSignal]
) -> ActivationStats | None:
    """The activation after a layer: its own, or that of a normalization layer directly
    after it (conv → BatchNorm → ReLU: the ReLU's units are the conv's channels)."""
    if sig.activation is not None or pos is None or pos + 1 >= len(ran):
        return sig.activation
    nxt = ran[pos + 1]
    return nxt.activation if "Norm" in nxt.module_type else None


def _percent(fraction: float) -> str:
    """A small positive fraction as a bound in percent that is never written 0% (for
    "within ... of")."""
    if fraction >= 0.01:
        return f"{fraction:.0%}"
    return f"{max(fraction, 0.001):.1%}"


def _share_of_loss(headroom: float) -> str:
    """A predicted decrease as a share of the loss, in words."""
    if headroom >= 1:
        return "all of the loss (its quadratic model overshoots)"
    return f"{headroom:.2g}× the loss"


#: At most this many layer names in one sentence of the summary (the table has them all).
_NAMES_IN_SUMMARY = 8


def _listed(names: Sequence[str]) -> str:
    """``a, b, c``; past :data:`_NAMES_IN_SUMMARY` names, the first ones and how many more."""
    if len(names) <= _NAMES_IN_SUMMARY:
        return ", ".join(names)
    shown = ", ".join(names[: _NAMES_IN_SUMMARY - 2])
    return f"{shown} and {len(names) - _NAMES_IN_SUMMARY + 2} more"


def _summary(
    layers: Sequence[LayerDiagnosis],
    model: ModelFacts,
    whole: ModelHeadroom | None,
    curvature: Mapping[str, BlockCurvature],
) -> str:
    lines = []
    loss, base = model.loss, model.baseline
    base_text = f"{base:.3g}" if base is not None else "unknown"
    if model.plateau and base is not None:
        if loss >= 1.5 * base:
            relation = f"{loss / base:.3g}× that of"
        elif loss >= base:
            relation = "no better than"
        else:
            relation = f"within {_percent((base - loss) / base)} of the loss of"
        lines.append(
            f"The loss {loss:.3g} is {relation} predicting a constant ({base_text}): the "
            "model has learned nothing from its inputs yet."
        )
    elif model.solved and base is not None:
        lines.append(
            f"The loss {loss:.3g} is {abs(loss) / base:.1e} of the best constant prediction's "
            f"({base_text}): (almost) nothing is left to win."
        )
    else:
        lines.append(f"Loss {loss:.3g} (best constant prediction: {base_text}).")
    trial = model.trial
    blew_up = trial is not None and trial.blew_up
    if blew_up:
        assert trial is not None
        lines.append(f"The step is unstable: {trial.describe()}.")
    if whole is not None:
        realized = (
            "could not be measured on held-out data"
            if whole.realized is None
            else f"realized {min(whole.realized, 1.0):.1%} of the loss on held-out data"
        )
        lines.append(
            f"Headroom: the damped quadratic model of the whole network predicts a decrease of "
            f"{_share_of_loss(whole.headroom)}; a Levenberg-Marquardt Gauss-Newton step "
            f"{realized}."
        )
        best, name = best_headroom(whole, curvature)
        if name is not None and whole.headroom < 1:
            lines.append(
                f"A Newton step on {display_name(name)} alone predicts more, "
                f"{_share_of_loss(best)}: its damping is relative to its own curvature, the "
                "whole network's to the sharpest of all, which holds the flatter directions "
                "back (both are quadratic models: the held-out step is the measured one)."
            )
        sgd = model.optimizer in (None, "sgd")
        product = None if not sgd or model.lr is None else model.lr * whole.lambda_max
        if not blew_up and product is not None and product > model.th.unstable:
            outcome = (
                f"; yet {trial.describe()}: at the edge of stability, "
                f"{trial.outcome(base, model.th.plateau)} (watch the loss: a divergence can start "
                "later)"
                if trial is not None
                else ": at the edge of stability, expect an early bump in the loss"
            )
            lines.append(
                f"lr {model.lr:g} exceeds the largest stable step 2/λmax = "
                f"{2 / whole.lambda_max:.2e} (lr·λmax = {one_decimal(product)}){outcome}."
            )
    if trial is not None and not blew_up and whole is None:
        # The one step that checks a first-order overshoot (curvature=False).
        rose = trial.losses[-1] > trial.losses[0]
        lines.append(
            f"The step does not blow up: {trial.describe()}"
            + (
                ", a rise short of a blow-up; whether training steadies after it takes more "
                "steps (diagnose with curvature=True runs twenty)."
                if rose
                else "."
            )
        )
    ratios = [layer.step_ratio for layer in layers if layer.step_ratio]
    if len(ratios) >= 2 and min(ratios) > 0 and max(ratios) / min(ratios) >= 100:
        lines.append(
            f"Curvature-optimal steps span {max(ratios) / min(ratios):.0e}×: one learning rate "
            "cannot suit every layer."
        )
    by_status: dict[str, list[str]] = {}
    for layer in layers:
        by_status.setdefault(layer.status, []).append(display_name(layer.name))
    for status, verb in (
        ("vanishing", "vanishing: far from their optimum, but the signal does not reach them"),
        ("exploding", "exploding"),
        ("dead", "dead: they neither learn nor pass a signal"),
        (
            "converged",
            "converged: nothing left for them to win (small gradients that are meant to be small)",
        ),
        ("frozen", "frozen (requires_grad=False): not judged"),
    ):
        names = by_status.get(status)
        if names:
            noun = "Layers" if len(names) > 1 else "Layer"
            lines.append(f"{noun} {_listed(names)}: {verb}.")
    vanishing = [layer for layer in layers if layer.status == "vanishing"]
    if vanishing:
        lines.append(f"Why, for layer {display_name(vanishing[0].name)}: {vanishing[0].reason}")
        if vanishing[0].advice:
            lines.append(f"First remedy: {vanishing[0].advice[0]}")
    dead, learning = by_status.get("dead", []), by_status.get("ok", [])
    if dead and learning:
        lines.append(
            f"The other layers ({len(learning)} ok) can still learn around the dead ones: the "
            "loss may fall, while the dead layers stay as they are."
        )
    reached = any((layer.signal_norm or 0.0) > 0 for layer in layers)
    if reached and not any(s in by_status for s in ("vanishing", "exploding", "dead", "nonfinite")):
        lines.append("No layer is starved of signal.")
    return "\n".join(lines)
