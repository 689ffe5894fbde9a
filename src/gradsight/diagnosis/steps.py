"""The step each layer actually gets from the user's optimizer.

A layer's curvature-optimal step α* = gᵀg/gᵀGg is compared with the step it gets. For
SGD that is the learning rate. An adaptive optimizer divides each coordinate by a
running RMS of its gradient, so its raw ``lr`` says little about the step a layer
takes: Adam at lr 1e-3 on a layer whose gradients are 1e-4 moves it as SGD at lr 10
would. The comparable quantity is the step along the gradient,

    α_eff = gᵀΔ / gᵀg,   Δ = P g,   P = lr / (√v̂ + ε)  (diagonal),

with v̂ the optimizer's second-moment estimate after this gradient: read from its
state, never written (the optimizer is not stepped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["adaptive_step", "optimizer_kind", "optimizer_lr"]

# Optimizers whose preconditioner is a running (bias-corrected) mean of g² with decay β2.
_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)


def optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str | None:
    """``"sgd"``, ``"adaptive"`` (Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad),
    ``"other"``, or None without an optimizer."""
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (*_ADAM_LIKE, torch.optim.RMSprop, torch.optim.Adagrad)):
        return "adaptive"
    return "other"


def optimizer_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """The first parameter group's learning rate (a float, even if stored as a tensor)."""
    groups = optimizer.param_groups
    if not groups or "lr" not in groups[0]:
        return None
    return float(groups[0]["lr"])


def adaptive_step(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    grad_of: Mapping[int, torch.Tensor | None],
) -> float | None:
    """The step α_eff = gᵀPg / gᵀg that ``optimizer`` takes along the gradient ``g`` of
    ``params`` (gradients in ``grad_of``, keyed by ``id``), its state left untouched.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adam([w], lr=0.1, eps=0.0)
        >>> g = torch.tensor([1e-4, 2e-4, -3e-4])
        >>> step = adaptive_step(opt, [w], {id(w): g})  # first step: Δ = lr·sign(g)
        >>> round(step / (0.1 * g.abs().sum() / (g * g).sum()).item(), 6)
        1.0
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    num = den = 0.0
    for p in params:
        g = grad_of.get(id(p))
        group = group_of.get(id(p))
        if g is None or group is None:
            continue
        g = g.detach().to(torch.float64)
        precond = _preconditioner(optimizer, group, optimizer.state.get(p, {}), g)
        num += float((precond * g * g).sum())
        den += float((g * g).sum())
    if den == 0 or not math.isfinite(num):
        return None
    return num / den


def _preconditioner(
    optimizer: torch.optim.Optimizer,
    group: Mapping[str, object],
    state: Mapping[str, object],
    g: torch.Tensor,
) -> torch.Tensor:
    lr = float(group["lr"])  # type: ignore[arg-type]
    eps = float(group.get("eps", 1e-8))  # type: ignore[arg-type]
    g2 = g * g
    if isinstance(optimizer, _ADAM_LIKE):
        beta2 = float(group["betas"][1])  # type: ignore[index]
        step = _count(state.get("step")) + 1
        v = _tensor(state.get("exp_avg_sq"), g)
        v = beta2 * v + (1 - beta2) * g2
        v_hat = v / (1 - beta2**step)
        return lr / (v_hat.sqrt() + eps)
    if isinstance(optimizer, torch.optim.RMSprop):
        alpha = float(group.get("alpha", 0.99))  # type: ignore[arg-type]
        v = alpha * _tensor(state.get("square_avg"), g) + (1 - alpha) * g2
        return lr / (v.sqrt() + eps)
    if isinstance(optimizer, torch.optim.Adagrad):
        init = float(group.get("initial_accumulator_value", 0.0))  # type: ignore[arg-type]
        s = state.get("sum")
        acc = (_tensor(s, g) if s is not None else torch.full_like(g, init)) + g2
        return lr / (acc.sqrt() + eps)
    raise TypeError(f"no adaptive step for {type(optimizer).__name__}")


def _count(step: object) -> int:
    if step is None:
        return 0
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)  # type: ignore[call-overload]


def _tensor(value: object, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(like.dtype).reshape(like.shape)
    return torch.zeros_like(like)
