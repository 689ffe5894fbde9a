"""Which parameters a curvature operator acts on, and evaluating a model without side effects.

``params=`` everywhere in :mod:`gradsight.curvature` accepts ``None`` (every trainable
parameter), an ``nn.Module`` (its trainable parameters), a parameter, a qualified module
name as in ``model.named_modules()`` (``""`` is the model itself), or a list mixing these.
The block is returned in the model's own parameter order, each parameter once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from gradsight._batch import compute_loss, trainable_parameters
from gradsight._errors import GradsightError

__all__ = ["ParamsSpec", "forward_loss", "frozen_rng", "resolve_params"]

ParamsSpec = None | str | nn.Module | torch.Tensor | Sequence[str | nn.Module | torch.Tensor]


def resolve_params(model: nn.Module, params: ParamsSpec) -> list[tuple[str, nn.Parameter]]:
    """Resolve a ``params=`` argument into ``(qualified name, parameter)`` pairs.

    Raises:
        GradsightError: for a module name the model does not have, a module or tensor
            that is not part of the model, or a block without trainable parameters.
    """
    named = trainable_parameters(model)
    if params is None:
        return named
    by_id = {id(p): (n, p) for n, p in named}
    items: Sequence[Any] = (
        [params] if isinstance(params, (str, nn.Module, torch.Tensor)) else params
    )
    if not isinstance(items, Sequence) or len(items) == 0:
        raise GradsightError(
            f"params must be None, a module, a parameter, a module name or a non-empty list "
            f"of these; got {params!r}. Pass e.g. params=model[0] or params=['0', '2']."
        )
    modules = dict(model.named_modules())
    wanted: set[int] = set()
    for item in items:
        if isinstance(item, str):
            if item not in modules:
                names = [n for n in modules if n][:8]
                raise GradsightError(
                    f"params names module {item!r}, which the model does not have. Expected "
                    f"a qualified name from model.named_modules(), e.g. {names}."
                )
            item = modules[item]
        if isinstance(item, nn.Module):
            own = [p for p in item.parameters() if p.requires_grad]
            if any(id(p) not in by_id for p in own):
                raise GradsightError(
                    f"params holds a {type(item).__name__} that is not a submodule of the "
                    "model. Pass a module of this model (e.g. model.layer1) or its name."
                )
            if not own:
                raise GradsightError(
                    f"params holds a {type(item).__name__} without trainable parameters. "
                    "Pass a layer with parameters that require grad (e.g. an nn.Linear)."
                )
            wanted.update(id(p) for p in own)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise GradsightError(
                    f"params holds a tensor of shape {tuple(item.shape)} that is not a "
                    "trainable parameter of the model. Pass parameters from "
                    "model.parameters() that have requires_grad=True."
                )
            wanted.add(id(item))
        else:
            raise GradsightError(
                f"params items must be modules, parameters or module names, got a "
                f"{type(item).__name__}. Pass e.g. params=[model.fc1, 'fc2']."
            )
    return [(n, p) for n, p in named if id(p) in wanted]


class _WithBufferCopies(nn.Module):
    """Call ``model`` with copies of its buffers, so BatchNorm statistics stay untouched."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.copies = {n: b.clone() for n, b in model.named_buffers()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.inner, self.copies, args, kwargs, strict=False)


@contextmanager
def frozen_rng(state: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Run with the CPU (and ``device``'s) RNG set to ``state``; restore it afterwards.

    Every forward pass of one operator then draws the same dropout masks, and the
    caller's random stream is left exactly as found.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state)
        yield


def forward_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    rng_state: torch.Tensor,
    device: torch.device,
) -> tuple[Any, torch.Tensor]:
    """``compute_loss`` on copies of the buffers under a frozen RNG: no side effects.

    The model is evaluated in the mode (train/eval) it is in; parameters are used as they
    are, so autograd reaches them, but neither they nor their ``.grad`` are written.
    """
    with frozen_rng(rng_state, device):
        return compute_loss(_WithBufferCopies(model), batch, loss_fn)
