"""Leave the user's model exactly as it was found: buffers, RNG state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["preserved"]


@contextmanager
def preserved(model: nn.Module, *, seed: int | None = 0) -> Iterator[None]:
    """Restore ``model``'s buffers and the global RNG state on exit.

    Inside the block a forward pass in training mode may update BatchNorm running
    statistics and dropout may draw random numbers; both are undone on exit, also on an
    exception. With ``seed`` set, the RNG is re-seeded inside the block so that what
    runs there (dropout masks) is reproducible.

    Parameters and their ``.grad`` are not copied: callers must not modify them (they
    take gradients with ``torch.autograd.grad``, which leaves ``.grad`` alone).
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for live, saved in buffers:
                live.copy_(saved)
