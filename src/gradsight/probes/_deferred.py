"""Activation statistics of many steps, reduced together (the lean probe's hot path).

Per measured step, the activation tensors a monitor reads (a few samples of each
layer's activation) are copied into a preallocated buffer, one copy per group of
layers with the same activation and shape. Once a buffer holds ``capacity`` steps (about
2 MiB), all of them are reduced in one go, in the buffer itself: a dozen tensor
operations for many steps of many layers. Measured on the 10-layer MLP of
``benchmarks/monitor.py`` (1 thread): reducing each step on its own cost 0.21 ms per
step, buffers of 1 MiB 0.13 ms, of 4 MiB 0.08 ms (each reduction has a fixed cost of
about 0.19 ms); and fresh temporaries cost page faults that can exceed the arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

from gradsight.probes._kernel import ACTIVATION_METRICS, activation_states

__all__ = ["DeferredStatistics"]

#: Metrics per layer, in the order of the kernel's columns.
STATS = ACTIVATION_METRICS
#: A group's buffer holds about this many bytes of steps (at most MAX_STEPS steps).
BUFFER_BYTES = 2 << 20
MAX_STEPS = 32
#: Distinct groups kept at once; beyond it (shapes that keep changing) all are reduced
#: and their buffers dropped.
MAX_GROUPS = 16

Block = tuple[Any, list[tuple[str, str]], torch.Tensor]


class _Group:
    """Up to ``capacity`` steps of one group of layers, in preallocated buffers (float32
    at least: half-precision sums over many entries would lose the statistics)."""

    def __init__(
        self, act: Any, unit_dim: int, shape: tuple[int, ...], like: torch.Tensor, capacity: int
    ) -> None:
        self.act = act
        self.unit_dim = unit_dim
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.x = torch.empty((capacity, *shape), dtype=dtype, device=like.device)
        self.steps: list[tuple[Any, list[tuple[str, str]]]] = []
        self.names: list[str] = []  # the layers of the last step added, and their keys
        self.keys: list[tuple[str, str]] = []

    @property
    def full(self) -> bool:
        return len(self.steps) == self.x.shape[0]

    def add(self, tag: Any, keys: list[tuple[str, str]], tensors: list[torch.Tensor]) -> None:
        slot = self.x[len(self.steps)]
        if tensors[0].dtype == slot.dtype:
            torch.stack(tensors, out=slot)
        else:
            for row, t in zip(slot, tensors, strict=True):
                row.copy_(t)
        self.steps.append((tag, keys))

    def reduce(self) -> list[Block]:
        k, n = len(self.steps), self.x.shape[1]
        if not k:
            return []
        states = activation_states(self.act, self.unit_dim, self.x[:k].flatten(0, 1), True)
        stats = states.metrics()
        out = [
            (tag, keys, stats[i * n : (i + 1) * n].reshape(-1))
            for i, (tag, keys) in enumerate(self.steps)
        ]
        self.steps = []
        return out


class DeferredStatistics:
    """Activation tensors captured step by step, reduced many steps at a time.

    Example:
        >>> from torch import nn
        >>> from gradsight.probes.activations import module_activation
        >>> tanh = module_activation(nn.Tanh())
        >>> deferred = DeferredStatistics()
        >>> for step in range(3):
        ...     deferred.add(step, ["a", "b"], tanh, 1, [torch.zeros(4, 5), torch.ones(4, 5)])
        >>> blocks = deferred.pop(final=True)
        >>> [(tag, keys[4], values[4].item()) for tag, keys, values in blocks][0]  # b: flat
        (0, ('b', 'saturation'), 1.0)
        >>> [tag for tag, _, _ in blocks]
        [0, 1, 2]
    """

    def __init__(self, buffer_bytes: int | None = None) -> None:
        self.buffer_bytes = BUFFER_BYTES if buffer_bytes is None else buffer_bytes
        self._groups: dict[tuple[Any, ...], _Group] = {}
        self._ready: list[Block] = []

    def add(
        self, tag: Any, names: list[str], act: Any, unit_dim: int, tensors: list[torch.Tensor]
    ) -> None:
        """Capture one step's tensors of the layers ``names`` (same activation and shape)."""
        first = tensors[0]
        key = (act, unit_dim, len(tensors), first.shape, first.dtype, first.device)
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= MAX_GROUPS:
                self._reduce_all(drop=True)
            step_bytes = max(1, first.numel() * 4 * len(tensors))
            capacity = max(1, min(MAX_STEPS, self.buffer_bytes // step_bytes))
            shape = (len(tensors), *first.shape)
            group = self._groups[key] = _Group(act, unit_dim, shape, first, capacity)
        if names != group.names:  # the keys of the usual step are built once
            group.names = list(names)
            group.keys = [(name, m) for name in names for m in STATS]
        with torch.no_grad():
            group.add(tag, group.keys, tensors)
            if group.full:
                self._ready += group.reduce()

    def pop(self, final: bool = False) -> list[Block]:
        """Reduced ``(tag, keys, values)`` blocks, each once; ``final``: also the steps
        still waiting, and the buffers are released (a flush, or the end)."""
        if final:
            self._reduce_all(drop=True)
        ready, self._ready = self._ready, []
        return ready

    def _reduce_all(self, drop: bool) -> None:
        with torch.no_grad():
            for group in self._groups.values():
                self._ready += group.reduce()
        if drop:
            self._groups.clear()
