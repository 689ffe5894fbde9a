"""What a training loop calls: build the optimizer, take one step on a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradsight.optim.gauss_newton import GaussNewton

__all__ = ["make_optimizer", "step_on_batch"]


def make_optimizer(model: nn.Module, **kwargs: Any) -> GaussNewton:
    """:class:`GaussNewton` over ``model`` with its defaults (those the benchmark runs).

    ``GaussNewton(model.parameters(), model=model, **kwargs)``; keyword arguments go to
    :class:`GaussNewton` (``lr``, ``momentum``, ``factor_damping``, …).

    Example:
        >>> from torch import nn
        >>> opt = make_optimizer(nn.Linear(3, 2))
        >>> opt.param_groups[0]["lr"], [b.kind for b in opt.blocks]
        (0.5, ['kfac'])
    """
    return GaussNewton(model.parameters(), model=model, **kwargs)


def step_on_batch(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
) -> float:
    """One optimization step on ``(inputs, targets)``; returns the loss before the step.

    A :class:`GaussNewton` gets the closure ``lambda: loss_fn(model(inputs), targets)``
    (it differentiates the loss itself); any other optimizer gets the usual
    ``zero_grad(); loss.backward(); step()``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> isinstance(step_on_batch(sgd, model, nn.functional.mse_loss, x, y), float)
        True
    """
    if isinstance(optimizer, GaussNewton):
        return float(optimizer.step(lambda: loss_fn(model(inputs), targets)))
    optimizer.zero_grad()
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
