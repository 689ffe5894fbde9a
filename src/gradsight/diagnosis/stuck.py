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

A stuck weight of exactly zero is then moved off zero at random: where that gives it a
gradient, its zero holds a saddle (the norm above). Where it does not, the zero is not
what holds it: the loss does not depend on it (a head weighted 0 in the loss) or its
input is zero (a condition absent from the batch), which no initialization changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from gradsight._batch import compute_loss
from gradsight._state import preserved, swapped_parameters
from gradsight._walk import ModelWalk

__all__ = ["STEPS", "Stuck", "still_zero"]

LossFn = Callable[[Any, Any], torch.Tensor]

#: Gradient steps tried: a chain of k zero-initialized layers opens in k steps.
STEPS = 5
#: Each step moves a parameter by this fraction of its norm (or by this much, where its
#: norm is zero) along its gradient, and a stuck zero weight is moved off zero by this
#: much at random: small, so that the steps stay in the region the diagnosis describes;
#: only which entries move matters.
SIZE = 1e-2


class Stuck(NamedTuple):
    """What :func:`still_zero` found."""

    #: The watched layers whose gradient stayed exactly zero.
    layers: set[str]
    #: Those of them, among the ones whose weight is exactly zero, that get a gradient
    #: once that weight is moved off zero: their zero holds a saddle.
    saddles: set[str]


def still_zero(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    watched: Mapping[str, Sequence[int]],
    *,
    zero_weights: Collection[str] = (),
    steps: int = STEPS,
    walk: ModelWalk | None = None,
) -> Stuck:
    """The names in ``watched`` whose parameters' gradients stay exactly zero over
    ``steps`` small gradient steps on every parameter in ``params``, and those of them in
    ``zero_weights`` (layers whose weight is exactly zero) that get a gradient when, after
    the steps, their parameters are moved off zero at random (one more pass).

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
        >>> zero = {"0": [0, 1], "1.gate": [2], "1.up": [3], "2": [4]}  # only 2.bias moves
        >>> found = still_zero(model, (x, y), nn.functional.mse_loss, params, grads, zero,
        ...                    zero_weights={"0"})
        >>> sorted(found.layers), found.saddles  # layer 0's zero holds the others
        (['0', '1.gate', '1.up', '2'], {'0'})
    """
    zero = set(watched)
    if not zero:
        return Stuck(set(), set())
    current = [p.detach() for p in params]
    with preserved(model, walk=walk):
        for _ in range(steps):
            current = [_small_step(c, g) for c, g in zip(current, grads, strict=True)]
            grads = _gradients(model, batch, loss_fn, params, current, walk)
            zero = {n for n in zero if all(_is_zero(grads[i]) for i in watched[n])}
            if not zero:
                return Stuck(set(), set())
        held = {n: watched[n] for n in zero if n in zero_weights}
        if not held:
            return Stuck(zero, set())
        # The stuck zero weights moved off zero at random, all at once, from the weights
        # the steps reached (where any layer that waited on another has opened).
        moved = {i for indices in held.values() for i in indices}
        gen = torch.Generator().manual_seed(0)
        for i in sorted(moved):
            noise = torch.randn(current[i].shape, generator=gen, dtype=current[i].dtype)
            current[i] = current[i] + SIZE * noise.to(current[i].device)
        grads = _gradients(model, batch, loss_fn, params, current, walk)
    saddles = {n for n, indices in held.items() if not all(_is_zero(grads[i]) for i in indices)}
    return Stuck(zero, saddles)


def _gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    walk: ModelWalk | None,
) -> tuple[torch.Tensor | None, ...]:
    """The gradient of the loss with ``values`` in place of ``params`` (swapped in, never
    written)."""
    leaves = [v.detach().requires_grad_(True) for v in values]
    swapped = {id(p): c for p, c in zip(params, leaves, strict=True)}
    with swapped_parameters(model, swapped, walk), torch.enable_grad():
        _, loss = compute_loss(model, batch, loss_fn)
        return torch.autograd.grad(loss, leaves, allow_unused=True)


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
