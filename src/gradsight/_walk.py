"""One walk of a model's module tree, shared by everything a diagnosis reads off it.

A diagnosis reads the model's structure in several places: which modules own
parameters, which are recurrent, which buffers to restore, which parameters train,
whether they are sharded, which embeddings renormalize their weights. For a model of
many small layers each walk of the tree costs about as much as a layer's forward pass,
so they share one :class:`ModelWalk`.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from gradsight._errors import GradsightError

__all__ = ["ModelWalk"]


class ModelWalk:
    """``model.named_modules()`` listed once, and the parameters and buffers read off it.

    The lists are those of ``named_modules()``, ``named_parameters()`` and ``buffers()``
    (each module, parameter and buffer once, under its first name), taken when the walk
    is made: make a new one after changing the model's structure.

    Raises:
        GradsightError: when ``model`` is not an ``nn.Module``.

    Example:
        >>> walk = ModelWalk(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
        >>> [name for name, _ in walk.named_parameters]
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> len(walk.buffers)
        3
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise GradsightError(
                f"model must be a torch.nn.Module, got {type(model).__name__}. "
                "Wrap a plain function in an nn.Module whose parameters are nn.Parameter."
            )
        self.model = model
        self.named_modules: list[tuple[str, nn.Module]] = list(model.named_modules())

    @property
    def modules(self) -> list[nn.Module]:
        return [module for _, module in self.named_modules]

    @cached_property
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return _members(self.named_modules, "_parameters")  # type: ignore[return-value]

    @cached_property
    def buffers(self) -> list[torch.Tensor]:
        return [b for _, b in _members(self.named_modules, "_buffers")]


def _members(
    named_modules: list[tuple[str, nn.Module]], slot: str
) -> list[tuple[str, torch.Tensor]]:
    """Each module's own entries of ``slot`` (``_parameters`` or ``_buffers``), each
    tensor once, under its first qualified name."""
    seen: set[int] = set()
    out = []
    for prefix, module in named_modules:
        for key, t in getattr(module, slot).items():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out.append((f"{prefix}.{key}" if prefix else key, t))
    return out
