"""Small float64 models × losses with their dense Hessians and GGNs, the test references."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class Case:
    name: str
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[Any, Any], torch.Tensor]

    def flat_loss(self, names: list[str] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss as a function of the flat vector of the named parameters."""
        named = dict(self.model.named_parameters())
        names = list(named) if names is None else names
        shapes = [named[n].shape for n in names]
        sizes = [named[n].numel() for n in names]
        x, y = self.batch

        def f(flat: torch.Tensor) -> torch.Tensor:
            pieces = torch.split(flat, sizes)
            swapped = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
            return self.loss_fn(functional_call(self.model, swapped, (x,)), y)

        return f

    def flat_params(self, names: list[str] | None = None) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        names = list(named) if names is None else names
        return torch.cat([named[n].detach().flatten() for n in names])

    def dense_hessian(self, names: list[str] | None = None) -> torch.Tensor:
        return torch.autograd.functional.hessian(self.flat_loss(names), self.flat_params(names))

    def dense_ggn(self) -> torch.Tensor:
        """Jᵀ H_out J from a dense Jacobian and the dense output-space Hessian."""
        named = dict(self.model.named_parameters())
        names = list(named)
        shapes = [named[n].shape for n in names]
        sizes = [named[n].numel() for n in names]
        x, y = self.batch

        def outputs(flat: torch.Tensor) -> torch.Tensor:
            pieces = torch.split(flat, sizes)
            swapped = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
            return functional_call(self.model, swapped, (x,)).flatten()

        flat = self.flat_params()
        out = outputs(flat).detach()
        J = torch.autograd.functional.jacobian(outputs, flat)
        out_shape = self.model(x).shape
        H_out = torch.autograd.functional.hessian(
            lambda o: self.loss_fn(o.reshape(out_shape), y), out
        )
        return J.T @ H_out @ J


def _mlp(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.tanh(self.conv(x))).flatten(1))


def make_case(name: str, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    arch, loss = name.split("-")
    if arch == "cnn":
        model: nn.Module = SmallCNN()
        x = torch.randn(8, 1, 6, 6, generator=gen)
    else:
        acts = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
        model = _mlp(acts[arch])
        x = torch.randn(12, 5, generator=gen)
    model = model.double()
    x = x.double()
    if loss == "ce":
        y = torch.randint(0, 3, (x.shape[0],), generator=gen)
        loss_fn: Callable[[Any, Any], torch.Tensor] = nn.CrossEntropyLoss()
    else:
        y = torch.randn(x.shape[0], 3, generator=gen, dtype=torch.float64)
        loss_fn = nn.MSELoss()
    return Case(name, model, (x, y), loss_fn)


CASE_NAMES = ["sigmoid-ce", "tanh-mse", "relu-ce", "sigmoid-mse", "cnn-ce", "cnn-mse"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
