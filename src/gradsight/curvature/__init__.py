"""Curvature of a model's loss on a batch, per parameter block or for the whole model.

Operators (products only; nothing of size parameters² is formed):

- :class:`HessianOperator`: Hessian-vector products on a retained double-backward graph
  (or forward-over-reverse with ``torch.func``).
- :class:`GGNOperator`: generalized Gauss-Newton ``Jᵀ H_out J``.

Estimators, which take an operator or a plain square tensor:

- :func:`lanczos`: extreme eigenvalues (full reorthogonalization).
- :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`xtrace`: traces.
- :func:`damped_cg`, :func:`damped_newton_decrement`, :func:`curvature_step`: damped
  solves, the Newton decrement ``½ gᵀ(A + λI)⁻¹g`` and ``α* = gᵀg / gᵀAg``.

Model-level functions build the operator for a block and run one estimator:
:func:`top_eigenvalues`, :func:`trace`, :func:`optimal_step`, :func:`newton_decrement`.

Every layer at once: :func:`layer_estimates` (and ``method="blockwise"`` of
:func:`top_eigenvalues`, :func:`trace` and :func:`optimal_step` for one layer) runs
:class:`~gradsight.curvature.blockwise.BlockwiseGGN`, the engine that
:func:`gradsight.diagnose` and the Monitor's curvature tier use too: one forward pass and
a few backward passes give each layer's Gauss-Newton λmax, trace, α* and decrement, with
error bars, instead of dozens of products per layer.

``params=`` selects the block: ``None`` (all trainable parameters), a module, a
parameter, a qualified module name as in ``model.named_modules()``, or a list of these.
The result for one layer is the diagonal block of the whole-model matrix. The model is
left as found: parameters, ``.grad``, buffers (BatchNorm statistics), train/eval mode and
the global RNG.
"""

from __future__ import annotations

from gradsight.curvature._api import (
    curvature_operator,
    layer_estimates,
    newton_decrement,
    optimal_step,
    top_eigenvalues,
    trace,
)
from gradsight.curvature._operator import CurvatureOperator
from gradsight.curvature.blockwise import BlockEstimate, BlockwiseGGN
from gradsight.curvature.ggn import GGNOperator
from gradsight.curvature.hessian import HessianOperator
from gradsight.curvature.lanczos import LanczosResult, lanczos
from gradsight.curvature.solve import (
    CGResult,
    NewtonDecrement,
    OptimalStep,
    curvature_step,
    damped_cg,
    damped_newton_decrement,
)
from gradsight.curvature.trace import TraceEstimate, hutchinson_trace, hutchpp_trace, xtrace

__all__ = [
    "BlockEstimate",
    "BlockwiseGGN",
    "CGResult",
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "NewtonDecrement",
    "OptimalStep",
    "TraceEstimate",
    "curvature_operator",
    "curvature_step",
    "damped_cg",
    "damped_newton_decrement",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "layer_estimates",
    "newton_decrement",
    "optimal_step",
    "top_eigenvalues",
    "trace",
    "xtrace",
]
