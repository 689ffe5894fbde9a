"""Does an exactly zero gradient stay zero? A few small gradient steps, on a copy.

A layer whose gradient is exactly zero while the loss still has something to win is either
waiting or stuck. *Waiting*: a zero-initialized layer elsewhere (a residual branch's last
weight in Fixup or SkipInit, DiT's adaLN-Zero, ControlNet's zero convolutions) gets a
gradient, and its first update opens the path. *Stuck*: the zero holds itself. A Llama
MLP whose RMSNorm weight is zero (a loop that zeroes every 1-D parameter, meant for
biases) is fed exactly zero; SiLU(gate)·up is then zero in both factors, so no signal
passes back to gate, up or the norm, and their gradients are zero at every step: the
model trains around them, and they never move. Which of the two it is cannot be read
off one pass by position alone (the next zero-weight layer may sit on the residual
stream, not on the branch). It is read off the thing itself: :func:`still_zero` takes a
few small gradient steps on every parameter and watches whether those gradients leave
zero. The update of any gradient-based optimizer (SGD, Adam, ...) is zero exactly where
the gradient is, so the steps' size does not matter, only which entries move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradsight._batch import compute_loss
from gradsight._state import preserved, swapped_parameters
from gradsight._walk import ModelWalk

__all__ = ["STEPS", "still_zero"]

LossFn = Callable[[Any, Any], torch.Tensor]

#: Gradient steps tried: a chain of k zero-initialized layers opens in k steps.
STEPS = 3
#: Each step moves a parameter by this fraction of its norm (or by this much, where its
#: norm is zero) along its gradient: small, so that the steps stay in the region the
#: diagnosis describes; only which entries move matters.
SIZE = 1e-2


def still_zero(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    watched: Mapping[str, Sequence[int]],
    *,
    steps: int = STEPS,
    walk: ModelWalk | None = None,
) -> set[str]:
    """The names in ``watched`` whose parameters' gradients stay exactly zero over
    ``steps`` small gradient steps on every parameter in ``params``.

    ``grads``: the gradient of each of ``params`` at the current weights (None where the
    loss does not reach it); ``watched``: for each name, the indices into ``params`` of
    its parameters, whose gradients are exactly zero now. A gradient that turns NaN/Inf
    is not zero. The model is left as it was: its parameters are never written (each
    step's weights are swapped in and out), and its buffers and the global RNG are
    restored (every pass runs on the same fixed seed, so dropout masks are the
    diagnosis pass's).

    Example:
        >>> class Gated(nn.Module):  # SiLU(gate(x)) * up(x), as a Llama MLP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate, self.up = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
        ...     def forward(self, x):
        ...         return nn.functional.silu(self.gate(x)) * self.up(x)
        >>> model = nn.Sequential(nn.Linear(2, 2), Gated(), nn.Linear(2, 1))
        >>> with torch.no_grad():  # the first layer feeds the gated block zero
        ...     _ = model[0].weight.zero_(), model[0].bias.zero_()
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> params = list(model.parameters())
        >>> grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
        >>> names = [n for n, _ in model.named_parameters()]
        >>> zero = {n: [i] for i, n in enumerate(names) if not grads[i].any()}
        >>> sorted(zero)  # only the last layer's bias gets a gradient
        ['0.bias', '0.weight', '1.gate.weight', '1.up.weight', '2.weight']
        >>> sorted(still_zero(model, (x, y), nn.functional.mse_loss, params, grads, zero))
        ['0.bias', '0.weight', '1.gate.weight', '1.up.weight', '2.weight']
    """
    zero = set(watched)
    if not zero:
        return zero
    current = [p.detach() for p in params]
    with preserved(model, walk=walk):
        for _ in range(steps):
            current = [_small_step(c, g) for c, g in zip(current, grads, strict=True)]
            leaves = [c.requires_grad_(True) for c in current]
            swapped = {id(p): c for p, c in zip(params, leaves, strict=True)}
            with swapped_parameters(model, swapped, walk), torch.enable_grad():
                _, loss = compute_loss(model, batch, loss_fn)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            current = [c.detach() for c in leaves]
            zero = {n for n in zero if all(_is_zero(grads[i]) for i in watched[n])}
            if not zero:
                break
    return zero


def _small_step(p: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``p`` moved against ``g`` by :data:`SIZE` of its norm (of 1 where it is zero); a
    new tensor (``p`` itself where ``g`` is zero or not finite)."""
    if g is None:
        return p
    g_norm = float(torch.linalg.vector_norm(g))
    if not 0.0 < g_norm < float("inf"):
        return p
    p_norm = float(torch.linalg.vector_norm(p))
    return p - (SIZE * (p_norm if p_norm > 0 else 1.0) / g_norm) * g


def _is_zero(g: torch.Tensor | None) -> bool:
    """Exactly zero (None: the loss does not reach it, the same), NaN and Inf are not."""
    return g is None or not bool(g.ne(0).any())
