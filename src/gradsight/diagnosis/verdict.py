"""From measurements to per-layer verdicts, with reasons that quote the numbers.

Every rule here compares quantities that do not change when the loss is multiplied by
a constant, nor when a ReLU network is reparametrized without changing its function
(a layer ×k, the next ÷k):

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
* lr·λmax > 2 for a layer's block (only when the user gives ``lr``): *exploding*;
* the fraction of units after the layer whose activation is flat on the whole batch
  (*dead*).

A rule on raw gradient magnitudes (|g| < 1e-7 means vanishing) fails both invariances,
and cannot tell a layer at its optimum from a layer the signal does not reach.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gradsight.diagnosis.headroom import BlockCurvature, ModelHeadroom
from gradsight.diagnosis.result import STATUSES, LayerDiagnosis
from gradsight.probes.signal import ActivationStats, ModuleSignal

__all__ = ["LayerEvidence", "Thresholds", "judge", "worst_status"]


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds (all on scale-free quantities).

    Attributes:
        vanishing: s_l / max_j s_j below this: the signal reaching the layer is lost.
        exploding: s_l / s_output above this, with the signal growing at each of at
            least ``min_chain`` later layers: the signal grows on its way back.
        converged: G_l / L below this: no relative weight change moves the loss.
        solved: L / baseline below this: the loss is (almost) all won.
        plateau: the loss is within this fraction of the constant-prediction baseline.
        dead: at least this fraction of the units after the layer are dead.
        headroom: a Newton step (layer or model) predicting less than this fraction of
            the loss, and a held-out step realizing less, means nothing is left to win.
    """

    vanishing: float = 1e-3
    exploding: float = 1e3
    converged: float = 1e-5
    solved: float = 1e-4
    plateau: float = 0.05
    dead: float = 0.5
    headroom: float = 1e-4
    min_chain: int = 3


@dataclass
class LayerEvidence:
    """What was measured on one parameter-owning module."""

    name: str
    module_type: str
    signal: ModuleSignal | None  # None: the module did not run
    grad_norms: dict[str, float] = field(default_factory=dict)  # trainable params only
    param_norms: dict[str, float] = field(default_factory=dict)

    @property
    def frozen(self) -> bool:
        return not self.grad_norms

    @property
    def grad_norm(self) -> float | None:
        if self.frozen:
            return None
        return math.sqrt(math.fsum(g * g for g in self.grad_norms.values()))

    @property
    def relative_grad(self) -> float | None:
        if self.frozen:
            return None
        return math.sqrt(
            math.fsum((g * self.param_norms[k]) ** 2 for k, g in self.grad_norms.items())
        )


def worst_status(statuses: Sequence[str]) -> str:
    """The most alarming status in ``statuses`` (``converged`` < ``ok`` < ... )."""
    return max(statuses, key=STATUSES.index) if statuses else "ok"


@dataclass(frozen=True)
class _Context:
    """Model-level facts every layer's verdict is judged against."""

    th: Thresholds
    ran: Sequence[LayerEvidence]
    sens: dict[str, float]
    s_max: float
    s_out: float
    scale: float
    plateau: bool
    solved: bool
    has_headroom: bool
    lr: float | None
    step_used: float | None
    curvature: Mapping[str, BlockCurvature]
    index: Mapping[str, int]  # position of each layer that ran, in ``ran``


def judge(
    evidence: Sequence[LayerEvidence],
    *,
    loss: float,
    baseline_loss: float | None,
    lr: float | None = None,
    curvature: Mapping[str, BlockCurvature] | None = None,
    model: ModelHeadroom | None = None,
    thresholds: Thresholds | None = None,
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

    Returns:
        ``(layers, plateau, summary)``.
    """
    th = thresholds or Thresholds()
    curvature = curvature or {}
    ran = [e for e in evidence if e.signal is not None]
    sens = {e.name: e.signal.sensitivity for e in ran if e.signal is not None}
    scale = abs(loss) if loss else 0.0
    plateau = bool(
        baseline_loss is not None and baseline_loss > 0 and loss >= (1 - th.plateau) * baseline_loss
    )
    solved = bool(
        baseline_loss is not None and baseline_loss > 0 and abs(loss) <= th.solved * baseline_loss
    )
    if model is not None:
        has_headroom = (
            plateau or model.headroom >= th.headroom or (model.realized or 0.0) >= th.headroom
        )
    else:
        g_max = max((e.relative_grad or 0.0 for e in ran), default=0.0)
        has_headroom = plateau or scale == 0 or g_max > th.converged * scale
    step_used = lr
    if step_used is None and model is not None and model.lambda_max > 0:
        step_used = 2.0 / model.lambda_max
    ctx = _Context(
        th=th,
        ran=ran,
        sens=sens,
        s_max=max(sens.values(), default=0.0),
        s_out=sens.get(ran[-1].name, 0.0) if ran else 0.0,
        scale=scale,
        plateau=plateau,
        solved=solved,
        has_headroom=has_headroom,
        lr=lr,
        step_used=step_used,
        curvature=curvature,
        index={e.name: i for i, e in enumerate(ran)},
    )
    layers = []
    for e in evidence:
        d = _measurements(e, ran, ctx.index, curvature.get(e.name), step_used)
        _decide(d, e, ctx)
        d.reason += _through_time(d)
        layers.append(d)
    return layers, plateau, _summary(layers, loss, baseline_loss, plateau, model, lr)


def _measurements(
    e: LayerEvidence,
    ran: Sequence[LayerEvidence],
    index: Mapping[str, int],
    curv: BlockCurvature | None,
    step_used: float | None,
) -> LayerDiagnosis:
    sig = e.signal
    d = LayerDiagnosis(
        name=e.name,
        module_type=e.module_type,
        status="ok",
        reason="",
        grad_norm=e.grad_norm,
        signal_norm=None if sig is None else sig.signal_norm,
        relative_grad=e.relative_grad,
        param_grad_norms=dict(e.grad_norms),
    )
    if curv is not None:
        d.headroom = curv.headroom
        d.lambda_max = curv.lambda_max
        d.optimal_step = curv.alpha_star
        if step_used and math.isfinite(curv.alpha_star):
            d.step_ratio = curv.alpha_star / step_used
    if sig is None:
        return d
    if sig.time_signal_norms is not None:
        d.time_signal_norms = list(sig.time_signal_norms)
    act = sig.activation
    if act is not None:
        d.activation, d.saturation, d.dead_fraction = act.name, act.saturation, act.dead_fraction
    d.weight_factor = sig.weight_factor
    i = index[e.name]
    if i + 1 < len(ran):
        nxt = ran[i + 1].signal
        assert nxt is not None
        d.attenuation = _ratio(sig.signal_norm, nxt.signal_norm)
        d.activation_factor = _ratio(sig.signal_norm, nxt.input_signal_norm)
    return d


def _decide(d: LayerDiagnosis, e: LayerEvidence, ctx: _Context) -> None:
    th = ctx.th
    if e.signal is None:
        d.status = "dead"
        d.reason = "not called in the forward pass: it gets no gradient and passes no signal."
        d.advice = ["Remove the module or call it in forward(); unused parameters waste memory."]
        return
    if any(not math.isfinite(g) for g in e.grad_norms.values()):
        d.status = "nonfinite"
        d.reason = "its gradient holds NaN/Inf; see the diagnosis' nonfinite_origin."
        return
    if d.dead_fraction is not None and d.dead_fraction >= th.dead:
        d.status = "dead"
        d.reason = (
            f"{d.dead_fraction:.0%} of the units after it ({d.activation}) are flat on every "
            "sample of the batch: they pass no backward signal and their incoming weights "
            f"get no gradient (gradient norm {_e(d.grad_norm)})."
        )
        d.advice = _advice("dead")
        return
    s = ctx.sens[e.name]
    rel_sens = s / ctx.s_max if ctx.s_max > 0 else 0.0
    g_rel = (e.relative_grad or 0.0) / ctx.scale if ctx.scale > 0 else 0.0
    i = ctx.index[e.name]
    step_note = _step_note(d, ctx)
    if ctx.lr is not None and d.lambda_max is not None and ctx.lr * d.lambda_max > 2:
        d.status = "exploding"
        d.reason = (
            f"lr·λmax = {ctx.lr:g}·{d.lambda_max:.2e} = {ctx.lr * d.lambda_max:.1f} > 2: a "
            "gradient step of this size is unstable for this layer's block (the largest "
            f"stable step is {2 / d.lambda_max:.1e})."
        )
        d.advice = _advice("unstable_step")
        return
    if ctx.s_out > 0 and s / ctx.s_out >= th.exploding and _grows_back(ctx.ran, i, th.min_chain):
        d.status = "exploding"
        d.reason = (
            f"the loss is {s / ctx.s_out:.1e}× more sensitive to this layer's output than to "
            "the output layer's: the backward signal grows on its way back; "
            f"{_chain_cause(ctx.ran, i)}."
        )
        d.advice = _advice("growing_signal")
        return
    if e.frozen:
        d.reason = f"frozen (requires_grad=False): not trained; loss sensitivity {_e(s)}."
        return
    if ctx.solved:
        d.status = "converged"
        d.reason = (
            f"the loss {_e(ctx.scale)} is below {th.solved:.0e} of the best constant "
            "prediction's: there is (almost) nothing left to win."
        )
        return
    if not ctx.has_headroom:
        d.status = "converged"
        d.reason = (
            "no headroom left for the model: "
            + _headroom_note(d, g_rel)
            + "; its gradient is small because it is meant to be small."
        )
        return
    if rel_sens < th.vanishing:
        d.status = "vanishing"
        ref = max(ctx.sens, key=lambda k: ctx.sens[k])
        where = (
            " while the loss is no better than the best constant prediction" if ctx.plateau else ""
        )
        d.reason = (
            f"gradient {_e(d.grad_norm)}: the loss's sensitivity to this layer's output is "
            f"{rel_sens:.1e} of layer {ref}'s{where}; {_chain_cause(ctx.ran, i)}{step_note}."
        )
        d.advice = _vanishing_advice(ctx, i)
        return
    layer_done = d.headroom < th.headroom if d.headroom is not None else g_rel <= th.converged
    if layer_done:
        d.status = "converged"
        d.reason = (
            f"the signal reaches it (sensitivity {rel_sens:.1e} of the largest) but "
            + _headroom_note(d, g_rel)
            + ": a gradient that is small because the layer sits at its optimum."
        )
        return
    d.reason = (
        f"learning: gradient {_e(d.grad_norm)}; {_headroom_note(d, g_rel)}; the signal "
        f"reaching it is {rel_sens:.1e} of the largest{step_note}."
    )


def _grows_back(ran: Sequence[LayerEvidence], i: int, min_chain: int) -> bool:
    """Whether the backward signal grows at every one of ``min_chain`` or more layers
    between layer i and the output: "layer after layer", not one outsized layer."""
    norms = [r.signal.signal_norm for r in ran[i:] if r.signal and r.signal.signal_norm]
    if len(norms) <= min_chain or len(norms) < len(ran) - i:
        return False
    return all(a > b for a, b in itertools.pairwise(norms))


def _through_time(d: LayerDiagnosis) -> str:
    """A sentence on the signal through time of a recurrent layer, if it fades."""
    steps = d.time_signal_norms
    if not steps or len(steps) < 2 or max(steps) <= 0:
        return ""
    ratio = steps[0] / max(steps)
    if ratio >= 1e-2:
        return ""
    return (
        f" Through time the signal fades: at the first of {len(steps)} steps it is "
        f"{ratio:.1e} of the strongest step's (vanishing through time)."
    )


def _headroom_note(d: LayerDiagnosis, g_rel: float) -> str:
    if d.headroom is not None:
        return f"a Newton step on this layer alone would win {d.headroom:.1e} of the loss"
    return f"a relative change of its weights moves the loss by at most {g_rel:.1e}× its value"


def _step_note(d: LayerDiagnosis, ctx: _Context) -> str:
    if d.step_ratio is None or ctx.step_used is None:
        return ""
    used = f"lr {ctx.lr:g}" if ctx.lr is not None else f"2/λmax = {ctx.step_used:.1e}"
    return f"; its curvature-optimal step is {d.step_ratio:.1e}× the one it gets ({used})"


def _later_factors(
    ran: Sequence[LayerEvidence], i: int
) -> tuple[list[ActivationStats], list[float]]:
    """The activations after layers i…n−1 and the (positive) weight factors of layers
    i+1…n: the factors the backward signal picks up between the output and layer i."""
    later = ran[i:]
    acts = [r.signal.activation for r in later[:-1] if r.signal and r.signal.activation]
    wfs = [
        wf for r in later[1:] if r.signal and (wf := r.signal.weight_factor) is not None and wf > 0
    ]
    return acts, wfs


def _chain_cause(ran: Sequence[LayerEvidence], i: int) -> str:
    """Where, between layer i and the output, the backward signal changes, and why."""
    later = ran[i:]
    if len(later) < 2:
        return ""
    first, last = later[0].signal, later[-1].signal
    assert first is not None and last is not None
    total = _ratio(first.signal_norm, last.signal_norm)
    if total is None:
        return ""
    steps = len(later) - 1
    per = total ** (1 / steps)
    acts, wfs = _later_factors(ran, i)
    verb = "attenuated" if total < 1 else "amplified"
    span = f"layers {later[1].name}–{later[-1].name}" if steps > 1 else f"layer {later[1].name}"
    parts = [
        f"the backward signal is {verb} ×{total:.1e} from layer {later[-1].name} back to here "
        f"(×{per:.2f} per layer through {span}"
    ]
    causes = []
    if acts:
        names = sorted({a.name for a in acts})
        mean_d = sum(a.mean_derivative for a in acts) / len(acts)
        max_d = max(a.max_derivative for a in acts)
        sat = sum(a.saturation for a in acts) / len(acts)
        dead = max(a.dead_fraction for a in acts)
        c = f"{'/'.join(names)} derivatives average {mean_d:.2f} (at most {max_d:g})"
        if sat >= 0.05:
            c += f", {sat:.0%} of units saturated"
        if dead >= 0.05:
            c += f", up to {dead:.0%} of units dead"
        causes.append(c)
    if wfs:
        gm = math.exp(sum(math.log(w) for w in wfs) / len(wfs))
        causes.append(f"weights scale it ×{gm:.2f} per layer")
    return parts[0] + (": " + "; ".join(causes) if causes else "") + ")"


def _vanishing_advice(ctx: _Context, i: int) -> list[str]:
    """Remedies for a vanishing layer, ordered by how much of the signal loss each
    addresses: the log-factors lost to activation derivatives and to weights between
    the layer and the output, the saturated and dead fractions, and the spread of the
    curvature-optimal steps across layers. Curvature scales with the square of the
    signal, so that spread counts half its decades."""
    acts, wfs = _later_factors(ctx.ran, i)
    act_loss = -sum(math.log10(max(a.rms_derivative, 1e-12)) for a in acts)
    weight_loss = -sum(math.log10(max(w, 1e-12)) for w in wfs)
    saturated = max((a.saturation for a in acts), default=0.0)
    dead = max((a.dead_fraction for a in acts), default=0.0)
    ratios = [
        c.alpha_star
        for c in ctx.curvature.values()
        if c.alpha_star > 0 and math.isfinite(c.alpha_star)
    ]
    spread = math.log10(max(ratios) / min(ratios)) if len(ratios) >= 2 else 0.0
    names = "/".join(sorted({a.name for a in acts})) or "activation"
    scored = [
        (
            act_loss,
            f"Use a non-saturating activation (ReLU, GELU) with He initialization: the "
            f"{names} derivatives after this layer cost the signal {act_loss:.1f} decades.",
        ),
        (
            weight_loss,
            "Initialize with a variance-preserving scale (Xavier for tanh/sigmoid, He for "
            f"ReLU): the later layers' weights cost the signal {weight_loss:.1f} decades.",
        ),
        (
            max(act_loss, weight_loss) * (0.5 + saturated),
            "Add normalization (LayerNorm/BatchNorm) before each activation, keeping "
            f"pre-activations where the derivative is large ({saturated:.0%} saturated).",
        ),
        (
            0.5 * (act_loss + weight_loss),
            "Add residual connections so that the signal has an identity path back.",
        ),
        (
            spread / 2,
            "Give each layer its own step size from its curvature (K-FAC/Gauss-Newton "
            f"preconditioning, or at least Adam): the curvature-optimal steps span "
            f"{spread:.0f} decades.",
        ),
    ]
    if dead >= 0.05:
        scored.append(
            (
                10 * dead,
                f"Up to {dead:.0%} of the units after later layers are dead: use LeakyReLU/GELU "
                "or a smaller learning rate.",
            )
        )
    return [text for score, text in sorted(scored, key=lambda item: -item[0]) if score > 0]


_ADVICE = {
    "dead": [
        "Lower the learning rate or warm it up: large steps push ReLU units into the "
        "region where they never activate.",
        "Use LeakyReLU/GELU, whose derivative is never exactly zero.",
        "Re-initialize the biases (zero or small positive) and use He initialization.",
    ],
    "unstable_step": [
        "Lower the learning rate below 2/λmax of the layer's curvature, or give each layer "
        "its own step size (layer-wise learning rates, curvature-aware optimizers).",
        "Clip gradients to bound the damage of an occasional unstable step.",
        "Initialize at a smaller weight scale (at the edge of chaos, e.g. σ_w² ≈ 1.76 for "
        "tanh with σ_b² = 0.05): large weights make the early layers' curvature large.",
    ],
    "growing_signal": [
        "Initialize at a smaller weight scale (at the edge of chaos, e.g. σ_w² ≈ 1.76 for "
        "tanh with σ_b² = 0.05) so that each layer passes the signal at about ×1.",
        "Add normalization layers to keep the backward signal from growing.",
        "Clip gradients or lower the learning rate for the early layers.",
    ],
}


def _advice(kind: str) -> list[str]:
    return list(_ADVICE[kind])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _summary(
    layers: Sequence[LayerDiagnosis],
    loss: float,
    baseline_loss: float | None,
    plateau: bool,
    model: ModelHeadroom | None,
    lr: float | None,
) -> str:
    lines = []
    base = f"{baseline_loss:.3g}" if baseline_loss is not None else "unknown"
    if plateau:
        lines.append(
            f"The loss {loss:.3g} is no better than predicting a constant ({base}): the "
            "model has learned nothing from its inputs yet."
        )
    else:
        lines.append(f"Loss {loss:.3g} (best constant prediction: {base}).")
    if model is not None:
        realized = "n/a" if model.realized is None else f"{model.realized:.1%}"
        lines.append(
            f"Headroom: the damped quadratic model of the whole network predicts a decrease of "
            f"{model.headroom:.2g}× the loss; a Levenberg-Marquardt Gauss-Newton step realized "
            f"{realized} of it on held-out data."
        )
        if lr is not None and lr * model.lambda_max > 2:
            lines.append(
                f"lr {lr:g} exceeds the largest stable step 2/λmax = {2 / model.lambda_max:.2e}."
            )
    ratios = [layer.step_ratio for layer in layers if layer.step_ratio]
    if len(ratios) >= 2 and min(ratios) > 0 and max(ratios) / min(ratios) >= 100:
        lines.append(
            f"Curvature-optimal steps span {max(ratios) / min(ratios):.0e}×: one learning rate "
            "cannot suit every layer."
        )
    by_status: dict[str, list[str]] = {}
    for layer in layers:
        by_status.setdefault(layer.status, []).append(layer.name)
    for status, verb in (
        ("vanishing", "vanishing: far from their optimum, but the signal does not reach them"),
        ("exploding", "exploding"),
        ("dead", "dead"),
        ("converged", "converged: small gradients that are meant to be small"),
    ):
        names = by_status.get(status)
        if names:
            lines.append(f"Layers {', '.join(names)}: {verb}.")
    vanishing = [layer for layer in layers if layer.status == "vanishing"]
    if vanishing:
        lines.append(f"Why, for layer {vanishing[0].name}: {vanishing[0].reason}")
        if vanishing[0].advice:
            lines.append(f"First remedy: {vanishing[0].advice[0]}")
    if not any(s in by_status for s in ("vanishing", "exploding", "dead", "nonfinite")):
        lines.append("No layer is starved of signal.")
    return "\n".join(lines)
