"""Curvature-aware optimization: the remedy for a step size that suits no layer.

- :class:`GaussNewton`: a :class:`torch.optim.Optimizer` that takes per-layer
  Gauss-Newton directions (K-FAC for linear layers, KFC for convolutions, the diagonal
  for the rest; the exact output Hessian), damped relative to each layer's own
  curvature, with Nesterov momentum and a per-layer normalized step length. Its steps do
  not change when the loss is multiplied by a constant; its ``state_dict()`` is the
  whole checkpoint.
- :mod:`gradsight.optim.blocks`: which curvature block each layer type gets
  (:func:`register_block` is the extension point).
- :mod:`gradsight.optim.evidence`: the committed benchmark's measured facts, as data.
- :func:`make_optimizer` and :func:`step_on_batch`: what a training loop calls, for
  this optimizer or any other.
- :class:`ClosureGGN`: the curvature engine's GGN operator built from a closure's graph.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3))
    >>> opt = make_optimizer(model)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> first = step_on_batch(opt, model, nn.functional.cross_entropy, x, y)
    >>> later = [step_on_batch(opt, model, nn.functional.cross_entropy, x, y) for _ in range(20)]
    >>> later[-1] < first
    True
"""

from __future__ import annotations

from gradsight.optim._closure_ggn import ClosureGGN
from gradsight.optim.blocks import CurvatureBlock, block_for, register_block
from gradsight.optim.gauss_newton import GaussNewton, StepInfo
from gradsight.optim.kfac import damped_inverse
from gradsight.optim.training import make_optimizer, step_on_batch

__all__ = [
    "ClosureGGN",
    "CurvatureBlock",
    "GaussNewton",
    "StepInfo",
    "block_for",
    "damped_inverse",
    "make_optimizer",
    "register_block",
    "step_on_batch",
]
