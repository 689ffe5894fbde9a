"""Headroom and step sizes from curvature: how much loss is left, and what step gets it.

Per parameter block (one layer) and for the whole model, on the generalized
Gauss-Newton matrix G (positive semi-definite, analytic in output space), all layers at
once from :class:`~gradsight.curvature.blockwise.BlockwiseGGN` (one forward pass and a
few backward passes), with standard errors where the output Hessian is sampled:

* λmax, the block's largest curvature. A gradient step of size η is stable for the
  block only if η·λmax < 2.
* α* = gᵀg / gᵀGg, the curvature-optimal step along the block's gradient (exact line
  search of the quadratic model). ``α* / η`` is the *step ratio*: how much larger a step
  the block needs than the one it gets. This is the seed's "choose ε" made per layer.
* The decrement ½(gᵀg)²/(gᵀGg + λgᵀg) with λ = ``damping``·λmax: the loss decrease the
  damped quadratic model predicts for the best step along the gradient (the first
  conjugate-gradient step of the damped Newton decrement ½gᵀ(G + λI)⁻¹g, and a lower
  bound on it). It is unchanged when the loss is multiplied by a constant (g, G and λ
  scale together) and when the block is rescaled (g ÷k, G ÷k², λ ÷k²); divided by the
  loss it is a scale-free *headroom*.
* For the whole model, the *realized* decrease of a Levenberg–Marquardt-damped
  Gauss-Newton step with one step size per layer, fitted on one half of the batch and
  evaluated on the other half, so that fitting noise does not count as headroom
  (Levenberg 1944, Marquardt 1963; Martens 2010 for damped Gauss-Newton in deep
  networks).

Where an estimate is within two standard errors of a verdict's threshold, or a layer
is not covered by the blockwise pass, :func:`block_curvature` recomputes it from the
block's own GGN-vector products, within a time budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsight._batch import call_model, split_batch
from gradsight._errors import GradsightError
from gradsight._state import preserved, swapped_parameters
from gradsight.curvature import (
    curvature_operator,
    curvature_step,
    damped_newton_decrement,
    lanczos,
)
from gradsight.curvature.blockwise import BlockwiseGGN
from gradsight.curvature.blockwise import take_rows as _take

__all__ = [
    "BlockCurvature",
    "ModelHeadroom",
    "best_headroom",
    "block_curvature",
    "layer_curvature",
    "loss_at",
    "model_headroom",
]

LossFn = Callable[[Any, Any], torch.Tensor]

#: Damping of the Newton decrement, relative to the block's largest curvature.
DAMPING = 1e-3
#: Passes one exact refinement of a block costs (about 45 products of ~2 passes).
REFINE_PASSES = 90
#: Refinement time always allowed (seconds), whatever the budget in passes.
MIN_SECONDS = 2.0
#: A pass timed cold (a process's first) takes at most about this many times a warm one:
#: where even a unit this much smaller could not fit a refinement, none is timed again.
COLD_FACTOR = 5.0
#: Levenberg–Marquardt damping schedule for the held-out step (relative to λmax).
LM_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class BlockCurvature:
    """Curvature of one parameter block along its gradient (GGN).

    Attributes:
        lambda_max: Largest GGN eigenvalue of the block (None where only the curvature
            along the gradient was measured, :func:`gradient_curvature`).
        alpha_star: Curvature-optimal step size along the gradient, gᵀg/gᵀGg.
        decrement: ½(gᵀg)²/(gᵀGg + λgᵀg) with λ = DAMPING·λmax, in loss units: the
            decrease the damped quadratic model predicts for the best step along the
            gradient (the first conjugate-gradient step of ½gᵀ(G + λI)⁻¹g, a lower bound
            on that Newton decrement).
        loss: The loss the products were taken at.
        matvecs: GGN-vector products spent (0 for the blockwise estimate).
        lambda_max_err, alpha_star_err, decrement_err: standard errors of the three
            (delete-a-group jackknife over samples of the blockwise estimate, which
            bounds its Monte Carlo error from above; 0 when computed exactly, that is
            from exact output-Hessian columns or refined by per-block products).
        exact: whether the values are exact (up to Lanczos' 1% on λmax).
    """

    lambda_max: float | None
    alpha_star: float
    decrement: float
    loss: float
    matvecs: int
    lambda_max_err: float = 0.0
    alpha_star_err: float = 0.0
    decrement_err: float = 0.0
    exact: bool = True

    @property
    def headroom(self) -> float:
        """The decrement as a fraction of the loss (scale-free)."""
        return _fraction(self.decrement, self.loss)

    @property
    def headroom_err(self) -> float:
        """Standard error of :attr:`headroom`."""
        return _fraction(self.decrement_err, self.loss)


@dataclass(frozen=True)
class ModelHeadroom:
    """Curvature and headroom of the whole model.

    Attributes:
        lambda_max: Largest GGN eigenvalue over all trainable parameters.
        decrement: The same decrease along the whole gradient, in loss units.
        loss: The loss on the batch.
        realized: Fraction of the held-out loss removed by the best Levenberg–Marquardt
            Gauss-Newton step fitted on the other half (0 when no damping helped; None
            when the batch cannot be split).
        lambda_max_err, decrement_err: standard errors (as in :class:`BlockCurvature`).
        coverage: fraction of the layers whose blocks the whole-model values include.
    """

    lambda_max: float
    decrement: float
    loss: float
    realized: float | None
    lambda_max_err: float = 0.0
    decrement_err: float = 0.0
    coverage: float = 1.0

    @property
    def headroom(self) -> float:
        """The decrement as a fraction of the loss (scale-free)."""
        return _fraction(self.decrement, self.loss)

    @property
    def headroom_err(self) -> float:
        """Standard error of :attr:`headroom`."""
        return _fraction(self.decrement_err, self.loss)


def best_headroom(
    whole: ModelHeadroom, blocks: Mapping[str, BlockCurvature]
) -> tuple[float, str | None]:
    """The largest headroom a damped Newton step predicts: the whole model's, or a single
    layer's where its own step predicts more, with that layer's name (None for the whole).

    A layer's step can predict more than the whole model's: its damping is relative to
    its own largest curvature, the whole model's to the largest of all, and where the
    layers' curvatures span many decades (GPT-2 with its weights ×100: the final
    LayerNorm's step alone predicts 0.73 of the loss, and scaling that layer alone takes
    the loss 27.8 → 4.2; the whole network's predicts 0.0014) that damping holds every
    direction but the sharpest back. Both are quadratic models, and either can be far
    from what a step realizes (an LSTM whose embedding alone predicts 0.47 moves the loss
    by 1% in 20 steps)."""
    name, best = None, whole.headroom
    for layer, bc in blocks.items():
        if math.isfinite(bc.headroom) and bc.headroom > best:
            name, best = layer, bc.headroom
    return best, name


def block_curvature(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Any,
    *,
    damping: float = DAMPING,
    lanczos_tol: float = 1e-2,
) -> BlockCurvature:
    """λmax, α* and the decrement of one block by exact GGN-vector products.

    The refinement of :func:`layer_curvature` where its estimate is too close to a
    verdict's threshold: Lanczos on the block's own operator for λmax (to
    ``lanczos_tol``), one product for ``gᵀGg``, and the same decrement
    ``½(gᵀg)²/(gᵀGg + λgᵀg)``.
    """
    op = curvature_operator(model, batch, loss_fn, params, kind="ggn")
    g = op.gradient
    lam = float(lanczos(op, 1, tol=lanczos_tol, max_matvecs=40).eigenvalues[0])
    step = curvature_step(op, g)
    return BlockCurvature(
        lambda_max=lam,
        alpha_star=step.alpha,
        decrement=_cauchy(step.grad_sq, step.curvature * step.grad_sq, damping * max(lam, 0.0)),
        loss=op.loss,
        matvecs=op.num_matvecs,
    )


def gradient_curvature(
    model: nn.Module, batch: Any, loss_fn: LossFn, params: Any, *, damping: float = DAMPING
) -> BlockCurvature:
    """α* and the decrement of one block along its gradient, from one GGN-vector product
    (no λmax): what the verdicts need of a layer the blockwise pass does not cover and the
    budget left unrefined. Its damping is relative to the curvature along the gradient
    (a lower bound of λmax: at 10⁻³ the difference is below rounding for the verdicts)."""
    op = curvature_operator(model, batch, loss_fn, params, kind="ggn")
    step = curvature_step(op, op.gradient)
    curv = max(step.curvature, 0.0) if math.isfinite(step.curvature) else 0.0
    return BlockCurvature(
        lambda_max=None,
        alpha_star=step.alpha,
        decrement=_cauchy(step.grad_sq, step.curvature * step.grad_sq, damping * curv),
        loss=op.loss,
        matvecs=op.num_matvecs,
    )


def _cauchy(gg: float, gag: float, lam: float) -> float:
    """``½(gᵀg)²/(gᵀGg + λgᵀg)``, the damped model's decrease along the gradient."""
    if gg == 0:
        return 0.0
    denom = gag + lam * gg
    return 0.5 * gg * gg / denom if denom > 0 else math.inf


def layer_curvature(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    layers: Sequence[str],
    *,
    lr: float | None = None,
    budget: float = 10.0,
    draws: int = 2,
    threshold: float = 1e-4,
    unstable: float = 4.0,
    damping: float = DAMPING,
    pass_seconds: float | None = None,
) -> tuple[dict[str, BlockCurvature], ModelHeadroom | None]:
    """Per-layer curvature of ``layers`` and the whole model's headroom, at one go.

    All layers come from :class:`~gradsight.curvature.blockwise.BlockwiseGGN` (one
    forward pass, the gradient's and the held-out half's backward passes and one
    backward pass per column of the output-Hessian factor), with standard errors.
    Then, within ``budget``:

    * a layer the blockwise pass does not cover is computed by :func:`block_curvature`
      (these first); those the budget leaves out get their curvature along the gradient
      (:func:`gradient_curvature`, one product each, no λmax), so that no verdict rests
      on signal flow alone where curvature was asked for;
    * a layer whose estimate is within two standard errors of a verdict's threshold
      (headroom ``threshold``; ``lr·λmax = unstable``) is recomputed exactly by
      :func:`block_curvature`, the closest first.

    Args:
        layers: module names (each block is the module's own trainable parameters).
        lr: the learning rate, for the ``lr·λmax`` threshold.
        budget: time allowed for the refinements, as a multiple of the blockwise pass's
            own forward-and-backward time; 0 for none, ``math.inf`` for all.
        draws: Monte Carlo draws of the output-Hessian factor when it is not exact.
        threshold: the headroom threshold of the verdicts.
        unstable: the ``lr·λmax`` threshold of the verdicts.
        pass_seconds: the time of one forward and backward pass, if the caller has
            timed one: the budget's unit is then the smaller of it and a quarter of the
            blockwise pass (whose first call in a process also pays one-time setup,
            which would leave a fresh process's first diagnosis without refinements).

    Returns:
        ``({layer: BlockCurvature}, ModelHeadroom)``; layers neither covered nor
        refined within the budget are left out, and the whole model's values are
        ``None`` when no layer is covered (or the loss's output Hessian has no factor).
    """
    start = time.perf_counter()
    modules = {name: model.get_submodule(name) for name in layers}
    out: dict[str, BlockCurvature] = {}
    todo: list[tuple[float, str]] = []
    whole: ModelHeadroom | None = None
    try:
        engine: BlockwiseGGN | None = BlockwiseGGN(
            model, batch, loss_fn, modules, draws=draws, held_out=True
        )
    except GradsightError:  # no factor for this loss: exact blocks within the budget
        engine = None
    unit = max(time.perf_counter() - start, 1e-6) / 4  # the pass is about four passes' work
    if pass_seconds is not None and pass_seconds > 0:
        unit = min(unit, pass_seconds)
    for name in layers:
        if engine is None or name not in engine.blocks:
            # First in line: without curvature its verdict rests on signal flow alone (an
            # estimate near a threshold, below, at least has one, with its error bar).
            todo.append((-1.0, name))
            continue
        est = engine.estimate(name, damping)
        bc = BlockCurvature(
            lambda_max=est.lambda_max,
            alpha_star=est.alpha_star,
            decrement=est.decrement,
            loss=engine.loss,
            matvecs=0,
            lambda_max_err=est.lambda_max_err,
            alpha_star_err=est.alpha_star_err,
            decrement_err=est.decrement_err,
            exact=est.exact,
        )
        out[name] = bc
        if not est.exact:
            margin = _margin(bc, lr, threshold, unstable)
            if margin < 2.0:
                todo.append((margin, name))
    if engine is not None and engine.blocks:
        whole_est = engine.whole(damping)
        whole = ModelHeadroom(
            lambda_max=whole_est.lambda_max,
            decrement=whole_est.decrement,
            loss=engine.loss,
            realized=_held_out(model, batch, loss_fn, engine, whole_est.lambda_max),
            lambda_max_err=whole_est.lambda_max_err,
            decrement_err=whole_est.decrement_err,
            coverage=len(engine.blocks) / max(len(layers), 1),
        )
    # A refinement costs ~45 GGN products of ~2 passes each; below MIN_SECONDS of
    # refinement in all (small models) the ratio to a pass does not matter.
    window = max(unit * budget, MIN_SECONDS if budget > 0 else 0.0)
    if todo and window < REFINE_PASSES * unit <= COLD_FACTOR * window:
        # The first pass of a model in a process pays torch's one-time costs (the
        # autograd engine's start, the allocator, lazy kernels): timed cold, a pass would
        # leave a process's first diagnosis fewer refinements than the next ones (a T5
        # got exact curvature on 34 of its 50 layers, then on all 50). Everything is
        # warm after the blockwise pass: one pass timed now is the unit's floor, where
        # the cold unit leaves a refinement out that a warm one could fit.
        unit = min(unit, _warm_pass_seconds(model, batch, loss_fn, modules))
        window = max(unit * budget, MIN_SECONDS)
    deadline = time.perf_counter() + window
    for _, name in sorted(todo):
        if time.perf_counter() + REFINE_PASSES * unit > deadline:
            break
        params = [p for p in modules[name].parameters(recurse=False) if p.requires_grad]
        out[name] = block_curvature(model, batch, loss_fn, params, damping=damping)
    if budget > 0:
        # Uncovered layers the budget left out still get the curvature along their
        # gradient (one product each): their headroom, scale-free, so that their verdict
        # never falls back to the size of their gradient, nor depends on the machine's load.
        for name in layers:
            if name not in out and (engine is None or name not in engine.blocks):
                params = [p for p in modules[name].parameters(recurse=False) if p.requires_grad]
                out[name] = gradient_curvature(model, batch, loss_fn, params, damping=damping)
    return {name: out[name] for name in layers if name in out}, whole


def _warm_pass_seconds(
    model: nn.Module, batch: Any, loss_fn: LossFn, modules: Mapping[str, nn.Module]
) -> float:
    """Seconds of one forward and backward pass (the gradient of the layers' own
    parameters), with the model's buffers and the RNG left as they were."""
    params = [p for m in modules.values() for p in m.parameters(recurse=False) if p.requires_grad]
    inputs, targets = split_batch(batch)
    start = time.perf_counter()
    with preserved(model), torch.enable_grad():
        loss = loss_fn(call_model(model, inputs), targets)
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
    return max(time.perf_counter() - start, 1e-6)


def _margin(bc: BlockCurvature, lr: float | None, threshold: float, unstable: float) -> float:
    """Standard errors between the estimate and the nearest verdict threshold."""
    margins = [math.inf]
    if bc.headroom_err > 0 and math.isfinite(bc.headroom):
        margins.append(abs(bc.headroom - threshold) / bc.headroom_err)
    if lr is not None and bc.lambda_max is not None and bc.lambda_max_err > 0:
        margins.append(abs(lr * bc.lambda_max - unstable) / (lr * bc.lambda_max_err))
    return min(margins)


def _held_out(
    model: nn.Module, batch: Any, loss_fn: LossFn, engine: BlockwiseGGN, lam: float
) -> float | None:
    """Held-out decrease of the block-scaled Levenberg–Marquardt step fitted on half."""
    halves = _split_halves(batch)
    if halves is None:
        return None
    _, held_out = halves
    params = [p for b in engine.blocks.values() for p in b.params]
    before = loss_at(model, held_out, loss_fn, params, None)
    if not math.isfinite(before) or before == 0:
        return None

    def decrease(rel: float) -> float | None:
        step = engine.held_out_step(rel * max(lam, torch.finfo(torch.float64).tiny))
        if step is None:
            return None
        after = loss_at(model, held_out, loss_fn, params, step)
        return (before - after) / abs(before) if math.isfinite(after) else -math.inf

    # The most damped (shortest) step first: when even it does not help, the longer
    # ones are not tried (one held-out pass instead of four where there is no headroom).
    last = decrease(LM_DAMPINGS[-1])
    if last is None or last <= 0:
        return None if last is None else 0.0
    for rel in LM_DAMPINGS[:-1]:
        gain = decrease(rel)
        if gain is not None and gain > 0:
            return gain  # the least damping that helps
    return last


def model_headroom(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    damping: float = DAMPING,
    cg_iters: int = 40,
) -> ModelHeadroom:
    """Whole-model λmax and decrement on ``batch``, and the held-out realized decrease."""
    op = curvature_operator(model, batch, loss_fn, None, kind="ggn")
    lam = float(lanczos(op, 1, tol=2e-2, max_matvecs=30).eigenvalues[0])
    tiny = torch.finfo(op.dtype).tiny
    nd = damped_newton_decrement(
        op, op.gradient, damping * max(lam, tiny), tol=1e-2, max_iter=cg_iters
    )
    return ModelHeadroom(
        lambda_max=lam,
        decrement=nd.decrement,
        loss=op.loss,
        realized=_realized_decrease(model, batch, loss_fn, cg_iters=cg_iters),
    )


def _realized_decrease(
    model: nn.Module, batch: Any, loss_fn: LossFn, *, cg_iters: int
) -> float | None:
    halves = _split_halves(batch)
    if halves is None:
        return None
    fit, held_out = halves
    op = curvature_operator(model, fit, loss_fn, None, kind="ggn")
    lam = float(lanczos(op, 1, tol=1e-1, max_matvecs=20).eigenvalues[0])
    params = op._params
    before = loss_at(model, held_out, loss_fn, params, None)
    if not math.isfinite(before) or before == 0:
        return None
    best = 0.0
    for rel in LM_DAMPINGS:
        nd = damped_newton_decrement(
            op,
            op.gradient,
            rel * max(lam, torch.finfo(op.dtype).tiny),
            tol=1e-2,
            max_iter=cg_iters,
        )
        if not math.isfinite(nd.decrement):
            continue
        after = loss_at(model, held_out, loss_fn, params, nd.step)
        if math.isfinite(after) and after < before:
            best = (before - after) / abs(before)
            break  # the least damping that decreases the held-out loss
    return best


def loss_at(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    step: torch.Tensor | Mapping[str, torch.Tensor] | None,
) -> float:
    """Loss with ``step`` added to ``params``, without writing to the model.

    ``step`` is flat (in the order of ``params``) or keyed by ``str(id(p))`` (missing
    parameters do not move).
    """
    inputs, targets = split_batch(batch)
    replacements: dict[int, torch.Tensor] = {}
    if isinstance(step, Mapping):
        for p in params:
            d = step.get(str(id(p)))
            if d is not None:
                replacements[id(p)] = p.detach() + d.view_as(p).to(p.dtype)
    elif step is not None:
        offset = 0
        for p in params:
            n = p.numel()
            replacements[id(p)] = p.detach() + step[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
    with preserved(model), swapped_parameters(model, replacements), torch.no_grad():
        return float(loss_fn(call_model(model, inputs), targets))


def _split_halves(batch: Any) -> tuple[Any, Any] | None:
    """Split a batch whose tensors share a leading batch size into two halves."""
    inputs, targets = split_batch(batch)
    sizes = {t.shape[0] for t in _leaves((inputs, targets)) if t.ndim > 0}
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    if n < 8:
        return None
    half = n // 2
    first, second = slice(0, half), slice(half, n)
    return (
        (_take(inputs, first), _take(targets, first)),
        (_take(inputs, second), _take(targets, second)),
    )


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _leaves(item)]
    return []


def _fraction(value: float, loss: float) -> float:
    if not math.isfinite(value):
        return math.inf
    return value / abs(loss) if loss else (0.0 if value == 0 else math.inf)
