"""The batch convention shared by every entry point: ``batch = (inputs, targets)``.

``inputs`` is passed to the model as ``model(inputs)`` when it is a tensor,
``model(*inputs)`` when it is a tuple or list, and ``model(**inputs)`` when it is a dict.
``targets`` is passed unchanged as the second argument of ``loss_fn(outputs, targets)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradsight._errors import GradsightError
from gradsight._walk import ModelWalk

__all__ = [
    "call_model",
    "compute_loss",
    "split_batch",
    "trainable_parameters",
    "unwrap_compiled",
]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Check that ``batch`` is an ``(inputs, targets)`` pair and return its two parts.

    Raises:
        GradsightError: if ``batch`` is not a tuple/list of length two, or is empty.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = (
            f"a {type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise GradsightError(
            f"batch must be a pair (inputs, targets), got {got}. "
            "Pass e.g. batch=(x, y) where model(x) gives the outputs and "
            "loss_fn(outputs, y) the scalar loss."
        )
    inputs, targets = batch
    first = _first_tensor(inputs)
    if first is None:
        raise GradsightError(
            f"batch inputs must be a tensor, or a tuple/list/dict holding tensors; "
            f"got {type(inputs).__name__}. Convert the data with torch.as_tensor(...)."
        )
    if first.ndim > 0 and first.shape[0] == 0:
        raise GradsightError(
            f"the batch is empty: inputs have shape {tuple(first.shape)}. "
            "Pass at least one sample (two or more for meaningful statistics)."
        )
    return inputs, targets


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on ``inputs`` following the batch convention of this module."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def compute_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> tuple[Any, torch.Tensor]:
    """Forward ``batch`` through ``model`` and reduce it with ``loss_fn``.

    Errors raised by the model or the loss are re-raised as :class:`GradsightError`
    with the shapes involved and a hint, and a loss that is not a scalar tensor is
    rejected.

    Returns:
        ``(outputs, loss)``.
    """
    inputs, targets = split_batch(batch)
    try:
        outputs = call_model(model, inputs)
    except Exception as exc:
        raise GradsightError(
            f"model(inputs) failed with {type(exc).__name__}: {exc}. "
            f"gradsight called it with inputs {_describe(inputs)}; expected the batch "
            "(inputs, targets) to hold what your training loop passes to the model "
            "(a tensor for model(x), a tuple for model(*x), a dict for model(**x))."
            + _mismatch_hint(model, inputs)
        ) from exc
    try:
        loss = loss_fn(outputs, targets)
    except Exception as exc:
        raise GradsightError(
            f"loss_fn(outputs, targets) failed with {type(exc).__name__}: {exc}. "
            f"outputs: {_describe(outputs)}; targets: {_describe(targets)}. "
            "loss_fn must accept (model outputs, batch targets) and return a scalar."
        ) from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = (
            f"a tensor of shape {tuple(loss.shape)}"
            if isinstance(loss, torch.Tensor)
            else f"a {type(loss).__name__}"
        )
        raise GradsightError(
            f"loss_fn must return a scalar tensor, got {got}. Reduce it, e.g. with "
            "reduction='mean' on a torch.nn loss or loss.mean() on a per-sample loss."
        )
    if not loss.is_floating_point() and not loss.is_complex():
        raise GradsightError(
            f"loss_fn must return a floating-point scalar, got dtype {loss.dtype}. "
            "Compute the loss in floating point (e.g. cast integer targets with .float())."
        )
    if not loss.requires_grad:
        raise GradsightError(
            "the loss does not depend on any trainable parameter (loss.requires_grad is "
            "False). Check that the model has parameters with requires_grad=True and that "
            "the forward pass is not wrapped in torch.no_grad()."
        )
    return outputs, loss.reshape(())


def trainable_parameters(
    model: nn.Module, walk: ModelWalk | None = None
) -> list[tuple[str, nn.Parameter]]:
    """``model``'s parameters that require grad, by qualified name (shared ones once);
    ``walk``: the model's, if already made.

    Raises:
        GradsightError: if ``model`` is not an ``nn.Module``, or it has no trainable
            parameters.
    """
    everything = (walk or ModelWalk(model)).named_parameters
    named = [(n, p) for n, p in everything if p.requires_grad]
    if not named:
        total = len(everything)
        raise GradsightError(
            f"the model has no trainable parameters ({total} parameters, none with "
            "requires_grad=True). gradsight diagnoses how gradients reach parameters: "
            "unfreeze at least one layer, e.g. layer.requires_grad_(True)."
        )
    return named


def _mismatch_hint(model: nn.Module, inputs: Any) -> str:
    """A fix for the two most common causes: inputs of another dtype or device."""
    x = _first_tensor(inputs)
    p = next(model.parameters(), None)
    if x is None or p is None:
        return ""
    if x.device != p.device:
        return (
            f" The inputs are on {x.device} but the model's parameters on {p.device}: "
            f"move them with inputs.to('{p.device}') or model.to('{x.device}')."
        )
    if x.is_floating_point() and p.is_floating_point() and x.dtype != p.dtype:
        return (
            f" The inputs are {x.dtype} but the model's parameters {p.dtype}: convert "
            f"with inputs.to({p.dtype}) or model.to({x.dtype})."
        )
    if not x.is_floating_point() and not isinstance(model, nn.Embedding) and p.is_floating_point():
        return (
            f" The inputs are {x.dtype} (integers); unless the model starts with an "
            f"embedding, convert them with inputs.to({p.dtype})."
        )
    return ""


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module inside a ``torch.compile``'d model (itself otherwise).

    gradsight hooks every module and reads every activation, which a compiled graph
    would have to break up anyway; it diagnoses the original module, which the compiled
    one shares its parameters and buffers with.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _describe(obj: Any) -> str:
    """Short structural description with shapes and dtypes, for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={obj.dtype}, device={obj.device})"
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{k!r}: {_describe(v)}" for k, v in obj.items())
        return "{" + inner + "}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_describe(v) for v in obj)
        return f"{type(obj).__name__}({inner})"
    return type(obj).__name__
