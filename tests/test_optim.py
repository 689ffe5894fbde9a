"""gradsight.optim.GaussNewton: scale invariance, errors, no leaks, convergence."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from gradsight import GradsightError
from gradsight.data import load_digits
from gradsight.demo.models import mlp
from gradsight.optim import GaussNewton, make_optimizer, step_on_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(seed: int, n: int = 48, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    w = torch.randn(4, 3, generator=g, dtype=dtype)
    return x, (x @ w).argmax(1)


def _tiny_with_norm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


_CONFIGS = [
    {},  # the defaults
    {"momentum": 0.0, "update_every": 3, "warmup": 2, "factor_damping": 1.0},
    {"exact_outputs": 0, "weight_decay": 0.1},  # probed output factors
]


@pytest.mark.parametrize("c", [1e-3, 7.0, 1024.0, 1e4])
@pytest.mark.parametrize("config", _CONFIGS, ids=["default", "no-momentum", "probed"])
@pytest.mark.parametrize("make_model", [_tiny, _tiny_with_norm], ids=["linear", "layernorm"])
def test_steps_invariant_to_loss_scale(c: float, config: dict, make_model) -> None:  # type: ignore[no-untyped-def]
    x, y = _data(0, dtype=torch.float64)
    runs = []
    for scale in (1.0, c):
        model = make_model(1).double()
        opt = GaussNewton(model, seed=3, **config)
        for _ in range(8):
            opt.step(lambda m=model, s=scale: s * nn.functional.cross_entropy(m(x), y))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # float64 rounding is all that differs; SGD's iterates differ at first order (below)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-8)


def test_sgd_is_not_invariant_to_loss_scale() -> None:
    x, y = _data(0, dtype=torch.float64)
    runs = []
    for scale in (1.0, 7.0):
        model = _tiny(1, torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            step_on_batch(
                opt, model, lambda o, t, s=scale: s * nn.functional.cross_entropy(o, t), x, y
            )
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(runs[0], runs[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_within_budget(seed: int) -> None:
    x, y = _data(seed)
    model = _tiny(seed)
    opt = make_optimizer(model)
    first = step_on_batch(opt, model, nn.functional.cross_entropy, x, y)
    for _ in range(200):
        last = step_on_batch(opt, model, nn.functional.cross_entropy, x, y)
    assert last < 0.3 * first  # measured 0.11–0.19: the default step suits minibatches


def test_each_layers_step_is_lr_times_its_initial_scale_per_group() -> None:
    """Each layer's update has a root-mean-square of lr × the layer's initial one, with
    each parameter group's own lr."""
    x, y = _data(0)
    model = _tiny(0)
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.05},
        {"params": list(model[2].parameters())},
    ]
    opt = GaussNewton(groups, lr=0.01, model=model, momentum=0.0, weight_decay=0.0, snr_decay=0.0)
    layers = [model[0], model[2]]
    before = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in layers]
    for step in range(2):  # the scale is the one at the first step, not the current one
        start = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in layers]
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
        rms = [
            float((torch.cat([p.detach().flatten() for p in m.parameters()]) - s).square().mean())
            ** 0.5
            for m, s in zip(layers, start, strict=True)
        ]
        want = [
            lr * float(b.square().mean()) ** 0.5 for lr, b in zip((0.05, 0.01), before, strict=True)
        ]
        assert rms == pytest.approx(want, rel=1e-5), step
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["momentum"] == 0.0


def _adam_ratio(grads: list[torch.Tensor], beta: float, decay: float) -> float:
    """Adam's bias-corrected m̂ and v̂ after ``grads``, computed plainly in float64:
    min(1, √mean(m̂²/v̂)) over the entries whose v̂ is nonzero (the others count 0)."""
    m = torch.zeros_like(grads[0], dtype=torch.float64)
    v = torch.zeros_like(m)
    for g in grads:
        m = beta * m + (1 - beta) * g.double()
        v = decay * v + (1 - decay) * g.double() ** 2
    t = len(grads)
    m_hat, v_hat = m / (1 - beta**t), v / (1 - decay**t)
    r2 = torch.where(v_hat > 0, m_hat**2 / v_hat, torch.zeros_like(v_hat))
    return min(1.0, float(r2.mean()) ** 0.5)


@pytest.mark.parametrize("knee", [0.0, 0.5, 1.0])
def test_step_shrinks_by_adams_signal_to_noise_ratio(knee: float) -> None:
    """Each layer's radius is lr × its initial RMS × the RMS ``r`` of Adam's m̂/√v̂ (at
    most 1), and × ``r / snr_knee`` more below the knee, against Adam's moments computed
    by hand from the gradients the optimizer used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = GaussNewton(model, lr=0.05, weight_decay=0.0, momentum=0.9, snr_decay=0.95, snr_knee=knee)
    grads: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    gen = torch.Generator().manual_seed(1)
    below = 0
    for _ in range(12):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        start = {i: [p.detach().clone() for p in model[i].parameters()] for i in grads}
        opt.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
        assert opt.last is not None
        for i in grads:
            grads[i].append(torch.cat([p.grad.flatten() for p in model[i].parameters()]))
            want = _adam_ratio(grads[i], 0.9, 0.95)
            assert opt.last.signal_to_noise[str(i)] == pytest.approx(want, rel=1e-5)
            moved = torch.cat(
                [
                    (p.detach() - s).flatten()
                    for p, s in zip(model[i].parameters(), start[i], strict=True)
                ]
            )
            init_rms = float(opt.state[model[i].weight]["init_rms"])
            rms = float(moved.square().mean()) ** 0.5
            length = want * min(1.0, want / knee) if knee > 0 else want
            below += want < knee
            assert rms == pytest.approx(0.05 * init_rms * length, rel=1e-4)
    if knee > 0:
        assert below > 0  # the knee was crossed (ratios here: 0.3–1)


def test_signal_to_noise_of_noise_and_of_a_constant_gradient() -> None:
    """A gradient that never changes keeps the full radius (ratio 1); pure noise gives
    the stationary √((1 − β)/(1 + β)) = 0.229 of a momentum 0.9 (linear losses: no
    curvature, so the direction is the gradient itself)."""
    layer = nn.Linear(2000, 1, bias=False)
    opt = GaussNewton(layer, momentum=0.9, snr_decay=0.99)
    fixed = torch.randn(1, 2000)
    for _ in range(5):
        opt.step(lambda: layer(fixed).sum())
        assert opt.last is not None
        assert opt.last.signal_to_noise[""] == pytest.approx(1.0, abs=1e-6)
    layer = nn.Linear(2000, 1, bias=False)
    opt = GaussNewton(layer, momentum=0.9, snr_decay=0.99)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        noise = torch.randn(1, 2000, generator=gen)
        opt.step(lambda noise=noise: layer(noise).sum())
    assert opt.last is not None
    assert opt.last.signal_to_noise[""] == pytest.approx((0.1 / 1.9) ** 0.5, rel=0.05)


def test_zero_initialized_layer_is_not_frozen() -> None:
    x, y = _data(0)
    model = _tiny(0)
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    opt = make_optimizer(model)
    for _ in range(3):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert float(model[2].weight.detach().norm()) > 0.0  # the normalized step moves it


def test_trains_the_sigmoid_mlp_that_sgd_cannot() -> None:
    """The remedy benchmark's case, in brief: 6 sigmoid layers, Xavier, digits, batch 64."""
    (x, y), (xt, yt) = load_digits()
    accuracy = {}
    for name in ("sgd", "gauss-newton"):
        torch.manual_seed(0)
        model = mlp(6, 64)
        opt = (
            make_optimizer(model)
            if name == "gauss-newton"
            else torch.optim.SGD(model.parameters(), lr=0.1)
        )
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                idx = perm[i : i + 64]
                step_on_batch(opt, model, nn.functional.cross_entropy, x[idx], y[idx])
        with torch.no_grad():
            accuracy[name] = float((model(xt).argmax(1) == yt).double().mean())
    assert accuracy["sgd"] < 0.2
    assert accuracy["gauss-newton"] > 0.88  # measured 0.91-0.94 on seeds 0-4


def test_refresh_schedule() -> None:
    x, y = _data(0)
    model = _tiny(0)
    opt = GaussNewton(model, warmup=3, update_every=4)
    refreshed = []
    for _ in range(12):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
        assert opt.last is not None
        refreshed.append(opt.last.refreshed)
    assert [i for i, r in enumerate(refreshed) if r] == [0, 1, 2, 4, 8]


def test_output_factor_is_the_gauss_newton_one() -> None:
    """One linear layer under cross-entropy: the GGN block is A ⊗ Σₙ Hₙ, so the K-FAC
    output factor must be Σₙ Hₙ — exactly with the batched basis pass, within sampling
    error with the random probe — and not the empirical Fisher Σₙ gₙgₙᵀ."""
    torch.manual_seed(0)
    x = torch.randn(4000, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (4000,))
    for exact_outputs, tol in ((32, 1e-10), (0, 0.1)):
        torch.manual_seed(1)
        layer = nn.Linear(3, 4).double()
        with torch.no_grad():
            p = torch.softmax(layer(x), dim=1)
        # H_n of the mean cross-entropy: (diag(p) − ppᵀ) / n
        expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0) / len(x)
        opt = GaussNewton(layer, exact_outputs=exact_outputs)
        opt.step(lambda lay=layer: nn.functional.cross_entropy(lay(x), y))
        rel = float((opt.state[layer.weight]["S"] - expected).norm() / expected.norm())
        assert rel < tol, (exact_outputs, rel)
    g = (p - nn.functional.one_hot(y, 4).double()) / len(x)
    empirical = g.T @ g * len(x)
    assert float((empirical - expected).norm() / expected.norm()) > 0.1  # 16% here


def test_step_without_closure_says_how_to_fix() -> None:
    model = _tiny(0)
    opt = GaussNewton(model)
    with pytest.raises(GradsightError, match=r"needs a closure.*got no closure.*step_on_batch"):
        opt.step()


def test_closure_that_called_backward_is_explained() -> None:
    model = _tiny(0)
    x, y = _data(0)
    opt = GaussNewton(model)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(GradsightError, match=r"called loss\.backward\(\)"):
        opt.step(closure)


@pytest.mark.parametrize(
    ("closure_value", "match"),
    [(lambda m, x: 3.0, "got float"), (lambda m, x: m(x), r"got a tensor of shape \(48, 3\)")],
)
def test_closure_must_return_scalar_loss(closure_value, match) -> None:  # type: ignore[no-untyped-def]
    model = _tiny(0)
    x, _ = _data(0)
    with pytest.raises(GradsightError, match=match):
        GaussNewton(model).step(lambda: closure_value(model, x))


def test_constructor_errors() -> None:
    with pytest.raises(GradsightError, match="lr must be a positive"):
        GaussNewton(_tiny(0), lr=0.0)
    with pytest.raises(GradsightError, match=r"snr_decay must lie in \[0, 1\)"):
        GaussNewton(_tiny(0), snr_decay=1.0)
    with pytest.raises(GradsightError, match=r"snr_knee must lie in \[0, 1\]"):
        GaussNewton(_tiny(0), snr_knee=1.5)
    with pytest.raises(GradsightError, match="register takes the model"):
        GaussNewton(_tiny(0).parameters()).register([])  # type: ignore[arg-type]
    with pytest.raises(GradsightError, match="do not belong to the registered model"):
        GaussNewton(_tiny(0).parameters(), model=_tiny(1))
    model = _tiny(0)
    x, y = _data(0)
    opt = GaussNewton(model.parameters())  # no model: a clear error at the first step
    with pytest.raises(GradsightError, match=r"needs the model.*opt\.register\(model\)"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    opt.register(model)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated lazy torch attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_graph_or_hook_left_over_1000_steps() -> None:
    model = _tiny(0)
    x, y = _data(0, n=16)
    opt = GaussNewton(model)
    for _ in range(50):
        step_on_batch(opt, model, nn.functional.cross_entropy, x, y)
    before, objects = _live_tensors(), len(gc.get_objects())
    for _ in range(950):
        step_on_batch(opt, model, nn.functional.cross_entropy, x, y)
    assert _live_tensors() == before
    assert len(gc.get_objects()) <= objects + 50
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())


def test_public_names() -> None:
    import gradsight.lab
    import gradsight.optim

    for mod in (gradsight.optim, gradsight.lab):
        for name in mod.__all__:
            assert hasattr(mod, name)
    assert gradsight.GradsightError is GradsightError
