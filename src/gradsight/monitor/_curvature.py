"""The Monitor's curvature tier: per-layer curvature through :mod:`gradsight.curvature`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CurvatureTier"]

#: Damping of the Newton decrement relative to the block's λmax, as in the verdicts.
DAMPING = 1e-3


class CurvatureTier:
    """Per-layer curvature of the loss on one batch, as ``(layer, metric, value)`` rows.

    For each parameter-owning layer (its own parameters as the block), on the
    generalized Gauss-Newton matrix G (the positive semi-definite part of the Hessian,
    which the verdicts use too):

    * ``lambda_max``: the top eigenvalue of G (Lanczos, 1% accuracy), and with a
      learning rate ``lr_lambda_max`` = lr·λmax (gradient descent on the block is
      unstable above 2);
    * ``trace`` and ``trace_stderr``: the trace of G (XTrace) and its standard error;
    * ``alpha_star``: the curvature-optimal step α* = gᵀg / gᵀGg along the gradient,
      and ``step_ratio`` = α*/lr, the step the layer needs over the step it gets;
    * ``headroom``: the damped Gauss-Newton decrement ½gᵀ(G+λI)⁻¹g (λ = 10⁻³·λmax(G))
      over the loss: the fraction of the loss a local second-order step could still win.

    Each metric needs a few dozen curvature-vector products, so this tier is meant for
    every few hundred steps. The model is left as found. Under torch.distributed every
    product is averaged over the ranks' shards (:class:`~gradsight.curvature.distributed.
    DistributedOperator`), giving the curvature of the whole batch on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        *,
        probes: int = 20,
        distributed: bool = False,
        group: Any = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.probes = probes
        self.distributed = distributed
        self.group = group

    def measure(
        self,
        batch: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        lr: float | None,
    ) -> list[tuple[str, str, float]]:
        from gradsight.curvature import (
            curvature_operator,
            curvature_step,
            damped_newton_decrement,
            lanczos,
            xtrace,
        )

        rows: list[tuple[str, str, float]] = []
        for layer in self.layers:
            # One operator per layer serves all four estimates (one forward-backward).
            op: Any = curvature_operator(self.model, batch, loss_fn, params=layer, kind="ggn")
            if self.distributed:
                from gradsight.curvature.distributed import DistributedOperator

                op = DistributedOperator(op, self.group)
            g = op.gradient
            lam = float(lanczos(op, 1, tol=1e-2, max_matvecs=40).eigenvalues[0])
            rows.append((layer, "lambda_max", lam))
            if lr is not None:
                rows.append((layer, "lr_lambda_max", lr * lam))
            tr = xtrace(op, max(self.probes, 4), seed=0)
            rows += [(layer, "trace", tr.estimate), (layer, "trace_stderr", tr.stderr)]
            alpha = float(curvature_step(op, g).alpha)
            rows.append((layer, "alpha_star", alpha))
            if lr is not None and math.isfinite(alpha):
                rows.append((layer, "step_ratio", alpha / lr))
            loss = float(op.loss)
            if loss > 0:
                damping = DAMPING * max(lam, torch.finfo(op.dtype).tiny)
                nd = damped_newton_decrement(op, g, damping, tol=1e-3, max_iter=50)
                rows.append((layer, "headroom", float(nd.decrement) / loss))
        return rows
