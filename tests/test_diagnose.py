"""diagnose(): verdicts on the reference cases, model left untouched, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsight
from gradsight import GradsightError, diagnose
from gradsight.demo.cases import train_sgd
from gradsight.demo.models import mlp

ce = nn.functional.cross_entropy


def test_sigmoid_mlp_early_layers_vanish_and_reason_names_the_chain(digits) -> None:
    (x, y), _ = digits
    model = mlp(10, 64, activation="sigmoid", init="xavier")
    train_sgd(model, x, y, epochs=3, lr=0.1)
    d = diagnose(model, (x[:512], y[:512]), ce, lr=0.1)
    assert d.status == "vanishing"
    assert d.plateau
    first, last = d.layers[0], d.layers[-1]
    assert first.status == "vanishing" and d.layers[1].status == "vanishing"
    assert last.status != "vanishing"
    assert d.first_last_grad_ratio is not None and d.first_last_grad_ratio <= 1e-4
    assert "sigmoid derivatives" in first.reason and "layers 2–18" in first.reason
    assert first.advice and "activation" in first.advice[0]
    assert "vanishing" in d.summary


def test_relu_he_mlp_has_no_vanishing_layer(digits) -> None:
    (x, y), _ = digits
    model = mlp(10, 64, activation="relu", init="he")
    train_sgd(model, x, y, epochs=3, lr=0.05)
    d = diagnose(model, (x[:512], y[:512]), ce)
    assert not {layer.status for layer in d.layers} & {"vanishing", "exploding", "dead"}
    assert d.first_last_grad_ratio is not None and d.first_last_grad_ratio > 1e-2


def test_least_squares_solution_is_converged() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.randn(100, 5)
        y = x @ torch.randn(5, 2) + 0.5 * torch.randn(100, 2)  # residual stays: loss > 0
        model = nn.Linear(5, 2)
        xa = torch.cat([x, torch.ones(100, 1)], dim=1)
        sol = torch.linalg.lstsq(xa, y).solution
        with torch.no_grad():
            model.weight.copy_(sol[:5].T)
            model.bias.copy_(sol[5])
        for scale in (1e-8, 1.0, 1e8):
            d = diagnose(model, (x, y), lambda o, t, s=scale: s * nn.functional.mse_loss(o, t))
            assert d.status == "converged", (scale, d)
    finally:
        torch.set_default_dtype(torch.float32)


def test_dead_relu_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    d = diagnose(model, (torch.randn(64, 8), torch.randint(0, 3, (64,))), ce)
    assert d.layer("0").status == "dead"
    assert "100%" in d.layer("0").reason


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_status_unchanged_when_loss_is_scaled(scale: float, digits) -> None:
    (x, y), _ = digits
    model = mlp(10, 32, activation="sigmoid", init="xavier")
    batch = (x[:256], y[:256])
    base = [layer.status for layer in diagnose(model, batch, ce).layers]
    scaled = diagnose(model, batch, lambda o, t: scale * ce(o, t))
    assert [layer.status for layer in scaled.layers] == base


@pytest.mark.parametrize("k", [1e-3, 1e3])
def test_status_unchanged_under_relu_reparametrization(k: float, digits) -> None:
    (x, y), _ = digits
    model = mlp(6, 32, activation="relu", init="he").double()
    batch = (x[:256].double(), y[:256])
    base = diagnose(model, batch, ce)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[2].weight.mul_(k)
        twin[2].bias.mul_(k)
        twin[4].weight.div_(k)
    assert torch.allclose(twin(batch[0]), model(batch[0]), rtol=1e-9)
    d = diagnose(twin, batch, ce)
    assert [layer.status for layer in d.layers] == [layer.status for layer in base.layers]


def test_model_left_bitwise_unchanged() -> None:
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    model.train()
    batch = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    ce(model(batch[0]), batch[1]).backward()  # the user has gradients in .grad
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    d1 = diagnose(model, batch, ce)
    d2 = diagnose(model, batch, ce)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # incl. BatchNorm running statistics
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert d1.to_dict() == d2.to_dict()  # reproducible despite dropout
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_hooks_removed_when_the_model_raises() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lin(x)
            raise RuntimeError("user bug")

    model = Broken()
    with pytest.raises(GradsightError, match=r"model\(inputs\) failed with RuntimeError: user bug"):
        diagnose(model, (torch.randn(2, 2), torch.zeros(2)), nn.functional.mse_loss)
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks
    assert not torch._C._is_torch_function_mode_enabled()


def test_error_for_model_without_trainable_parameters() -> None:
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(GradsightError, match=r"no trainable parameters.*requires_grad_\(True\)"):
        diagnose(model, (torch.randn(4, 3), torch.randn(4, 1)), nn.functional.mse_loss)


def test_error_for_batch_of_wrong_shape() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(GradsightError, match=r"model\(inputs\) failed.*shape=\(4, 5\)"):
        diagnose(model, (torch.randn(4, 5), torch.randn(4, 1)), nn.functional.mse_loss)
    with pytest.raises(GradsightError, match=r"batch must be a pair \(inputs, targets\)"):
        diagnose(model, torch.randn(4, 3), nn.functional.mse_loss)
    with pytest.raises(GradsightError, match=r"batch is empty"):
        diagnose(model, (torch.randn(0, 3), torch.randn(0, 1)), nn.functional.mse_loss)


def test_error_for_non_scalar_loss() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(
        GradsightError, match=r"scalar tensor, got a tensor of shape \(4, 1\).*mean"
    ):
        diagnose(model, (torch.randn(4, 3), torch.randn(4, 1)), lambda o, t: (o - t) ** 2)


def test_error_for_bad_lr() -> None:
    with pytest.raises(GradsightError, match=r"lr must be a positive number.*got -1"):
        diagnose(
            nn.Linear(2, 1), (torch.randn(3, 2), torch.randn(3, 1)), nn.functional.mse_loss, lr=-1
        )


class _LogLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NaN for negative inputs


def test_nonfinite_origin_names_the_faulty_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _LogLayer(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias.fill_(-50.0)
    d = diagnose(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))), ce)
    assert d.status == "nonfinite"
    assert d.nonfinite_origin == "1"


class _Counted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


class _Forgiving(nn.Module):
    """Runs its layers under ``except Exception``, as some models guard optional parts."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.log, self.rest = nn.Linear(4, 4), _LogLayer(), _Counted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.log(self.first(x))
        except Exception:
            h = x
        return self.rest(h)


def test_locating_a_nan_stops_at_its_module_through_the_models_own_except() -> None:
    """The pass that locates a NaN ends at the module where it starts (what comes after
    it does not run again), also when the model catches Exception around it; the model's
    state is left as it was."""
    torch.manual_seed(0)
    model = _Forgiving()
    with torch.no_grad():
        model.first.bias.fill_(-50.0)
    before = [p.detach().clone() for p in model.parameters()]
    d = diagnose(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))), ce)
    assert d.status == "nonfinite" and d.nonfinite_origin == "log"
    assert model.rest.calls == 1  # the first pass only
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_backward_origin_when_forward_is_finite() -> None:
    class Sqrt(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(x)  # finite at 0, infinite derivative

    model = nn.Sequential(nn.Linear(3, 3), Sqrt(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    d = diagnose(model, (torch.randn(5, 3), torch.randn(5, 1)), nn.functional.mse_loss)
    assert d.status == "nonfinite"
    assert d.nonfinite_origin == "1"
    assert d.layer("0").status == "nonfinite" and d.layer("2").status != "nonfinite"


def test_exports_and_layer_lookup() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    d = diagnose(model, (torch.randn(16, 3), torch.randn(16, 1)), nn.functional.mse_loss)
    assert [layer.name for layer in d.layers] == ["0", "2"]
    assert d.layer("2").name == "2"
    with pytest.raises(GradsightError, match=r"no parameter-owning module named 'nope'.*'0', '2'"):
        d.layer("nope")
    data = d.to_dict()
    assert data["status"] == d.status and len(data["layers"]) == 2
    assert "grad norm" in str(d) and d.layers[0].status in gradsight.STATUSES


@pytest.mark.parametrize("collector_on", [True, False])
def test_the_garbage_collector_is_left_as_found(collector_on: bool) -> None:
    """diagnose pauses the cycle collector while its temporaries live, and leaves it as
    it found it: on, or off where the caller turned it off; also when it raises."""
    import gc

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    was_on = gc.isenabled()
    try:
        gc.enable() if collector_on else gc.disable()
        diagnose(model, batch, ce, curvature=False)
        assert gc.isenabled() is collector_on
        with pytest.raises(GradsightError):
            diagnose(model, (torch.randn(16, 5), batch[1]), ce, curvature=False)
        assert gc.isenabled() is collector_on
    finally:
        gc.enable() if was_on else gc.disable()


def test_a_diagnosis_leaves_no_reference_cycles() -> None:
    """Everything a diagnosis makes is freed by reference counting (so pausing the
    collector defers nothing): a collection right after finds no garbage from it, on an
    MLP and on torch's Transformer encoder (attention, LayerNorm, functional GELU)."""
    import gc

    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
    encoder = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    cases = [
        (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(32, 4), 3),
        (encoder, torch.randn(8, 5, 16), 16),
    ]
    for model, x, classes in cases:
        y = torch.randint(0, classes, x.shape[:-1])

        def loss_fn(out: torch.Tensor, t: torch.Tensor, c: int = classes) -> torch.Tensor:
            return ce(out.reshape(-1, c), t.reshape(-1))

        diagnose(model, (x, y), loss_fn, curvature=False)  # lazy imports, first-call caches
        gc.collect()
        d = diagnose(model, (x, y), loss_fn, curvature=False)
        del d
        assert gc.collect() == 0


def test_curvature_under_autocast_is_measured_in_full_precision() -> None:
    """Called inside a bfloat16 autocast region (as a training step is), diagnose
    measures curvature in full precision: in bfloat16 the loss's output Hessian is not
    recognized and every layer fell back to the time-budgeted refinement. The verdicts
    and curvature equal those outside autocast; the caller's autocast is left as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5)
    )
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 16, generator=gen), torch.randint(0, 5, (64,), generator=gen))

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ce(out, t)  # not recognized by name: its Hessian is found by probing it

    plain = diagnose(model, batch, loss_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = diagnose(model, batch, loss_fn)
        assert torch.is_autocast_enabled("cpu")
    assert [layer.status for layer in mixed.layers] == [layer.status for layer in plain.layers]
    # The one-pass engine ran (its whole-model headroom), not the per-layer fallback.
    assert mixed.headroom is not None and plain.headroom is not None
    assert mixed.headroom == pytest.approx(plain.headroom, rel=0.05)
    for a, b in zip(mixed.layers, plain.layers, strict=True):
        assert a.lambda_max is not None and b.lambda_max is not None
        assert a.lambda_max == pytest.approx(b.lambda_max, rel=0.05)


def test_error_for_a_model_that_is_not_a_module() -> None:
    """A plain function is told apart before anything walks it (it used to end in an
    AttributeError from the first walk of the module tree)."""
    with pytest.raises(GradsightError, match=r"torch.nn.Module, got function.*nn.Parameter"):
        diagnose(lambda x: x, (torch.randn(4, 3), torch.randn(4, 3)), nn.functional.mse_loss)


def test_one_walk_lists_what_torch_lists() -> None:
    """The walk a diagnosis shares lists the modules, parameters and buffers torch's own
    iterators list: a module under two names once, a tied weight once under its first
    name, an empty parameter slot left out, non-persistent buffers included."""
    from gradsight._walk import ModelWalk

    shared = nn.Linear(4, 4)
    head = nn.Linear(4, 4, bias=False)
    head.weight = shared.weight  # tied
    model = nn.Sequential(shared, nn.BatchNorm1d(4), shared, head, nn.Linear(4, 2, bias=False))
    model[1].register_buffer("scratch", torch.zeros(3), persistent=False)
    walk = ModelWalk(model)
    assert [(n, id(m)) for n, m in walk.named_modules] == [
        (n, id(m)) for n, m in model.named_modules()
    ]
    assert [(n, id(p)) for n, p in walk.named_parameters] == [
        (n, id(p)) for n, p in model.named_parameters()
    ]
    assert [id(b) for b in walk.buffers] == [id(b) for b in model.buffers()]
    assert len(walk.buffers) == 4  # running mean, var, batch count, scratch


def test_a_layer_that_passes_nothing_back_is_named_as_where_the_signal_stops() -> None:
    """A zeroed model (every parameter zero: the head's weight gets no gradient from its
    zero input, and passes nothing back) used to read "vanishing" with the activations'
    average derivative as the cause of a ×0 attenuation (ALBERT with zeroed weights:
    "tanh derivatives average 1.00"). It is a saddle no optimizer leaves: ground truth,
    20 SGD steps move only the head's bias. Its layers are dead, each held by a weight of
    exactly zero that gets a gradient once moved off zero (on a copy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    d = diagnose(model, (x, y), nn.functional.cross_entropy, curvature=False)
    first = d.layer("0")
    assert first.grad_norm == 0.0 and first.status == "dead"
    assert "its weight is exactly zero and so is its gradient" in first.reason
    assert "derivatives average" not in first.reason
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(trained(x), y).backward()
        opt.step()
    moved = {n for n, p in trained.named_parameters() if p.any()}
    assert moved == {"4.bias"}
