"""The generalized Gauss-Newton matrix of a model's loss on a batch, as a linear operator.

With ``f(θ)`` the model outputs on the batch, ``J = ∂f/∂θ_B`` their Jacobian with
respect to a block of parameters and ``H_out = ∂²L/∂f²`` the Hessian of the loss in
output space, the GGN (Schraudolph 2002; Martens 2020, "New insights and perspectives on
the natural gradient method") is

    G = Jᵀ H_out J.

It drops from the Hessian the term Σ ∂L/∂f · ∂²f/∂θ², so it is positive semi-definite
whenever the loss is convex in the outputs, and equals the Hessian for a model linear in
θ_B. ``H_out`` is analytic for cross-entropy, ``(diag(p) − ppᵀ)/n`` per sample with
``p = softmax(logits)``, and for the mean squared error, ``2/n · I``; any other loss
gets its output-space Hessian from autograd.

Products ``G v`` run on a graph retained from one forward pass: ``J v`` by the
double-vjp trick (``J v = ∂(Jᵀu · v)/∂u`` with a dummy ``u``), then ``H_out``, then
``Jᵀ(·)`` by one backward pass; several vectors at once through vmap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradsight._batch import split_batch
from gradsight._errors import GradsightError
from gradsight.curvature._blocks import ParamsSpec, forward_loss, frozen_rng, resolve_params
from gradsight.curvature._operator import CurvatureOperator
from gradsight.curvature.hessian import _double_backward

__all__ = ["GGNOperator", "output_hessian"]

OutputHessian = Callable[[torch.Tensor], torch.Tensor]


def jacobian_transpose_graph(
    outputs: torch.Tensor, tensors: Sequence[torch.Tensor], output_gradient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[int]]:
    """The block's flat gradient Jᵀ(∂L/∂z), and the graph of Jᵀu for a dummy u.

    Differentiating Jᵀu with respect to u along v gives Jv (the double-backward trick),
    so one graph serves every product Jᵀ H_out J v.

    Returns:
        ``(gradient, u, Jᵀu per tensor, indices of the tensors z depends on)``.
    """
    grads = torch.autograd.grad(
        outputs, tensors, output_gradient, retain_graph=True, allow_unused=True
    )
    gradient = torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, tensors, strict=True)
        ]
    )
    dummy = torch.zeros_like(outputs, requires_grad=True)
    jt = torch.autograd.grad(outputs, tensors, dummy, create_graph=True, allow_unused=True)
    jt_dummy = [
        j if j is not None else torch.zeros_like(p) for j, p in zip(jt, tensors, strict=True)
    ]
    live = [i for i, j in enumerate(jt_dummy) if j.requires_grad]
    return gradient, dummy, jt_dummy, live


class GGNOperator(CurvatureOperator):
    """Generalized Gauss-Newton matrix ``Jᵀ H_out J`` of the loss for a block of parameters.

    Args:
        model: the network; left exactly as found (see :class:`HessianOperator`).
        batch: ``(inputs, targets)``; ``model(inputs)`` must return one tensor.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        params: the block; ``None`` for all trainable parameters.
        loss_hessian: ``"auto"`` (analytic for cross-entropy and MSE, autograd otherwise)
            or ``"autograd"`` (always autograd).
        max_batch: most vectors multiplied in one vmapped pass.

    Example:
        For a model linear in its parameters the GGN is the Hessian; with the MSE of a
        linear layer it is ``2 XᵀX / (n · outputs)`` per output row:

        >>> import torch
        >>> from torch import nn
        >>> from gradsight.curvature import GGNOperator, HessianOperator
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 2, bias=False).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> G = GGNOperator(model, (x, y), nn.MSELoss()).to_dense()
        >>> H = HessianOperator(model, (x, y), nn.MSELoss()).to_dense()
        >>> closed_form = torch.kron(torch.eye(2, dtype=torch.float64), 2 * x.T @ x / 16)
        >>> torch.allclose(G, closed_form), torch.allclose(G, H)
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        params: ParamsSpec = None,
        *,
        loss_hessian: Literal["auto", "autograd"] = "auto",
        max_batch: int = 64,
    ) -> None:
        named = resolve_params(model, params)
        tensors = [p for _, p in named]
        device = tensors[0].device
        rng_state = torch.get_rng_state()
        _, targets = split_batch(batch)
        outputs, loss = forward_loss(model, batch, loss_fn, rng_state, device)
        if not isinstance(outputs, torch.Tensor):
            raise GradsightError(
                f"the GGN needs model(inputs) to return one tensor, got a "
                f"{type(outputs).__name__}. Wrap the model so that it returns the tensor "
                "the loss is computed from, or use kind='hessian'."
            )
        (dloss_dout,) = torch.autograd.grad(loss, outputs, retain_graph=True)
        gradient, self._dummy, self._jt_dummy, self._live = jacobian_transpose_graph(
            outputs, tensors, dloss_dout
        )
        self._outputs = outputs
        with frozen_rng(rng_state, device):
            self._h_out = output_hessian(
                loss_fn, outputs.detach(), targets, analytic=loss_hessian == "auto"
            )
        super().__init__(
            [n for n, _ in named], tensors, gradient.detach(), float(loss.detach()), max_batch
        )

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._live:
            return [torch.zeros_like(v) for v in vectors]
        (jv,) = _double_backward(self._jt_dummy, self._live, [self._dummy], vectors)
        hjv = self._h_out(jv)
        return _double_backward([self._outputs], [0], self._params, [hjv])


def output_hessian(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    outputs: torch.Tensor,
    targets: Any,
    *,
    analytic: bool = True,
) -> OutputHessian:
    """``W ↦ H_out W`` for stacked ``W`` of shape ``(k, *outputs.shape)``.

    Analytic for ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` without class weights and
    for ``nn.MSELoss`` / ``F.mse_loss`` with targets of the outputs' shape, both with
    ``reduction`` ``"mean"`` or ``"sum"``; otherwise (or with ``analytic=False``) the
    Hessian-vector products of ``loss_fn`` in output space by double backward.
    """
    if analytic:
        fast = _cross_entropy_hessian(loss_fn, outputs, targets) or _mse_hessian(
            loss_fn, outputs, targets
        )
        if fast is not None:
            return fast
    out = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(out, targets)
        (g,) = torch.autograd.grad(loss, out, create_graph=True)
    if not g.requires_grad:  # the loss is linear in the outputs
        return lambda w: torch.zeros_like(w)

    def apply(w: torch.Tensor) -> torch.Tensor:
        return _double_backward([g], [0], [out], [w])[0]

    return apply


def cross_entropy_settings(
    loss_fn: Any, targets: Any, *, label_smoothing: bool = True
) -> tuple[str, int] | None:
    """``(reduction, ignore_index)`` of an unweighted cross-entropy loss
    (``nn.CrossEntropyLoss`` or ``F.cross_entropy``) with mean or sum reduction and
    tensor targets; None otherwise, or for label smoothing when ``label_smoothing`` is
    False. Its Hessian with respect to the logits is the softmax Jacobian."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing and not label_smoothing:
        return None
    return class_loss_settings(loss_fn, targets, nn.CrossEntropyLoss, F.cross_entropy)


def class_loss_settings(
    loss_fn: Any, targets: Any, module: type[nn.Module], function: Any
) -> tuple[str, int] | None:
    """``(reduction, ignore_index)`` of ``loss_fn`` when it is an unweighted instance of
    ``module`` (``nn.CrossEntropyLoss``, ``nn.NLLLoss``) or is ``function`` itself (its
    defaults: mean, -100), with mean or sum reduction and tensor targets; else None."""
    reduction: Any
    ignore_index: Any
    if isinstance(loss_fn, module):
        if getattr(loss_fn, "weight", None) is not None:
            return None
        reduction, ignore_index = loss_fn.reduction, loss_fn.ignore_index
    elif loss_fn is function:
        reduction, ignore_index = "mean", -100
    else:
        return None
    if reduction not in ("mean", "sum") or not isinstance(targets, torch.Tensor):
        return None
    return str(reduction), int(ignore_index)


def _cross_entropy_hessian(
    loss_fn: Any, outputs: torch.Tensor, targets: Any
) -> OutputHessian | None:
    settings = cross_entropy_settings(loss_fn, targets)
    if settings is None:
        return None
    reduction, ignore_index = settings
    cdim = 1 if outputs.ndim >= 2 else 0
    probs = torch.softmax(outputs, dim=cdim)
    if targets.is_floating_point():  # class probabilities: every position counts
        if targets.shape != outputs.shape:
            return None
        weight = torch.ones_like(probs)
        count = outputs.numel() // outputs.shape[cdim]
    else:  # class indices: positions labelled ignore_index drop out of sum and mean
        mask = (targets != ignore_index).to(outputs.dtype)
        weight = mask.unsqueeze(cdim).expand_as(probs)
        count = int(mask.sum())
    scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    pw = probs * weight * scale

    def apply(w: torch.Tensor) -> torch.Tensor:
        return pw * (w - (probs * w).sum(dim=cdim + 1, keepdim=True))

    return apply


def mse_reduction(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> str | None:
    """``"mean"`` or ``"sum"``: the reduction of a mean squared error loss
    (``nn.MSELoss`` or ``F.mse_loss``) on targets of the outputs' shape; None otherwise."""
    if isinstance(loss_fn, nn.MSELoss):
        reduction = loss_fn.reduction
    elif loss_fn is F.mse_loss:
        reduction = "mean"
    else:
        return None
    if (
        reduction not in ("mean", "sum")
        or not isinstance(targets, torch.Tensor)
        or targets.shape != outputs.shape
    ):
        return None
    return str(reduction)


def mse_scale(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> float | None:
    """The constant Hessian ∂²L/∂z² = scale·I of a mean squared error loss (see
    :func:`mse_reduction`); None otherwise."""
    reduction = mse_reduction(loss_fn, outputs, targets)
    if reduction is None:
        return None
    return 2.0 / outputs.numel() if reduction == "mean" else 2.0


def _mse_hessian(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> OutputHessian | None:
    scale = mse_scale(loss_fn, outputs, targets)
    if scale is None:
        return None
    return lambda w: scale * w
