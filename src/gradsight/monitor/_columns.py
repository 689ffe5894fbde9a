"""The layout of one measured step's raw vector, and its finishing touches, batched.

The Monitor's hot path does as little as it can per step: one multi-tensor norm of the
parameter gradients, and one ``torch.stack`` of those norms with the backward-signal
norms (taken by the probe's hooks), the loss and the loss scale into a preallocated row.
What turns the raw rows into the recorded metrics (per-layer gradient norms from
per-parameter ones, unscaling by a GradScaler's scale) waits until the rows are copied
to the host, and is then done for all steps that share a layout in a handful of tensor
operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["RowBuffer", "StepLayout"]

# Metrics that scale with the loss, divided by the loss scale of a GradScaler.
SCALED = frozenset({"grad_norm", "signal_norm", "activation_signal_norm", "input_signal_norm"})


@dataclass(eq=False)
class StepLayout:
    """What the entries of a raw step vector are.

    The raw vector is ``[per-parameter gradient norms (one per entry of owners),
    *probe values (keys), loss (if has_loss), loss scale (if has_scale)]``.

    Example:
        >>> layout = StepLayout(("a", "b"), (0, 0, 1), (("a", "signal_norm"),), True, False)
        >>> raw = torch.tensor([[3.0, 4.0, 2.0, 7.0, 0.5]])  # ‖∇‖ of 3 params, a signal, loss
        >>> layout.keys
        [('a', 'grad_norm'), ('b', 'grad_norm'), ('a', 'signal_norm'), ('', 'loss')]
        >>> layout.finish(raw)
        tensor([[5.0000, 2.0000, 7.0000, 0.5000]], dtype=torch.float64)
    """

    layers: tuple[str, ...]
    owners: tuple[int, ...]  # layer index of each parameter gradient
    probe_keys: tuple[tuple[str, str], ...]
    has_loss: bool
    has_scale: bool
    keys: list[tuple[str, str]] = field(init=False)
    _combine: dict[torch.device, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._used = list(dict.fromkeys(self.owners))
        keys = [(self.layers[i], "grad_norm") for i in self._used] + list(self.probe_keys)
        if self.has_loss:
            keys.append(("", "loss"))
        self._scaled = [m in SCALED for _, m in keys]
        if self.has_scale:
            keys.append(("", "loss_scale"))
        self.keys = keys

    @property
    def raw_size(self) -> int:
        """Entries of the raw step vector."""
        return len(self.owners) + len(self.probe_keys) + self.has_loss + self.has_scale

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """``[steps, len(keys)]`` float64 metrics from ``[steps, raw entries]``."""
        raw = raw.double()
        p = len(self.owners)
        parts = []
        if p:
            m = self._combine.get(raw.device)
            if m is None:  # [parameters, used layers]: 1 where the parameter is the layer's
                m = torch.zeros(p, len(self._used), dtype=torch.float64, device=raw.device)
                col = {layer: j for j, layer in enumerate(self._used)}
                for i, layer in enumerate(self.owners):
                    m[i, col[layer]] = 1.0
                self._combine[raw.device] = m
            parts.append((raw[:, :p].square() @ m).sqrt())
        parts.append(raw[:, p:])
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.has_scale:
            scale = out[:, -1:]
            mask = torch.tensor([*self._scaled, False], device=out.device)
            out = torch.where(mask, out / scale, out)
        return out


class RowBuffer:
    """Raw step vectors of one layout in one preallocated ``[capacity, raw_size]`` tensor.

    Measurements wait here (on the model's device: no synchronisation) instead of as one
    small tensor per step: kept for many steps, those interleave with the training
    step's large transient buffers in the heap and fragment it (the small CNN's peak
    resident set grew by 20+ MiB over 20 steps that way).

    Example:
        >>> layout = StepLayout(("a",), (0,), (), True, False)
        >>> buf = RowBuffer(layout, capacity=4, device=torch.device("cpu"))
        >>> buf.add(7, [torch.tensor(3.0), torch.tensor(0.5)])
        >>> steps, keys, values = buf.take()
        >>> steps, keys, values.tolist()
        ([7], [('a', 'grad_norm'), ('', 'loss')], [[3.0, 0.5]])
    """

    def __init__(self, layout: StepLayout, capacity: int, device: torch.device) -> None:
        self.layout = layout
        self.rows = torch.empty(capacity, layout.raw_size, dtype=torch.float64, device=device)
        self.steps: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.steps) == self.rows.shape[0]

    def add(self, step: int, parts: list[torch.Tensor]) -> None:
        """Store one step's raw entries (0-d tensors, any float dtype)."""
        row = self.rows[len(self.steps)]
        try:  # stacked in the parts' own dtype, then cast: stack(out=float64) is 5× slower
            row.copy_(torch.stack(parts))
        except RuntimeError:  # on other devices: the general path's host statistics
            row.copy_(torch.stack([t.to(row.device, row.dtype) for t in parts]))
        self.steps.append(step)

    def take(self) -> tuple[list[int], list[tuple[str, str]], torch.Tensor]:
        """The stored steps, the layout's keys and the finished ``[steps, keys]`` values;
        the buffer is empty afterwards."""
        steps, self.steps = self.steps, []
        return steps, self.layout.keys, self.layout.finish(self.rows[: len(steps)])
