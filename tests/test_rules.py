"""The verdict rules one by one, on synthetic evidence (no model, no autograd).

Each rule of :data:`gradsight.diagnosis.RULES` is a small function of one layer's facts
and the model's; these tests hand it the numbers directly, so that each precedence the
issue tracker found wrong (a solved model called dead, a learning layer called dead,
a used module called "not called", a frozen layer in the model's status, vanishing
through time as a mere sentence) is pinned down where it is decided.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch

from gradsight.diagnosis import RULES, Thresholds
from gradsight.diagnosis.advice import ModelTraits, remedies, vanishing_advice
from gradsight.diagnosis.headroom import BlockCurvature, ModelHeadroom
from gradsight.diagnosis.rules import LayerFacts, ModelFacts, apply_rules
from gradsight.diagnosis.steps import adaptive_step, optimizer_kind
from gradsight.diagnosis.trial import Carrier, Trial
from gradsight.diagnosis.verdict import LayerEvidence, judge, worst_status
from gradsight.probes import ActivationStats, ModuleSignal

TH = Thresholds()


def _act(name: str = "relu", dead: float = 0.0, saturation: float = 0.0) -> ActivationStats:
    return ActivationStats(
        name=name,
        saturation=max(saturation, dead),
        dead_fraction=dead,
        mean_derivative=0.5,
        rms_derivative=0.7,
        max_derivative=1.0,
    )


def _signal(name: str, norm: float | None = 1.0, **kw) -> ModuleSignal:  # type: ignore[no-untyped-def]
    return ModuleSignal(
        name=name,
        module_type="Linear",
        calls=1,
        signal_norm=norm,
        input_signal_norm=kw.pop("input_norm", norm),
        output_norm=kw.pop("output_norm", 1.0),
        activation=kw.pop("activation", None),
        time_signal_norms=kw.pop("time", None),
    )


def _model(**kw) -> ModelFacts:  # type: ignore[no-untyped-def]
    base = dict(
        th=TH,
        loss=2.3,
        baseline=2.3,
        plateau=True,
        solved=False,
        has_headroom=True,
        headroom=None,
        realized=None,
        lr=None,
        optimizer=None,
        ran=[_signal("0"), _signal("1")],
        s_max=1.0,
        s_out=1.0,
        traits=ModelTraits(),
    )
    base.update(kw)
    return ModelFacts(**base)  # type: ignore[arg-type]


def _layer(**kw) -> LayerFacts:  # type: ignore[no-untyped-def]
    base = dict(
        name="0",
        frozen=False,
        grad_norm=0.1,
        grad_finite=True,
        signal=_signal("0"),
        position=0,
        rel_sens=1.0,
        g_rel=0.1,
    )
    base.update(kw)
    return LayerFacts(**base)  # type: ignore[arg-type]


def _verdict(layer: LayerFacts, model: ModelFacts) -> tuple[str, str, tuple[str, ...]]:
    v, _ = apply_rules(layer, model)
    return v.status, v.reason, v.advice


def test_rules_are_declared_in_order_and_end_with_a_default() -> None:
    names = [r.__name__ for r in RULES]
    assert names[:2] == ["nonfinite", "frozen"]
    assert names.index("solved") < names.index("dead") < names.index("vanishing")
    assert names.index("unreached") < names.index("unstable_step")
    assert names[-1] == "learning"


def test_nonfinite_gradient() -> None:
    assert _verdict(_layer(grad_finite=False), _model())[0] == "nonfinite"


def test_frozen_layer_gets_its_own_status_and_stays_out_of_the_models() -> None:
    status, reason, _ = _verdict(_layer(frozen=True, grad_norm=None), _model())
    assert status == "frozen" and "requires_grad=False" in reason
    assert worst_status(["frozen", "converged", "converged"]) == "converged"
    assert worst_status(["frozen", "ok"]) == "ok"


def test_solved_model_has_nothing_dead_or_vanishing() -> None:
    """Issue 12.2: at an L-BFGS optimum half the tanh units are saturated on every
    sample; with the loss at 1e-6 of the constant prediction's it is converged."""
    sat = _act("tanh", dead=0.5)
    layer = _layer(activation=sat, rel_sens=1e-6, g_rel=1e-9)
    model = _model(loss=6e-8, baseline=0.06, plateau=False, solved=True)
    status, reason, _ = _verdict(layer, model)
    assert status == "converged"
    assert "1.0e-06 of the best constant prediction's (6.0e-02)" in reason


def test_partly_dead_layer_that_learns_is_not_dead() -> None:
    """Issue 12.3: 62% dead units, headroom 0.28, gradient 5.7e-2: still learning."""
    layer = _layer(
        activation=_act("relu", dead=0.62),
        grad_norm=5.7e-2,
        headroom=0.28,
        rel_sens=0.3,
    )
    status, reason, _ = _verdict(layer, _model())
    assert status == "ok"
    assert "Partly dead: 62%" in reason and "38%" in reason


def test_dead_layer_neither_learns_nor_passes_a_signal() -> None:
    relu = _act("relu", dead=1.0)
    layer = _layer(
        signal=_signal("0", norm=0.0, activation=relu),
        activation=relu,
        grad_norm=0.0,
        rel_sens=0.0,
        g_rel=0.0,
    )
    status, reason, advice = _verdict(layer, _model())
    assert status == "dead" and "100%" in reason
    assert any("LeakyReLU" in a for a in advice)


def test_mostly_dead_layer_whose_live_units_learn_is_not_dead() -> None:
    layer = _layer(activation=_act("relu", dead=0.9), rel_sens=1e-4, g_rel=1e-2)
    status, reason, _ = _verdict(layer, _model())
    assert status == "vanishing" and "Partly dead: 90%" in reason


def test_module_with_a_gradient_is_never_not_called() -> None:
    """Issue 12.1: MHA's out_proj is used through its weight; gradient 0.27."""
    layer = _layer(name="attn.out_proj", signal=_signal("attn"), used_by="attn", grad_norm=0.27)
    status, reason, _ = _verdict(layer, _model())
    assert status == "ok"
    assert "used directly by attn" in reason
    assert "not called" not in reason
    lone = _layer(signal=None, position=None, rel_sens=None, grad_norm=0.27)
    assert "not called" not in _verdict(lone, _model())[1]


def test_module_the_loss_does_not_depend_on_has_nothing_to_win_and_says_why() -> None:
    """An auxiliary head the loss leaves out: exactly zero gradient, nothing to win. Not
    an alarm (the model's status stays the others'), but the reason says why."""
    uncalled = _layer(signal=None, position=None, rel_sens=None, grad_norm=0.0, g_rel=0.0)
    status, reason, _ = _verdict(uncalled, _model())
    assert status == "converged" and "not called" in reason
    unused = _layer(signal=_signal("head", norm=None), position=None, rel_sens=None, grad_norm=0.0)
    status, reason, advice = _verdict(unused, _model())
    assert status == "converged" and "does not reach the loss" in reason and advice
    assert not re.search(r"[;:,] *\.", reason)


def test_vanishing_through_time_is_a_verdict() -> None:
    """Issue 12.5: 100 steps, the signal at step 1 is 1e-32 of the strongest, the loss
    at the constant prediction's."""
    steps = tuple(10.0 ** (-32 + 32 * t / 99) for t in range(100))
    at_first = tuple([1.0] + [0.0] * 99)  # the input is at step 1 only
    layer = _layer(name="rnn", signal=_signal("rnn", time=steps), time_input_norms=at_first)
    status, reason, advice = _verdict(layer, _model())
    assert status == "vanishing" and "through time" in reason
    assert "1.0e-32" in reason and "100 time steps" in reason
    assert any("LSTM/GRU" in a for a in advice)
    gated = _model(traits=ModelTraits(gated_recurrent=True))
    assert not any("LSTM/GRU" in a for a in _verdict(layer, gated)[2])


def test_fading_before_steps_without_input_is_a_note() -> None:
    """The same fade, but the input sits at the last step: nothing is lost."""
    steps = tuple(10.0 ** (-32 + 32 * t / 99) for t in range(100))
    at_last = tuple([0.0] * 99 + [1.0])
    layer = _layer(name="rnn", signal=_signal("rnn", time=steps), time_input_norms=at_last)
    status, reason, _ = _verdict(layer, _model())
    assert status == "ok" and "Through time the signal fades" in reason


def test_fading_through_time_while_the_model_still_learns_is_a_note() -> None:
    steps = tuple(10.0 ** (-8 + 8 * t / 49) for t in range(50))
    layer = _layer(name="rnn", signal=_signal("rnn", time=steps))
    status, reason, _ = _verdict(layer, _model(realized=0.2))
    assert status == "ok" and "Through time the signal fades" in reason


_BLEW_UP = Trial(lr=0.1, losses=(2.3, 2.1, 9.5), rise=1.2, at=2)
_TRAINS = Trial(lr=0.1, losses=(2.3, 2.0, 1.9, 1.7), rise=1.2, at=None)


def test_unstable_step_only_for_sgd_where_the_trial_blows_up_and_the_layer_carries_it() -> None:
    """Exploding needs evidence that SGD at the lr blows up (the trial) and that this
    layer carries it; lr·λmax alone (50 × 0.1 = 5) decides neither."""
    carrier = Carrier(share=0.6)
    layer = _layer(lambda_max=50.0, carrier=carrier)
    status, reason, _ = _verdict(layer, _model(lr=0.1, trial=_BLEW_UP))
    assert status == "exploding"
    assert "raises the loss from 2.3 to 9.5 (×4.13, above ×1.2) by step 2" in reason
    assert "it holds 60% of the whole model's sharpest direction" in reason
    assert "lr·λmax (the Gauss-Newton matrix's) is 0.1·5.00e+01 = 5.0" in reason
    assert _verdict(layer, _model(lr=0.1, trial=_BLEW_UP, optimizer="adaptive"))[0] != "exploding"
    assert _verdict(layer, _model(lr=0.1, trial=_TRAINS))[0] != "exploding"
    assert _verdict(_layer(lambda_max=50.0), _model(lr=0.1))[0] != "exploding"  # no trial


@pytest.mark.parametrize(
    ("lr_lambda", "trial", "carrier", "status", "note"),
    [
        (1.5, _TRAINS, None, "ok", None),
        (3.0, _TRAINS, None, "ok", "At the edge of stability: lr·λmax = 3.0 is above 2"),
        # A Falcon at lr 1: lr·λmax 5.9 (26 for the whole model), the loss 4.18 → 0.05.
        (45.0, _TRAINS, None, "ok", "yet 3 full-batch SGD steps at lr 0.1 take the loss"),
        (8.0, _BLEW_UP, None, "ok", "carried by other layers"),
        (0.5, _BLEW_UP, Carrier(0.1, alone=34.0), "exploding", None),
    ],
)
def test_a_sharp_block_explodes_only_where_sgd_blows_up_and_it_carries_it(
    lr_lambda: float, trial: Trial, carrier: Carrier | None, status: str, note: str | None
) -> None:
    """Above lr·λmax = 2 gradient descent oscillates along the sharpest direction, but
    training often steadies itself (the catapult phase): a note, with the trial's
    numbers; exploding where the trial blows up and the layer carries it (one step on
    it alone multiplies the loss by 34), whatever its own lr·λmax."""
    layer = _layer(lambda_max=lr_lambda / 0.1, headroom=0.3, carrier=carrier)
    got, reason, _ = _verdict(layer, _model(lr=0.1, trial=trial))
    assert got == status
    if note is None:
        assert "edge of stability" not in reason and "carried by other" not in reason
    else:
        assert note in reason, reason
    if status == "exploding":
        assert "one SGD step on it alone raises the loss ×34" in reason


def test_a_carrier_whose_own_block_is_stable_says_so_with_its_product() -> None:
    """A DistilBERT with weights ×100 at lr 3: the exploding carrier's own block has
    lr·λmax = 3·9.25e-05 = 2.8e-4, which read "= 0.0 (the largest stable step is 2.2e+04)"
    beside "exploding"."""
    layer = _layer(lambda_max=9.25e-5, headroom=0.3, carrier=Carrier(0.6))
    status, reason, _ = _verdict(layer, _model(lr=3.0, trial=_BLEW_UP))
    assert status == "exploding"
    assert "= 2.8e-04" in reason and "= 0.0" not in reason
    assert "stable on its own, it blows up as part of the whole model's sharpest" in reason


def test_vanishing_reason_has_no_dangling_fragments() -> None:
    ran = [_signal("0", output_norm=1e-6), _signal("1")]
    layer = _layer(name="0", signal=ran[0], position=0, rel_sens=1e-6)
    status, reason, _ = _verdict(layer, _model(ran=ran))
    assert status == "vanishing"
    assert not re.search(r"[;:,] *\.|\(\)", reason)


def test_last_layer_never_vanishes() -> None:
    """Its signal is the loss's own: a zero output (an all-zero input and bias) makes
    its sensitivity zero without any signal being lost."""
    ran = [_signal("0"), _signal("1", output_norm=0.0)]
    layer = _layer(name="1", signal=ran[1], position=1, rel_sens=0.0, g_rel=0.0, last=True)
    status, reason, _ = _verdict(layer, _model(ran=ran))
    assert status == "converged" and "last layer" in reason


def test_branch_that_gets_little_signal_while_earlier_layers_get_it_is_not_vanishing() -> None:
    """Attention queries at init: tiny sensitivity, yet the embedding before them gets a
    strong signal through the value path and the residual stream."""
    layer = _layer(name="q", rel_sens=3e-5, upstream_sens=0.5, g_rel=0.01, position=1)
    residual = _model(traits=ModelTraits(has_residual=True))
    status, reason, _ = _verdict(layer, residual)
    assert status == "ok" and "Little of the signal enters its branch" in reason
    assert "a skip connection" in reason
    # A plain stack (four GRUs at weights ×100) has no other path: the signal grows
    # again on its way back past the layer; no skip connection is invented.
    status, reason, _ = _verdict(layer, _model())
    assert status == "ok" and "grows again on its way back" in reason
    assert "skip connection" not in reason
    lost = _layer(name="q", rel_sens=3e-5, upstream_sens=1e-5, g_rel=0.01, position=1)
    assert _verdict(lost, _model())[0] == "vanishing"


def test_converged_by_first_order_alone_says_curvature_was_not_measured() -> None:
    """Without curvature a tiny scale-free gradient cannot tell an optimum from a flat
    start (attention queries and keys at initialization): the reason says so, and only a
    measured Newton decrement makes it "sits at its optimum"."""
    learned = _model(loss=1.0, plateau=False)  # the model has learned something
    first_order = _verdict(_layer(name="q", rel_sens=0.3, g_rel=1e-7, position=1), learned)
    assert first_order[0] == "converged"
    assert "curvature was not measured" in first_order[1] and "curvature=True" in first_order[1]
    measured = _verdict(
        _layer(name="q", rel_sens=0.3, headroom=1e-7, g_rel=1e-7, position=1), learned
    )
    assert measured[0] == "converged"
    assert "sits at its optimum" in measured[1] and "not measured" not in measured[1]


def test_a_hidden_layer_on_a_plateau_is_not_converged_by_first_order_alone() -> None:
    """BERT's queries and keys at initialization, without curvature: scale-free
    gradients of 1e-7 of the loss while the model has learned nothing (loss at the
    constant prediction's). Freezing them keeps the loss flat for 500 AdamW steps, where
    training them halves it by step 300: not an optimum, a flat start. Without a
    measured decrement a hidden layer on the plateau is ``ok`` with the reason why; the
    last layer (its optimum given inputs that carry nothing is the constant prediction)
    and a layer measured with curvature still read converged."""
    q = _layer(name="q", rel_sens=0.3, g_rel=1e-7, position=1)
    status, reason, _ = _verdict(q, _model())
    assert status == "ok" and "learned nothing yet" in reason and "curvature=True" in reason
    assert _verdict(dataclasses.replace(q, last=True), _model())[0] == "converged"
    assert _verdict(dataclasses.replace(q, headroom=1e-7), _model())[0] == "converged"
    # Little signal: the reason does not say the signal reaches it.
    faint = _layer(name="q", rel_sens=1.6e-11, upstream_sens=1.0, g_rel=1e-9, position=1)
    status, reason, _ = _verdict(faint, _model(loss=1.0, plateau=False))
    assert (
        status == "converged" and "little of the signal reaches it (sensitivity 1.6e-11" in reason
    )


def test_a_steep_layer_on_a_plateau_is_not_converged() -> None:
    """GPT-NeoX with its logits ×100: loss 27 against a constant prediction's 4.2, and
    the embedding's Newton step would win 9e-5 of the loss because its curvature is
    steep, while a relative change of its weights moves the loss by 50× its value
    (AdamW on it lowers the loss 27 → 19). A gradient that is not small rules out an
    optimum: it is learning, and the reason says why the decrement is small. Off the
    plateau, or with a small gradient, the same decrement is converged."""
    steep = _layer(name="emb", rel_sens=0.55, headroom=9e-5, g_rel=50.0, position=0)
    status, reason, _ = _verdict(steep, _model(loss=27.2, baseline=4.16, plateau=True))
    assert status == "ok" and "not at its optimum" in reason and "5.0e+01× its value" in reason
    off = _model(loss=1.0, baseline=4.16, plateau=False)
    assert _verdict(steep, off)[0] == "converged"
    small = _layer(name="emb", rel_sens=0.55, headroom=9e-5, g_rel=1e-7, position=0)
    assert _verdict(small, _model(loss=27.2, baseline=4.16, plateau=True))[0] == "converged"


def test_a_zero_gradient_under_a_signal_says_the_input_is_zero_not_an_optimum() -> None:
    """The head of an all-zero language model: the loss's signal reaches its output, yet
    its gradient is exactly zero because its input is (the final LayerNorm's weight is
    zero). It read "a gradient that is small because the layer sits at its optimum"."""
    ran = [_signal("0"), _signal("head", output_norm=0.0)]
    # Under the head's signal, with an exactly zero gradient.
    zero = dict(signal=ran[1], position=1, rel_sens=None, g_rel=0.0, grad_norm=0.0, headroom=0.0)
    status, reason, _ = _verdict(_layer(name="head", last=True, **zero), _model(ran=ran))
    assert status == "converged"
    assert "the input its weights act on carries nothing" in reason
    assert "optimum" not in reason
    # A tied weight the head uses directly: the same, through the module that uses it.
    status, reason, _ = _verdict(_layer(name="shared", used_by="head", **zero), _model(ran=ran))
    assert status == "converged" and "reaches head, which uses its weights" in reason
    assert "optimum" not in reason
    # A head with a bias: its weights see a zero input, its bias is at its optimum (the
    # zoo's cnn-bn sick twin: dead channels before it, balanced labels, a zero bias).
    biased = _layer(name="head", last=True, params=("weight", "bias"), **zero)
    reason = _verdict(biased, _model(ran=ran))[1]
    assert "so they cannot move the loss, and the rest of it (a bias) sits at its optimum" in reason


def test_vanishing_needs_headroom_of_its_own_when_measured() -> None:
    layer = _layer(rel_sens=1e-6, headroom=1e-7, g_rel=1e-7)
    assert _verdict(layer, _model())[0] == "converged"
    assert _verdict(_layer(rel_sens=1e-6, headroom=0.2), _model())[0] == "vanishing"


def test_headroom_share_is_at_most_one_in_words() -> None:
    layer = _layer(headroom=1.0)
    reason = _verdict(layer, _model(plateau=False))[1]
    assert "all of the loss" in reason and "1.0e+00 of the loss" not in reason


@pytest.mark.parametrize(
    ("traits", "absent"),
    [
        (ModelTraits(activations=frozenset({"relu"})), "non-saturating activation"),
        (ModelTraits(activations=frozenset({"sigmoid"}), has_norm=True), "Add normalization"),
        (ModelTraits(activations=frozenset({"sigmoid"}), has_residual=True), "residual"),
        (ModelTraits(activations=frozenset({"gelu"})), "LeakyReLU/GELU"),
    ],
)
def test_advice_never_proposes_what_the_model_already_does(traits, absent) -> None:  # type: ignore[no-untyped-def]
    act = next(iter(traits.activations))
    ran = [
        _signal(str(i), norm=0.1**i, activation=_act(act, dead=0.3, saturation=0.6))
        for i in range(5)
    ][::-1]
    advice = vanishing_advice(ran, 0, traits, alpha_spread=4.0)
    assert advice and not any(absent in a for a in advice)
    assert not any("0% saturated" in a or " 0 decades" in a for a in advice)


def test_no_normalization_advice_without_saturation() -> None:
    ran = [_signal(str(i), norm=0.1**i, activation=_act("sigmoid")) for i in range(4)][::-1]
    advice = vanishing_advice(ran, 0, ModelTraits(frozenset({"sigmoid"})), 0.0)
    assert advice and not any("normalization" in a for a in advice)


def test_a_layer_that_predicts_more_than_the_whole_model_is_explained() -> None:
    """GPT-2 with its weights ×100: the final LayerNorm's own Newton step predicts 0.73 of
    the loss (ground truth: scaling that layer alone by 0.01 takes the loss 27.8 → 4.2),
    while the whole network's, damped relative to its sharpest curvature, predicts
    0.0014. The summary does not leave the two side by side unexplained: it names the
    layer and says why the whole model's is smaller; the model's headroom stays its own
    (a layer's quadratic model can be as far off: an LSTM embedding's 0.47 moved the
    loss by 1%)."""
    curv = {
        "h": BlockCurvature(lambda_max=1e6, alpha_star=1e-6, decrement=1e-5, loss=27.8, matvecs=0),
        "ln_f": BlockCurvature(
            lambda_max=1.0, alpha_star=1.0, decrement=20.3, loss=27.8, matvecs=0
        ),
    }
    whole = ModelHeadroom(lambda_max=1e6, decrement=0.039, loss=27.8, realized=0.0)
    ev = [_evidence("h", 1e-3), _evidence("ln_f", 1.0)]
    layers, _, summary = judge(ev, loss=27.8, baseline_loss=30.0, curvature=curv, model=whole)
    assert "predicts a decrease of 0.0014× the loss" in summary
    assert "A Newton step on ln_f alone predicts more, 0.73× the loss" in summary
    assert "its damping is relative to its own curvature" in summary
    assert [layer.status for layer in layers] == ["converged", "ok"]  # h: its own headroom
    # Where the whole model's step wins the most, nothing is added.
    whole_wins = dataclasses.replace(whole, decrement=25.0)
    _, _, summary = judge(ev, loss=27.8, baseline_loss=30.0, curvature=curv, model=whole_wins)
    assert "alone predicts more" not in summary
    # Nor where the whole model's quadratic model already predicts all of the loss.
    overshoots = dataclasses.replace(whole, decrement=40.0)
    big = {**curv, "ln_f": dataclasses.replace(curv["ln_f"], decrement=400.0)}
    _, _, summary = judge(ev, loss=27.8, baseline_loss=30.0, curvature=big, model=overshoots)
    assert "all of the loss" in summary and "alone predicts more" not in summary


def test_a_stuck_layer_is_held_by_the_zero_weights_of_its_closest_enclosing_module() -> None:
    """Qwen3 with every norm zeroed: a key projection is held at zero by its attention's
    q/k norms (the one after it, which position alone misses), an MLP projection by its
    block's post-attention norm, not by the attention's norms; a flat model's layer by
    the nearest zero weight before it."""
    from gradsight.diagnosis.verdict import _held_by

    block = "model.layers.0."
    holders = [
        (1, block + "self_attn.q_norm"),
        (3, block + "self_attn.k_norm"),
        (7, block + "post_attention_layernorm"),
        (12, "model.layers.1.post_attention_layernorm"),
    ]
    assert _held_by(block + "self_attn.k_proj", 2, holders) == (
        block + "self_attn.q_norm",
        block + "self_attn.k_norm",
    )
    assert _held_by(block + "mlp.gate_proj", 8, holders) == (block + "post_attention_layernorm",)
    assert _held_by(block + "self_attn.k_norm", 3, holders) == (block + "self_attn.k_norm",)
    flat = [(1, "1"), (5, "5")]
    assert _held_by("3", 3, flat) == ("1",) and _held_by("0", 0, flat) == ()


def test_the_edge_of_chaos_is_advised_to_saturating_networks_only() -> None:
    """An unstable step in a SiLU transformer at its standard init (the lr is the fault)
    is not told to initialize at tanh's edge of chaos; a tanh network is."""
    silu, tanh = ModelTraits(frozenset({"silu"})), ModelTraits(frozenset({"tanh"}))
    assert not any("tanh" in a or "edge of chaos" in a for a in remedies("unstable_step", silu))
    assert any("edge of chaos" in a for a in remedies("unstable_step", tanh))
    assert remedies("unstable_step", silu)[0].startswith("Lower the learning rate")


def _evidence(name: str, grad: float, **kw) -> LayerEvidence:  # type: ignore[no-untyped-def]
    return LayerEvidence(
        name=name,
        module_type="Linear",
        signal=kw.pop("signal", _signal(name)),
        grad_norms={"weight": grad},
        param_norms={"weight": 1.0},
        **kw,
    )


def test_summary_names_the_root_module_and_reads_the_right_way_round() -> None:
    layers, _, summary = judge([_evidence("", 1e-9)], loss=2e-4, baseline_loss=20.0, curvature={})
    assert layers[0].status == "converged"
    assert "(model)" in summary and "Layer :" not in summary and "Layers :" not in summary
    assert "1.0e-05 of the best constant prediction's" in summary
    assert "below" not in summary


def test_plateau_sentence_agrees_with_its_numbers() -> None:
    _, _, summary = judge([_evidence("0", 0.1)], loss=7.66, baseline_loss=7.62)
    assert "The loss 7.66 is no better than predicting a constant (7.62)" in summary
    _, _, summary = judge([_evidence("0", 0.1)], loss=2.25, baseline_loss=2.30)
    assert "no better than" not in summary and "within 2%" in summary
    # A hair below the constant is not "within 0%" (seen mid-training on BERT).
    _, _, summary = judge([_evidence("0", 0.1)], loss=4.150, baseline_loss=4.162)
    assert "within 0.3% of the loss of predicting a constant" in summary
    _, _, summary = judge([_evidence("0", 0.1)], loss=4.1619, baseline_loss=4.162)
    assert "within 0.1% of" in summary
    # Far worse than the constant: said as a ratio (GPT-2 with its weights ×100).
    _, _, summary = judge([_evidence("0", 0.1)], loss=27.8, baseline_loss=4.47)
    assert "The loss 27.8 is 6.22× that of predicting a constant (4.47)" in summary


def test_adaptive_step_ratio_compares_with_the_step_taken() -> None:
    """Issue 12.7: with Adam the step ratio divides by the step Adam takes along the
    gradient, not by its raw lr."""
    curv = {
        "0": BlockCurvature(lambda_max=10.0, alpha_star=0.05, decrement=0.1, loss=1.0, matvecs=0)
    }
    ev = [_evidence("0", 1e-3, step=0.04)]
    layers, _, _ = judge(
        ev,
        loss=1.0,
        baseline_loss=2.0,
        lr=0.003,
        curvature=curv,
        traits=ModelTraits(optimizer="adaptive"),
    )
    assert layers[0].step_taken == 0.04
    assert layers[0].step_ratio == pytest.approx(0.05 / 0.04)
    assert "lr 0.003" not in layers[0].reason
    other, _, _ = judge(
        ev,
        loss=1.0,
        baseline_loss=2.0,
        lr=0.003,
        curvature=curv,
        traits=ModelTraits(optimizer="other"),
    )
    assert other[0].step_ratio is None


@pytest.mark.parametrize("steps_before", [0, 3])
def test_adaptive_step_matches_the_update_adam_takes(steps_before: int) -> None:
    """α_eff = gᵀΔ/gᵀg against the change a real Adam step makes (β1 = 0, so that its
    update is the preconditioned gradient itself), the optimizer left untouched."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=0.01, betas=(0.0, 0.999))
    for _ in range(steps_before):
        w.grad = torch.randn(20, dtype=torch.float64)
        opt.step()
    g = torch.randn(20, dtype=torch.float64) * 1e-3
    state = copy.deepcopy(opt.state_dict())
    predicted = adaptive_step(opt, [w], {id(w): g})
    assert opt.state_dict()["state"].keys() == state["state"].keys()
    before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    delta = before - w.detach()
    assert predicted == pytest.approx(float(g @ delta / (g @ g)), rel=1e-9)
    assert optimizer_kind(opt) == "adaptive"
    assert optimizer_kind(torch.optim.SGD([w], lr=0.1)) == "sgd"


def test_a_layer_blocked_by_a_zero_initialized_one_is_ok_not_converged() -> None:
    """Exactly zero gradient and signal because a later layer's weight is exactly zero
    and that layer gets a gradient (a zero-initialized residual branch): its first update
    opens the path, so the layer is ``ok`` and the reason names the layer and why."""
    blocked = _layer(
        signal=_signal("0", norm=0.0),
        grad_norm=0.0,
        rel_sens=0.0,
        g_rel=0.0,
        headroom=0.0,
        upstream_sens=1.0,
        blocked_by=("blocks.0.fc2", 0.14, "after"),
    )
    status, reason, _ = _verdict(blocked, _model())
    assert status == "ok" and reason.startswith("no signal yet")
    assert "blocks.0.fc2 after it" in reason and "exactly zero" in reason and "1.4e-01" in reason
    # Its input exactly zero, from a zero-weight layer before it (a zeroed final norm
    # before the output layer): the same, said the other way round.
    fed = dataclasses.replace(
        blocked, signal=_signal("0", norm=1.0), blocked_by=("ln_f", 0.02, "before")
    )
    status, reason, _ = _verdict(fed, _model())
    assert status == "ok" and reason.startswith("no input yet") and "ln_f before it" in reason
    # Held by a zero gate (ReZero's α, Mllama's cross-attention gates): said as a gate.
    gated = dataclasses.replace(blocked, blocked_by=("blocks.0", 0.3, "gating"))
    status, reason, _ = _verdict(gated, _model(zero_gates=frozenset({"blocks.0"})))
    assert status == "ok" and reason.startswith("no signal yet")
    assert "the gate of blocks.0, which gates it, is exactly zero" in reason
    gate = _layer(name="blocks.0", zero_weight=True, params=("alpha",))
    assert "Its gate (alpha) is exactly zero" in _verdict(gate, _model())[1]
    # The same facts with nothing to open the path: the loss does not depend on it.
    status, reason, _ = _verdict(dataclasses.replace(blocked, blocked_by=None), _model())
    assert status == "converged" and "no backward signal reaches it" in reason
    assert "the signal reaches it" not in reason


def test_a_layer_held_at_zero_by_a_stuck_zero_weight_is_dead() -> None:
    """Exactly zero gradient that stays zero over a few gradient steps, held by a
    trainable weight of exactly zero that gets no gradient either (a gated MLP behind a
    zero norm): dead, naming that weight, with the norm's fix first; held by a frozen
    parameter of exactly zero (ReZero's α frozen at zero), dead even where no signal
    reaches it, naming the parameter and unfreezing it first. Without such a holder (a
    loss that weighs it 0: the loss does not depend on it whatever training does) or
    where a lost signal starves it with nothing to open the path, the verdict is the
    one-pass one; a "no signal yet" that the steps refuted is not given."""
    gate = _layer(
        name="mlp.gate",
        signal=_signal("mlp.gate", norm=0.0, output_norm=0.0),
        grad_norm=0.0,
        rel_sens=0.0,
        g_rel=0.0,
        position=3,
        upstream_sens=1.0,
        stuck=True,
        stuck_by=("mlp_norm",),
    )
    status, reason, advice = _verdict(gate, _model(zero_norms=frozenset({"mlp_norm"})))
    assert status == "dead" and "held there by the weight of mlp_norm, which is exactly" in reason
    assert "no optimizer step moves it" in reason and "5 small gradient steps" in reason
    assert advice[0].startswith("Initialize the normalization weight of mlp_norm to 1")
    norm = dataclasses.replace(gate, name="mlp_norm", stuck_by=("mlp_norm",))
    status, reason, _ = _verdict(norm, _model(zero_norms=frozenset({"mlp_norm"})))
    assert status == "dead" and reason.startswith("its weight is exactly zero and so is its")
    # A later zero-weight layer would open the path now, but the steps showed it stuck.
    waiting = dataclasses.replace(gate, blocked_by=("model.norm", 0.02, "after"))
    assert _verdict(waiting, _model())[0] == "dead"
    # No stuck zero weight holds it: the one-pass verdicts.
    assert _verdict(dataclasses.replace(gate, stuck_by=()), _model())[0] == "converged"
    assert _verdict(dataclasses.replace(gate, stuck=False, stuck_by=()), _model())[0] == (
        "converged"
    )
    starved = dataclasses.replace(gate, upstream_sens=0.0)
    assert _verdict(starved, _model())[0] == "vanishing"
    frozen = dataclasses.replace(starved, stuck_by=("blocks.0.alpha",))
    status, reason, advice = _verdict(frozen, _model(frozen_zeros=frozenset({"blocks.0.alpha"})))
    assert status == "dead" and "held there by blocks.0.alpha, frozen (requires_grad=False)" in (
        reason
    )
    assert "nothing passes through it" in reason
    assert advice[0].startswith("Unfreeze blocks.0.alpha (requires_grad=True)")
    pair = ("blocks.0.attn_gate", "blocks.0.mlp_gate")
    status, reason, advice = _verdict(
        dataclasses.replace(frozen, stuck_by=pair), _model(frozen_zeros=frozenset(pair))
    )
    assert status == "dead" and "blocks.0.attn_gate and blocks.0.mlp_gate, frozen" in reason
    assert "nothing passes through them" in reason and "the layers they hold" in advice[0]


def test_vanishing_is_not_excused_by_the_headroom_of_an_exactly_zero_gradient() -> None:
    """At an exactly zero gradient the Newton decrement is 0/0, not "nothing to win": a
    layer whose signal is exactly lost while the model has headroom is vanishing."""
    layer = _layer(
        signal=_signal("0", norm=0.0), grad_norm=0.0, rel_sens=0.0, g_rel=0.0, headroom=0.0
    )
    status, reason, _ = _verdict(layer, _model())
    assert status == "vanishing" and "exactly zero" in reason


def test_an_sgd_step_that_overshoots_by_first_order_is_exploding() -> None:
    """lr·‖g‖² far above a nonnegative loss: the linear model of the step goes below
    zero (past Polyak's step), whatever the curvature says (0 at saturated outputs). The
    layers carrying the step are exploding, the others say so in a note; not judged for
    an adaptive optimizer, nor without a positive baseline (a loss that may be negative)."""
    model = _model(lr=0.01, loss=388.0, baseline=1.34, grad_sq=13 * 1.5e4, grad_layers=13)
    big = _layer(grad_norm=math.sqrt(1.5e4), lambda_max=0.0, headroom=1.0)
    status, reason, advice = _verdict(big, model)
    assert status == "exploding" and "lr·‖g‖² is 5.03 times the loss" in reason
    assert "Polyak's step L/‖g‖² is 2.0e-03" in reason and advice[0].startswith("Lower")
    small = _layer(grad_norm=1.0, lambda_max=0.0, headroom=1.0)
    status, reason, _ = _verdict(small, model)
    assert status != "exploding" and "The step as a whole overshoots" in reason
    for other in (
        dataclasses.replace(model, optimizer="adaptive"),
        dataclasses.replace(model, baseline=None),
        dataclasses.replace(model, lr=0.001),  # 0.5 times the loss: no overshoot
    ):
        status, reason, _ = _verdict(big, other)
        assert status != "exploding" and "overshoots" not in reason
    # Where the SGD trial ran and did not blow up, the first-order view is refuted.
    trained = dataclasses.replace(model, trial=_TRAINS)
    assert _verdict(big, trained)[0] != "exploding"
    assert _verdict(big, dataclasses.replace(model, trial=_BLEW_UP))[0] == "exploding"


def test_a_tied_weight_counts_once_in_the_step_s_first_order_effect() -> None:
    """lr·‖g‖² sums each parameter once: a weight tied between an embedding and the
    output layer is listed by both modules but is one parameter of the step."""
    sig = [_signal("emb"), _signal("head")]
    evidence = [
        LayerEvidence("emb", "Embedding", sig[0], {"weight": 3.0}, {"weight": 1.0}),
        LayerEvidence(
            "head", "Linear", sig[1], {"weight": 3.0}, {"weight": 1.0}, shared=frozenset({"weight"})
        ),
    ]
    # Once, lr·‖g‖² is 0.1·9 = 1.8 times the loss 0.5 (below 2); twice, it would be 3.6.
    layers, _, _ = judge(evidence, loss=0.5, baseline_loss=1.0, lr=0.1)
    assert all(layer.status != "exploding" for layer in layers)
    assert not any("overshoots" in layer.reason for layer in layers)


def test_a_nonfinite_layer_gets_no_note_built_on_its_numbers() -> None:
    """A NaN gradient's reason said "Partly dead: 100% … the other 0% pass the signal"
    and "earlier layers get up to nan of it": notes quote numbers, which are NaN/Inf."""
    layer = _layer(
        grad_finite=False,
        activation=_act("relu", dead=1.0),
        rel_sens=math.nan,
        upstream_sens=math.nan,
    )
    status, reason, _ = _verdict(layer, _model())
    assert status == "nonfinite"
    assert "Partly dead" not in reason and "Little of the signal" not in reason


@pytest.mark.parametrize(
    ("dead", "words"),
    [(0.997, ("over 99%", "under 1%")), (1.0, ("All of the units after it",))],
)
def test_a_dead_share_near_one_is_never_written_as_a_whole_or_nothing(
    dead: float, words: tuple[str, ...]
) -> None:
    """ "Partly dead: 100% … the other 0% pass the signal and learn" contradicted itself."""
    layer = _layer(activation=_act("relu", dead=dead), grad_norm=5e-2, headroom=0.3)
    status, reason, _ = _verdict(layer, _model())
    assert status == "ok"
    assert all(w in reason for w in words), reason
    assert "100%" not in reason and " 0% " not in reason


def test_a_zero_initialized_layer_is_not_converged_on_its_zero_scale_free_gradient() -> None:
    """All its parameters exactly zero while it gets a gradient: ‖g‖·‖p‖ = 0 says nothing
    (DeiT's class token and position embeddings read "converged … at its optimum")."""
    status, reason, _ = _verdict(_layer(g_rel=None), _model(plateau=False))
    assert status == "ok"
    assert "exactly zero (zero-initialized)" in reason
    assert _verdict(_layer(g_rel=1e-9), _model(plateau=False))[0] == "converged"


def test_a_signal_that_dies_inside_the_layer_makes_it_dead() -> None:
    """A router whose softmax is saturated: the signal reaches its output, yet its
    gradient and the signal at its input are exactly zero. An exactly zero input gives
    the same zero gradient but passes the signal back to that input: converged, as
    before, with the input named. A solved model has nothing dead."""
    router = _layer(
        name="mlp.gate",
        signal=_signal("mlp.gate", norm=7e-5, input_norm=0.0),
        grad_norm=0.0,
        g_rel=0.0,
        rel_sens=1e-3,
        position=1,
    )
    status, reason, advice = _verdict(router, _model())
    assert status == "dead" and reason.startswith("a backward signal reaches its output (7.0e-05)")
    assert "its gradient and the signal at its input are exactly zero" in reason
    assert "load-balancing loss" in advice[0]
    fed_zero = dataclasses.replace(router, signal=_signal("mlp.gate", norm=7e-5, input_norm=0.3))
    status, reason, _ = _verdict(fed_zero, _model())
    assert status == "converged" and "the input its weights act on carries nothing" in reason
    unmeasured = dataclasses.replace(router, signal=_signal("mlp.gate", norm=7e-5, input_norm=None))
    assert _verdict(unmeasured, _model())[0] == "converged"
    assert _verdict(router, _model(solved=True))[0] == "converged"


def test_a_growing_signal_is_exploding_unless_sgd_was_tried_and_does_not_blow_up() -> None:
    """The backward signal grows at every later layer (four saturating recurrent layers
    at weights ×100 amplify it ×4e8): exploding by signal flow alone, but where SGD at the
    lr was tried (one step without curvature, twenty with it) and does not blow up, the
    trial decides (ground truth for that stack: 100 SGD steps take its loss 127 → 61)."""
    ran = [_signal(str(i), norm=10.0 ** (4 - i)) for i in range(5)]
    layer = _layer(signal=ran[0], position=0, rel_sens=1.0)
    facts = _model(ran=ran, s_max=ran[0].sensitivity, s_out=ran[-1].sensitivity, lr=1.0)
    assert _verdict(layer, facts)[0] == "exploding"
    assert _verdict(layer, dataclasses.replace(facts, trial=_BLEW_UP))[0] == "exploding"
    assert _verdict(layer, dataclasses.replace(facts, trial=_TRAINS))[0] != "exploding"


def test_a_signal_amplified_overall_names_the_fall_that_starves_a_layer() -> None:
    """Four GRUs at weights ×100 after an embedding: from the head back the signal grows
    ×1.6e3 overall, yet it falls ×4e-4 inside the first GRU, back to the embedding, which
    is vanishing. The reason said only "amplified"; it names the fall too. A chain that
    is attenuated overall names its largest fall as before."""
    from gradsight.diagnosis.chain import chain_cause

    grown = [
        _signal("embed", norm=1.6e3),
        *[_signal(f"g{i}", norm=10.0 ** (7 - i)) for i in range(4)],
    ]
    grown.append(_signal("head", norm=1.0))
    text = chain_cause(grown, 0)
    assert "amplified ×1.6e+03" in text
    assert "yet the largest single fall, ×1.6e-04, is from layer g0 back to layer embed" in text
    fading = [_signal(str(i), norm=10.0 ** (-4 + i)) for i in range(5)]
    text = chain_cause(fading, 0)
    assert "attenuated" in text and "; the largest single fall" in text and "yet" not in text
