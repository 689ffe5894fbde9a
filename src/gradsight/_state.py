"""Leave the user's model exactly as it was found: buffers, RNG state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from gradsight._walk import ModelWalk

__all__ = ["preserved", "renormed_weights_kept", "swapped_parameters"]


@contextmanager
def preserved(
    model: nn.Module, *, seed: int | None = 0, walk: ModelWalk | None = None
) -> Iterator[None]:
    """Restore ``model``'s buffers and the global RNG state on exit.

    Inside the block a forward pass in training mode may update BatchNorm running
    statistics and dropout may draw random numbers; both are undone on exit, also on an
    exception. With ``seed`` set, the RNG is re-seeded inside the block so that what
    runs there (dropout masks) is reproducible.

    Parameters and their ``.grad`` are not copied: callers must not modify them (they
    take gradients with ``torch.autograd.grad``, which leaves ``.grad`` alone).
    ``walk``: the model's, if already made.
    """
    walk = walk or ModelWalk(model)
    buffers = [(b, b.detach().clone()) for b in walk.buffers]
    devices = sorted({p.device.index or 0 for _, p in walk.named_parameters if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                # The generators the model can draw from; torch.manual_seed would also
                # queue a lazy CUDA seeding that records a stack trace (milliseconds).
                torch.default_generator.manual_seed(seed)
                for index in devices:
                    torch.cuda.default_generators[index].manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for live, saved in buffers:
                live.copy_(saved)


@contextmanager
def swapped_parameters(
    model: nn.Module, replacements: Mapping[int, torch.Tensor], walk: ModelWalk | None = None
) -> Iterator[None]:
    """Let ``model`` see other tensors in place of some parameters, then put them back.

    ``replacements`` maps ``id(parameter)`` to the tensor to use instead; every module
    slot that holds that parameter (tied or shared modules included) sees it. The
    parameter objects themselves are never written to (no in-place update, no version
    bump, so an autograd graph the caller holds stays valid), and each slot gets its
    original object back on exit. Unlike ``torch.func.functional_call``, this restores
    models in which one module is reachable under two names. ``walk``: the model's, if
    already made.
    """
    saved: list[tuple[nn.Module, str, torch.nn.Parameter]] = []
    modules = model.modules() if walk is None else walk.modules
    try:
        for module in modules:  # each module once, however many names it has
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) in replacements:
                    saved.append((module, key, param))
                    module._parameters[key] = replacements[id(param)]  # type: ignore[assignment]
        yield
    finally:
        for module, key, param in saved:
            module._parameters[key] = param


@contextmanager
def renormed_weights_kept(model: nn.Module, walk: ModelWalk | None = None) -> Iterator[None]:
    """Put back, on exit, the weights that ``model``'s forward rewrites in place: those of
    ``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm`` (each lookup renormalizes
    the rows it reads). A diagnosis's passes must leave them as they were: training
    renormalizes them in its own forward, after its own updates. ``walk``: the model's,
    if already made.

    Example:
        >>> emb = nn.Embedding(4, 3, max_norm=0.1)
        >>> before = emb.weight.detach().clone()
        >>> with renormed_weights_kept(emb):
        ...     _ = emb(torch.tensor([0, 1]))
        >>> torch.equal(emb.weight, before)
        True
    """
    kept = [
        (m.weight, m.weight.detach().clone())
        for m in (walk or ModelWalk(model)).modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for live, saved in kept:
                if not torch.equal(live, saved):
                    live.copy_(saved)
