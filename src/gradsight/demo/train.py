"""A plain minibatch training loop with a progress bar, as the demo uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from gradsight.optim import GaussNewton

if TYPE_CHECKING:
    from gradsight.monitor import Monitor

__all__ = ["TrainResult", "evaluate", "gauss_newton_step", "train"]


@dataclass
class TrainResult:
    """Per-epoch training loss (full training set) and held-out accuracy."""

    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float(
        (logits.argmax(dim=1) == y).double().mean()
    )


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    label: str = "training",
    progress: Progress | None = None,
    monitor: Monitor | None = None,
) -> TrainResult:
    """Train ``model`` with cross-entropy for ``epochs`` epochs of shuffled minibatches.

    With a ``monitor``, ``monitor.step(loss)`` follows each backward pass and each epoch's
    full training loss and held-out accuracy are logged to it. A
    :class:`gradsight.optim.GaussNewton` optimizer gets a closure (it differentiates the
    loss itself); see :func:`gauss_newton_step` for how the monitor then measures.
    """
    x, y = train_data
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult()
    own = progress is None
    bar = progress or Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    task = bar.add_task(label, total=epochs, info="")
    if own:
        bar.start()
    try:
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                if isinstance(optimizer, GaussNewton):
                    gauss_newton_step(model, optimizer, x[idx], y[idx], monitor)
                    continue
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                if monitor is not None:
                    monitor.step(loss)
                optimizer.step()
            model.eval()
            loss_all, _ = evaluate(model, x, y)
            _, acc = evaluate(model, *test_data)
            result.train_loss.append(loss_all)
            result.test_accuracy.append(acc)
            if monitor is not None:
                monitor.log({"train_loss_full": loss_all, "test_accuracy": acc})
            bar.update(task, advance=1, info=f"loss {loss_all:.3f}  test acc {acc:.1%}")
    finally:
        if own:
            bar.stop()
    return result


def gauss_newton_step(
    model: nn.Module,
    optimizer: GaussNewton,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    monitor: Monitor | None = None,
) -> torch.Tensor:
    """One :class:`~gradsight.optim.GaussNewton` step, measured by ``monitor`` if given.

    The optimizer runs several backward passes of its own on curvature-refresh steps
    (gradient, output Hessian, the factors' signals). So that the monitor records the
    signal flow of the loss's gradient and nothing else, a measured step first runs one
    plain backward pass for the monitor, and the optimizer's own passes run inside
    :meth:`Monitor.paused() <gradsight.Monitor.paused>`.

    Returns:
        The batch's loss before the step (detached).
    """

    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs), targets)

    if monitor is None:
        return optimizer.step(closure)
    if monitor.steps % monitor.every == 0:  # measured: one plain pass for the monitor
        optimizer.zero_grad()
        loss = closure()
        loss.backward()
        monitor.step(loss)
        with monitor.paused():
            optimizer.step(closure)
        return loss.detach()
    with monitor.paused():
        loss = optimizer.step(closure)
    monitor.step(loss)
    return loss
