"""Is the step used stable for a block? The Hessian decides, not its Gauss-Newton part.

Gradient descent with step η on a block is locally stable when η·λmax(H) ≤ 2, with H
the block's Hessian. The Gauss-Newton matrix G = JᵀH_outJ, which the rest of the
diagnosis uses for curvature (it is positive semi-definite, and cheap per layer), is
only part of it: H = G + Σ_k (∂L/∂f_k) ∇²f_k. The rest can be large either way:

* a weight used twice (an embedding tied to the LM head) enters the output as a
  product, so its residual term is not zero: on a tied GPT-2 the Hessian's λmax is 14×
  the Gauss-Newton one's, and the step that diverges looks safe by G;
* a layer whose residual term is negative (common far from an optimum) has a Gauss-
  Newton λmax several times the Hessian's, and a safe step looks unstable by G.

So the ``lr·λmax > 2`` verdict is checked on the Hessian (Lanczos on Hessian-vector
products) for the blocks where it can change: those whose Gauss-Newton estimate puts
lr·λmax above ``1`` (within a factor 2 of the threshold, or beyond it), and those whose
parameters are shared with another module. Other blocks' G-based estimate stands. A
sampled G estimate counts with its error bar (λmax + 2 standard errors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradsight.curvature import top_eigenvalues
from gradsight.diagnosis.headroom import BlockCurvature

__all__ = ["hessian_lambda_max"]

LossFn = Callable[[Any, Any], torch.Tensor]


def hessian_lambda_max(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    blocks: Mapping[str, Sequence[nn.Parameter]],
    curvature: Mapping[str, BlockCurvature],
    lr: float,
    *,
    tol: float = 1e-2,
    max_matvecs: int = 20,
) -> dict[str, float]:
    """The Hessian's largest eigenvalue for each block whose stability verdict it can
    change (see the module docstring), by name.

    Args:
        model, batch, loss_fn: a model returning one tensor, its batch and loss.
        blocks: each layer's trainable parameters, by layer name.
        curvature: the Gauss-Newton estimates, by layer name.
        lr: the step whose stability is judged.
        tol, max_matvecs: Lanczos' relative accuracy and its budget of products.
    """
    owners: dict[int, int] = {}
    for params in blocks.values():
        for p in params:
            owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, float] = {}
    for name, params in blocks.items():
        if not params:
            continue
        ggn = curvature.get(name)
        shared = any(owners[id(p)] > 1 for p in params) or _tied_elsewhere(model, params)
        # The sampled estimate's error bar counts: λmax + 2 standard errors.
        high = (
            None
            if ggn is None or ggn.lambda_max is None
            else ggn.lambda_max + 2 * ggn.lambda_max_err
        )
        if not shared and (high is None or lr * high <= 1.0):
            continue
        top = top_eigenvalues(
            model, batch, loss_fn, k=1, params=list(params), tol=tol, max_matvecs=max_matvecs
        )
        out[name] = float(top[0])
    return out


def _tied_elsewhere(model: nn.Module, params: Sequence[nn.Parameter]) -> bool:
    """Whether a parameter of the block is also registered on another module."""
    ids = {id(p) for p in params}
    seen = 0
    for module in model.modules():
        if any(id(p) in ids for p in module.parameters(recurse=False)):
            seen += 1
            if seen > 1:
                return True
    return False
