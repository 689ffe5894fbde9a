"""A model's own loss as a function of its logits (Hugging Face models that compute their
loss from ``labels`` among their inputs), for the parts of gradsight that need the loss
of *other* outputs: the constant baseline and curvature."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["checked_model_loss", "loss_of_outputs", "model_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]


def model_loss(model: torch.nn.Module) -> Callable[..., torch.Tensor] | None:
    """``loss(logits, labels, num_items_in_batch=None)`` computed by the model's own
    ``loss_function`` for the loss types with a logits-and-labels signature, else None."""
    fn = getattr(model, "loss_function", None)
    config = getattr(model, "config", None)
    kind = getattr(model, "loss_type", None)
    if fn is None or config is None or kind is None:
        return None
    if kind in ("ForCausalLM", "ForMaskedLM"):

        def lm(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
            return fn(logits, labels, vocab_size=config.vocab_size, num_items_in_batch=num_items)

        return lm
    if kind == "ForSequenceClassification":

        def seq(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
            return fn(labels=labels, pooled_logits=logits, config=config)

        return seq
    if kind == "ForTokenClassification":

        def tok(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
            return fn(logits, labels, config, num_items_in_batch=num_items)

        return tok
    return None


def checked_model_loss(
    model: torch.nn.Module,
    labels: Any,
    output: Any,
    loss: torch.Tensor,
    num_items: Any = None,
) -> LossFn | None:
    """``loss_fn(outputs, targets)`` from the model's loss function, if on ``output``'s
    logits and ``labels`` it reproduces ``loss`` (relative 1e-4), else None. ``outputs``
    is the model's output or its logits; ``targets`` are the labels where they are a
    tensor (a half of the batch, for the baseline's cross-fitting), else ``labels``."""
    compute = model_loss(model)
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if compute is None or not isinstance(labels, torch.Tensor) or logits is None:
        return None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(compute(logits.detach(), labels, num_items))
    except Exception:
        return None
    ref = float(loss.detach().float())
    if not (math.isfinite(ref) and abs(value - ref) <= 1e-4 * max(abs(ref), 1e-12)):
        return None

    def loss_fn(outputs: Any, targets: Any) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs
        return compute(logits, targets if isinstance(targets, torch.Tensor) else labels)

    return loss_fn


def loss_of_outputs(
    model: torch.nn.Module,
    inputs: Any,
    targets: Any,
    outputs: Any,
    loss: torch.Tensor,
    loss_fn: LossFn,
) -> tuple[LossFn, Any]:
    """``(loss_fn, targets)``, or, where the loss function returns the loss a Hugging
    Face model computed itself from the ``labels`` among its inputs (``lambda out, y:
    out.loss``), the model's own loss function of its logits and those labels: the same
    loss, which depends on the outputs that the baseline and curvature replace (the
    returned ``out.loss`` does not), and targets the baseline can split in halves."""
    if not (isinstance(outputs, Mapping) and isinstance(inputs, Mapping)):
        return loss_fn, targets
    own_loss, labels = outputs.get("loss"), inputs.get("labels")
    if not isinstance(own_loss, torch.Tensor) or own_loss.numel() != 1:
        return loss_fn, targets
    if not torch.equal(own_loss.detach().reshape(()), loss.detach()):
        return loss_fn, targets  # the loss function computes a loss of its own
    own = checked_model_loss(model, labels, outputs, loss)
    if own is None:
        return loss_fn, targets
    return own, labels
