"""Signal-flow probe numbers against hand computations, and hook hygiene."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from gradsight import GradsightError
from gradsight.probes import FLAT_FRACTION, SignalProbe, parameter_owners


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _count_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_three_layer_sigmoid_mlp_matches_hand_computed_deltas() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(
            nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)
        )
        x, y = torch.randn(7, 3), torch.randn(7, 2)
        with SignalProbe(model) as probe:
            torch.autograd.grad(_mse(model(x), y), list(model.parameters()))
        flow = probe.result()
    finally:
        torch.set_default_dtype(torch.float32)

    w1, b1, w2, b2, w3, b3 = (p.detach() for p in model.parameters())
    z1 = x @ w1.T + b1
    a1 = torch.sigmoid(z1)
    z2 = a1 @ w2.T + b2
    a2 = torch.sigmoid(z2)
    z3 = a2 @ w3.T + b3
    d3 = 2 * (z3 - y) / z3.numel()  # ∂L/∂z3
    g_a2 = d3 @ w3  # ∂L/∂(input of layer 3)
    d2 = g_a2 * a2 * (1 - a2)
    g_a1 = d2 @ w2
    d1 = g_a1 * a1 * (1 - a1)

    assert [m.name for m in flow.modules] == ["0", "2", "4"]
    for name, delta, z in (("0", d1, z1), ("2", d2, z2), ("4", d3, z3)):
        assert flow[name].signal_norm == pytest.approx(float(delta.norm()), rel=1e-12)
        assert flow[name].output_norm == pytest.approx(float(z.norm()), rel=1e-12)
    assert flow["0"].input_signal_norm is None  # the data needs no gradient
    assert flow["2"].input_signal_norm == pytest.approx(float(g_a1.norm()), rel=1e-12)
    assert flow["4"].weight_factor == pytest.approx(float(g_a2.norm() / d3.norm()), rel=1e-12)

    s1 = torch.sigmoid(z1) * (1 - torch.sigmoid(z1))
    act = flow["0"].activation
    assert act is not None and act.name == "sigmoid" and act.max_derivative == 0.25
    assert act.mean_derivative == pytest.approx(float(s1.mean()), rel=1e-12)
    assert act.rms_derivative == pytest.approx(float(s1.pow(2).mean().sqrt()), rel=1e-12)
    flat = float((s1 <= FLAT_FRACTION * 0.25).double().mean())
    assert act.saturation == pytest.approx(flat)
    assert flow["4"].activation is None


def test_saturation_and_dead_units_by_construction() -> None:
    layer = nn.Linear(2, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([-100.0, -100.0, 0.5, 100.0]))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 1))
    with SignalProbe(model) as probe:
        model(torch.randn(8, 2)).sum().backward()
    act = probe.result()["0"].activation
    assert act is not None
    assert act.dead_fraction == pytest.approx(0.5)  # units 0 and 1 never active
    assert act.saturation == pytest.approx(0.5)

    sat = nn.Linear(1, 2)
    with torch.no_grad():
        sat.weight.zero_()
        sat.bias.copy_(torch.tensor([10.0, 0.0]))  # σ'(10) ≈ 4.5e-5: flat; σ'(0) = 0.25
    model = nn.Sequential(sat, nn.Sigmoid(), nn.Linear(2, 1))
    with SignalProbe(model) as probe:
        model(torch.randn(5, 1)).sum().backward()
    act = probe.result()["0"].activation
    assert act is not None
    assert act.saturation == pytest.approx(0.5) and act.dead_fraction == pytest.approx(0.5)
    expected = (0.25 + math.exp(-10) / (1 + math.exp(-10)) ** 2) / 2
    assert act.mean_derivative == pytest.approx(expected, rel=1e-5)


def test_inplace_relu_gives_gradient_of_pre_activation() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        lin1, lin2 = nn.Linear(3, 6), nn.Linear(6, 2)
        inplace = nn.Sequential(lin1, nn.ReLU(inplace=True), lin2)
        x = torch.randn(9, 3)
        with SignalProbe(inplace) as probe:
            inplace(x).pow(2).sum().backward()
        flow = probe.result()
        z = lin1(x).detach().requires_grad_(True)
        lin2(torch.relu(z)).pow(2).sum().backward()
    finally:
        torch.set_default_dtype(torch.float32)
    assert flow["0"].signal_norm == pytest.approx(float(z.grad.norm()), rel=1e-12)
    assert flow["0"].activation is not None and flow["0"].activation.name == "relu"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = torch.tanh(self.inner(x)) * self.scale  # a functional activation
        return h, {"aux": h.sum(dim=1)}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()
        self.shared = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, extra = self.block(x)
        h = self.shared(torch.relu(self.shared(h)))  # called twice
        return {"y": self.head(self.frozen(h)), "aux": extra["aux"]}


def test_nested_tuple_dict_outputs_shared_and_frozen_modules() -> None:
    net = _Net()
    with SignalProbe(net) as probe:
        out = net(torch.randn(6, 4))
        (out["y"].sum() + out["aux"].sum()).backward()
    flow = probe.result()
    names = [m.name for m in flow.modules]
    assert names == ["block", "block.inner.0", "shared", "frozen", "head"]
    assert flow["shared"].calls == 2
    assert flow["block.inner.0"].activation is not None
    assert flow["block.inner.0"].activation.name == "tanh"
    assert flow["frozen"].signal_norm is not None  # the signal passes a frozen layer
    assert all(m.signal_norm is not None and m.signal_norm > 0 for m in flow.modules)
    assert _count_hooks(net) == 0


def test_hooks_removed_after_exception_in_user_code() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    before = _count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), SignalProbe(model):
        model(torch.randn(3, 2))
        raise RuntimeError("boom")
    assert _count_hooks(model) == before == 0
    # No torch function mode is left active either.
    assert not torch._C._is_torch_function_mode_enabled()


def test_tensor_hooks_left_on_a_retained_graph_record_nothing_after_exit() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1))
    with SignalProbe(model) as probe:
        loss = model(torch.randn(3, 2)).sum()
        loss.backward(retain_graph=True)
    flow_before = probe.result()
    loss.backward()  # runs the same graph again, outside the probe
    assert probe.result()["0"].signal_norm == flow_before["0"].signal_norm


def test_parameter_owners_lists_shared_modules_once() -> None:
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    assert [n for n, _ in parameter_owners(model)] == ["0"]


def test_lean_mode_recognises_third_party_activation_modules() -> None:
    class GELUActivation(nn.Module):  # as in Hugging Face transformers
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.gelu(x)

    model = nn.Sequential(nn.Linear(4, 8), GELUActivation(), nn.Linear(8, 1))
    with SignalProbe(model, activations="modules", input_signals=False) as probe:
        model(torch.randn(16, 4)).sum().backward()
    act = probe.result()["0"].activation
    assert act is not None and act.name == "gelu"


def test_deferred_statistics_of_half_precision_activations_are_computed_in_float32() -> None:
    from gradsight.probes._deferred import DeferredStatistics
    from gradsight.probes.activations import module_activation

    sigmoid = module_activation(nn.Sigmoid())
    torch.manual_seed(0)
    ys = [torch.sigmoid(4 * torch.randn(64, 300)).bfloat16() for _ in range(2)]
    deferred = DeferredStatistics()
    deferred.add("step", ["a", "b"], sigmoid, 1, ys)
    [(tag, keys, values)] = deferred.pop(final=True)
    assert tag == "step" and keys[:2] == [("a", "saturation"), ("a", "dead_fraction")]
    assert values.dtype == torch.float32
    for i, y in enumerate(ys):
        d = (y.double() * (1 - y.double())).reshape(-1)
        want = [
            float((d <= 0.025).double().mean()),
            float((d.reshape(64, 300) <= 0.025).all(dim=0).double().mean()),
            float(d.mean()),
            float(d.square().mean().sqrt()),
        ]
        assert values[4 * i : 4 * i + 4].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_lean_signal_norms_of_half_precision_gradients_do_not_overflow() -> None:
    # A GradScaler-style scaled loss: every entry of ∂L/∂out is 2**12, so ‖·‖ = 2**12·√n
    # exceeds float16's largest value (65504) while each entry fits.
    model = nn.Sequential(nn.Linear(8, 512), nn.Tanh(), nn.Linear(512, 4)).half()
    x = torch.randn(64, 8).half()
    lean = dict(activations="modules", input_signals=False, output_norms=False)
    with SignalProbe(model, **lean) as probe:  # type: ignore[arg-type]
        out = model(x)
        out.backward(torch.full_like(out, 2.0**12))
        keys, values, _ = probe.collect_columns()
    got = dict(zip(keys, values, strict=True))[("2", "signal_norm")]
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(2.0**12 * math.sqrt(64 * 4), rel=1e-3)


def _function_form(module: nn.Module, x: torch.Tensor) -> str | None:
    """The activation diagnose's function watcher sees in ``module(x)`` (first one)."""
    from torch.overrides import TorchFunctionMode

    from gradsight.probes import match_activation

    seen: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            spec = match_activation(func, args, kwargs)
            if spec is not None:
                seen.append(spec.name)
            return func(*args, **(kwargs or {}))

    with Watch():
        module(x)
    return seen[0] if seen else None


def test_every_torch_activation_module_is_seen_by_diagnose_and_monitor_alike() -> None:
    # One registry serves both: an activation module that diagnose recognises (through
    # the functions its forward calls) is recognised by the Monitor's module hooks, with
    # the same parameters, and the other way round.
    from gradsight.probes import module_activation

    x = torch.randn(4, 6)
    checked = []
    for name in nn.modules.activation.__all__:
        cls = getattr(nn.modules.activation, name)
        try:
            module = cls()
        except TypeError:  # needs arguments: not an elementwise activation
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # softmax's implicit dimension
                fn = _function_form(module, x)
        except (RuntimeError, TypeError, ValueError):  # not for a [4, 6] input
            continue
        mod = module_activation(module)
        assert (fn is None) == (mod is None), (name, fn, mod)
        if mod is not None:
            assert mod.spec.name == fn, name
            checked.append(name)
    for params in ({"alpha": 0.5}, {"negative_slope": 0.2}, {"beta": 2.0}):
        for cls in (nn.ELU, nn.LeakyReLU, nn.Softplus):
            try:
                module = cls(**params)
            except TypeError:
                continue
            assert module_activation(module).spec.name == _function_form(module, x)  # type: ignore[union-attr]
    assert {"ELU", "ReLU6", "Hardtanh", "LeakyReLU", "Softplus", "GELU", "SiLU"} <= set(checked)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_monitor_records_elu_statistics_equal_to_the_full_probe(alpha: float, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gradsight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ELU(alpha), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-6.0, 2.0, 32))  # some units flat, some dead
    x = torch.randn(64, 4)
    with SignalProbe(model) as probe:
        model(x).sum().backward()
    want = probe.result()["0"].activation
    assert want is not None and want.name == f"elu({alpha:g})" and 0 < want.dead_fraction < 1
    with gradsight.Monitor(
        model, logdir=tmp_path / "r", activation_samples=None, diagnose_at_close=False
    ) as mon:
        model.zero_grad()
        loss = model(x).sum()
        loss.backward()
        mon.step(loss)
    run = gradsight.store.load_run(tmp_path / "r")
    for metric in ("saturation", "dead_fraction", "mean_derivative", "rms_derivative"):
        got = run.series(metric)["0"][1][0]
        assert got == pytest.approx(getattr(want, metric), rel=1e-5, abs=1e-7), metric


# --------------------------------------------------------------------------- fault injection


def _train_cnn(monitored: bool, tmp_path, steps: int = 6):  # type: ignore[no-untyped-def]
    """A few Adam steps of a small CNN, with or without a Monitor; the parameters after
    them, the Monitor, and the gradsight warnings raised."""
    import gradsight

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(steps)
    ]
    mon = None
    if monitored:
        mon = gradsight.Monitor(
            model,
            logdir=tmp_path / "run",
            optimizer=opt,
            activation_entries=16,
            diagnose_at_close=False,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()
        if mon is not None:
            mon.close()
    notes = [str(w.message) for w in caught if "gradsight" in str(w.message)]
    return [p.detach().clone() for p in model.parameters()], mon, notes


def _failing_after(calls: int, exc: Exception):  # type: ignore[no-untyped-def]
    """Wraps functions so that together they work ``calls`` times, then raise ``exc``."""
    count = [0]

    def wrap(fn):  # type: ignore[no-untyped-def]
        def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
            count[0] += 1
            if count[0] > calls:
                raise exc
            return fn(*args, **kwargs)

        return broken

    return wrap


@pytest.mark.parametrize("fault", ["tensor hook", "forward hook"])
def test_a_failing_monitor_hook_never_reaches_training(fault: str, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gradsight.probes import _lean
    from gradsight.store import load_run

    plain, _, _ = _train_cnn(False, tmp_path)
    if fault == "tensor hook":  # the backward-signal norm, inside loss.backward()
        make = _lean.LeanHooks._norm_hook
        boom = _failing_after(7, RuntimeError("injected: norm of an unsupported dtype"))
        monkeypatch.setattr(_lean.LeanHooks, "_norm_hook", lambda self, n: boom(make(self, n)))
        lost = "signal_norm"
    else:  # the activation module's forward hook, inside model(x)
        boom = _failing_after(3, TypeError("injected: unsupported dtype"))
        monkeypatch.setattr(_lean, "strided", boom(_lean.strided))
        lost = "saturation"
    params, mon, notes = _train_cnn(True, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(params, plain, strict=True))  # bitwise
    # One warning per part that failed (the norm hook serves signals and activations).
    assert len(notes) == (2 if fault == "tensor hook" else 1), notes
    for note in notes:
        assert "injected" in note and "not recorded" in note and "Training is unaffected" in note
    assert mon is not None and mon.stopped is None  # the rest of the Monitor goes on
    run = load_run(tmp_path / "run")
    assert len(run.series("grad_norm")["0"][0]) == 6  # other measurements: every step
    steps = run.series(lost)["0"][0]
    assert 0 < len(steps) < 6  # recorded until the fault, not after


def test_diagnose_survives_a_failing_activation_statistic(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import gradsight
    from gradsight.probes import _accumulate

    monkeypatch.setattr(
        _accumulate, "activation_states", _failing_after(0, TypeError("injected: bad dtype"))(None)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = gradsight.diagnose(
            model,
            (torch.randn(32, 4), torch.randint(0, 2, (32,))),
            nn.functional.cross_entropy,
            curvature=False,
        )
    notes = [str(w.message) for w in caught if "injected" in str(w.message)]
    assert len(notes) == 1 and "activation statistics" in notes[0]
    assert d.layer("0").grad_norm > 0 and d.layer("0").signal_norm is not None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


class _Counting(torch.overrides.TorchFunctionMode):
    """A mode of the model's own, entered around one of its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


class _ModeInside(nn.Module):
    """Enters a torch function mode of its own around its first layer and keeps the
    functional activations outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.mode = _Counting()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.mode:
            h = self.a(x)
        h = torch.tanh(h)
        return self.c(torch.sigmoid(self.b(h)))


def test_function_watcher_leaves_the_mode_stack_as_it_found_it() -> None:
    """The watcher is on the stack only between a layer and its activation: a mode the
    model enters itself still sees its calls and is popped by its own exit, activations
    around it are still found, and nothing is left on the stack, during the backward
    pass or after the probe."""
    torch.manual_seed(0)
    model = _ModeInside()
    x = torch.randn(32, 4)
    depth = torch._C._len_torch_function_stack()
    with SignalProbe(model) as probe:
        loss = model(x).pow(2).mean()
        probe.end_forward()
        assert torch._C._len_torch_function_stack() == depth
        loss.backward()
    assert torch._C._len_torch_function_stack() == depth
    assert model.mode.calls > 0
    flow = probe.result()
    assert flow["b"].activation is not None and flow["b"].activation.name == "sigmoid"
    # The model's own mode was on top when `a` finished: the watcher stayed off rather
    # than be popped by the model's exit, so `a`'s tanh goes unrecorded, not misattributed.
    assert flow["a"].activation is None or flow["a"].activation.name == "tanh"


def test_small_gradients_norms_taken_together_equal_each_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )
    x = torch.randn(64, 6)
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            out.retain_grad()
            outs[name] = out

        return hook

    handles = [model[i].register_forward_hook(keep(str(i))) for i in (0, 2, 4)]
    with SignalProbe(model) as probe:
        model(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    flow = probe.result()
    for name, out in outs.items():
        assert out.grad is not None
        assert flow[name].signal_norm == pytest.approx(float(out.grad.norm()), rel=1e-6)


class _FunctionalReLU(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 32), nn.Linear(32, 2)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(nn.functional.relu(self.a(x) - 0.5, self.inplace))  # positional flag


def test_functional_activation_in_place_by_position_is_read_before_it_overwrites() -> None:
    """``F.relu(z, True)`` overwrites z: its statistics are taken before the call (not
    kept for later, when z holds the output), and equal those of ``F.relu(z)``."""
    flows = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = _FunctionalReLU(inplace)
        with SignalProbe(model) as probe:
            model(torch.randn(64, 6)).pow(2).mean().backward()
        flows.append(probe.result()["a"].activation)
    plain, inplace_stats = flows
    assert plain is not None and inplace_stats is not None
    assert 0.05 < plain.dead_fraction < 1 or 0.05 < plain.saturation < 1
    assert inplace_stats == plain


@pytest.mark.parametrize("unit_dim", [1, 0])
def test_relu_statistics_from_sums_equal_the_general_kernel(unit_dim: int) -> None:
    """ReLU's derivative is 0 or 1, so its flat count and sum of squares come from the sum
    alone (a shortcut); they equal what the general kernel computes for the same
    derivative declared without the shortcut: dead units, half-dead ones, NaN entries."""
    from gradsight.probes._kernel import activation_states
    from gradsight.probes.activations import RELU, ActivationSpec

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 40, 6, 5, generator=gen)
    z[0, :, 2] = -1.0  # a unit flat on every entry read
    z[1, :20] = -torch.rand(20, 6, 5, generator=gen)  # the first half of the samples off
    z[2, 0, 0, 0] = float("nan")
    plain = ActivationSpec("relu", RELU.derivative, 1.0, rectifier=True)
    assert not plain.binary and RELU.binary
    fast, general = activation_states(RELU, unit_dim, z), activation_states(plain, unit_dim, z)
    assert fast.count == general.count
    assert torch.equal(fast.flat, general.flat) and torch.equal(fast.dsum, general.dsum)
    torch.testing.assert_close(fast.dsq, general.dsq)  # the general one: a norm, squared
    assert torch.equal(fast.alive, general.alive)
    torch.testing.assert_close(fast.metrics(), general.metrics())
    # Dead fraction of the first tensor: unit 2 of 6 along dim 1; no sample is all off.
    assert float(fast.metrics()[0, 1]) == pytest.approx(1 / 6 if unit_dim == 1 else 0.0)


@pytest.mark.parametrize("unit_dim", [1, 2, 0])
def test_small_tensors_reduced_on_the_host_equal_the_torch_kernel(
    unit_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small CPU tensors are reduced in NumPy (its per-call cost is a fraction of
    torch's); the statistics equal the torch kernel's for every activation kind: dead and
    saturated units, NaN entries, signed derivatives (ELU's, leaky ReLU's negative slope)."""
    from gradsight.probes import _kernel
    from gradsight.probes.activations import GELU, RELU, SIGMOID, TANH, _elu, _leaky

    gen = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(2, 30, 6, 4, generator=gen)
    z[0, :, 2] = -50.0  # flat for every rectifier and saturating function
    z[1, 3, 1, 1] = float("nan")
    cases = [
        (spec, t)
        for spec in (SIGMOID, TANH, RELU, GELU, _elu(0.5), _leaky(-0.2))
        for t in (z, z[1:])
    ]  # several tensors stacked, and one alone
    for spec, t in cases:
        host = _kernel.activation_states(spec, unit_dim, t.clone())
        with monkeypatch.context() as patch:
            patch.setattr(_kernel, "_HOST_ENTRIES", 0)
            device = _kernel.activation_states(spec, unit_dim, t.clone())
        assert host.count == device.count, spec.name
        assert torch.equal(host.flat, device.flat), spec.name
        assert torch.equal(host.alive, device.alive), spec.name
        torch.testing.assert_close(host.dsum, device.dsum, equal_nan=True)
        torch.testing.assert_close(host.dsq, device.dsq, equal_nan=True)
        torch.testing.assert_close(host.metrics(), device.metrics(), equal_nan=True)
        rows = host.host_metrics()
        torch.testing.assert_close(
            torch.tensor(rows),
            device.metrics().double(),
            equal_nan=True,
            check_dtype=False,
            rtol=1e-5,  # float32 sums, in another order
            atol=1e-6,
        )
        if spec is RELU and unit_dim == 1 and t is z:
            assert rows[0][1] == pytest.approx(1 / 6)  # the flat unit is dead
    # A ReLU module's statistics, read off its output (the sign alone, on the host).
    from gradsight.probes.activations import module_activation

    act = module_activation(nn.ReLU())
    assert act is not None
    y = torch.relu(z)
    host = _kernel.activation_states(act, unit_dim, y.clone())
    with monkeypatch.context() as patch:
        patch.setattr(_kernel, "_HOST_ENTRIES", 0)
        device = _kernel.activation_states(act, unit_dim, y.clone())
    assert torch.equal(host.flat, device.flat) and torch.equal(host.alive, device.alive)
    torch.testing.assert_close(host.metrics(), device.metrics(), equal_nan=True)
    assert host.metrics().equal(_kernel.activation_states(RELU, unit_dim, z.clone()).metrics())


class _Branches(nn.Module):
    """A skip connection, a module called twice, an in-place ReLU after a layer, a
    two-input layer and an unused layer: every way a backward signal is read."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.bi = nn.Bilinear(5, 5, 3)
        self.unused = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu(self.a(x), inplace=True)
        h = h + self.b(h)
        h = self.b(h)  # called twice
        return self.bi(h, h * 2)


@pytest.mark.parametrize("kept_entries", [1 << 20, 40])
def test_gradient_edges_record_what_tensor_hooks_record(
    kept_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that runs the backward pass itself can have the backward signals taken at
    their autograd edges (no Python call in the backward pass): the flow equals the one
    tensor hooks record, also where the budget of kept entries runs out part-way (the
    rest by hooks) and after an in-place activation."""
    from gradsight.probes import signal

    monkeypatch.setattr(signal, "_KEPT_ENTRIES", kept_entries)
    torch.manual_seed(0)
    model = _Branches()
    x = torch.randn(8, 5)
    flows = []
    for edges in (False, True):
        params = list(model.parameters())
        with SignalProbe(model, gradient_edges=edges) as probe:
            loss = model(x).pow(2).mean()
            probe.end_forward()
            assert bool(probe.gradient_edges) == edges
            grads = torch.autograd.grad(loss, [*params, *probe.gradient_edges], allow_unused=True)
            probe.take_gradients(grads[len(params) :])
        flows.append(probe.result())
    hooks, edges_flow = flows
    assert [m.name for m in hooks.modules] == [m.name for m in edges_flow.modules]
    assert hooks.unused == edges_flow.unused == ["unused"]
    for h, e in zip(hooks.modules, edges_flow.modules, strict=True):
        assert h.calls == e.calls
        for field in ("signal_norm", "input_signal_norm", "output_norm"):
            want = getattr(h, field)
            assert want is not None or h.name == "a"  # the data needs no gradient
            assert getattr(e, field) == (want if want is None else pytest.approx(want, rel=1e-6))
    assert edges_flow["b"].calls == 2


def test_take_gradients_says_what_it_expects() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with SignalProbe(model, gradient_edges=True) as probe:
        model(torch.randn(4, 3)).sum()
        with pytest.raises(GradsightError, match=r"one gradient per gradient edge \(3\), got 1"):
            probe.take_gradients([None])
