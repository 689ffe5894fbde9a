"""Model-level entry points: build the operator for a block, run one estimator on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from gradsight._errors import GradsightError
from gradsight.curvature._blocks import ParamsSpec
from gradsight.curvature._operator import CurvatureOperator
from gradsight.curvature.blockwise import BlockEstimate, BlockwiseGGN
from gradsight.curvature.ggn import GGNOperator
from gradsight.curvature.hessian import HessianOperator
from gradsight.curvature.lanczos import lanczos
from gradsight.curvature.solve import (
    NewtonDecrement,
    OptimalStep,
    curvature_step,
    damped_newton_decrement,
)
from gradsight.curvature.trace import TraceEstimate, hutchinson_trace, hutchpp_trace, xtrace

__all__ = [
    "curvature_operator",
    "layer_estimates",
    "newton_decrement",
    "optimal_step",
    "top_eigenvalues",
    "trace",
]

Kind = Literal["hessian", "ggn"]
Method = Literal["lanczos", "blockwise"]
LossFn = Callable[[Any, Any], torch.Tensor]


def curvature_operator(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: ParamsSpec = None,
    kind: Kind = "hessian",
) -> CurvatureOperator:
    """:class:`HessianOperator` (``kind="hessian"``) or :class:`GGNOperator` (``"ggn"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
        >>> op = curvature_operator(model, batch, nn.CrossEntropyLoss(), params="2", kind="ggn")
        >>> op.shape, op.names
        ((10, 10), ['2.weight', '2.bias'])
    """
    if kind == "hessian":
        return HessianOperator(model, batch, loss_fn, params)
    if kind == "ggn":
        return GGNOperator(model, batch, loss_fn, params)
    raise GradsightError(
        f"kind must be 'hessian' or 'ggn', got {kind!r}. The GGN (Jᵀ H_out J) is the "
        "positive semi-definite part of the Hessian."
    )


def top_eigenvalues(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    k: int = 1,
    params: ParamsSpec = None,
    kind: Kind = "hessian",
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    which: Literal["largest", "magnitude"] = "largest",
    seed: int = 0,
    method: Method = "lanczos",
) -> torch.Tensor:
    """The ``k`` largest eigenvalues of the loss curvature for a block, by :func:`lanczos`.

    Args:
        model, batch, loss_fn: as in :func:`gradsight.diagnose`.
        k: how many eigenvalues.
        params: the block (a module, module name, parameters or a list); ``None`` for the
            whole model.
        kind: ``"hessian"`` or ``"ggn"``.
        tol: relative accuracy target of each eigenvalue.
        max_matvecs: cap on curvature-vector products.
        which: ``"largest"`` (algebraic) or ``"magnitude"``.
        seed: seed of Lanczos' start vector.
        method: ``"lanczos"`` (products with the block's operator), or ``"blockwise"``:
            λmax of the Gauss-Newton block from the engine that :func:`gradsight.diagnose`
            and the Monitor use (one forward and a few backward passes; ``k=1``,
            ``kind="ggn"``, ``params`` one module or ``None``; see
            :func:`layer_estimates`), exact when the loss's output Hessian has few
            columns, else a sampled estimate.

    Returns:
        A float64 tensor of shape ``(k,)``, largest first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> top_eigenvalues(model, (x, y), nn.MSELoss(), k=2, tol=1e-10)  # 2·diag(1,4,9)/3
        tensor([6.0000, 2.6667], dtype=torch.float64)
    """
    if method == "blockwise":
        if k != 1:
            raise GradsightError(
                f"method='blockwise' gives the largest eigenvalue only, got k={k}. Use "
                "method='lanczos' for more."
            )
        est = _blockwise(model, batch, loss_fn, params, kind, seed)
        return torch.tensor([est.lambda_max], dtype=torch.float64)
    _check_method(method)
    op = curvature_operator(model, batch, loss_fn, params, kind)
    return lanczos(op, k, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed).eigenvalues


def trace(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    probes: int = 100,
    params: ParamsSpec = None,
    kind: Kind = "hessian",
    *,
    method: Literal["xtrace", "hutch++", "hutchinson", "blockwise"] = "hutch++",
    seed: int = 0,
) -> TraceEstimate:
    """The trace of the loss curvature for a block, with its standard error.

    Args:
        model, batch, loss_fn: as in :func:`gradsight.diagnose`.
        probes: budget of curvature-vector products.
        params: the block; ``None`` for the whole model.
        kind: ``"hessian"`` or ``"ggn"``.
        method: :func:`hutchpp_trace` (default), :func:`xtrace` or
            :func:`hutchinson_trace`. Hutch++ is the default because it measured both
            more accurate and faster than XTrace at 50 products on the 545k-parameter
            sigmoid MLP and on a small CNN (``benchmarks/results/curvature.md``); XTrace
            is exact once ``probes`` reaches the dimension. ``"blockwise"``: the
            Gauss-Newton block's trace from the engine of :func:`layer_estimates`
            (``kind="ggn"``, ``params`` one module or ``None``; ``probes`` unused).
        seed: seed of the random test vectors.

    Returns:
        A :class:`TraceEstimate` (``.estimate``, ``.stderr``, ``.num_matvecs``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> # XTrace is exact once the budget covers the dimension: 2·(1+4+9)/3
        >>> round(trace(model, (x, y), nn.MSELoss(), probes=6, method="xtrace").estimate, 8)
        9.33333333
        >>> est = trace(model, (x, y), nn.MSELoss(), probes=30)  # Hutch++, the default
        >>> abs(est.estimate - 28 / 3) < 1.0
        True
    """
    if method == "blockwise":
        est = _blockwise(model, batch, loss_fn, params, kind, seed)
        return TraceEstimate(est.trace, est.trace_err, 0, "blockwise")
    estimators = {"xtrace": xtrace, "hutch++": hutchpp_trace, "hutchinson": hutchinson_trace}
    if method not in estimators:
        raise GradsightError(
            f"method must be one of {sorted([*estimators, 'blockwise'])}, got {method!r}."
        )
    op = curvature_operator(model, batch, loss_fn, params, kind)
    return estimators[method](op, probes, seed=seed)


def optimal_step(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: ParamsSpec = None,
    kind: Kind = "hessian",
    *,
    method: Method = "lanczos",
) -> OptimalStep:
    """The curvature-optimal step size along the block's gradient, ``α* = gᵀg / gᵀHg``.

    See :func:`curvature_step`; costs one forward-backward and one product
    (``method="lanczos"``, the default: no Lanczos is run, the name says "products with
    the operator"), or comes from the engine of :func:`layer_estimates`
    (``method="blockwise"``, ``kind="ggn"``, ``params`` one module or ``None``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> x, y = torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
        >>> optimal_step(model, (x, y), nn.MSELoss()).alpha  # H = I: α* = 1
        1.0
    """
    if method == "blockwise":
        est = _blockwise(model, batch, loss_fn, params, kind, 0)
        gg, alpha = est.grad_sq, est.alpha_star
        if gg == 0.0:
            return OptimalStep(math.nan, 0.0, math.nan, 0.0)
        if not 0 < alpha < math.inf:  # no positive curvature along g
            return OptimalStep(math.inf, gg, 0.0, math.inf)
        return OptimalStep(alpha, gg, 1.0 / alpha, 0.5 * gg * alpha)
    _check_method(method)
    op = curvature_operator(model, batch, loss_fn, params, kind)
    return curvature_step(op, op.gradient)


def newton_decrement(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: ParamsSpec = None,
    kind: Kind = "ggn",
    *,
    damping: float = 1e-3,
    relative_to: Literal["lambda_max", "trace"] = "lambda_max",
    tol: float = 1e-4,
    max_iter: int | None = None,
    probes: int = 20,
    seed: int = 0,
) -> NewtonDecrement:
    """``½ gᵀ(G + λI)⁻¹ g`` for a block, with ``λ`` relative to the block's own curvature.

    ``λ = damping × scale`` where ``scale`` is the block's largest eigenvalue
    (``relative_to="lambda_max"``, by Lanczos to 1e-2) or its mean eigenvalue
    ``trace / D`` (``"trace"``, by XTrace with ``probes`` products). Both scale with the
    loss, so the decrement is invariant to multiplying the loss by a constant. A block
    without positive curvature gets ``λ = damping × (tiny)`` and a huge or infinite
    decrement if its gradient is non-zero.

    Returns:
        A :class:`NewtonDecrement` (``.decrement``, ``.step``, ``.damping``, ``.cg``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> x, y = torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
        >>> # loss = ½·((w₁−1)² + (w₂−1)²), G = I: the decrement is the whole loss, 1.0
        >>> round(newton_decrement(model, (x, y), nn.MSELoss(), damping=0.0).decrement, 8)
        1.0
    """
    op = curvature_operator(model, batch, loss_fn, params, kind)
    if relative_to == "lambda_max":
        scale = float(lanczos(op, 1, tol=1e-2, seed=seed).eigenvalues[0])
    elif relative_to == "trace":
        scale = xtrace(op, max(probes, 4), seed=seed).estimate / op.shape[0]
    else:
        raise GradsightError(f"relative_to must be 'lambda_max' or 'trace', got {relative_to!r}.")
    scale = max(scale, torch.finfo(op.dtype).tiny)
    return damped_newton_decrement(op, op.gradient, damping * scale, tol=tol, max_iter=max_iter)


def layer_estimates(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    layers: Sequence[str | nn.Module] | None = None,
    *,
    damping: float = 1e-3,
    draws: int = 2,
    seed: int = 0,
) -> dict[str, BlockEstimate]:
    """Gauss-Newton curvature of every layer at once, with error bars.

    The engine behind :func:`gradsight.diagnose` and the Monitor's curvature tier
    (:class:`~gradsight.curvature.blockwise.BlockwiseGGN`): one forward pass, the
    gradient's backward pass and one backward pass per column of the loss's
    output-Hessian factor give every layer's rows, from which each layer's λmax, trace,
    α* = gᵀg/gᵀGg and damped decrement ½(gᵀg)²/(gᵀGg + λgᵀg) (λ = ``damping``·λmax)
    follow. Exact (zero error bars) when each sample's output is one vector of at most
    8 entries (cross-entropy with up to 9 classes, mean squared error on up to 8
    outputs) and the rows number at most 2048; otherwise ``draws`` Monte Carlo draws
    per sample with jackknife standard errors. Each layer is a module's own trainable
    parameters; layers the engine has no rows for are left out of the result.

    Args:
        model, batch, loss_fn: as in :func:`gradsight.diagnose` (``model(inputs)`` returns
            the tensor the loss is computed from).
        layers: module names or modules; ``None`` for every module owning trainable
            parameters.
        damping: of the decrement, relative to each layer's λmax.
        draws: Monte Carlo draws per sample when the factor is not exact.
        seed: seed of the draws.

    Returns:
        ``{module name: BlockEstimate}`` in the model's order, plus ``""`` → the whole
        model (all covered layers as one block, cross-layer terms included) when it is
        not itself a layer.

    Raises:
        GradsightError: when the loss's output-space Hessian has no known factor or the
            model's output is not one tensor with a batch dim.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> est = layer_estimates(model, (x, y), nn.MSELoss())[""]  # G = 2·diag(1,4,9)/3
        >>> round(est.lambda_max, 6), round(est.trace, 6), est.lambda_max_err
        (6.0, 9.333333, 0.0)
    """
    modules = _named(model, layers)
    eng = BlockwiseGGN(model, batch, loss_fn, modules, draws=draws, seed=seed)
    out = {name: eng.estimate(name, damping) for name in eng.blocks}
    if out and "" not in out:
        out[""] = eng.whole(damping)
    return out


def _named(
    model: nn.Module, layers: Sequence[str | nn.Module] | None
) -> dict[str, nn.Module] | None:
    if layers is None:
        return None
    by_obj = {id(m): n for n, m in model.named_modules()}
    mods = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for item in layers:
        name = item if isinstance(item, str) else by_obj.get(id(item))
        if name is None or name not in mods:
            raise GradsightError(
                f"layers must name modules of the model (as in model.named_modules()), got "
                f"{item!r}; e.g. {[n for n in mods if n][:6]}."
            )
        out[name] = mods[name]
    return out


def _blockwise(
    model: nn.Module, batch: Any, loss_fn: LossFn, params: ParamsSpec, kind: Kind, seed: int
) -> BlockEstimate:
    """The engine's estimate for ``params`` (one module's own parameters, or ``None``)."""
    if kind != "ggn":
        raise GradsightError(
            f"method='blockwise' measures the Gauss-Newton matrix, got kind={kind!r}. Pass "
            "kind='ggn', or method='lanczos' for the Hessian."
        )
    if params is None:
        eng = BlockwiseGGN(model, batch, loss_fn, seed=seed)
        if eng.skipped:
            raise GradsightError(
                "method='blockwise' with params=None needs every layer covered; not covered: "
                f"{eng.skipped}. Use method='lanczos'."
            )
        return eng.whole()
    if not isinstance(params, (str, nn.Module)):
        raise GradsightError(
            "method='blockwise' takes params as one module or its name (its own "
            f"parameters) or None, got {type(params).__name__}. Use method='lanczos' for "
            "other blocks."
        )
    (name,) = _named(model, [params]) or {}
    module = model.get_submodule(name)
    own = {id(p) for p in module.parameters(recurse=False) if p.requires_grad}
    if any(id(p) not in own for p in module.parameters() if p.requires_grad):
        raise GradsightError(
            f"method='blockwise' measures one layer's own parameters; module {name!r} has "
            "submodules with parameters. Pass one of them, or use method='lanczos'."
        )
    eng = BlockwiseGGN(model, batch, loss_fn, {name: module}, seed=seed)
    if name not in eng.blocks:
        raise GradsightError(
            f"method='blockwise' does not cover module {name!r}: {eng.skipped.get(name)}. "
            "Use method='lanczos'."
        )
    return eng.estimate(name)


def _check_method(method: str) -> None:
    if method not in ("lanczos", "blockwise"):
        raise GradsightError(f"method must be 'lanczos' or 'blockwise', got {method!r}.")
