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

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradsight._errors import GradsightError

__all__ = ["DistributedOperator", "Ranks"]


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


class Ranks:
    """The collectives :class:`~gradsight.curvature.blockwise.BlockwiseGGN` uses across ranks.

    Every rank holds a shard of the batch. The engine's rows are per sample, and the Gram
    matrix of a layer pairs samples of different ranks, so each layer's inputs and
    backward vectors are gathered along the sample dim (activation-sized traffic, one
    layer at a time); gradients and the loss are averaged, as DDP averages gradients.
    Every rank then holds the same tensors and computes the same numbers, taking the
    same decisions and issuing the same collectives in the same order.

    Args:
        group: the process group (default: the world).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def mean(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor averaged over the ranks (one collective for all of them)."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.size)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].view_as(t))
            start += t.numel()
        return out

    def total(self, count: int) -> int:
        """``count`` summed over the ranks."""
        t = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return int(t[0])

    def common(self, names: Sequence[str]) -> list[str]:
        """The names every rank has, in this rank's order."""
        got: list[Any] = [None] * self.size
        dist.all_gather_object(got, list(names), group=self.group)
        shared = set(names).intersection(*[set(g) for g in got])
        return [n for n in names if n in shared]

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` of every rank concatenated along ``dim`` (rank order), shards of any size.

        Raises:
            GradsightError: when the shards differ in another dim (e.g. sequence lengths).
        """
        x = t.movedim(dim, 0).contiguous()
        shape = torch.tensor(x.shape, dtype=torch.int64)
        shapes = [torch.zeros_like(shape) for _ in range(self.size)]
        dist.all_gather(shapes, shape, group=self.group)
        rest = {tuple(s[1:].tolist()) for s in shapes}
        if len(rest) > 1:
            raise GradsightError(
                "blockwise curvature under torch.distributed gathers each layer's inputs over "
                f"the ranks; their shapes differ beyond the batch dim: {sorted(rest)}. Give "
                "every rank batches of the same shape (e.g. pad sequences to one length)."
            )
        sizes = [int(s[0]) for s in shapes]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        full = torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])
        return full.movedim(0, dim)
