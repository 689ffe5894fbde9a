"""The generalized Gauss-Newton operator of a loss that a closure computed.

:class:`gradsight.curvature.GGNOperator` evaluates ``loss_fn(model(inputs), targets)``
itself. An optimizer only gets a closure, so this adapter builds the same operator,
``G = Jᵀ H_out J`` (Schraudolph 2002), from the graph the closure left behind: the
model's output tensor ``z`` (captured by a forward hook) and the scalar loss computed
from it. ``H_out = ∂²L/∂z²`` comes from autograd (double backward through the loss),
so any loss that is twice differentiable in ``z`` works, and ``G`` scales with the loss:
``c·L`` has the GGN ``c·G``.

Products reuse the engine's vmapped double-backward (the double-vjp trick
``J v = ∂(Jᵀu · v)/∂u``), so :func:`gradsight.curvature.damped_cg`,
:func:`gradsight.curvature.lanczos` and :func:`gradsight.curvature.curvature_step`
accept this operator unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradsight._errors import GradsightError
from gradsight.curvature import CurvatureOperator
from gradsight.curvature.ggn import jacobian_transpose_graph
from gradsight.curvature.hessian import _double_backward

__all__ = ["ClosureGGN"]


class ClosureGGN(CurvatureOperator):
    """``G = Jᵀ H_out J`` for ``params`` from a model output ``z`` and a loss built on it.

    Args:
        outputs: the model output ``z`` with its graph to ``params``.
        loss: the scalar loss computed from ``outputs`` with its graph.
        params: the parameters (the block), in the order vectors are laid out.
        names: their names (for messages); defaults to ``"0"``, ``"1"``, ….
        max_batch: most vectors multiplied in one vmapped pass.
        lazy: build the graph of ``Jᵀu`` on the first product instead of at once (the
            gradient then comes from a plain backward pass); for a caller that may need
            only the gradient and ``H_out``, as the optimizer between model-based steps.

    Attributes:
        output_gradient: ``∂L/∂z`` (detached).

    Example:
        For a linear model and the mean squared error the GGN is ``2XᵀX / n``:

        >>> import torch
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> w = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)
        >>> z = x @ w
        >>> op = ClosureGGN(z, ((z - 1.0) ** 2).mean(), [w])
        >>> torch.allclose(op.to_dense(), 2 * x.T @ x / 6)
        True
    """

    def __init__(
        self,
        outputs: torch.Tensor,
        loss: torch.Tensor,
        params: Sequence[torch.Tensor],
        names: list[str] | None = None,
        max_batch: int = 64,
        *,
        lazy: bool = False,
    ) -> None:
        tensors = list(params)
        (g_out,) = torch.autograd.grad(loss, outputs, create_graph=True)
        self._jt: tuple[torch.Tensor, list[torch.Tensor], list[int]] | None = None
        if lazy:
            grads = torch.autograd.grad(
                outputs, tensors, g_out.detach(), retain_graph=True, allow_unused=True
            )
            gradient = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, tensors, strict=True)
                ]
            )
        else:
            gradient, dummy, jt_dummy, live = jacobian_transpose_graph(
                outputs, tensors, g_out.detach()
            )
            self._jt = (dummy, jt_dummy, live)
        self._outputs = outputs
        self._g_out = g_out
        self._loss_is_quadratic_free = not g_out.requires_grad  # loss linear in z: H_out = 0
        self.output_gradient = g_out.detach()
        super().__init__(
            names if names is not None else [str(i) for i in range(len(tensors))],
            tensors,
            gradient.detach(),
            float(loss.detach()),
            max_batch,
        )

    def output_hessian(self, w: torch.Tensor) -> torch.Tensor:
        """``H_out w`` for ``k`` stacked output-shaped vectors ``w`` of shape ``(k, *z.shape)``."""
        if self._loss_is_quadratic_free:
            return torch.zeros_like(w)
        return _double_backward([self._g_out], [0], [self._outputs], [w])[0]

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._jt is None:
            _, dummy, jt_dummy, live = jacobian_transpose_graph(
                self._outputs, self._params, self.output_gradient
            )
            self._jt = (dummy, jt_dummy, live)
        dummy, jt_dummy, live = self._jt
        if not live:
            return [torch.zeros_like(v) for v in vectors]
        (jv,) = _double_backward(jt_dummy, live, [dummy], vectors)
        return _double_backward([self._outputs], [0], self._params, [self.output_hessian(jv)])


def check_closure_loss(loss: object) -> torch.Tensor:
    """The closure's return value as a scalar loss with a graph, or a clear error."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = (
            f"a tensor of shape {tuple(loss.shape)}"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise GradsightError(
            "the closure must return the scalar loss of the current batch, e.g. "
            "`lambda: loss_fn(model(x), y)`, got " + got + "."
        )
    if loss.grad_fn is None:
        raise GradsightError(
            "the closure returned a loss without a graph (computed under torch.no_grad(), or "
            "detached). Return loss_fn(model(x), y) computed with gradients enabled."
        )
    return loss.reshape(())
