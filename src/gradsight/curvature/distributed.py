"""Curvature under ``torch.distributed``: every rank holds a shard of the batch.

With equal shards and a loss that averages over samples, the loss, gradient and
curvature of the whole (concatenated) batch are the means over ranks of each shard's:

    L = (1/W) Σ_r L_r,   g = (1/W) Σ_r g_r,   G v = (1/W) Σ_r G_r v.

:class:`DistributedOperator` wraps a shard's operator and all-reduces each of these, so
that every estimator (Lanczos, Hutch++, XTrace, CG) runs unchanged and in lockstep on all
ranks: their random vectors come from fixed seeds, and an all-reduce gives every rank the
same bits, so all ranks take the same decisions and issue the same collectives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedOperator"]


class DistributedOperator:
    """A curvature operator whose products are averaged over the ranks of a group.

    Args:
        op: This rank's operator (on its shard of the batch), e.g. a
            :class:`~gradsight.curvature.GGNOperator`.
        group: The process group (default: the world).

    Every rank must construct it and apply it to the same vectors in the same order.
    """

    def __init__(self, op: Any, group: Any = None) -> None:
        self.op = op
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.names = op.names
        self.shapes = op.shapes
        self.gradient = self._mean(op.gradient.clone())
        loss = torch.tensor([float(op.loss)], dtype=torch.float64)
        self.loss = float(self._mean(loss)[0])

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.op.shape
        return (int(rows), int(cols))

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.op.dtype
        return dtype

    @property
    def device(self) -> torch.device:
        device: torch.device = self.op.device
        return device

    @property
    def num_matvecs(self) -> int:
        return int(self.op.num_matvecs)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self._mean(self.op @ other)

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.div_(self.world_size)
