"""Curvature in full precision, whatever autocast region the caller is in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

__all__ = ["full_precision"]


@contextmanager
def full_precision() -> Iterator[None]:
    """Turn autocast off (CPU and CUDA) for the block, as the caller had it after.

    Curvature products are second derivatives of the loss: in bfloat16 their rounding
    swamps them (and the test that recognizes a loss's output Hessian fails, so every
    layer falls back to exact products within a time budget). They measure the model's
    function, which autocast only computes at lower precision.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with full_precision():
        ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    with ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
