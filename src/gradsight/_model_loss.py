"""A model's own loss as a function of its logits (Hugging Face models that compute their
loss from ``labels`` among their inputs), for the parts of gradsight that need the loss
of *other* outputs: the constant baseline and curvature."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["checked_model_loss", "loss_of_outputs", "model_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]


#: transformers' loss types whose loss function takes ``(labels, pooled_logits, config)``.
_CLASSIFICATION = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForVideoClassification",
    "ForAudioClassification",
)


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
    if kind in _CLASSIFICATION:

        def seq(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
            return fn(labels=labels, pooled_logits=logits, config=config)

        return seq
    if kind == "ForTokenClassification":

        def tok(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
            return fn(logits, labels, config, num_items_in_batch=num_items)

        return tok
    return None


def _aligned_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None
) -> torch.Tensor:
    """Cross-entropy of every position's logits against the label at the same position
    (ignoring -100), as encoder-decoder models (BART, T5) compute theirs in their forward
    with ``nn.CrossEntropyLoss`` instead of a ``loss_function``."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _loss_candidates(model: torch.nn.Module) -> list[Callable[..., torch.Tensor]]:
    """The model's own loss function where its loss type has one, then plain cross-entropy
    at aligned positions; :func:`checked_model_loss` keeps the first that reproduces the
    model's loss."""
    own = model_loss(model)
    return ([] if own is None else [own]) + [_aligned_cross_entropy]


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
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if not isinstance(labels, torch.Tensor) or not isinstance(logits, torch.Tensor):
        return None
    ref = float(loss.detach().float())
    if not math.isfinite(ref):
        return None
    added = _added_terms(model, output)
    for compute in _loss_candidates(model):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = float(compute(logits.detach(), labels, num_items))
        except Exception:
            continue
        for extra in (0.0, added) if added else (0.0,):
            if abs(value + extra - ref) <= 1e-4 * max(abs(ref), 1e-12):
                return _of_logits(compute, labels, extra)
    return None


def _added_terms(model: torch.nn.Module, output: Any) -> float:
    """What a mixture-of-experts model adds to its loss besides that of its logits: the
    router's load-balancing loss times ``config.router_aux_loss_coef`` (Mixtral,
    Qwen2-MoE, OLMoE with ``output_router_logits=True``), else 0. It depends on the router
    logits, not on the logits the baseline and curvature replace: for them it is a
    constant."""
    aux = output.get("aux_loss") if isinstance(output, Mapping) else None
    coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", None)
    if not isinstance(aux, torch.Tensor) or aux.numel() != 1 or not isinstance(coef, float | int):
        return 0.0
    value = float(coef) * float(aux.detach().float())
    return value if math.isfinite(value) else 0.0


def _of_logits(
    compute: Callable[..., torch.Tensor], labels: torch.Tensor, extra: float = 0.0
) -> LossFn:
    def loss_fn(outputs: Any, targets: Any) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs
        value = compute(logits, targets if isinstance(targets, torch.Tensor) else labels)
        return value + extra if extra else value

    return loss_fn


def loss_of_outputs(
    model: torch.nn.Module,
    inputs: Any,
    targets: Any,
    outputs: Any,
    loss: torch.Tensor,
    loss_fn: LossFn,
) -> tuple[LossFn, Any]:
    """``(loss_fn, targets)``, or, where the loss function uses the loss a Hugging Face
    model computed itself from the ``labels`` among its inputs (``lambda out, y:
    out.loss``, ``0.5 * out.loss``, ``out.loss + aux``), the same loss function with that
    ``out.loss`` recomputed from the logits it is given by the model's own loss function,
    and targets the baseline can split in halves: the returned ``out.loss`` does not
    depend on the outputs that the baseline and curvature replace, the recomputed one
    does. The recomputation is checked to reproduce the loss (relative 1e-4)."""
    if not (isinstance(outputs, Mapping) and isinstance(inputs, Mapping)):
        return loss_fn, targets
    own_loss, labels = outputs.get("loss"), inputs.get("labels")
    if not isinstance(own_loss, torch.Tensor) or own_loss.numel() != 1:
        return loss_fn, targets
    if not isinstance(labels, torch.Tensor):
        return loss_fn, targets
    try:
        with torch.no_grad():
            # Whether the loss function reads out.loss: its value moves when that does.
            moved = loss_fn(_replaced(outputs, loss=own_loss.detach() + 1.0), targets)
    except Exception:  # a loss function that takes nothing but the model's own output
        return loss_fn, targets
    if not isinstance(moved, torch.Tensor) or torch.equal(moved.detach(), loss.detach()):
        return loss_fn, targets  # a loss of its own, from the outputs it is given
    own = checked_model_loss(model, labels, outputs, own_loss)
    if own is None:
        return loss_fn, targets
    # The targets the loss function is given: the labels themselves (split with them),
    # other targets of the batch's size (split together with the labels), or others.
    same = targets is labels or (
        isinstance(targets, torch.Tensor)
        and targets.shape == labels.shape
        and bool(torch.equal(targets, labels))
    )
    paired = (
        not same
        and isinstance(targets, torch.Tensor)
        and targets.ndim >= 1
        and targets.shape[:1] == labels.shape[:1]
    )

    def of_outputs(new: Any, new_targets: Any) -> torch.Tensor:
        if paired:
            new_labels, y = new_targets
        else:
            new_labels = new_targets
            y = new_targets if same else targets
        logits = new["logits"] if isinstance(new, Mapping) else new
        return loss_fn(_replaced(outputs, logits=logits, loss=own(logits, new_labels)), y)

    of_targets = (labels, targets) if paired else labels
    try:
        with torch.no_grad():
            check = float(of_outputs(outputs, of_targets))
    except Exception:
        return loss_fn, targets
    ref = float(loss.detach())
    if not abs(check - ref) <= 1e-4 * max(abs(ref), 1e-12):
        return loss_fn, targets
    return of_outputs, of_targets


def _replaced(outputs: Mapping[str, Any], **values: Any) -> Any:
    """``outputs`` (a ``ModelOutput``, else a dict) with some entries replaced."""
    merged = {**outputs, **values}
    try:
        return type(outputs)(**merged)
    except TypeError:
        return merged
