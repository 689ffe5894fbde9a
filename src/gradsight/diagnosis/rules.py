"""The verdict rules: a declared, ordered list of small functions.

Each rule looks at one layer's facts (:class:`LayerFacts`) and the model's
(:class:`ModelFacts`) and returns a :class:`Verdict` (status, a reason quoting the
numbers, advice) or ``None`` to pass. :data:`RULES` is tried in order and the first
verdict wins, so the order is the precedence, and it follows what a user can do about
it:

1. ``nonfinite``: NaN/Inf gradients make every other number meaningless;
2. ``frozen``: ``requires_grad=False``; measured, never judged as a learner;
3. ``converged`` when the loss does not depend on the module at all (not called, or its
   output unused by the loss, so its gradient is exactly zero): nothing for it to win,
   and the reason says so in case it should be trained;
4. ``exploding`` at the step used, which would leave even an optimum: full-batch SGD at
   the lr blows up within ``trial_steps`` steps (non-finite, or still above
   ``trial_rise`` × the start at each of its last ``trial_window`` steps, or frozen there
   after rising above it: a spike that falls back and keeps training is not;
   :mod:`gradsight.diagnosis.trial`), and the layer carries the instability (the
   trial rerun with it frozen trains the rest; where no single frozen layer stops it, a
   share of the whole model's top Hessian eigenvector, or one step on it alone raises
   the loss); or, without curvature, a step that overshoots by first order (lr·‖g‖²
   above ``overshoot`` times a nonnegative loss: past Polyak's step) and, taken, raises
   the loss, at the layers carrying most of lr·‖g‖². lr·λmax above 2 at the start
   decides neither way: a note says it;
5. ``converged`` when the model is solved (loss ≤ ``solved``× the constant
   prediction's): with nothing left to win nothing is dead or vanishing;
6. ``converged`` when the whole model has no headroom left;
7. ``dead`` when most units after the layer never activate on the batch, the signal
   reaching the layer is crushed and its own gradient moves the loss by nothing: it
   neither learns nor passes a signal. A partly dead layer that still learns keeps its
   status, and its reason says "partly dead";
8. ``dead`` when a backward signal reaches the layer's output, yet its gradient and the
   signal at its input are both exactly zero: the signal dies inside the module (a
   mixture-of-experts router whose softmax is saturated, certain of its choice);
9. ``exploding`` when the backward signal grows at every later layer;
10. ``dead`` when the gradient is exactly zero and stays so over a few small gradient
    steps on every layer (tried on a copy, :mod:`gradsight.diagnosis.stuck`), held there
    by a trainable weight of exactly zero that gets no gradient either but gets one once
    moved off zero: a saddle no optimizer leaves, as a gated MLP behind a zero
    normalization weight makes one (unless the signal starving it was lost later:
    ``vanishing``, below); or held there by a frozen parameter of exactly zero that,
    moved off zero, gives it one (a ReZero gate or a LoRA B frozen at zero);
11. ``ok`` when the gradient is exactly zero only because a later layer's weight is
    exactly zero (no signal arrives) or an earlier one's (no input arrives), and that
    layer gets a gradient (a zero-initialized residual branch: its first update opens
    the path);
12. ``vanishing`` when the loss's sensitivity to the layer is a tiny fraction of the
    largest while the model has headroom, the layer's own headroom (when measured, and
    defined: not 0/0 at an exactly zero gradient) is not negligible, and the signal is
    lost on the way back: no earlier layer gets a strong signal either. Where earlier
    layers do (through a skip connection or a parallel path, e.g. attention queries and
    keys at initialization beside the value path), little of the signal enters this
    layer's branch; the reason says so, and the status follows the layer's own headroom;
13. ``vanishing`` through time: a recurrent layer whose signal does not reach the time
    steps where its inputs are (input-weighted reach below ``time_vanishing``) while the
    loss sits on its plateau and no step the signal does reach helps;
14. ``converged`` when the layer's own headroom is negligible, unless the loss is no
    better than the best constant prediction while the layer's scale-free gradient is
    not small (a steep curvature, not an optimum: a gradient that is not small rules one
    out);
15. ``ok``: learning.

A layer whose output is exactly zero while a signal reaches it (a zero-initialized
layer) has no relative sensitivity (``‖∂L/∂z‖·‖z‖`` is 0 whatever the signal): it is
not judged by it.

Every rule compares quantities that do not change when the loss is multiplied by a
constant, nor when a ReLU network is reparametrized without changing its function.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradsight._format import display_name, one_decimal
from gradsight.diagnosis.advice import ModelTraits, remedies, vanishing_advice
from gradsight.diagnosis.chain import chain_cause
from gradsight.diagnosis.result import Status
from gradsight.diagnosis.stuck import STEPS
from gradsight.diagnosis.trial import Carrier, Trial
from gradsight.probes import ActivationStats, ModuleSignal

__all__ = [
    "RULES",
    "LayerFacts",
    "ModelFacts",
    "Rule",
    "Thresholds",
    "Verdict",
    "apply_rules",
    "first_order_overshoot",
]


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
        dead: at least this fraction of the units after the layer are dead (and the
            signal reaching it is lost): the layer is dead.
        partly_dead: at least this fraction of dead units is reported in the reason.
        headroom: a Newton step (layer or model) predicting less than this fraction of
            the loss, and a held-out step realizing less, means nothing is left to win.
        time_vanishing: a recurrent layer's signal at its first time step below this
            fraction of the strongest step's: the signal fades through time.
        learnable: a held-out Levenberg-Marquardt step realizing at least this fraction
            of the loss means the model can still learn from what the signal reaches.
        min_chain: the fewest consecutive growing layers that make "exploding".
        unstable: SGD's lr·λmax above this: gradient descent oscillates along the
            block's sharpest direction (2, the quadratic's limit). Often training
            steadies itself by lowering that curvature (the catapult phase, Lewkowycz
            et al. 2020; the edge of stability, Cohen et al. 2021), so it is a note; the
            SGD trial decides whether it blows up.
        overshoot: SGD's step lr·‖g‖² over the loss above this (a nonnegative loss):
            by first order the step would take the loss this many times below zero, past
            even Polyak's step L/‖g‖², so it overshoots whatever the curvature says
            (without curvature; the step is then taken to check it).
        trial_steps: full-batch SGD steps at the lr in the trial (with curvature).
        trial_rise: the trial blows up when the loss goes non-finite, or is above this
            times its start at each of the trial's last ``trial_window`` steps.
        trial_window: see ``trial_rise``.
        carrier_share: a layer holding at least this share of the whole model's top
            Hessian eigenvector carries an instability that blows up the trial.
        carrier_rise: a layer whose block's lr·λmax is above 2 carries it when one SGD
            step on the block alone raises the loss above this times its start.
    """

    vanishing: float = 1e-3
    exploding: float = 1e3
    converged: float = 1e-5
    solved: float = 1e-4
    plateau: float = 0.05
    dead: float = 0.5
    partly_dead: float = 0.05
    headroom: float = 1e-4
    time_vanishing: float = 1e-3
    learnable: float = 0.01
    min_chain: int = 3
    unstable: float = 2.0
    overshoot: float = 2.0
    trial_steps: int = 20
    trial_rise: float = 1.1
    trial_window: int = 3
    carrier_share: float = 0.2
    carrier_rise: float = 1.2


@dataclass(frozen=True)
class Verdict:
    """A rule's answer: the status, one sentence quoting the numbers, and remedies."""

    status: Status
    reason: str
    advice: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerFacts:
    """What the rules see of one parameter-owning module.

    Attributes:
        name: Qualified module name.
        frozen: None of its own parameters requires a gradient.
        grad_norm: ‖∂L/∂θ‖ over its trainable parameters (None if frozen).
        grad_finite: Its gradient holds no NaN/Inf.
        signal: Its signal-flow measurements, or those of the module that uses its
            parameters when it is not called itself (see ``used_by``); None when the
            loss does not reach it.
        used_by: The module whose forward uses its parameters directly, if any.
        position: Its place among the layers that ran (its user's, for ``used_by``).
        rel_sens: s_l / max_j s_j, the loss's sensitivity to its output relative to the
            largest (None without a signal).
        g_rel: The scale-free gradient Σ‖g_p‖·‖p‖ (in quadrature) over the loss; None
            when every one of its trainable parameters is exactly zero while it gets a
            gradient (zero-initialized: a relative change of zero says nothing).
        headroom: Share of the loss a Newton step on this layer alone would win, ≤ 1.
        lambda_max: Largest eigenvalue of its block's curvature: the Hessian's where it
            was measured (``hessian``), else the Gauss-Newton matrix's.
        hessian: Whether ``lambda_max`` is the Hessian's.
        step: The step it gets (lr, or an adaptive optimizer's step along its gradient).
        step_ratio: The curvature-optimal step over ``step``.
        activation: The activation after it, looked up through a normalization layer
            that directly follows it (conv → BatchNorm → ReLU: the ReLU's units are the
            conv's channels).
        last: It is the last layer that ran: its signal is the loss's own.
        upstream_sens: The largest ``rel_sens`` of the layers that ran before it.
        time_input_norms: Recurrent layers: ‖x_t‖ of the input at each time step.
        experts: A mixture of experts' fused expert weights: how many experts they hold;
            ``idle_experts``: those whose gradient is exactly zero (no token of the batch
            routed to them).
        stack_fade: A stacked recurrent module (``nn.LSTM(num_layers=2)``): its layer
            whose scale-free gradient is smallest, the layer whose is largest, and their
            ratio, where that ratio is below ``th.vanishing``.
        zero_weight: Its trained weight is exactly zero (zero-initialized) while it gets
            a gradient: its output carries nothing yet, and its first update changes that.
        blocked_by: With an exactly zero gradient: the layer with ``zero_weight`` that
            explains it, its gradient norm, and ``"after"`` (no backward signal arrives:
            it stops there), ``"gating"`` (no backward signal arrives: a zero gate of its
            block scales its output) or ``"before"`` (its output, this layer's input, is
            exactly zero); either way that layer's first update opens the path.
        zero_scale: A normalization layer whose weight is exactly zero, the layer itself
            or the one right after it: it outputs its bias alone, the same on every
            sample (a loop that zeroes every 1-D parameter zeroes these weights too).
        carrier: Where the SGD trial blew up: why this layer carries the instability
            (None when it does not, or no trial ran).
        params: The names of its trainable parameters (``("weight", "bias")``).
        zero_params: Those of them that are exactly zero.
        stuck: Its gradient is exactly zero and stayed so over a few small gradient
            steps on every layer (:func:`gradsight.diagnosis.stuck.still_zero`): no
            optimizer step moves it. False where that was not tried or it moved.
        stuck_by: For a stuck layer, the stuck layers whose weights of exactly zero hold
            a saddle there (moved off zero, they get a gradient): the layer itself, or
            those in its closest enclosing module
            (a flat model: the nearest one before it); empty where there are none.
        unlocked: For a stuck layer, moving the stuck zero weights off zero (on a copy)
            gives it a gradient: they hold it, whatever starves its signal now.
    """

    name: str
    frozen: bool
    grad_norm: float | None
    grad_finite: bool
    signal: ModuleSignal | None
    used_by: str | None = None
    position: int | None = None
    rel_sens: float | None = None
    g_rel: float | None = 0.0
    headroom: float | None = None
    lambda_max: float | None = None
    hessian: bool = False
    step: float | None = None
    step_ratio: float | None = None
    activation: ActivationStats | None = None
    last: bool = False
    upstream_sens: float | None = None
    time_input_norms: tuple[float, ...] | None = None
    experts: int = 0
    idle_experts: tuple[int, ...] = ()
    stack_fade: tuple[int, int, float] | None = None
    params: tuple[str, ...] = ()
    zero_params: tuple[str, ...] = ()
    zero_weight: bool = False
    blocked_by: tuple[str, float, str] | None = None
    zero_scale: str | None = None
    carrier: Carrier | None = None
    stuck: bool = False
    stuck_by: tuple[str, ...] = ()
    unlocked: bool = False

    @property
    def label(self) -> str:
        return display_name(self.name)

    @property
    def dead_fraction(self) -> float:
        return self.activation.dead_fraction if self.activation is not None else 0.0

    @property
    def activation_name(self) -> str:
        return self.activation.name if self.activation is not None else "activation"


@dataclass(frozen=True)
class ModelFacts:
    """Model-level facts every layer's verdict is judged against.

    Attributes:
        th: The thresholds.
        loss: The loss on the batch.
        baseline: The best constant prediction's loss (None if unknown).
        plateau: The loss is no better than ``baseline`` (within ``th.plateau``).
        solved: The loss is at most ``th.solved`` of ``baseline``.
        has_headroom: Some of the loss is still to be won.
        headroom: The whole model's damped Newton decrement over the loss, ≤ 1.
        realized: Share of the held-out loss a Levenberg-Marquardt step removed.
        lr: The learning rate given (None if not).
        optimizer: ``"sgd"``, ``"adaptive"`` (Adam-like), ``"other"``, or None.
        ran: Signal measurements of the layers that ran, forward order.
        s_max: The largest loss sensitivity over those layers.
        s_out: The last layer's sensitivity.
        traits: What the model already does (activations, normalization, residuals).
        alpha_spread: Decades spanned by the layers' curvature-optimal steps.
        zero_gates: Layers whose trainable parameters are all exactly zero gates (ReZero's
            α, Mllama's cross-attention gates).
        zero_norms: Normalization layers whose weight is exactly zero (they output their
            bias alone and pass no signal back).
        frozen_zeros: Frozen parameters (qualified names) that are exactly zero and,
            moved off zero, give a stuck layer a gradient: they hold it for good.
        grad_sq: ‖g‖² over every trained layer; ``grad_layers``: how many have a gradient.
        trial: Full-batch SGD at ``lr`` from the current weights (SGD with curvature, or
            where the step overshoots by first order), or None.
        carriers_measured: Where the trial blew up, whether the layers carrying it were
            measured (with curvature: the Hessian's sharpest direction, steps alone);
            without, the first-order overshoot names them.
    """

    th: Thresholds
    loss: float
    baseline: float | None
    plateau: bool
    solved: bool
    has_headroom: bool
    headroom: float | None
    realized: float | None
    lr: float | None
    optimizer: str | None
    ran: Sequence[ModuleSignal]
    s_max: float
    s_out: float
    traits: ModelTraits
    alpha_spread: float = 0.0
    zero_norms: frozenset[str] = frozenset()
    zero_gates: frozenset[str] = frozenset()
    frozen_zeros: frozenset[str] = frozenset()
    grad_sq: float = 0.0
    grad_layers: int = 0
    trial: Trial | None = None
    carriers_measured: bool = False

    @property
    def scale(self) -> float:
        return abs(self.loss)

    @functools.cached_property
    def overshoot(self) -> float | None:
        """:func:`first_order_overshoot` for SGD (None for other optimizers, or without an
        lr): one value for every layer, computed once."""
        if self.optimizer not in (None, "sgd") or self.lr is None:
            return None
        return first_order_overshoot(self.lr, self.grad_sq, self.loss, self.baseline, self.th)


Rule = Callable[[LayerFacts, ModelFacts], Verdict | None]


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def nonfinite(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """Its gradient holds NaN/Inf."""
    if layer.grad_finite:
        return None
    return Verdict("nonfinite", "its gradient holds NaN/Inf; see the diagnosis' nonfinite_origin.")


def frozen(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """``requires_grad=False``: listed with its measurements, never judged."""
    if not layer.frozen:
        return None
    sens = ""
    if layer.rel_sens is not None:
        sens = f"; the loss's sensitivity to its output is {layer.rel_sens:.1e} of the largest"
    return Verdict("frozen", f"frozen (requires_grad=False): not trained, not judged{sens}.")


def _lr_lambda(layer: LayerFacts, model: ModelFacts) -> float | None:
    """SGD's lr·λmax for the layer's block (None for other optimizers, or unmeasured)."""
    if model.optimizer not in (None, "sgd") or model.lr is None or layer.lambda_max is None:
        return None
    return model.lr * layer.lambda_max


def unstable_step(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """Full-batch SGD at the lr blows up (the trial of ``trial_steps`` steps: see
    :func:`gradsight.diagnosis.trial.sgd_trial`), and this layer carries the instability
    (see :func:`gradsight.diagnosis.trial.carriers`). SGD only: an adaptive optimizer's
    stability depends on its preconditioner."""
    trial = model.trial
    if trial is None or not trial.blew_up or layer.carrier is None or model.lr is None:
        return None
    if model.optimizer not in (None, "sgd"):
        return None
    product = _lr_lambda(layer, model)
    of = "the Hessian's" if layer.hessian else "the Gauss-Newton matrix's"
    block = (
        ""
        if product is None or layer.lambda_max is None
        else f" Its block's lr·λmax ({of}) is {model.lr:g}·{layer.lambda_max:.2e} = "
        f"{one_decimal(product)} (the largest stable step is {2 / layer.lambda_max:.1e})"
        + (
            "."
            if product > model.th.unstable
            else ": stable on its own, it blows up through its interplay with the other layers."
            if layer.carrier.frozen is not None
            else ": stable on its own, it blows up as part of the whole model's sharpest direction."
        )
    )
    return Verdict(
        "exploding",
        f"the step is unstable: {trial.describe()}, and this layer carries it: "
        f"{layer.carrier.describe()}.{block}",
        remedies("unstable_step", model.traits),
    )


def overshooting_step(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """SGD's step overshoots by first order: lr·‖g‖² exceeds ``th.overshoot`` × the loss,
    so the linear model of the step takes a nonnegative loss below zero: the step is past
    Polyak's step L/‖g‖² (with the most generous target, 0). Curvature can miss this:
    saturated outputs (a softmax at one-hot) make the Gauss-Newton curvature vanish while
    the gradient is large. Judged for SGD only, where the baseline shows a nonnegative
    loss, on the layers carrying at least half an equal share of lr·‖g‖²."""
    total = model.overshoot
    if total is None or not layer.grad_norm or model.lr is None:
        return None
    if model.trial is not None and not model.trial.blew_up:
        return None  # the trial's steps did not blow up: the first-order view is refuted
    if model.carriers_measured:
        return None  # which layers carry the blow-up was measured: unstable_step names them
    mine = model.lr * layer.grad_norm**2 / model.loss
    if mine / total < 0.5 / max(model.grad_layers, 1):
        return None  # a small part of the step: not where it overshoots
    polyak = model.loss / model.grad_sq
    return Verdict(
        "exploding",
        f"the step overshoots: for SGD at lr {model.lr:g}, lr·‖g‖² is {total:.3g} times the "
        f"loss ({model.loss:.3g}), so by first order the step would take the loss below zero; "
        f"even Polyak's step L/‖g‖² is {polyak:.1e}, and this layer's gradient carries "
        f"{mine / total:.0%} of lr·‖g‖².",
        (
            f"Lower the learning rate below {polyak:.1e} (Polyak's step L/‖g‖²), or use a "
            "step that adapts to the gradient's size (gradient clipping, Adam).",
            *remedies("unstable_step", model.traits)[1:],
        ),
    )


def first_order_overshoot(
    lr: float, grad_sq: float, loss: float, baseline: float | None, th: Thresholds
) -> float | None:
    """lr·‖g‖² over the loss where it is above ``th.overshoot`` and the baseline shows a
    nonnegative loss (``grad_sq``: ‖g‖², each parameter once), else None."""
    if not loss > 0 or baseline is None or not baseline > 0 or not grad_sq > 0:
        return None
    total = lr * grad_sq / loss
    return total if math.isfinite(total) and total > th.overshoot else None


def solved(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """The model's loss is (almost) all won: nothing is dead or vanishing."""
    if not model.solved or model.baseline is None:
        return None
    return Verdict(
        "converged",
        f"the loss {model.scale:.1e} is {model.scale / model.baseline:.1e} of the best "
        f"constant prediction's ({model.baseline:.1e}): there is (almost) nothing left to win.",
    )


def unreached(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """The loss does not depend on the module: exactly zero gradient, no signal. There is
    nothing for it to win (an auxiliary head the loss leaves out, a module kept for later):
    ``converged``, with a reason that says why, in case it should be trained."""
    if layer.used_by is not None or (layer.grad_norm or 0.0) > 0:
        return None
    sig = layer.signal
    if sig is not None and sig.signal_norm is not None:
        return None
    if sig is None:
        reason = (
            "not called in the forward pass: the loss does not depend on it, its parameters "
            "get exactly zero gradient, and there is nothing for it to win."
        )
        advice = ("Call it in forward() if it should be trained, or remove it.",)
    else:
        reason = (
            "its output does not reach the loss: no backward signal arrives, its parameters "
            "get exactly zero gradient, and there is nothing for it to win."
        )
        advice = (
            "Include this output in the loss (e.g. add its head's loss term) if it should be "
            "trained.",
        )
    return Verdict("converged", reason, advice)


def no_headroom(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """Nothing is left to win for the whole model."""
    if model.has_headroom:
        return None
    return Verdict(
        "converged",
        f"no headroom left for the model: {_headroom_note(layer)}; its gradient is small "
        "because it is meant to be small.",
    )


def _zero_norm_advice(names: Sequence[str]) -> str:
    shown = ", ".join(display_name(n) for n in names[:3]) + (" …" if len(names) > 3 else "")
    return (
        f"Initialize the normalization weight of {shown} to 1 (nn.init.ones_): a zero "
        "normalization weight outputs the bias alone and passes no signal back. A loop that "
        "zeroes every 1-D parameter (meant for biases) zeroes these too."
    )


def dead(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """Most units after the layer never activate, and it neither learns (its scale-free
    gradient is at most ``th.converged`` of the loss) nor passes a signal (the loss's
    sensitivity to its output is below ``th.vanishing`` of the largest)."""
    frac = layer.dead_fraction
    if frac < model.th.dead or layer.rel_sens is None or layer.rel_sens >= model.th.vanishing:
        return None
    if layer.g_rel is None or layer.g_rel > model.th.converged:
        return None  # its live units still learn: partly dead, said in the reason
    cause, advice = "", remedies("dead", model.traits)
    if layer.zero_scale is not None:
        which = (
            "its weight is"
            if layer.zero_scale == layer.name
            else f"the weight of {display_name(layer.zero_scale)}, the normalization after it, is"
        )
        cause = (
            f" The cause: {which} exactly zero, so it outputs its bias alone, the same on "
            "every sample."
        )
        advice = (_zero_norm_advice([layer.zero_scale]), *advice)
    return Verdict(
        "dead",
        f"{frac:.0%} of the units after it ({layer.activation_name}) are flat on every sample "
        f"of the batch: the loss's sensitivity to its output is {layer.rel_sens:.1e} of the "
        f"largest and its gradient {_e(layer.grad_norm)} moves the loss by at most "
        f"{layer.g_rel:.1e}× its value, so it neither learns nor passes a signal." + cause,
        advice,
    )


#: A scale-free gradient below this moves the loss by less than float32 resolves.
_ROUND_OFF = 1e-7
#: The signal at a layer's input below this fraction of the one at its output: none passes.
_ROUND_OFF_SIGNAL = 1e-6


def blocked_inside(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """A backward signal reaches its output, yet its gradient and the signal at its input
    are both exactly zero, or at round-off: the signal dies inside the module, between its
    output and its weights (a router whose softmax is saturated, so that its top-k choice
    is certain; a top-1 router renormalized to weight 1; a hard choice that passes no
    gradient). Not where the signal reaching it is lost already (``vanishing``). An
    exactly zero input would not do this: a
    weight whose input is zero still passes the signal back to that input. It neither
    learns nor passes a signal: ``dead``."""
    sig = layer.signal
    if sig is None or layer.used_by is not None or layer.grad_norm is None:
        return None
    if not sig.signal_norm or sig.input_signal_norm is None:
        return None
    if layer.rel_sens is None or layer.rel_sens < model.th.vanishing:
        return None  # the signal reaching it is lost already (an underflow): vanishing
    if any(not p.endswith("bias") for p in layer.zero_params):
        return None  # a weight of exactly zero passes nothing back: not inside it
    exact = layer.grad_norm == 0.0 and sig.input_signal_norm == 0.0
    # Or at round-off: the gradient moves the loss by less than float32 resolves, and
    # the signal at its input is a millionth of the one at its output (a top-1 router
    # renormalized to weight 1: its true gradient is zero, its computed one 1e-10).
    rounded = (
        layer.g_rel is not None
        and layer.g_rel < _ROUND_OFF
        and sig.input_signal_norm <= _ROUND_OFF_SIGNAL * sig.signal_norm
    )
    if not (exact or rounded):
        return None
    what = (
        "exactly zero"
        if exact
        else f"at round-off ({_e(layer.grad_norm)}, and {_e(sig.input_signal_norm)} at its input)"
    )
    return Verdict(
        "dead",
        f"a backward signal reaches its output ({_e(sig.signal_norm)}), but none passes "
        f"through it: its gradient and the signal at its input are {what}, so the "
        "signal dies inside it, between its output and its weights, as a saturated softmax "
        "(a router certain of its choice) or a hard choice (top-k, argmax) makes it. It "
        "neither learns nor passes a signal.",
        (
            "If it is a mixture-of-experts router: make its choice less certain (a smaller "
            "initialization of the router weights or of the features it reads, a router "
            "z-loss) and train it with the load-balancing loss (output_router_logits=True in "
            "transformers), which reaches the router's logits directly.",
            "Otherwise look in its forward for what passes no gradient between its weights and "
            "its output (a detach, an argmax, a softmax or sigmoid at saturation).",
        ),
    )


def growing_signal(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """The backward signal grows at every later layer, by ≥ ``th.exploding`` in all,
    unless SGD at the lr was tried and does not blow up (a stack of saturating recurrent
    layers at weights ×100 amplifies the signal ×1e8 while 100 SGD steps take its loss
    127 → 61): the trial decides, and the growth alone is no verdict."""
    sig, i = layer.signal, layer.position
    if sig is None or i is None or model.s_out <= 0 or layer.used_by is not None:
        return None
    if model.trial is not None and not model.trial.blew_up:
        return None
    growth = sig.sensitivity / model.s_out
    if growth < model.th.exploding or not _grows_back(model.ran, i, model.th.min_chain):
        return None
    return Verdict(
        "exploding",
        f"the loss is {growth:.1e}× more sensitive to this layer's output than to the output "
        f"layer's: the backward signal grows on its way back; {chain_cause(model.ran, i)}.",
        remedies("growing_signal", model.traits),
    )


def stuck_at_zero(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """Its gradient is exactly zero and stays so over a few small gradient steps on every
    layer (tried on a copy), held there by a weight of exactly zero that gets no gradient
    either but gives one once moved off zero: a trainable one that itself gets a gradient
    once moved (the layer's own, or one in its closest enclosing module), a saddle no
    optimizer leaves; or a frozen one (``requires_grad=False``: ReZero's α, DiT's adaLN
    modulation, LoRA's B frozen at their zero initialization), which nothing moves. A
    gated MLP behind a zero normalization weight is one: SiLU(gate)·up fed zero is zero in
    both factors, so no signal passes back to gate, up or the norm. A layer that a lost
    signal starves is ``vanishing`` instead (the cause is later), unless a zero-weight
    layer's first update lets that signal through or a frozen zero holds it; one held at
    zero by an input that is zero on the batch or a loss that weighs it 0 does not affect
    the loss whatever its weights (``converged``)."""
    holders = layer.stuck_by
    if not layer.stuck or not holders:
        return None
    frozen = [h for h in holders if h in model.frozen_zeros]
    if frozen:
        return _held_by_frozen(frozen)
    if layer.blocked_by is None and _starved(layer, model.th) and not layer.unlocked:
        return None
    tried = f"over {STEPS} small gradient steps on every layer (tried on a copy)"
    if holders == (layer.name,) and layer.name in model.zero_gates:
        reason = (
            f"its gate ({', '.join(layer.params)}) is exactly zero and so is its gradient, "
            f"which stays so {tried}: the branch it gates carries nothing and passes no signal "
            "back, and no optimizer step moves it."
        )
    elif holders == (layer.name,):
        reason = (
            f"its weight is exactly zero and so is its gradient, which stays so {tried}: its "
            "output carries nothing of its input, no signal passes back through it, and no "
            "optimizer step moves it."
        )
    else:
        names = " and ".join(
            f"the {'gate' if h in model.zero_gates else 'weight'} of {display_name(h)}"
            for h in holders
        )
        are, get = ("is", "gets") if len(holders) == 1 else ("are", "get")
        reason = (
            f"its gradient is exactly zero and stays so {tried}, held there by {names}, "
            f"which {are} exactly zero and {get} no gradient either: what passes between "
            "them stays zero, so no optimizer step moves it, and it passes no signal."
        )
    norms = [h for h in holders if h in model.zero_norms]
    gates = [display_name(h) for h in holders if h in model.zero_gates]
    if norms:
        advice: tuple[str, ...] = (_zero_norm_advice(norms),)
    elif gates:
        advice = (
            f"Start the layers that {', '.join(gates)} gate{'s' if len(gates) == 1 else ''} "
            "off zero (a zero gate opens only where the branch behind it passes something "
            "on), or the gate itself.",
        )
    else:
        advice = (
            f"Initialize the weight of {display_name(holders[0])} as its layer type "
            "expects instead of exactly zero.",
        )
    return Verdict("dead", reason, advice)


def _held_by_frozen(frozen: Sequence[str]) -> Verdict:
    """``dead``, held at zero by the frozen zero parameters ``frozen``."""
    names = (
        " and ".join(frozen[:3])
        if len(frozen) <= 3
        else (f"{', '.join(frozen[:3])} and {len(frozen) - 3} more")
    )
    it, gives, holds = (
        ("it", "it gives", "it holds") if len(frozen) == 1 else ("them", "they give", "they hold")
    )
    return Verdict(
        "dead",
        f"its gradient is exactly zero and stays so over {STEPS} small gradient steps on "
        f"every layer (tried on a copy), held there by {names}, frozen (requires_grad=False) "
        f"at exactly zero: nothing passes through {it}, so this layer never gets a gradient "
        f"and never learns; moved off zero (on the copy), {gives} this layer one.",
        (
            f"Unfreeze {names} (requires_grad=True): a zero-initialized gate or scale opens "
            "at its first update only if it is trained. To keep it frozen, start it off zero "
            f"(or freeze the layers {holds} too).",
        ),
    )


def opened_by_first_update(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """Its gradient is exactly zero because a later layer's weight is exactly zero (no
    backward signal arrives), as zero-initialized residual branches make them (Fixup,
    SkipInit, torchvision's ``zero_init_residual``, ControlNet's zero convolutions), or an
    earlier one's is (its input is zero); that layer gets a gradient, so its first update
    opens the path: ``ok``, not stuck (unless a few gradient steps showed it stuck)."""
    if layer.blocked_by is None or layer.stuck:
        return None
    blocker, grad, where = layer.blocked_by
    what = "no input yet" if where == "before" else "no signal yet"
    zero = "gate" if blocker in model.zero_gates else "weight"
    at = ", which gates it," if where == "gating" else f" {where} it"
    return Verdict(
        "ok",
        f"{what}: its gradient is exactly zero because the {zero} of {display_name(blocker)}"
        f"{at} is exactly zero; that layer gets a gradient ({_e(grad)}), so its first "
        "update opens the path to this one.",
    )


def vanishing(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """The signal reaching the layer is lost on the way back while there is something to
    win: its sensitivity is below ``th.vanishing`` of the largest, no earlier layer gets
    a stronger share, and its own headroom (when measured) is not negligible. Or, where
    earlier layers do get a strong share through another path, its own gradient is
    exactly zero while a signal, crushed, still reaches it: the signal that enters its
    branch is lost (Mamba with weights ×0.01: x_proj's gets 3e-24 of the largest; SGD
    never moves it), and an exactly zero gradient leaves no headroom of its own to judge
    it by (0/0)."""
    if layer.position is None:
        return None
    branch_lost = _branch_lost(layer, model.th)
    if not (_starved(layer, model.th) or branch_lost):
        return None
    gradient = layer.grad_norm is not None and layer.grad_norm > 0
    if (
        gradient
        and layer.headroom is not None
        and layer.headroom < model.th.headroom
        and not _steep(layer, model)
    ):
        return None  # nothing to win for it: converged, not stuck (without any gradient
        # the Newton decrement is 0/0, which says nothing)
    assert layer.rel_sens is not None
    ref = max(model.ran, key=lambda s: s.sensitivity)
    where = (
        " while the loss is no better than the best constant prediction" if model.plateau else ""
    )
    if ref.sensitivity > 0 and layer.rel_sens > 0:
        reach = (
            f"the loss's sensitivity to this layer's output is {layer.rel_sens:.1e} of layer "
            f"{display_name(ref.name)}'s"
        )
    else:
        reach = "no backward signal reaches this layer's output (it is exactly zero)"
    parts = [f"gradient {_e(layer.grad_norm)}: {reach}{where}"]
    if branch_lost and layer.upstream_sens is not None:
        parts.append(
            f"little of the signal enters its branch (earlier layers get up to "
            f"{layer.upstream_sens:.1e} of it through another path), and what does is lost "
            "before its weights: their gradient is exactly zero"
        )
    cause = chain_cause(model.ran, layer.position)
    if cause:
        parts.append(cause)
    if note := _step_note(layer, model):
        parts.append(note)
    advice = vanishing_advice(model.ran, layer.position, model.traits, model.alpha_spread)
    blocking = [s.name for s in model.ran[layer.position + 1 :] if s.name in model.zero_norms]
    if blocking:  # normalization layers after it that pass nothing back: the first fix
        advice = (_zero_norm_advice(blocking), *advice)
    return Verdict("vanishing", "; ".join(parts) + ".", advice)


def _starved(layer: LayerFacts, th: Thresholds) -> bool:
    """The backward signal reaching the layer was lost on the way back: its sensitivity
    is below ``th.vanishing`` of the largest, it is not the last layer (whose signal is
    the loss's own), and no earlier layer gets a strong signal either."""
    if layer.rel_sens is None or layer.rel_sens >= th.vanishing or layer.last:
        return False
    return layer.upstream_sens is None or layer.upstream_sens < th.vanishing


def _branch_lost(layer: LayerFacts, th: Thresholds) -> bool:
    """A crushed but nonzero signal reaches it while earlier layers get a strong one, and
    its own gradient is exactly zero."""
    sig = layer.signal
    return (
        layer.grad_norm == 0.0
        and not layer.last
        and layer.used_by is None
        and sig is not None
        and bool(sig.signal_norm)
        and layer.rel_sens is not None
        and 0.0 < layer.rel_sens < th.vanishing
    )


def _learns_beyond_constant(model: ModelFacts) -> bool:
    """Whether the held-out Levenberg-Marquardt step realizes at least ``th.learnable``
    of the loss and takes it below the plateau (``1 − th.plateau`` of the best constant
    prediction's): moving the output biases to the class frequencies also realizes a
    decrease, but it learns nothing the constant does not know."""
    if model.realized is None or model.realized < model.th.learnable:
        return False
    if model.baseline is None or not model.baseline > 0:
        return True
    return model.loss * (1.0 - model.realized) < (1.0 - model.th.plateau) * model.baseline


def vanishing_through_time(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """A recurrent layer's signal does not reach the time steps where its inputs are,
    while the loss sits on its plateau and no step the signal reaches realizes a
    decrease."""
    fade = _time_fade(layer, model.th)
    if fade is None or fade.reach >= model.th.time_vanishing:
        return None
    if not model.plateau or _learns_beyond_constant(model):
        return None
    where = (
        f"the input-weighted signal, where its inputs are, is {fade.reach:.1e} of the "
        "strongest step's"
        if fade.weighted
        else f"at time step 1 of {fade.steps} it is {fade.first:.1e} of the strongest step's"
    )
    return Verdict(
        "vanishing",
        f"vanishing through time: the backward signal fades over the {fade.steps} time steps "
        f"({where}; below {model.th.time_vanishing:g} of it before step {fade.lost_at}) while "
        "the loss is no better than the best constant prediction: the loss cannot reach the "
        "steps it would have to learn from.",
        remedies("through_time", model.traits),
    )


def layer_converged(layer: LayerFacts, model: ModelFacts) -> Verdict | None:
    """The signal reaches the layer, but its own step would win nothing. Not where the
    loss is no better than a constant while the layer's scale-free gradient is not small:
    there a tiny Newton decrement means a steep curvature, not an optimum."""
    if layer.headroom is not None:
        done = layer.headroom < model.th.headroom and not _steep(layer, model)
    else:  # zero-initialized parameters (no scale-free gradient) have not started
        done = layer.g_rel is not None and layer.g_rel <= model.th.converged
    if not done:
        return None
    signal = layer.signal.signal_norm if layer.signal is not None else None
    if _flat_start(layer, model):
        return None  # not told from an optimum by first order: ok, and the reason says so
    if layer.grad_norm == 0 and signal and layer.used_by is not None:
        # The signal measured is the user's output's, not what reaches these weights.
        return Verdict(
            "converged",
            f"a backward signal reaches {display_name(layer.used_by)}, which uses its weights, "
            "yet their gradient is exactly zero: none of it reaches them, so they cannot move "
            "the loss now (what the module computes from them passes nothing back, or the "
            "input they act on is zero).",
        )
    if layer.grad_norm == 0 and signal:
        # A weight's gradient pairs the signal at the output with the input: with a
        # signal there, an exactly zero gradient means an exactly zero input.
        if layer.last:
            where = "the loss's own signal reaches its output"
        else:
            where = "a backward signal reaches its output"
        rest = ", and the rest of it (a bias) sits at its optimum" if len(layer.params) > 1 else ""
        return Verdict(
            "converged",
            f"{where}, yet its gradient is exactly zero: the input its weights act on "
            f"carries nothing (exactly zero), so they cannot move the loss{rest}; nothing "
            "for it to win until the layers before it pass something on.",
        )
    if layer.grad_norm == 0 and signal == 0:
        where = "the loss weighs its output 0" if layer.last else "no backward signal reaches it"
        return Verdict(
            "converged",
            f"{where} (exactly zero): the loss does not depend on it, so its gradient is "
            "exactly zero and there is nothing for it to win (a loss term weighted 0 does "
            "this; if it should be trained, look for what multiplies its output by zero).",
        )
    if layer.last:
        reach = "the loss's own signal reaches it (the last layer)"
    elif layer.rel_sens is None:
        reach = "its gradient comes from the module that uses its parameters"
    elif layer.rel_sens == 0:
        reach = "no backward signal reaches it (exactly zero: the loss does not depend on it)"
    elif layer.rel_sens < model.th.vanishing:
        reach = f"little of the signal reaches it (sensitivity {layer.rel_sens:.1e} of the largest)"
    else:
        reach = f"the signal reaches it (sensitivity {layer.rel_sens:.1e} of the largest)"
    if layer.headroom is not None:
        why = "a gradient that is small because the layer sits at its optimum."
    else:
        # First order alone cannot tell an optimum from a flat start.
        why = (
            "by first order it sits at its optimum. Its curvature was not measured: a flat "
            "start (attention's queries and keys at initialization) reads the same, and "
            "diagnose with curvature=True tells them apart."
        )
    return Verdict("converged", f"{reach} but {_headroom_note(layer)}: {why}")


def _flat_start(layer: LayerFacts, model: ModelFacts) -> bool:
    """Without curvature, a small scale-free gradient (not exactly zero) on a layer
    before the last while the model has learned nothing yet (its loss no better than the
    best constant prediction's): first order cannot tell an optimum from a flat start
    (attention's queries and keys at initialization: freezing BERT's keeps its loss flat
    for hundreds of steps; weights ×0.01), and on a plateau an optimum of a hidden layer
    is the less likely one. The last layer's is not: with inputs that carry nothing yet,
    its best is the constant prediction."""
    return (
        layer.headroom is None
        and model.plateau
        and not layer.last
        and layer.used_by is None
        and bool(layer.grad_norm)
        and layer.g_rel is not None
        and layer.g_rel <= model.th.converged
    )


def _steep(layer: LayerFacts, model: ModelFacts) -> bool:
    """A negligible Newton decrement while the loss is no better than the best constant
    prediction and a relative change of the layer's weights still moves the loss by more
    than ``th.converged`` of it: the curvature is steep (saturated outputs, a loss scaled
    up), the quadratic model allows only a tiny step, and the layer is not at its
    optimum (a gradient that is not small rules one out)."""
    return (
        model.plateau
        and layer.headroom is not None
        and layer.headroom < model.th.headroom
        and layer.g_rel is not None
        and layer.g_rel > model.th.converged
    )


def learning(layer: LayerFacts, model: ModelFacts) -> Verdict:
    """Learning: the default."""
    headroom = _headroom_note(layer)
    if _steep(layer, model):
        assert layer.g_rel is not None
        headroom += (
            ", yet it is not at its optimum: the loss is no better than the best constant "
            f"prediction and a relative change of its weights moves it by up to "
            f"{layer.g_rel:.1e}× its value (the curvature is steep, so the quadratic model "
            "allows only a tiny step)"
        )
    if _flat_start(layer, model):
        headroom += (
            ", which by first order alone would read as an optimum, but the model has learned "
            "nothing yet (its loss is no better than the best constant prediction's): a flat "
            "start (attention's queries and keys at initialization, small weights) reads the "
            "same, and diagnose with curvature=True tells them apart"
        )
    parts = [f"learning: gradient {_e(layer.grad_norm)}", headroom]
    if layer.rel_sens is not None:
        parts.append(f"the signal reaching it is {layer.rel_sens:.1e} of the largest")
    if note := _step_note(layer, model):
        parts.append(note)
    return Verdict("ok", "; ".join(parts) + ".")


#: The rules, in order of precedence (the first verdict wins).
RULES: tuple[Rule, ...] = (
    nonfinite,
    frozen,
    unreached,
    unstable_step,
    overshooting_step,
    solved,
    no_headroom,
    dead,
    blocked_inside,
    growing_signal,
    stuck_at_zero,
    opened_by_first_update,
    vanishing,
    vanishing_through_time,
    layer_converged,
    learning,
)


def apply_rules(
    layer: LayerFacts, model: ModelFacts, rules: Sequence[Rule] = RULES
) -> tuple[Verdict, str]:
    """The first verdict of ``rules`` for ``layer``, and the rule's name.

    Sentences that hold whatever the status (partly dead units, a fading signal through
    time, the module whose forward uses the parameters) are added to the reason.
    """
    for rule in rules:
        verdict = rule(layer, model)
        if verdict is not None:
            break
    else:  # pragma: no cover - ``learning`` always answers
        verdict, rule = learning(layer, model), learning
    notes = _notes(layer, model, verdict.status)
    if notes:
        verdict = Verdict(verdict.status, verdict.reason + " " + " ".join(notes), verdict.advice)
    return verdict, rule.__name__


def _notes(layer: LayerFacts, model: ModelFacts, status: str) -> list[str]:
    if status == "nonfinite":
        return []  # its numbers are NaN/Inf: no sentence built on them holds
    notes = []
    product = _lr_lambda(layer, model)
    if product is not None and product > model.th.unstable and status != "exploding":
        notes.append(_edge_note(product, model))
    overshoot = model.overshoot
    if model.trial is not None and not model.trial.blew_up:
        overshoot = None  # the trial's steps did not blow up
    if overshoot is not None and status != "exploding":
        notes.append(
            f"The step as a whole overshoots: lr·‖g‖² is {overshoot:.3g} times the loss "
            "(see the exploding layers)."
        )
    if layer.used_by is not None:
        notes.append(
            f"Its parameters are used directly by {display_name(layer.used_by)} rather than "
            "through a call of the module, so that module's signal stands in for it."
        )
    if layer.zero_weight and status not in ("dead", "frozen"):
        notes.append(
            "Its weight is exactly zero (zero-initialized): its output carries nothing yet "
            "and the layers before it get no signal through it, until its first update."
            if "weight" in layer.params or not layer.params
            else f"Its gate ({', '.join(layer.params)}) is exactly zero (zero-initialized): "
            "the branch it gates carries nothing yet and passes no signal back, until its "
            "first update."
        )
    if layer.stack_fade is not None and status not in ("frozen", "vanishing", "dead"):
        low, high, r = layer.stack_fade
        notes.append(
            f"Its stacked layers learn unevenly: its layer {low} gets {r:.1e} of the "
            f"scale-free gradient of its layer {high}, so layer {low} barely moves: the "
            "signal fades through its own stack."
        )
    if layer.idle_experts and status != "frozen":
        idle = layer.idle_experts
        listed = ", ".join(map(str, idle[:8])) + (" …" if len(idle) > 8 else "")
        notes.append(
            f"{len(idle)} of its {layer.experts} experts ({listed}) get exactly zero gradient: "
            "the router sends them no token of this batch, so they learn nothing from it (a "
            "load-balancing loss on the router spreads the tokens)."
        )
    frac = layer.dead_fraction
    if status not in ("dead", "frozen", "converged") and frac >= 1:
        notes.append(
            f"All of the units after it ({layer.activation_name}) are flat on every sample of "
            "the batch."
        )
    elif status not in ("dead", "frozen", "converged") and frac >= model.th.partly_dead:
        notes.append(
            f"Partly dead: {_share(frac)} of the units after it ({layer.activation_name}) "
            f"never activate on the batch; the other {_share(1 - frac)} pass the signal and "
            "learn."
        )
    if (
        status not in ("vanishing", "dead", "frozen")
        and layer.rel_sens is not None
        and layer.rel_sens < model.th.vanishing
        and not layer.last
        and not _starved(layer, model.th)
    ):
        share = (
            f"the loss's sensitivity to its output is {layer.rel_sens:.1e} of the largest, "
            f"while earlier layers get up to {layer.upstream_sens:.1e} of it"
        )
        if model.traits.has_residual or any("ttention" in s.module_type for s in model.ran):
            notes.append(
                f"Little of the signal enters its branch: {share} through another path (a "
                "skip connection, or attention's value path beside its queries and keys), so "
                "the signal is not lost on the way back."
            )
        else:  # a plain stack: no other path, the signal grows again past it
            notes.append(
                f"Little of the signal arrives here: {share} (the backward signal grows again "
                "on its way back past this layer), so it is not lost."
            )
    fade = _time_fade(layer, model.th)
    if fade is not None and status != "vanishing":
        notes.append(
            f"Through time the signal fades: at time step 1 of {fade.steps} it is "
            f"{fade.first:.1e} of the strongest step's (below {model.th.time_vanishing:g} "
            f"before step {fade.lost_at}), so the loss reaches only the later steps"
            + (
                f"; where its inputs are, it reaches {fade.reach:.1e} of the strongest."
                if fade.weighted
                else "."
            )
        )
    return notes


def _edge_note(product: float, model: ModelFacts) -> str:
    """lr·λmax above ``th.unstable`` (2) for a layer that is not exploding."""
    trial = model.trial
    oscillates = (
        f"lr·λmax = {one_decimal(product)} is above {model.th.unstable:g}, so gradient descent "
        "oscillates along this block's sharpest direction"
    )
    if trial is not None and trial.blew_up:
        return (
            f"For this block {oscillates}, but the instability that blows up SGD here is "
            "carried by other layers (see the exploding ones)."
        )
    if trial is not None:
        return (
            f"At the edge of stability: {oscillates}, yet {trial.describe()}: "
            f"{trial.outcome(model.baseline, model.th.plateau)}. A divergence can still start "
            "later, as training raises the curvature: watch the loss."
        )
    return f"At the edge of stability: {oscillates} (expect an early bump in the loss)."


def _share(fraction: float) -> str:
    """A fraction strictly between 0 and 1 as a percentage that is never 0% or 100%."""
    if fraction < 0.005:
        return "under 1%"
    if fraction > 0.995:
        return "over 99%"
    return f"{fraction:.0%}"


@dataclass(frozen=True)
class _Fade:
    first: float  # the first step's signal over the strongest step's
    reach: float  # the input-weighted signal over the strongest step's (``first`` if unknown)
    weighted: bool  # whether ``reach`` is weighted by the inputs' norms
    lost_at: int  # the last step, counted from 1, whose signal is below the threshold, + 1
    steps: int


def _time_fade(layer: LayerFacts, th: Thresholds) -> _Fade | None:
    """How far back through time the signal reaches, if it fades below
    ``th.time_vanishing`` of the strongest step's before the first step.

    The *reach* weights each step's share of the signal by the norm of the layer's input
    at that step, Σ_t ‖x_t‖·g_t / (max_t g_t · Σ_t ‖x_t‖) with g_t = ‖∂L/∂x_t‖: a signal
    that fades before steps whose inputs are zero loses nothing.
    """
    sig = layer.signal
    steps = sig.time_signal_norms if sig is not None and layer.used_by is None else None
    if not steps or len(steps) < 2 or not max(steps) > 0:
        return None
    top = max(steps)
    first = steps[0] / top
    if not first < th.time_vanishing:
        return None
    lost = [t for t, s in enumerate(steps, start=1) if s < th.time_vanishing * top]
    inputs = layer.time_input_norms
    weighted = inputs is not None and len(inputs) == len(steps) and sum(inputs) > 0
    if weighted:
        assert inputs is not None
        reach = sum(c * g for c, g in zip(inputs, steps, strict=True)) / (top * sum(inputs))
    else:
        reach = first
    return _Fade(first, reach, weighted, lost[-1] + 1 if lost else 1, len(steps))


def _grows_back(ran: Sequence[ModuleSignal], i: int, min_chain: int) -> bool:
    """Whether the backward signal grows at every one of ``min_chain`` or more layers
    between layer i and the output: "layer after layer", not one outsized layer."""
    norms = [s.signal_norm for s in ran[i:] if s.signal_norm]
    if len(norms) <= min_chain or len(norms) < len(ran) - i:
        return False
    return all(a > b for a, b in itertools.pairwise(norms))


def _headroom_note(layer: LayerFacts) -> str:
    if layer.headroom is not None:
        if layer.headroom >= 1:
            return (
                "a Newton step on this layer alone would, by its quadratic model, win all of "
                "the loss"
            )
        return f"a Newton step on this layer alone would win {layer.headroom:.1e} of the loss"
    if layer.g_rel is None and set(layer.params) - set(layer.zero_params):
        return (
            f"its gradient is on its {', '.join(layer.zero_params)}, exactly zero "
            "(zero-initialized), so a relative change of it says nothing; its first update "
            "moves it off zero"
        )
    if layer.g_rel is None:
        return (
            "its parameters are exactly zero (zero-initialized), so a relative change of them "
            "says nothing; its first update moves them off zero"
        )
    return (
        f"a relative change of its weights moves the loss by at most {layer.g_rel:.1e}× its value"
    )


def _step_note(layer: LayerFacts, model: ModelFacts) -> str:
    if layer.step_ratio is None or layer.step is None:
        return ""
    if model.optimizer == "adaptive":
        used = f"the step the optimizer takes along its gradient, {layer.step:.1e}"
    elif model.lr is not None:
        used = f"lr {model.lr:g}"
    else:
        used = f"2/λmax = {layer.step:.1e}, the largest stable step for the whole model"
    return f"its curvature-optimal step is {layer.step_ratio:.1e}× the one it gets ({used})"
