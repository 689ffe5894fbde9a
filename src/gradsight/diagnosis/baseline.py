"""The trivial baseline: the loss of the best constant prediction.

A model whose loss is no better than predicting one constant output for every sample
(the class frequencies for cross-entropy, the target mean for squared error, the
unigram distribution for a language model) has learned nothing from its inputs,
whatever its gradients say: that is a *plateau*.

The constant is one value per output feature, shared by every sample and every
position of a sequence or image, and it is judged on samples it was not fitted on
(two-fold cross-fitting), so that it cannot memorize the batch: with a vocabulary of
2,048 and 1,024 tokens in the batch, a unigram fitted on the batch itself would "know"
every token it is scored on. With at least 50 rows per feature (a classifier's batch)
memorizing is worth under 2% of the loss, and the constant is fitted on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gradsight._outputs import FlatOutputs, output_keys

__all__ = ["constant_baseline_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]

# Shrinkage from the model's mean output (t = 0) to the fitted constant (t = 1); the
# held-out loss picks t, as a ridge path picks its penalty.
_PATH = (0.0, 0.25, 0.5, 1.0)
_IN_SAMPLE_ROWS = 50


def constant_baseline_loss(
    outputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    max_iter: int = 10,
) -> float | None:
    """Held-out loss of the best constant output, one value per output feature.

    The constant has one entry per output feature, broadcast over the batch and over
    every other dimension: shape ``(C,)`` for ``(batch, C)`` outputs; the last
    dimension of ``(batch, seq, vocab)`` outputs (a language model's unigram); dimension
    1 of ``(batch, C, H, W, ...)`` outputs (a segmentation map's class frequencies). It
    is fitted with L-BFGS on
    one half of the batch (samples 0, 2, 4, ...) and scored on the other, and the other
    way round; the held-out loss also chooses how far to move from the model's mean
    output towards the fitted constant. With at least 50 rows (samples × positions) per
    feature, fewer than 4 samples, or targets that cannot be split along the batch, it is
    fitted and scored on the whole batch.

    For cross-entropy this is (up to the held-out correction, O(C/n)) the entropy of
    the label frequencies; for mean squared error the target variance.

    For structured outputs (a Hugging Face ``ModelOutput``: its ``logits``; a dict, tuple
    or list of heads: every floating tensor with the batch's first dimension), the
    constant replaces those entries, one value per feature of each.

    Returns:
        The baseline loss, or None when ``outputs`` holds no floating tensor with a
        batch dimension to replace, or the loss cannot be evaluated on a constant.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> y = torch.randint(0, 3, (600,), generator=gen)
        >>> freq = torch.bincount(y).double() / len(y)
        >>> entropy = float(-(freq * freq.log()).sum())
        >>> base = constant_baseline_loss(torch.randn(600, 3), y, torch.nn.functional.cross_entropy)
        >>> entropy <= base < 1.01 * entropy
        True
    """
    if not isinstance(outputs, torch.Tensor):
        keys = output_keys(outputs)
        if keys is None:
            return None
        # One entry keeps its shape (a (batch, seq, vocab) tensor shares one constant over
        # its positions); several heads are flattened: one constant per head's feature.
        flat = FlatOutputs(keys)
        whole = flat.flatten(outputs)
        return constant_baseline_loss(
            whole, targets, lambda o, t: loss_fn(flat.rebuild(o), t), max_iter=max_iter
        )
    if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        return None
    if outputs.ndim == 0 or outputs.shape[0] == 0:
        return None
    values = []
    for dims in _feature_dims(outputs):
        try:
            values.append(_baseline(outputs.detach(), targets, loss_fn, dims, max_iter))
        except Exception:  # a loss that cannot take a constant prediction has no baseline
            continue
    finite = [v for v in values if v is not None and torch.isfinite(torch.tensor(v))]
    return min(finite) if finite else None


def _feature_dims(outputs: torch.Tensor) -> list[tuple[int, ...]]:
    """Candidate dimensions that hold the output features (the rest are shared)."""
    if outputs.ndim <= 1:
        return [()]
    if outputs.ndim == 3:
        return [(2,)]  # (batch, seq, features), as transformers' and torch's sequence models
    return [(1,)]  # (batch, features) and channels-first (batch, C, H, W, ...)


def _mean_constant(outputs: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    reduce = [d for d in range(outputs.ndim) if d not in dims]
    return outputs.mean(dim=reduce, keepdim=True)


def _baseline(
    outputs: torch.Tensor, targets: Any, loss_fn: LossFn, dims: Sequence[int], max_iter: int
) -> float | None:
    with torch.no_grad():
        start = _mean_constant(outputs, dims)
        at_start = float(loss_fn(start.expand_as(outputs), targets))
    features = max(math.prod(outputs.shape[d] for d in dims), 1)
    rows = outputs.numel() // features
    # Memorizing costs O(features / rows) of the loss: with 50 rows per feature or more
    # (a classifier's batch) the in-sample fit is within 2% and one fit is enough.
    halves = _halves(outputs, targets) if rows < _IN_SAMPLE_ROWS * features else None
    if halves is None:
        fitted = _fit(start, outputs, targets, loss_fn, max_iter)
        with torch.no_grad():
            return min(at_start, float(loss_fn(fitted.expand_as(outputs), targets)))
    (out_a, y_a), (out_b, y_b) = halves
    with torch.no_grad():
        combine = _combiner(loss_fn, start, outputs, targets, halves)
    fit_a = _fit(_mean_constant(out_a, dims), out_a, y_a, loss_fn, max_iter)
    fit_b = _fit(_mean_constant(out_b, dims), out_b, y_b, loss_fn, max_iter)
    best = at_start
    with torch.no_grad():
        start_a, start_b = _mean_constant(out_a, dims), _mean_constant(out_b, dims)
        for t in _PATH:
            c_a = start_a + t * (fit_a - start_a)
            c_b = start_b + t * (fit_b - start_b)
            held_out = combine(
                float(loss_fn(c_a.expand_as(out_b), y_b)), float(loss_fn(c_b.expand_as(out_a), y_a))
            )
            best = min(best, held_out)
    return best


def _halves(
    outputs: torch.Tensor, targets: Any
) -> tuple[tuple[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None:
    """Even and odd samples of the batch (targets: a tensor, or a dict, tuple or list of
    them, split along their first dimension), or None when they cannot be split."""
    n = outputs.shape[0]
    if n < 4 or not _splittable(targets, n):
        return None
    return (outputs[0::2], _take(targets, 0)), (outputs[1::2], _take(targets, 1))


def _splittable(targets: Any, n: int) -> bool:
    if isinstance(targets, torch.Tensor):
        return targets.ndim >= 1 and targets.shape[0] == n
    if isinstance(targets, Mapping):
        return bool(targets) and all(_splittable(v, n) for v in targets.values())
    if isinstance(targets, (tuple, list)):
        return bool(targets) and all(_splittable(v, n) for v in targets)
    return False


def _take(targets: Any, start: int) -> Any:
    if isinstance(targets, torch.Tensor):
        return targets[start::2]
    if isinstance(targets, Mapping):
        return {k: _take(v, start) for k, v in targets.items()}
    return type(targets)(_take(v, start) for v in targets)


def _combiner(
    loss_fn: LossFn,
    start: torch.Tensor,
    outputs: torch.Tensor,
    targets: Any,
    halves: tuple[tuple[torch.Tensor, Any], tuple[torch.Tensor, Any]],
) -> Callable[[float, float], float]:
    """How two halves' losses make a whole batch's: summed (``reduction="sum"``) or
    averaged by size (``"mean"``), whichever reproduces the whole batch's loss."""
    (out_a, y_a), (out_b, y_b) = halves
    whole = float(loss_fn(start.expand_as(outputs), targets))
    la = float(loss_fn(start.expand_as(out_a), y_a))
    lb = float(loss_fn(start.expand_as(out_b), y_b))
    wa, wb = out_a.shape[0] / outputs.shape[0], out_b.shape[0] / outputs.shape[0]
    if abs(whole - (la + lb)) < abs(whole - (wa * la + wb * lb)):
        return lambda a, b: a + b
    # The loss on half A is scored with the constant fitted on B and the other way round.
    return lambda on_b, on_a: wb * on_b + wa * on_a


def _fit(
    start: torch.Tensor, outputs: torch.Tensor, targets: Any, loss_fn: LossFn, max_iter: int
) -> torch.Tensor:
    """The constant (shaped like ``start``) minimizing the loss on ``outputs``' batch."""
    const = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [const], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12
    )
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
    return const.detach()
