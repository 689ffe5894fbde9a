"""Verdicts on the reference cases, their invariances, and signal-propagation theory."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsight
from contradictions import contradictions
from gradsight.demo.cases import REFERENCE_CASES, ReferenceCase
from gradsight.demo.models import mlp
from gradsight.probes import SignalProbe
from gradsight.theory import mean_field

ce = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def diagnosed() -> dict[str, gradsight.Diagnosis]:
    out = {}
    for case in REFERENCE_CASES:
        built = case.build()
        out[case.key] = gradsight.diagnose(built.model, built.batch, built.loss_fn, lr=built.lr)
    return out


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.key)
def test_reference_case(case: ReferenceCase, diagnosed: dict[str, gradsight.Diagnosis]) -> None:
    d = diagnosed[case.key]
    got = {name: d.layer(name).status for name in case.expect}
    assert got == case.expect, (case.title, [(la.name, la.status, la.reason) for la in d.layers])
    assert not [la.name for la in d.layers if la.status in case.forbid], str(d)
    for layer in d.layers:
        assert layer.status in gradsight.STATUSES and layer.reason
    assert contradictions(d) == []


def test_vanishing_reason_quotes_the_chain_and_the_step(diagnosed) -> None:
    first = diagnosed["sigmoid-sgd"].layer("0")
    assert "sigmoid derivatives average" in first.reason
    assert "curvature-optimal step is" in first.reason
    # Advice ordered by evidence: the sigmoid derivatives cost most of the signal.
    assert first.advice[0].startswith("Use a non-saturating activation")
    assert "decades" in first.advice[0]
    assert any("curvature-optimal steps span" in a for a in first.advice)
    dead = diagnosed_dead_advice(diagnosed)
    assert dead[0].startswith("Lower the learning rate")


def diagnosed_dead_advice(diagnosed: dict[str, gradsight.Diagnosis]) -> list[str]:
    return diagnosed["relu-dead"].layer("0").advice


def test_step_ratios_span_orders_of_magnitude_in_the_sigmoid_mlp(diagnosed) -> None:
    ratios = [la.step_ratio for la in diagnosed["sigmoid-sgd"].layers]
    assert all(r is not None and r > 0 for r in ratios)
    assert max(ratios) / min(ratios) > 1e6  # type: ignore[type-var, operator]
    # The early layers need far larger steps than the output layer gets.
    assert ratios[0] > 1e6 * ratios[-1]  # type: ignore[operator]


def test_plateau_counts_as_headroom_where_one_step_does_not(diagnosed) -> None:
    d = diagnosed["sigmoid-sgd"]
    assert d.plateau
    # A local damped Gauss-Newton step realizes almost nothing on held-out data...
    assert d.realized_decrease is not None and d.realized_decrease < 0.05
    # ...yet the model is stalled, not converged.
    assert d.status == "vanishing"


@pytest.mark.parametrize(("lr", "exploding"), [(1e-3, False), (0.1, False), (1.0, True)])
def test_exploding_only_at_a_learning_rate_where_sgd_blows_up(lr: float, exploding: bool) -> None:
    """The chaotic tanh net: at lr 0.1 layer 0's lr·λmax is 48, yet full-batch SGD takes
    the loss 2.65 → 0.01 (the edge of stability: a note with the trial's numbers); at lr 1
    it diverges (2.65 → 25), and the layer carrying it is exploding: the readout. Ground
    truth, 50 SGD steps with one layer frozen: the readout frozen, the rest trains (2.65 →
    0.08); layer 0 frozen (the largest gradient and share of the sharpest direction,
    which this case used to name), it still blows up (to ~20)."""
    case = next(c for c in REFERENCE_CASES if c.key == "tanh-chaotic")
    built = case.build()
    d = gradsight.diagnose(built.model, built.batch, built.loss_fn, lr=lr)
    first, readout = d.layer("0"), d.layer("40")
    named = [layer.name for layer in d.layers if layer.status == "exploding"]
    assert named == (["40"] if exploding else []), (named, readout.reason)
    if lr == 0.1:
        assert first.lambda_max is not None and lr * first.lambda_max > 2
        assert (
            "At the edge of stability" in first.reason and "take the loss from 2.65" in first.reason
        )
    if exploding:
        assert "full-batch SGD at lr 1 raises the loss" in readout.reason
        assert "with it frozen the same 20 steps train the rest" in readout.reason

        def frozen_run(index: int) -> list[float]:
            model = copy.deepcopy(built.model)
            model[index].requires_grad_(False)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
            losses = []
            for _ in range(50):
                opt.zero_grad()
                loss = built.loss_fn(model(built.batch[0]), built.batch[1])
                losses.append(float(loss))
                loss.backward()
                opt.step()
            return losses

        assert frozen_run(40)[-1] < 0.5 * frozen_run(40)[0]
        assert max(frozen_run(0)) > 5 * frozen_run(0)[0]


# ----------------------------------------------------------------------------- invariances


def _statuses(model: nn.Module, batch, loss_fn) -> list[str]:  # type: ignore[no-untyped-def]
    return [la.status for la in gradsight.diagnose(model, batch, loss_fn).layers]


@pytest.fixture(scope="module")
def sigmoid_case(digits):  # type: ignore[no-untyped-def]
    (x, y), _ = digits
    torch.manual_seed(1)
    model = mlp(8, 32, activation="sigmoid", init="xavier").double()
    batch = (x[:256].double(), y[:256])
    return model, batch, _statuses(model, batch, ce)


@pytest.fixture(scope="module")
def relu_case(digits):  # type: ignore[no-untyped-def]
    (x, y), _ = digits
    torch.manual_seed(2)
    model = mlp(6, 32, activation="relu", init="he").double()
    batch = (x[:256].double(), y[:256])
    return model, batch, _statuses(model, batch, ce)


@settings(max_examples=6, deadline=None)
@given(log_c=st.floats(min_value=-8, max_value=8))
def test_statuses_invariant_to_loss_scale(sigmoid_case, log_c: float) -> None:  # type: ignore[no-untyped-def]
    model, batch, base = sigmoid_case
    assert "vanishing" in base
    c = 10.0**log_c
    assert _statuses(model, batch, lambda o, t: c * ce(o, t)) == base


@settings(max_examples=6, deadline=None)
@given(
    log_k=st.floats(min_value=-3, max_value=3),
    layer=st.sampled_from([0, 2, 4, 6, 8]),
)
def test_statuses_invariant_to_relu_reparametrization(relu_case, log_k: float, layer: int) -> None:  # type: ignore[no-untyped-def]
    model, batch, base = relu_case
    k = 10.0**log_k
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[layer].weight.mul_(k)
        twin[layer].bias.mul_(k)
        twin[layer + 2].weight.div_(k)
    assert torch.allclose(twin(batch[0]), model(batch[0]), rtol=1e-9, atol=1e-9)
    assert _statuses(twin, batch, ce) == base


# ---------------------------------------------------------------------------- mean field


@pytest.mark.parametrize(("sigma_w2", "chi1"), [(1.0, 0.759), (1.761, 1.0), (4.0, 1.342)])
def test_measured_attenuation_matches_mean_field(sigma_w2: float, chi1: float) -> None:
    theory = mean_field("tanh", sigma_w2, 0.05)
    assert theory.chi1 == pytest.approx(chi1, abs=1e-3)  # DESIGN.md's values
    width, depth = 512, 16
    measured = []
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(depth):
            lin = nn.Linear(width, width)
            with torch.no_grad():
                lin.weight.normal_(0, math.sqrt(sigma_w2 / width), generator=gen)
                lin.bias.normal_(0, math.sqrt(0.05), generator=gen)
            layers += [lin, nn.Tanh()]
        layers.append(nn.Linear(width, width))
        model = nn.Sequential(*layers)
        x = torch.randn(64, width, generator=gen) * math.sqrt(theory.q_star)
        with SignalProbe(model, activations=False) as probe:
            out = model(x)
            (out * torch.randn(out.shape, generator=gen)).sum().backward()
        s = [m.signal_norm for m in probe.result().modules]
        # Skip the first layers (q converging to q*); per-layer factor of ‖δ‖².
        logs = [2 * math.log(s[i] / s[i + 1]) for i in range(4, depth - 1)]  # type: ignore[operator]
        measured.append(math.exp(sum(logs) / len(logs)))
    for value in measured:
        assert value == pytest.approx(theory.chi1, rel=0.05)


def _sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int):  # type: ignore[no-untyped-def]
    """Ground truth outside gradsight: a copy of ``model`` after ``steps`` SGD steps on
    ``(x, y)``, and the loss before each step."""
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ce(trained(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return trained, losses


class _ZeroInitResidual(nn.Module):
    """x ← x + W₂ relu(W₁ x) with W₂ = 0 at init (Fixup, SkipInit, ControlNet's zero
    convolutions, torchvision's ``zero_init_residual``)."""

    def __init__(self, train_branch_out: bool = True) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(10, 32), nn.Linear(32, 3)
        self.fc1 = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.fc2 = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        for lin in self.fc2:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            lin.requires_grad_(train_branch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for fc1, fc2 in zip(self.fc1, self.fc2, strict=True):
            h = h + fc2(torch.relu(fc1(h)))
        return self.head(h)


@pytest.mark.parametrize("train_branch_out", [True, False])
def test_zero_initialized_residual_branches(train_branch_out: bool) -> None:
    """Healthy twin: the branches' output layers start at exactly zero and get a
    gradient, so the layers before them get none yet but will: ground truth, one SGD
    step gives them a gradient. They are ``ok`` with the reason, never converged or
    vanishing; the zero layers' sensitivity (0 at a zero output) is not quoted. Sick
    twin: the zero layers are frozen, so the first layers never get a gradient (20 SGD
    steps leave them as they were): dead, held by the frozen zero weight, which the
    reason names and the advice unfreezes."""
    torch.manual_seed(0)
    model = _ZeroInitResidual(train_branch_out)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = x[:, :3].argmax(1)
    d = gradsight.diagnose(model, (x, y), ce, lr=0.1)
    first = [d.layer(f"fc1.{i}") for i in range(3)]
    # Ground truth from training, outside gradsight.
    before = [m.weight.detach().clone() for m in model.fc1]
    trained, _ = _sgd(model, x, y, 0.1, 20 if not train_branch_out else 1)
    trained.zero_grad()
    ce(trained(x), y).backward()
    grads = [float(m.weight.grad.norm()) for m in trained.fc1]
    if train_branch_out:
        assert all(g > 0 for g in grads)  # one update of fc2 opened the path
        assert all(layer.status == "ok" and "no signal yet" in layer.reason for layer in first)
        assert all(f"fc2.{i}" in layer.reason for i, layer in enumerate(first))
        for i in range(3):
            second = d.layer(f"fc2.{i}")
            assert second.status == "ok" and "exactly zero (zero-initialized)" in second.reason
            assert "of the largest" not in second.reason
    else:
        assert all(torch.equal(m.weight, b) for m, b in zip(trained.fc1, before, strict=True))
        assert all(g == 0 for g in grads)
        for i, layer in enumerate(first):
            assert layer.status == "dead"
            assert f"held there by fc2.{i}.weight, frozen (requires_grad=False)" in layer.reason
            assert layer.advice[0].startswith(f"Unfreeze fc2.{i}.weight")
    assert d.status == ("ok" if train_branch_out else "dead")
    assert contradictions(d) == []


def _conv_bn(zero_scale: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 8), (8, 8), (8, 8)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    if zero_scale:  # the classic bug: every 1-D parameter zeroed, "meant for biases"
        for p in model.parameters():
            if p.ndim == 1:
                nn.init.zeros_(p)
    return model


@pytest.mark.parametrize("zero_scale", [False, True])
def test_zeroed_normalization_weights_are_named_as_the_cause(zero_scale: bool) -> None:
    """Sick twin: every 1-D parameter zeroed, BatchNorm weights included: each BatchNorm
    outputs its bias (0), ReLU passes nothing, and no convolution or BatchNorm gets a
    gradient (ground truth: 20 SGD steps leave them exactly as they were). They are dead,
    with the zero weight as the cause and re-initializing it as the first advice. Healthy
    twin (weights 1): nothing dead, nothing about normalization weights."""
    model = _conv_bn(zero_scale)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    d = gradsight.diagnose(model, (x, y), ce, lr=0.1)
    trained, _ = _sgd(model, x, y, 0.1, 20)
    convs = [i for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    moved = [
        not torch.equal(trained[i].weight, model[i].weight) for i in convs
    ]  # outside gradsight: did training move them?
    if zero_scale:
        assert not any(moved)
        for i in convs:
            layer = d.layer(str(i))
            assert layer.status == "dead", (i, layer.status, layer.reason)
            assert "weight" in layer.reason and "exactly zero" in layer.reason
            assert layer.advice[0].startswith("Initialize the normalization weight of")
    else:
        assert all(moved)
        assert all(layer.status not in ("dead", "vanishing") for layer in d.layers)
        assert not any("normalization weight" in a for layer in d.layers for a in layer.advice)
    assert contradictions(d, has_norm=True) == []


def test_the_summary_names_a_few_layers_and_counts_the_rest() -> None:
    torch.manual_seed(0)
    model = mlp(16, 16, activation="sigmoid", init="xavier")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 64, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    d = gradsight.diagnose(model, (x, y), ce, curvature=False)
    vanishing = [layer.name for layer in d.layers if layer.status == "vanishing"]
    assert len(vanishing) > 8
    line = next(s for s in d.summary.splitlines() if s.endswith("the signal does not reach them."))
    assert f"and {len(vanishing) - 6} more" in line and vanishing[6] not in line.split(",")


def _deep_conv(gain: float) -> nn.Module:
    """12 ReLU convolutions without normalization or skips, He init × ``gain``."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(12):
        conv = nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        with torch.no_grad():
            conv.weight.mul_(gain)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.mark.parametrize("curvature", [True, False])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_a_step_that_overshoots_where_curvature_is_blind_is_exploding(
    gain: float, curvature: bool
) -> None:
    """Sick twin: He init ×2 in a 12-layer plain ReLU net: activations grow ×4 per layer,
    the logits are huge, the softmax is saturated, so the Gauss-Newton curvature is ~0
    (no lr·λmax test can fire) while lr·‖g‖² is hundreds of times the loss. Ground truth:
    SGD at that lr multiplies the loss by over 1e3 within two steps (then NaN). Healthy
    twin (He init): SGD at the same lr lowers the loss, and nothing is exploding."""
    model = _deep_conv(gain)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    d = gradsight.diagnose(model, (x, y), ce, lr=0.01, curvature=curvature)
    _, losses = _sgd(model, x, y, 0.01, 3)
    if gain > 1:
        assert not losses[2] < 1e3 * losses[0]  # diverged (or NaN)
        assert d.status == "exploding"
        assert "The step is unstable: full-batch SGD at lr 0.01" in d.summary  # the trial
        # With curvature the layers carrying the blow-up are measured (the Hessian's
        # sharpest direction, a step on each alone); without, the first-order overshoot
        # names those carrying lr·‖g‖². The others say it in a note.
        named = "this layer carries it" if curvature else "Polyak's step"
        assert any(named in layer.reason for layer in d.layers)
        for layer in d.layers:
            if layer.status == "exploding":
                assert named in layer.reason
            else:
                assert "overshoots" in layer.reason
    else:
        assert losses[2] < losses[0]
        assert all(layer.status != "exploding" for layer in d.layers)
        assert not any("overshoots" in layer.reason for layer in d.layers)
    assert contradictions(d) == []


def test_a_step_at_the_edge_of_stability_is_not_exploding() -> None:
    """8 conv+BatchNorm+ReLU layers at SGD lr 0.1: the head's lr·λmax is between 2 and
    4. Ground truth: the loss bumps once, then training converges (1.4 → below 0.1 in 30
    steps; the catapult phase). Not exploding; the head's reason notes the edge."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 64, 4))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    d = gradsight.diagnose(model, (x, y), ce, lr=0.1)
    _, losses = _sgd(model, x, y, 0.1, 30)
    assert any(b > a for a, b in itertools.pairwise(losses))  # a bump
    assert losses[-1] < 0.1 * losses[0]  # and it converges
    head = d.layer("25")
    assert head.lambda_max is not None and 2 < 0.1 * head.lambda_max <= 4
    assert all(layer.status != "exploding" for layer in d.layers)
    assert "edge of stability" in head.reason
    assert contradictions(d, has_norm=True) == []


class _StackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 16, num_layers=3, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(z)
        return self.head(out[:, -1])


@pytest.mark.parametrize("label_at", [0, -1])
def test_a_stacked_lstm_whose_signal_cannot_reach_the_label_vanishes_through_time(
    label_at: int,
) -> None:
    """A 3-layer LSTM over 150 steps, the (imbalanced) label written at one step. Sick
    twin (the first step): ground truth, 60 Adam steps leave the loss at the constant
    prediction's; the held-out step's gain only moves the output bias to the class
    frequencies, which the constant knows too, so the LSTM is vanishing through time.
    Healthy twin (the last step): Adam learns it, and nothing vanishes."""
    torch.manual_seed(0)
    model = _StackedLSTM()
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(64, generator=gen) < 0.3).long()  # imbalanced: 30% ones
    seq = torch.zeros(64, 150, 4)
    seq[:, label_at, 0] = labels * 2.0 - 1.0
    d = gradsight.diagnose(model, (seq, labels), ce, lr=0.5)
    trained = copy.deepcopy(model)
    opt = torch.optim.Adam(trained.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        loss = ce(trained(seq), labels)
        loss.backward()
        opt.step()
    final = float(ce(trained(seq), labels))
    if label_at == 0:
        assert d.baseline_loss is not None and final > 0.9 * d.baseline_loss
        assert d.layer("lstm").status == "vanishing"
        assert "through time" in d.layer("lstm").reason
    else:
        assert final < 0.1
        assert all(layer.status != "vanishing" for layer in d.layers)
    assert contradictions(d) == []


class _AdaLNZero(nn.Module):
    """DiT's adaLN-Zero block: x + gate(c) · f(x), the gate a zero-initialized projection of
    the conditioning, computed before the branch it scales."""

    def __init__(self) -> None:
        super().__init__()
        self.modulation = nn.Linear(4, 16)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.f = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gate = self.modulation(c)
        return x + gate * self.f(x)


class _DiTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(_AdaLNZero() for _ in range(2))
        self.head = nn.Linear(16, 3)  # not zero-initialized

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


def test_a_branch_gated_from_before_by_a_zero_projection_is_waiting_not_converged() -> None:
    """The last adaLN-Zero block's branch gets no signal (its gate, computed before it,
    is exactly zero), and no zero layer runs after it: it was "converged: the loss does
    not depend on it". Ground truth: one SGD step gives it a gradient. It is ok, naming
    the gate of its own block."""
    torch.manual_seed(0)
    model = _DiTLike()
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(64, 8, generator=gen), torch.randn(64, 4, generator=gen)
    y = x[:, :3].argmax(1)
    d = gradsight.diagnose(model, ((x, c), y), ce, lr=0.1, curvature=False)
    last = d.layer("blocks.1.f")
    assert last.grad_norm == 0.0 and last.status == "ok", last.reason
    assert "blocks.1.modulation, which gates it" in last.reason
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        ce(trained(x, c), y).backward()
        opt.step()
    assert float(trained.blocks[1].f.weight.grad.norm()) > 0  # it opened
    assert contradictions(d) == []


class _ReZero(nn.Module):
    """x ← x + α·f(x), α a zero-initialized parameter of the block (ReZero)."""

    def __init__(self, zero_out: bool) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))
        self.f = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        if zero_out:  # the branch's output layer zero as well: the two zeros lock each other
            nn.init.zeros_(self.f[2].weight)
            nn.init.zeros_(self.f[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.f(x)


@pytest.mark.parametrize("zero_out", [False, True])
def test_a_zero_gate_opens_its_branch_unless_a_zero_behind_it_locks_it(zero_out: bool) -> None:
    """ReZero: the gate α starts at zero and gets a gradient, so its first update opens the
    branch (ground truth: 20 SGD steps move every parameter); the branch is ok, waiting for
    the gate. With the branch's output layer zero too, neither α nor that layer ever gets
    a gradient (moving one off zero would give the other one): 20 SGD steps leave the
    branch as it was, and it is dead, held by those zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _ReZero(zero_out), _ReZero(zero_out), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = x[:, :3].argmax(1)
    d = gradsight.diagnose(model, (x, y), ce, lr=0.1, curvature=False)
    trained, _ = _sgd(model, x, y, 0.1, 20)
    branch = ["1", "1.f.0", "1.f.2", "2", "2.f.0", "2.f.2"]
    moved = {
        n.rsplit(".", 1)[0]
        if n.endswith(("weight", "bias"))
        else n.replace("alpha", "").rstrip(".")
        for (n, p), q in zip(trained.named_parameters(), model.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    statuses = {name: d.layer(name).status for name in branch}
    if zero_out:
        assert not moved & set(branch)  # never moved
        assert set(statuses.values()) == {"dead"}, statuses
        assert "the weight of 1.f.2" in d.layer("1.f.0").reason
        assert d.layer("1").reason.startswith("its gate (alpha) is exactly zero")
    else:
        assert set(branch) <= moved
        assert set(statuses.values()) == {"ok"}, statuses
        assert "the gate of 1, which gates it, is exactly zero" in d.layer("1.f.0").reason
    assert contradictions(d) == []


@pytest.mark.parametrize("balanced", [False, True])
def test_a_head_whose_gradient_is_on_its_zero_bias_learns(balanced: bool) -> None:
    """A head behind an exactly zero input (the LayerNorm before it has weight and bias
    0, as GPT-J with every norm zeroed): its weight gets no gradient, its zero bias does.
    A relative change of a zero bias says nothing, so it is not "by first order at its
    optimum" (it read converged, "moves the loss by at most 0.0e+00× its value"): ok,
    with the reason saying where its gradient is. Ground truth: 20 SGD steps on the head
    lower the loss. With balanced labels the bias is at its optimum already (a gradient at
    round-off): converged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[2].bias.zero_()
    x = torch.randn(60, 4)
    y = torch.arange(60) % 3 if balanced else torch.zeros(60, dtype=torch.long)
    d = gradsight.diagnose(model, (x, y), ce, lr=0.5, curvature=False)
    head = d.layer("2")
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained[2].parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ce(trained(x), y)
        losses.append(float(loss))
        loss.backward()
        opt.step()
    if balanced:
        assert losses[-1] > losses[0] - 1e-6
        assert head.status == "converged", head.reason
    else:
        assert losses[-1] < 0.5 * losses[0]
        assert head.status == "ok" and "its gradient is on its bias, exactly zero" in head.reason


class _Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(ids))[0][:, -1])


@pytest.mark.parametrize("scale", [1.0, 0.003])
def test_a_stacked_lstm_whose_inner_layer_does_not_learn_says_so(scale: float) -> None:
    """nn.LSTM(num_layers=2) with every matrix ×0.003: one module, but its layer 0 gets
    under 1e-3 of the scale-free gradient of its layer 1. Ground truth: 20 SGD steps move
    layer 0's input weights by 5e-4 of what they move layer 1's. The module's reason says
    its stacked layers learn unevenly. At the default init: nothing of the kind."""
    torch.manual_seed(0)
    model = _Stacked()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(scale)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (32, 8), generator=gen)
    y = ids[:, 0]
    d = gradsight.diagnose(model, (ids, y), ce, lr=1.0, curvature=False)
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        ce(trained(ids), y).backward()
        opt.step()

    def moved(name: str) -> float:
        before, after = getattr(model.lstm, name), getattr(trained.lstm, name)
        return float((after - before).norm() / before.norm())

    uneven = "Its stacked layers learn unevenly: its layer 0" in d.layer("lstm").reason
    if scale < 1:
        assert moved("weight_ih_l0") < 1e-3 * moved("weight_ih_l1")
        assert uneven
    else:
        assert moved("weight_ih_l0") > 1e-2 * moved("weight_ih_l1")
        assert not uneven
