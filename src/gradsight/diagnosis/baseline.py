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

The fit starts from the closed-form optimum of the usual losses, read off the targets:
the log class frequencies (cross-entropy on class indices), the target mean (squared
error), its logit (binary cross-entropy). For those losses the fit stops at once (the
gradient there is zero); for any other loss it is a few L-BFGS iterations from the best
of these starts, so a custom loss only costs more time, never a different answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradsight._outputs import FlatOutputs, output_keys
from gradsight.curvature.ggn import class_loss_settings, cross_entropy_settings, mse_reduction

__all__ = ["constant_baseline_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]

# Shrinkage from the model's mean output (t = 0) to the fitted constant (t = 1); the
# held-out loss picks t, as a ridge path picks its penalty.
_PATH = (0.0, 0.25, 0.5, 1.0)
# For a closed form that is the exact minimum on its half: at most halfway back.
_EXACT_PATH = _PATH[2:]
_IN_SAMPLE_ROWS = 50
# A constant is the minimum where every entry of ∂loss/∂c is within this fraction of the
# loss (relative, so that c·loss is solved as loss is); L-BFGS stops there too.
_TOLERANCE_GRAD = 1e-6
# Count added to every class for a constant scored on samples it was not fitted on (the
# Krichevsky-Trofimov estimator): a class absent from one half is not impossible.
_HELD_OUT_COUNT = 0.5
# Count given to absent classes in the in-sample optimum (log 0 is -inf).
_ABSENT_COUNT = 1e-6

Candidate = Callable[[torch.Tensor, Any], "_Start | None"]
T = TypeVar("T", torch.Tensor, np.ndarray)


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
    is fitted on one half of the batch (samples 0, 2, 4, ...) and scored on the other,
    and the other way round; the held-out loss also chooses how far to move from the
    model's mean output towards the fitted constant. With at least 50 rows (samples ×
    positions) per feature, fewer than 4 samples, or targets that cannot be split along
    the batch, it is fitted and scored on the whole batch. The fit is the closed-form
    optimum where the loss is a usual one (see the module docstring), L-BFGS otherwise.

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
        >>> abs(base - entropy) < 1e-12  # 200 rows per class: fitted on the whole batch
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
        if not isinstance(whole, torch.Tensor) or whole.ndim == 0 or whole.shape[0] == 0:
            return None
        dims = _feature_dims(whole)
        candidate = _structured_candidate(flat) if len(keys) > 1 else None
        return _safe_baseline(
            whole.detach(),
            targets,
            lambda o, t: loss_fn(flat.rebuild(o), t),
            dims,
            max_iter,
            candidate or _tensor_candidate(dims),
        )
    if not outputs.is_floating_point() or outputs.ndim == 0 or outputs.shape[0] == 0:
        return None
    known = _cross_entropy_baseline(outputs.detach(), targets, loss_fn)
    if known is None:
        known = _squared_error_baseline(outputs.detach(), targets, loss_fn)
    if known is not None:
        return known
    dims = _feature_dims(outputs)
    return _safe_baseline(
        outputs.detach(), targets, loss_fn, dims, max_iter, _tensor_candidate(dims)
    )


#: A fitted constant whose loss falls this many times the loss at the model's mean
#: output below it has found no minimum: the loss is unbounded below in the constant
#: (a negative log-likelihood of outputs that are not normalized).
_UNBOUNDED = 1e3


def _safe_baseline(
    outputs: torch.Tensor,
    targets: Any,
    loss_fn: LossFn,
    dims: tuple[int, ...],
    max_iter: int,
    candidate: Candidate,
) -> float | None:
    try:
        value = _baseline(outputs, targets, loss_fn, dims, max_iter, candidate)
    except Exception:  # a loss that cannot take a constant prediction has no baseline
        return None
    return value if value is not None and math.isfinite(value) else None


def _bounded(value: float, at_start: float) -> float | None:
    """``value``, or None where it is :data:`_UNBOUNDED` times the loss at the model's mean
    output below it (no best constant: the loss falls without bound)."""
    return None if value < at_start - _UNBOUNDED * max(abs(at_start), 1e-12) else value


def _cross_entropy_baseline(outputs: torch.Tensor, targets: Any, loss_fn: LossFn) -> float | None:
    """The baseline of ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` (mean or sum, no
    class weights or label smoothing), or of ``F.nll_loss`` / ``nn.NLLLoss`` on
    log-probabilities (see :func:`_nll_settings`), on class indices, from the class
    counts alone: the same constants and held-out scoring as the general fit, without a
    call of the loss. None for any other loss or target layout."""
    settings = cross_entropy_settings(loss_fn, targets, label_smoothing=False)
    if settings is None:
        settings = _nll_settings(loss_fn, targets)
    if settings is None or outputs.ndim < 2 or targets.is_floating_point():
        return None
    if _feature_dims(outputs) != (1,) or targets.shape != outputs.shape[:1] + outputs.shape[2:]:
        return None
    reduction, ignore_index = settings
    classes, samples = outputs.shape[1], outputs.shape[0]
    with torch.no_grad():
        # Per sample: the logits summed over positions, and the labels; on the host, where
        # the rest is counting and arithmetic on class vectors.
        per_sample = outputs.movedim(1, -1).reshape(samples, -1, classes)
        sums = per_sample.sum(dim=1, dtype=torch.float64).cpu().numpy()
        labels = targets.reshape(samples, -1).cpu().numpy()
    valid = labels != ignore_index
    if not valid.any() or bool(((labels < 0) | (labels >= classes))[valid].any()):
        return None  # the loss itself says what is wrong
    positions = labels.shape[1]

    def counts(half: slice) -> np.ndarray:
        return np.bincount(labels[half][valid[half]], minlength=classes).astype(np.float64)

    # Half A is the even samples, half B the odd ones.
    a, b = slice(0, None, 2), slice(1, None, 2)
    n_a, n_b = counts(a), counts(b)
    sum_a, sum_b = sums[a].sum(axis=0), sums[b].sum(axis=0)
    rows_a, rows_b = (samples + 1) // 2 * positions, samples // 2 * positions
    n = n_a + n_b
    scale = float(n.sum()) if reduction == "mean" else 1.0

    def summed(c: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """−Σ_k n_k log softmax(c)_k for each row of ``c``."""
        shifted = c - c.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return -(counts * log_p).sum(axis=-1)

    def centered_log(counts: np.ndarray) -> np.ndarray:
        logits = np.log(counts)
        return logits - logits.mean(axis=-1, keepdims=True)

    at_start = float(summed((sum_a + sum_b) / (rows_a + rows_b), n)) / scale
    if (rows_a + rows_b) >= _IN_SAMPLE_ROWS * classes or samples < 4:
        return min(at_start, float(summed(centered_log(n + _ABSENT_COUNT), n)) / scale)
    # Each half's constants: its mean output moved towards its log frequencies, and the
    # frequencies with half a row more in every class; scored on the other half.
    fit_a, fit_b, held_a, held_b = centered_log(
        np.stack(
            [n_a + _ABSENT_COUNT, n_b + _ABSENT_COUNT, n_a + _HELD_OUT_COUNT, n_b + _HELD_OUT_COUNT]
        )
    )
    t = np.array(_EXACT_PATH)[:, None]
    start_a, start_b = sum_a / rows_a, sum_b / rows_b
    consts_a = np.vstack([start_a + t * (fit_a - start_a), held_a])
    consts_b = np.vstack([start_b + t * (fit_b - start_b), held_b])
    held_out = (summed(consts_a, n_b) + summed(consts_b, n_a)) / scale
    return min(at_start, float(held_out.min()))


def _nll_settings(loss_fn: LossFn, targets: Any) -> tuple[str, int] | None:
    """``(reduction, ignore_index)`` of an unweighted ``F.nll_loss`` / ``nn.NLLLoss``.

    Its inputs are log-probabilities (a model ending in ``LogSoftmax``), so the constant
    that replaces them must be one too: a constant c scores as ``log_softmax(c)``, which
    makes it cross-entropy in the constant. Left to the general fit, NLL of a free
    constant falls without bound (−c[y] as c[y] → ∞)."""
    return class_loss_settings(loss_fn, targets, nn.NLLLoss, F.nll_loss)


def _squared_error_baseline(outputs: torch.Tensor, targets: Any, loss_fn: LossFn) -> float | None:
    """The baseline of ``F.mse_loss`` / ``nn.MSELoss`` (mean or sum) on targets of the
    outputs' shape, from the targets' per-feature sums alone: the same constants (the
    target mean; the path from the model's mean output) and held-out scoring as the
    general fit, without a call of the loss. None for any other loss or target layout.

    On rows r of one feature, Σ_r (c − y_r)² = m c² − 2c Σy + Σy² (m rows): every
    candidate constant is scored from the three sums of the half it is scored on."""
    reduction = mse_reduction(loss_fn, outputs, targets)
    if reduction is None or not targets.is_floating_point() or outputs.ndim < 1:
        return None
    dims = _feature_dims(outputs)
    n, total = outputs.shape[0], outputs.numel()
    with torch.no_grad():
        # Per sample and feature: Σ output, Σy, Σy², in one copy to the host.
        y, out = targets.detach().double(), outputs.detach().double()
        per = torch.stack([out, y, y.square()])
        shared = [d + 1 for d in range(1, outputs.ndim) if d not in dims]
        host = (per.sum(dim=shared) if shared else per).reshape(3, n, -1).cpu().numpy()
    features = host.shape[2]

    def scores(consts: np.ndarray, stats: np.ndarray, entries: int) -> np.ndarray:
        """The loss of each row of ``consts`` on the rows ``stats`` (Σ output, Σy, Σy²)
        sums."""
        m = entries / features  # rows per feature
        summed = (m * consts**2 - 2 * consts * stats[1] + stats[2]).sum(axis=1)
        return summed / entries if reduction == "mean" else summed

    whole = host.sum(axis=1)
    at_start, in_sample = scores(
        np.stack([whole[0], whole[1]]) * (features / total), whole, total
    ).tolist()
    if total // features >= _IN_SAMPLE_ROWS * features or n < 4:
        return min(at_start, in_sample)
    # Each half's constants (the model's mean output, the target mean) scored on the other.
    a, b = host[:, 0::2].sum(axis=1), host[:, 1::2].sum(axis=1)
    n_a, n_b = (n + 1) // 2, n // 2
    e_a, e_b = total // n * n_a, total // n * n_b
    start_a, fit_a = a[:2] * (features / e_a)
    start_b, fit_b = b[:2] * (features / e_b)
    pairs = _shrunk(start_a, fit_a, start_b, fit_b, _EXACT_PATH)
    on_b = scores(np.stack([c for c, _ in pairs]), b, e_b)
    on_a = scores(np.stack([c for _, c in pairs]), a, e_a)
    if reduction == "mean":
        held_out = (on_b * (n_b / n) + on_a * (n_a / n)).tolist()
    else:
        held_out = (on_b + on_a).tolist()
    return min(at_start, *held_out)


def _feature_dims(outputs: torch.Tensor) -> tuple[int, ...]:
    """The dimensions that hold the output features (the rest are shared)."""
    if outputs.ndim <= 1:
        return ()
    if outputs.ndim == 3:
        return (2,)  # (batch, seq, features), as transformers' and torch's sequence models
    return (1,)  # (batch, features) and channels-first (batch, C, H, W, ...)


def _tensor_candidate(dims: tuple[int, ...]) -> Candidate:
    return lambda outputs, targets: _closed_form(outputs, targets, dims)


@dataclass
class _Start:
    """A closed-form start: the constant and, for cross-entropy, the class counts it is
    the log of (weighted as the loss weighs its rows; ``row`` is one row's weight)."""

    const: torch.Tensor
    counts: torch.Tensor | None = None
    row: float = 1.0

    def smoothed(self, extra: float) -> torch.Tensor:
        """The constant with ``extra`` rows added to every class's count."""
        assert self.counts is not None
        logits = _centered_log(self.counts, extra * self.row)
        return logits.to(self.const.dtype).reshape(self.const.shape)


def _log_counts(counts: torch.Tensor, row: float, shape: list[int], dtype: torch.dtype) -> _Start:
    logits = _centered_log(counts, _ABSENT_COUNT * row)
    return _Start(logits.to(dtype).reshape(shape), counts, row)


def _centered_log(counts: torch.Tensor, extra: float) -> torch.Tensor:
    """Logits of the class frequencies with ``extra`` added to every count (softmax is
    shift-invariant: centered, so that shrinking towards another constant is by shape)."""
    logits = (counts + extra).log()
    return logits - logits.mean()


def _shrunk(start_a: T, fit_a: T, start_b: T, fit_b: T, path: Sequence[float]) -> list[tuple[T, T]]:
    """Each half's constant moved a fraction ``t`` of the way from its mean output to its
    fit, for each ``t`` of ``path``."""
    return [(start_a + t * (fit_a - start_a), start_b + t * (fit_b - start_b)) for t in path]


def _closed_form(outputs: torch.Tensor, targets: Any, dims: tuple[int, ...]) -> _Start | None:
    """The constant that minimizes the usual loss these targets are for, shaped like the
    model's mean output (one entry per feature), or None for targets of no usual form.

    Class indices, one per row (the outputs' shape without the feature dimension, in any
    layout of the same size): the log of each class's count, the minimum of
    cross-entropy. Floating targets of the outputs' size: their mean per feature, the
    minimum of squared error (binary cross-entropy's, its logit, is tried beside it).
    """
    if not isinstance(targets, torch.Tensor) or targets.is_complex():
        return None
    shape = _constant_shape(outputs, dims)
    features = math.prod(shape)
    with torch.no_grad():
        if not targets.is_floating_point():
            if targets.dtype == torch.bool or targets.numel() * features != outputs.numel():
                return None
            if len(dims) != 1 or features < 2:
                return None
            labels = targets.reshape(-1).long()
            labels = labels[(labels >= 0) & (labels < features)]  # ignore_index drops out
            if labels.numel() == 0:
                return None
            counts = torch.bincount(labels, minlength=features).to(torch.float64)
            return _log_counts(counts, 1.0, shape, outputs.dtype)
        if targets.numel() != outputs.numel():
            return None
        t = targets.detach().reshape(outputs.shape).to(torch.float64)
        reduce = [d for d in range(outputs.ndim) if d not in dims]
        return _Start(t.mean(dim=reduce, keepdim=True).to(outputs.dtype))


def _constant_shape(outputs: torch.Tensor, dims: Sequence[int]) -> list[int]:
    shape = [1] * outputs.ndim
    for d in dims:
        shape[d] = outputs.shape[d]
    return shape


def _binary_alternative(start: _Start, targets: Any) -> _Start | None:
    """The logit of a mean in [0, 1]: the constant binary cross-entropy wants."""
    const = start.const
    if start.counts is not None or not isinstance(targets, torch.Tensor):
        return None
    if bool((const < 0).any()) or bool((const > 1).any()):
        return None
    return _Start(torch.logit(const.to(torch.float64), eps=1e-6).to(const.dtype))


def _cross_entropy_from_gradients(
    a: torch.Tensor, g_a: torch.Tensor, b: torch.Tensor, g_b: torch.Tensor, dim: int, rows: int
) -> _Start | None:
    """The minimum of a loss that is cross-entropy in the constant, whatever its rows,
    weights or scale (a language model's loss on shifted targets, ``c × loss``), read off
    its gradient at two constants.

    For L(c) = Σ_r w_r CE(c, y_r) the gradient is W·softmax(c) − n, with n the weighted
    class counts and W = Σ n: two gradients give W (their difference is W·(p_b − p_a)),
    then n. None when the gradients do not have this form (W ≤ 0, counts below zero);
    whether the result is the minimum is checked by the caller.
    """
    with torch.no_grad():
        p_a = torch.softmax(a.double(), dim=dim)
        p_b = torch.softmax(b.double(), dim=dim)
        dp, dg = p_b - p_a, g_b.double() - g_a.double()
        denom = float((dp * dp).sum())
        if not denom > 0:
            return None
        total = float((dg * dp).sum()) / denom
        if not (math.isfinite(total) and total > 0):
            return None
        counts = total * p_a - g_a.double()
        if float(counts.min()) < -1e-3 * total / counts.numel():
            return None
        return _log_counts(counts.clamp_min(0.0), total / max(rows, 1), list(a.shape), a.dtype)


def _structured_candidate(flat: FlatOutputs) -> Candidate:
    """Closed-form starts for several heads flattened into one ``(batch, D)`` tensor: each
    head's from the targets under the same key (a dict of targets) or position (a
    tuple or list), its model mean where there are none."""
    keys, shapes = list(flat.keys), list(flat.shapes)

    def candidate(whole: torch.Tensor, targets: Any) -> _Start | None:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        parts, found = [], False
        for key, shape, chunk in zip(keys, shapes, torch.split(whole, sizes, dim=1), strict=True):
            head = chunk.reshape(whole.shape[0], *shape)
            target = _entry(targets, key)
            start = None if target is None else _closed_form(head, target, _feature_dims(head))
            const = head.mean(dim=0, keepdim=True)
            if start is not None and start.const.ndim == head.ndim:
                const, found = start.const.expand(1, *shape), True
            parts.append(const.reshape(1, -1))
        return _Start(torch.cat(parts, dim=1)) if found else None

    return candidate


def _entry(targets: Any, key: Any) -> Any:
    if isinstance(targets, Mapping):
        return targets.get(key)
    if isinstance(targets, (tuple, list)) and isinstance(key, int) and key < len(targets):
        return targets[key]
    return None


def _mean_constant(outputs: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    reduce = [d for d in range(outputs.ndim) if d not in dims]
    return outputs.mean(dim=reduce, keepdim=True)


def _baseline(
    outputs: torch.Tensor,
    targets: Any,
    loss_fn: LossFn,
    dims: Sequence[int],
    max_iter: int,
    candidate: Candidate,
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
        fit = _fit(start, outputs, targets, loss_fn, dims, max_iter, candidate)
        return _bounded(min(at_start, fit.loss), at_start)
    (out_a, y_a), (out_b, y_b) = halves
    in_a = _rows_of_a(outputs)
    with torch.no_grad():
        start_a, start_b = _mean_constant(out_a, dims), _mean_constant(out_b, dims)
    both = _exact_halves(outputs, targets, loss_fn, halves, in_a, candidate, start_a.shape)
    if both is None:
        fit_a = _fit(start_a, out_a, y_a, loss_fn, dims, max_iter, candidate)
        fit_b = _fit(start_b, out_b, y_b, loss_fn, dims, max_iter, candidate)
    else:
        fit_a, fit_b = both
    # How far to move from each half's mean output towards its fit, chosen on held-out
    # loss; a closed form solved exactly needs no strong shrinkage.
    path = _PATH if fit_a.exact is None or fit_b.exact is None else _EXACT_PATH
    pairs = _shrunk(start_a, fit_a.const, start_b, fit_b.const, path)
    counted = [
        f.exact for f in (fit_a, fit_b) if f.exact is not None and f.exact.counts is not None
    ]
    if len(counted) == 2:
        # Cross-entropy, solved in closed form: scored on the other half, a class's
        # frequency counts half a row more in every class (Krichevsky-Trofimov), as a
        # class absent from one half is still possible in the other.
        pairs.append((counted[0].smoothed(_HELD_OUT_COUNT), counted[1].smoothed(_HELD_OUT_COUNT)))
    best = at_start
    with torch.no_grad():
        # Each half scored with the other half's constant, in one call on the whole batch:
        # the loss weighs the rows as it weighs the batch's.
        for c_a, c_b in pairs:
            held_out = torch.where(in_a, c_b, c_a).expand_as(outputs)
            best = min(best, float(loss_fn(held_out, targets)))
    return _bounded(best, at_start)


def _rows_of_a(outputs: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, ...]``: True on the samples of half A (the even ones)."""
    even = torch.arange(outputs.shape[0], device=outputs.device) % 2 == 0
    return even.view(-1, *[1] * (outputs.ndim - 1))


def _exact_halves(
    outputs: torch.Tensor,
    targets: Any,
    loss_fn: LossFn,
    halves: tuple[tuple[torch.Tensor, Any], tuple[torch.Tensor, Any]],
    in_a: torch.Tensor,
    candidate: Candidate,
    shape: torch.Size,
) -> tuple[_Fitted, _Fitted] | None:
    """Both halves' closed forms, where each is the minimum on its half: checked at once,
    with one call of the loss on the whole batch (each half's rows holding its own
    constant) and one gradient, as :func:`_fit` checks one. None where they are not
    (:func:`_fit` then fits each half on its own)."""
    (out_a, y_a), (out_b, y_b) = halves
    found = candidate(out_a, y_a), candidate(out_b, y_b)
    if any(f is None or f.const.shape != shape for f in found):
        return None
    exact_a, exact_b = found
    assert exact_a is not None and exact_b is not None
    c_a, c_b = (f.const.detach().clone().requires_grad_(True) for f in (exact_a, exact_b))
    with torch.enable_grad():
        value = loss_fn(torch.where(in_a, c_a, c_b).expand_as(outputs), targets)
        g_a, g_b = torch.autograd.grad(value, [c_a, c_b])
    loss = float(value.detach())
    if not (_stationary(loss, g_a) and _stationary(loss, g_b)):
        return None
    return _Fitted(exact_a.const, loss, exact_a), _Fitted(exact_b.const, loss, exact_b)


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
        return targets[start::2].contiguous()  # a loss may .view() its labels (transformers')
    if isinstance(targets, Mapping):
        return {k: _take(v, start) for k, v in targets.items()}
    return type(targets)(_take(v, start) for v in targets)


def _stationary(value: float, g: torch.Tensor) -> bool:
    """Whether the loss ``value`` is at a minimum of the constant: every entry of its
    gradient ``g`` within :data:`_TOLERANCE_GRAD` of it (relative, so that c·loss is
    solved as loss is)."""
    return (
        math.isfinite(value)
        and bool(torch.isfinite(g).all())
        and float(g.abs().max()) <= _TOLERANCE_GRAD * abs(value)
    )


@dataclass
class _Fitted:
    """A fitted constant, its loss (both halves' at once, for closed forms checked together
    by :func:`_exact_halves`), and the closed-form start it is (None: fitted by L-BFGS)."""

    const: torch.Tensor
    loss: float
    exact: _Start | None


def _fit(
    start: torch.Tensor,
    outputs: torch.Tensor,
    targets: Any,
    loss_fn: LossFn,
    dims: Sequence[int],
    max_iter: int,
    candidate: Candidate,
) -> _Fitted:
    """The constant (shaped like ``start``, the model's mean output) minimizing the loss
    on ``outputs``' batch.

    Closed forms are tried first (from the targets; then, for a loss that is
    cross-entropy in the constant, from two of its gradients); one is the minimum when the
    loss's gradient there vanishes (every entry of ∂loss/∂c within 10⁻⁶ of the loss:
    relative, so that c·loss is solved as loss is). Otherwise L-BFGS runs from the best
    point seen."""

    def gradient(c: torch.Tensor) -> tuple[float, torch.Tensor]:
        const = c.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = loss_fn(const.expand_as(outputs), targets)
            (g,) = torch.autograd.grad(value, const)
        return float(value.detach()), g

    found = candidate(outputs, targets)
    tried = [] if found is None else [found, _binary_alternative(found, targets)]
    best, best_value, g = start, math.inf, None
    for s in tried:
        if s is None or s.const.shape != start.shape:
            continue
        value, s_g = gradient(s.const)
        if _stationary(value, s_g):
            return _Fitted(s.const, value, s)
        if value < best_value:
            best, best_value, g = s.const, value, s_g
    if g is None:
        best_value, g = gradient(start)
    if len(dims) == 1 and outputs.shape[dims[0]] > 1:
        # Two gradients determine a cross-entropy's minimum: at the best point and at 0.
        other = torch.zeros_like(start) if best is start else start
        g_other = gradient(other)[1]
        rows = outputs.numel() // outputs.shape[dims[0]]
        ce = _cross_entropy_from_gradients(best, g, other, g_other, dims[0], rows)
        if ce is not None:
            ce_value, ce_g = gradient(ce.const)
            if _stationary(ce_value, ce_g):
                return _Fitted(ce.const, ce_value, ce)
            if math.isfinite(ce_value) and ce_value < best_value:
                best, best_value = ce.const, ce_value
    # L-BFGS stops on absolute tolerances: minimize the loss relative to its value at
    # the start, so that the baseline of c·loss is exactly c times the baseline.
    scale = abs(best_value) if math.isfinite(best_value) and best_value else 1.0
    const = best.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [const],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=_TOLERANCE_GRAD,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(const.expand_as(outputs), targets) / scale
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    fitted = const.detach()
    with torch.no_grad():
        value = float(loss_fn(fitted.expand_as(outputs), targets))
    if not value <= best_value:  # NaN, or worse than where it started
        return _Fitted(best.detach(), best_value, None)
    return _Fitted(fitted, value, None)
