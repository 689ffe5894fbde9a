"""Reference cases with known answers (DESIGN.md), shared by the tests and the docs.

Each case builds a model, a batch, a loss and the learning rate it is judged at, and
states the statuses a correct diagnosis must give. The same cases, diagnosed by
gradsight and by the naive rule "gradient norm below a threshold means vanishing",
make the comparison table in ``docs/reference-cases.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradsight.data import load_digits
from gradsight.demo.models import mlp

__all__ = ["REFERENCE_CASES", "Built", "ReferenceCase", "naive_status", "train_sgd"]

LossFn = Callable[[Any, Any], torch.Tensor]

#: The naive rule's threshold: a layer whose gradient norm is below it is "vanishing".
NAIVE_THRESHOLD = 1e-5


@dataclass
class Built:
    """What a case builds: a model, its batch, its loss and the lr it is judged at."""

    model: nn.Module
    batch: tuple[Any, Any]
    loss_fn: LossFn
    lr: float | None = None


@dataclass(frozen=True)
class ReferenceCase:
    """A model with a known diagnosis.

    Attributes:
        key: Short identifier.
        title: What the case is.
        build: Makes the case (deterministic; the global RNG is left untouched).
        expect: Layer name → the status a correct diagnosis gives it.
        forbid: Statuses no layer may get.
    """

    key: str
    title: str
    build: Callable[[], Built]
    expect: dict[str, str] = field(default_factory=dict)
    forbid: frozenset[str] = frozenset()


def naive_status(grad_norm: float | None, threshold: float = NAIVE_THRESHOLD) -> str:
    """The rule current tools use: a gradient norm below ``threshold`` is vanishing."""
    return "vanishing" if grad_norm is not None and grad_norm < threshold else "ok"


def _scaled(loss_fn: LossFn, c: float) -> LossFn:
    def scaled(outputs: Any, targets: Any) -> torch.Tensor:
        return c * loss_fn(outputs, targets)

    return scaled


def train_sgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float
) -> None:
    """Plain SGD on cross-entropy, minibatches of 32 in a seeded order (the RNG untouched)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)


def _digits_mlp(activation: str, epochs: int, lr: float, scale: float = 1.0) -> Callable[[], Built]:
    def build() -> Built:
        (x, y), _ = load_digits()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            init = "he" if activation == "relu" else "xavier"
            model = mlp(10, 64, activation=activation, init=init)
            train_sgd(model, x, y, epochs=epochs, lr=lr)
        return Built(model, (x[:512], y[:512]), _scaled(nn.functional.cross_entropy, scale))

    return build


def _least_squares(scale: float) -> Callable[[], Built]:
    def build() -> Built:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
        w = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        y = x @ w + 0.3 * torch.randn(200, 3, generator=gen, dtype=torch.float64)
        xa = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], dim=1)
        sol = torch.linalg.lstsq(xa, y).solution
        linear = nn.Linear(8, 3).double()
        with torch.no_grad():
            linear.weight.copy_(sol[:8].T)
            linear.bias.copy_(sol[8])
        model = nn.Sequential(linear)
        return Built(model, (x, y), _scaled(nn.functional.mse_loss, scale))

    return build


def _tanh_lbfgs() -> Built:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(
        64, 1, generator=gen, dtype=torch.float64
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    # 2,000 L-BFGS iterations reach a gradient of ~1e-5 (loss 2.9e-3); beyond that it
    # only creeps along a flat direction of the saturated tanh units.
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=2000,
        max_eval=4000,
        tolerance_grad=1e-12,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    return Built(model, (x, y), nn.functional.mse_loss)


def _tanh_chaotic(lr: float) -> Callable[[], Built]:
    def build() -> Built:
        width, depth = 128, 20
        gen = torch.Generator().manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            lin = nn.Linear(width, width)
            with torch.no_grad():
                lin.weight.normal_(0, math.sqrt(4.0 / width), generator=gen)
                lin.bias.normal_(0, math.sqrt(0.05), generator=gen)
            layers += [lin, nn.Tanh()]
        head = nn.Linear(width, 10)
        with torch.no_grad():
            head.weight.normal_(0, math.sqrt(1.0 / width), generator=gen)
            head.bias.zero_()
        layers.append(head)
        x = torch.randn(256, width, generator=gen)
        y = torch.randint(0, 10, (256,), generator=gen)
        return Built(nn.Sequential(*layers), (x, y), nn.functional.cross_entropy, lr=lr)

    return build


def _dead_relu() -> Built:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = nn.Linear(8, 16)
        model = nn.Sequential(first, nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        first.bias.fill_(-100.0)
    x = torch.randn(64, 8, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    return Built(model, (x, y), nn.functional.cross_entropy)


_EARLY_VANISH = {"0": "vanishing", "2": "vanishing"}
_NOT_STUCK = frozenset({"vanishing", "exploding", "dead", "nonfinite"})

REFERENCE_CASES: tuple[ReferenceCase, ...] = (
    ReferenceCase(
        "sigmoid-init",
        "10-layer sigmoid MLP, Xavier init, at init",
        _digits_mlp("sigmoid", 0, 0.1),
        _EARLY_VANISH,
    ),
    ReferenceCase(
        "sigmoid-sgd",
        "10-layer sigmoid MLP after 10 epochs of SGD (lr 0.1)",
        _digits_mlp("sigmoid", 10, 0.1),
        _EARLY_VANISH,
    ),
    ReferenceCase(
        "sigmoid-sgd-x1e8",
        "the same, loss × 1e8",
        _digits_mlp("sigmoid", 10, 0.1, 1e8),
        _EARLY_VANISH,
    ),
    ReferenceCase(
        "relu-he",
        "10-layer ReLU MLP, He init, after 3 epochs of SGD (lr 0.05)",
        _digits_mlp("relu", 3, 0.05),
        forbid=_NOT_STUCK,
    ),
    ReferenceCase(
        "relu-he-x1e-8",
        "the same, loss × 1e-8",
        _digits_mlp("relu", 3, 0.05, 1e-8),
        forbid=_NOT_STUCK,
    ),
    ReferenceCase(
        "lstsq",
        "linear least squares at its solution (float64)",
        _least_squares(1.0),
        {"0": "converged"},
    ),
    ReferenceCase("lstsq-x1e8", "the same, loss × 1e8", _least_squares(1e8), {"0": "converged"}),
    ReferenceCase(
        "tanh-lbfgs",
        "small tanh MLP at an L-BFGS optimum (float64)",
        _tanh_lbfgs,
        {"0": "converged", "2": "converged"},
    ),
    # Full-batch SGD on this batch (ground truth): at lr 0.1 the loss falls 2.65 → 0.01 in
    # 200 steps although lr·λmax is 5 for the whole model and 48 for layer 0 (the edge of
    # stability: training lowers the curvature); at lr 1 it rises 2.65 → 3.5 by step 10
    # and 25 by step 100.
    ReferenceCase(
        "tanh-chaotic-edge",
        "20-layer tanh MLP, σ_w² = 4, σ_b² = 0.05, judged at lr 0.1 (lr·λmax 5, trains)",
        _tanh_chaotic(0.1),
        {"0": "ok"},
    ),
    ReferenceCase(
        "tanh-chaotic",
        "the same, judged at lr 1 (SGD diverges; freezing the readout alone lets the rest train)",
        _tanh_chaotic(1.0),
        {"40": "exploding"},
    ),
    ReferenceCase("relu-dead", "ReLU layer with bias −100", _dead_relu, {"0": "dead"}),
)
