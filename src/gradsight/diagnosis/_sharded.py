"""Diagnosing an FSDP2 model (``torch.distributed.fsdp.fully_shard``): on its full parameters.

Under FSDP2 each rank holds a shard of every parameter (a ``DTensor``), and the module's
forward and backward run collectives (all-gather, reduce-scatter) from hooks. A diagnosis
needs whole gradients of whole parameters, and its own passes (``torch.autograd.grad``,
the curvature products of ``torch.func``) must not enter FSDP's collectives. So
:func:`gathered` builds, on every rank, a plain copy of the model: the same module
objects' classes without FSDP's, the same attributes and user hooks, FSDP's hooks left
out, and each sharded parameter replaced by its full tensor (one all-gather per
parameter; every rank must call it, in the same order). The diagnosis then runs on that
copy exactly as on the unsharded model, and the copy is dropped.

This costs one full copy of the parameters per rank for the time of the diagnosis: the
memory FSDP saves is needed back briefly, once per diagnosis.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from gradsight._walk import ModelWalk

__all__ = ["gathered", "is_sharded"]

# Module attributes FSDP2 adds (its state is keyed by these, and by the module itself).
_FSDP_KEYS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_HOOK_SETS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs")
_HOOK_FLAGS = ("_forward_hooks_always_called",)


def gathered(model: nn.Module) -> nn.Module:
    """``model`` itself when its parameters are not sharded; else a plain copy with the full
    parameters (a collective: call it on every rank).

    Example:
        >>> m = nn.Linear(2, 2)
        >>> gathered(m) is m
        True
    """
    if not is_sharded(model):
        return model
    with torch.no_grad():
        return _copy(model, {})


def is_sharded(model: nn.Module, walk: ModelWalk | None = None) -> bool:
    """Whether ``model``'s parameters are sharded across ranks (FSDP2 makes them
    ``DTensor``s, each rank holding a shard); ``walk``: the model's, if already made."""
    if not torch.distributed.is_available() or "torch.distributed.tensor" not in sys.modules:
        # No DTensor exists before its module is imported (importing it takes seconds).
        return False
    from torch.distributed.tensor import DTensor

    if walk is not None:
        return any(isinstance(p, DTensor) for _, p in walk.named_parameters)
    return any(isinstance(p, DTensor) for p in model.parameters())


def _is_fsdp(obj: Any) -> bool:
    owner = getattr(obj, "__self__", None)  # FSDP's hooks are bound methods of its state
    fn = getattr(obj, "func", obj)  # or partials
    names = (type(owner).__module__ if owner is not None else "", getattr(fn, "__module__", ""))
    return any((n or "").startswith("torch.distributed.fsdp") for n in names)


def _plain_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The module class ``fully_shard`` derived ``cls`` from (``FSDPLinear`` → ``Linear``)."""
    from torch.distributed.fsdp import FSDPModule

    for c in cls.__mro__:
        if issubclass(c, nn.Module) and not issubclass(c, FSDPModule):
            return c
    return cls  # pragma: no cover - an FSDPModule is always an nn.Module subclass


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)
    return t.detach() if full_tensor is None else full_tensor().detach()


def _copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:  # a module reached twice stays one module
        result: nn.Module = memo[id(module)]
        return result
    cls = _plain_class(type(module))
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {
        k: v
        for k, v in module.__dict__.items()
        if k not in _FSDP_KEYS and not k.startswith("__composable_api_state_key")
    }
    kept: set[int] = set()
    for name in _HOOK_DICTS:
        hooks = OrderedDict((i, h) for i, h in state[name].items() if not _is_fsdp(h))
        kept |= set(hooks)
        state[name] = hooks
    for name in _HOOK_SETS + _HOOK_FLAGS:
        if name in state:
            state[name] = type(state[name])({i: v for i, v in state[name].items() if i in kept})
    params: dict[str, nn.Parameter | None] = {}
    for k, p in module._parameters.items():
        if p is None or id(p) in memo:  # tied parameters stay tied
            params[k] = None if p is None else memo[id(p)]
            continue
        q = nn.Parameter(_full(p), requires_grad=p.requires_grad)
        memo[id(p)] = params[k] = q
    state["_parameters"] = params
    state["_buffers"] = {k: None if b is None else _full(b) for k, b in module._buffers.items()}
    state["_modules"] = {
        k: None if m is None else _copy(m, memo) for k, m in module._modules.items()
    }
    new.__dict__.update(state)
    return new
