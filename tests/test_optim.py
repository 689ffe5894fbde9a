"""gradsight.optim.GaussNewton: scale invariance, errors, no leaks, convergence."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from gradsight import GradsightError
from gradsight.optim import GaussNewton, make_optimizer, step_on_batch


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    # Tiny matrices: a second thread only adds spin-wait when other jobs share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(seed: int, n: int = 48, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    w = torch.randn(4, 3, generator=g, dtype=dtype)
    return x, (x @ w).argmax(1)


@pytest.mark.parametrize("c", [1e-3, 7.0, 1024.0, 1e4])
@pytest.mark.parametrize("per_layer", [False, True])
def test_steps_invariant_to_loss_scale(c: float, per_layer: bool) -> None:
    x, y = _data(0, dtype=torch.float64)
    runs = []
    for scale in (1.0, c):
        model = _tiny(1, torch.float64)
        opt = GaussNewton(model, per_layer=per_layer, seed=3)
        for _ in range(5):
            opt.step(lambda m=model, s=scale: s * nn.functional.cross_entropy(m(x), y))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # float64 rounding, amplified by the small (near-collinear) subspace solve, is all
    # that differs; SGD's iterates differ at first order (test below)
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
    for _ in range(40):
        last = step_on_batch(opt, model, nn.functional.cross_entropy, x, y)
    assert last < 0.25 * first


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
    with pytest.raises(GradsightError, match="takes the model"):
        GaussNewton([nn.Parameter(torch.zeros(2))])  # type: ignore[arg-type]
    with pytest.raises(GradsightError, match="lr must be a positive"):
        GaussNewton(_tiny(0), lr=0.0)


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
