"""Models whose outputs are not one tensor, seen as models that return one.

Curvature (Gauss-Newton products Jᵀ H_out J) needs the model's output as one tensor
with a batch dimension. Real models return more: a Hugging Face ``ModelOutput``
(``logits``, a cache, hidden states), a dict of heads, a tuple. :func:`tensor_output`
wraps such a model into one that returns, per sample, the concatenation of the
floating tensors the loss is computed from, and the loss into one that rebuilds the
original structure from that tensor. The Gauss-Newton matrix of the wrapped pair is the
original's: the loss sees the same values, and the flattening is linear.

For a ``ModelOutput`` only ``logits`` is taken (its other tensors, a model's own loss or
hidden states, are left as they are); for a dict, tuple or list every floating tensor
whose first dimension is the batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FlatOutputs", "TensorOutput", "output_keys", "tensor_output"]

LossFn = Callable[[Any, Any], torch.Tensor]
_PREFIX = "model."


class FlatOutputs:
    """Flattens chosen entries of a structured output into one ``(batch, D)`` tensor, and
    rebuilds the structure (the last one flattened) from such a tensor."""

    def __init__(self, keys: Sequence[Any]) -> None:
        self.keys = list(keys)
        self.template: Any = None
        self.shapes: list[tuple[int, ...]] = []

    def flatten(self, out: Any) -> torch.Tensor:
        """The chosen entries as one tensor: a single entry keeps its shape (a
        ``(batch, seq, vocab)`` tensor stays one, so that the loss's per-position
        structure is still seen); several are flattened per sample and concatenated."""
        parts = [out[k] for k in self.keys]
        self.template = out
        self.shapes = [tuple(p.shape[1:]) for p in parts]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def rebuild(self, flat: torch.Tensor) -> Any:
        """The last output's structure with its tensors taken from ``flat``."""
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        chunks = torch.split(flat.reshape(flat.shape[0], -1), sizes, dim=1)
        values = {
            k: c.reshape(flat.shape[0], *s)
            for k, c, s in zip(self.keys, chunks, self.shapes, strict=True)
        }
        out = self.template
        if isinstance(out, Mapping):
            merged = {**out, **values}
            try:
                return type(out)(**merged)
            except TypeError:
                return merged
        items = list(out)
        for k, v in values.items():
            items[k] = v
        return type(out)(items) if isinstance(out, tuple) else items


class TensorOutput(nn.Module):
    """``model`` with its structured output flattened into one ``(batch, D)`` tensor.

    The wrapped model is the submodule ``model``: its layers are named ``model.<name>``.
    """

    def __init__(self, model: nn.Module, keys: Sequence[Any]) -> None:
        super().__init__()
        self.model = model
        self.flat = FlatOutputs(keys)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.flat.flatten(self.model(*args, **kwargs))


def output_keys(outputs: Any) -> list[Any] | None:
    """The entries of ``outputs`` the loss is computed from, or None if there are none."""

    def batched(v: Any, n: int | None) -> bool:
        return (
            isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and v.ndim >= 1
            and (n is None or v.shape[0] == n)
        )

    if isinstance(outputs, Mapping):
        if batched(outputs.get("logits"), None):
            return ["logits"]
        items = list(outputs.items())
    elif isinstance(outputs, (tuple, list)):
        items = list(enumerate(outputs))
    else:
        return None
    first = next((v for _, v in items if batched(v, None)), None)
    if first is None:
        return None
    keys = [k for k, v in items if batched(v, first.shape[0])]
    return keys or None


def tensor_output(
    model: nn.Module, outputs: Any, loss_fn: LossFn
) -> tuple[nn.Module, LossFn, str] | None:
    """``(model', loss_fn', prefix)`` with ``model'`` returning one tensor, or None when
    ``outputs`` already is one tensor (use the model as it is) or holds none to use.

    Layer ``name`` of ``model`` is layer ``prefix + name`` of ``model'``.

    Example:
        >>> class Heads(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)
        ...     def forward(self, x):
        ...         return {"a": self.a(x), "b": self.b(x)}
        >>> model, x = Heads(), torch.randn(5, 3)
        >>> def loss_fn(out, t):
        ...     return out["a"].pow(2).mean() + out["b"].mean()
        >>> wrapped, loss2, prefix = tensor_output(model, model(x), loss_fn)
        >>> flat = wrapped(x)
        >>> flat.shape, prefix
        (torch.Size([5, 3]), 'model.')
        >>> bool(torch.allclose(loss2(flat, None), loss_fn(model(x), None)))
        True
    """
    if isinstance(outputs, torch.Tensor):
        return None
    keys = output_keys(outputs)
    if keys is None:
        return None
    wrapped = TensorOutput(model, keys)

    def flat_loss(flat: torch.Tensor, targets: Any) -> torch.Tensor:
        return loss_fn(wrapped.flat.rebuild(flat), targets)

    return wrapped, flat_loss, _PREFIX
