"""The trivial baseline: the loss of the best constant prediction.

A model whose loss is no better than predicting one constant output for every sample
(the class frequencies for cross-entropy, the target mean for squared error) has
learned nothing from its inputs, whatever its gradients say: that is a *plateau*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["constant_baseline_loss"]


def constant_baseline_loss(
    outputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    max_iter: int = 100,
) -> float | None:
    """Smallest loss reachable by one constant output broadcast over the batch.

    Minimizes ``loss_fn(c.expand_as(outputs), targets)`` over ``c`` (one value per
    output entry of a sample) with L-BFGS, starting from the batch mean of ``outputs``.
    This works for any loss and matches the closed forms: for cross-entropy the
    entropy of the label frequencies, for mean squared error the target variance.

    Returns:
        The baseline loss, or None when ``outputs`` is not a single floating tensor
        with a batch dimension, or the loss cannot be evaluated on a constant.

    Example:
        >>> y = torch.tensor([0, 0, 1, 2])
        >>> ce = torch.nn.functional.cross_entropy
        >>> base = constant_baseline_loss(torch.randn(4, 3), y, ce)
        >>> expected = -(0.5 * torch.log(torch.tensor(0.5)) + 0.5 * torch.log(torch.tensor(0.25)))
        >>> abs(base - float(expected)) < 1e-5
        True
    """
    if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        return None
    if outputs.ndim == 0 or outputs.shape[0] == 0:
        return None
    start = outputs.detach().mean(dim=0)
    const = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [const], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12
    )

    try:
        with torch.no_grad():
            # L-BFGS stops on absolute tolerances: minimize the loss relative to its value
            # at the start, so that the baseline of c·loss is exactly c times the baseline.
            scale = abs(float(loss_fn(start.expand_as(outputs), targets))) or 1.0

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(const.expand_as(outputs), targets) / scale
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
            with torch.no_grad():
                best = loss_fn(const.expand_as(outputs), targets)
                at_start = loss_fn(start.expand_as(outputs), targets)
    except Exception:  # a loss that cannot take a constant prediction has no baseline
        return None
    value = min(float(best), float(at_start))
    return value if torch.isfinite(torch.tensor(value)) else None
