"""Base class of the curvature operators and the glue that lets estimators take a matrix.

An operator of shape ``(D, D)`` acts on a flat vector ``v`` of shape ``(D,)`` or on a
matrix ``V`` of shape ``(D, k)`` whose columns are ``k`` vectors; ``D`` is the number of
scalar parameters in the block, laid out in the order of :attr:`names`, each parameter
flattened in row-major order (as ``torch.cat([p.flatten() for p in params])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from gradsight._errors import GradsightError

__all__ = ["CurvatureOperator", "LinearOperatorLike", "as_matmul"]


class LinearOperatorLike(Protocol):
    """Anything with a square ``shape``, a ``dtype``, a ``device`` and ``@``."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor: ...


class CurvatureOperator:
    """A symmetric ``(D, D)`` curvature matrix known only through its products.

    Subclasses implement :meth:`_matmat` on a list of per-parameter tensors that carry a
    leading batch dimension of ``k`` vectors. Products with several vectors are computed
    at once (vmap), in chunks of at most ``max_batch`` vectors to bound memory.

    Attributes:
        names: qualified names of the parameters in the block, in model order.
        shapes: their shapes.
        gradient: the flat gradient of the loss with respect to the block (detached).
        loss: the loss value on the batch.
        num_matvecs: how many vectors this operator has been applied to so far.
    """

    def __init__(
        self,
        names: list[str],
        params: Sequence[torch.Tensor],
        gradient: torch.Tensor,
        loss: float,
        max_batch: int = 64,
    ) -> None:
        self.names = names
        self.shapes = [tuple(p.shape) for p in params]
        self._numels = [p.numel() for p in params]
        self._params = list(params)
        self.gradient = gradient
        self.loss = loss
        self.max_batch = max_batch
        self.num_matvecs = 0
        dim = sum(self._numels)
        self._shape = (dim, dim)
        self._dtype = params[0].dtype
        self._device = params[0].device

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, D)`` with ``D`` the number of scalar parameters in the block."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, which vectors must have."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device, where vectors must live."""
        return self._device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        """Apply the operator to a vector ``(D,)`` or to the columns of a matrix ``(D, k)``."""
        if not isinstance(other, torch.Tensor) or other.ndim not in (1, 2):
            got = (
                f"shape {tuple(other.shape)}"
                if isinstance(other, torch.Tensor)
                else type(other).__name__
            )
            raise GradsightError(
                f"a curvature operator multiplies a tensor of shape ({self.shape[1]},) or "
                f"({self.shape[1]}, k), got {got}. Flatten parameter-shaped vectors with "
                "torch.cat([t.flatten() for t in tensors])."
            )
        if other.shape[0] != self.shape[1]:
            raise GradsightError(
                f"vector length must equal the block's parameter count {self.shape[1]}, got "
                f"a tensor of shape {tuple(other.shape)}. The block holds {self.names}."
            )
        squeeze = other.ndim == 1
        rows = other.reshape(self.shape[1], -1).T.to(device=self.device, dtype=self.dtype)
        outs = []
        for start in range(0, rows.shape[0], self.max_batch):
            chunk = rows[start : start + self.max_batch].contiguous()
            out = self._matmat(self._split(chunk))
            outs.append(torch.cat([o.reshape(chunk.shape[0], -1) for o in out], dim=1))
            self.num_matvecs += chunk.shape[0]
        result = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        return result[0] if squeeze else result.T

    def _split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``(k, D)`` rows into per-parameter views of shape ``(k, *p.shape)``."""
        k = rows.shape[0]
        pieces = torch.split(rows, self._numels, dim=1)
        return [p.reshape(k, *s) for p, s in zip(pieces, self.shapes, strict=True)]

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The full ``(D, D)`` matrix, one column per unit vector: for tests on tiny blocks."""
        return self @ torch.eye(self.shape[1], dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.shape[0]}, params={self.names})"


def as_matmul(A: Any, name: str = "A") -> tuple[int, torch.dtype, torch.device]:
    """Check that ``A`` is a square matrix or operator; return ``(dim, dtype, device)``."""
    shape = getattr(A, "shape", None)
    if shape is None or not hasattr(A, "__matmul__") or len(shape) != 2 or shape[0] != shape[1]:
        got = f"shape {tuple(shape)}" if shape is not None else f"a {type(A).__name__}"
        raise GradsightError(
            f"{name} must be a square matrix (a 2-D torch.Tensor) or a curvature operator, "
            f"got {got}. Build one with HessianOperator(model, batch, loss_fn) or "
            "GGNOperator(...)."
        )
    return int(shape[0]), A.dtype, A.device
