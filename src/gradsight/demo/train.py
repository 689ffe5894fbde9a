"""A plain minibatch training loop with a progress bar, as the demo uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

if TYPE_CHECKING:
    from gradsight.monitor import Monitor

__all__ = ["TrainResult", "evaluate", "train"]


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
    full training loss and held-out accuracy are logged to it.
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
