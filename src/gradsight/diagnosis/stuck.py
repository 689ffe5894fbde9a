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

A weight of exactly zero that is *frozen* (``requires_grad=False``) holds what it gates
for good: ReZero's α, DiT's adaLN-Zero modulation, a ResNet's last BatchNorm or LoRA's B
frozen at their zero initialization leave their branch without a gradient at every step.
Those are moved off zero too, on their own pass: a stuck layer that then gets a gradient
is held by the frozen zero.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from gradsight._batch import compute_loss
from gradsight._state import preserved, swapped_parameters
from gradsight._walk import ModelWalk

__all__ = ["ALONE", "STEPS", "Stuck", "still_zero"]

LossFn = Callable[[Any, Any], torch.Tensor]

#: Gradient steps tried: a chain of k zero-initialized layers opens in k steps.
STEPS = 5
#: Each step moves a parameter by this fraction of its norm (or by this much, where its
#: norm is zero) along its gradient, and a stuck zero weight is moved off zero by this
#: much at random: small, so that the steps stay in the region the diagnosis describes;
#: only which entries move matters.
SIZE = 1e-2
#: Up to this many frozen zero parameters are each moved alone (one pass each), to tell
#: which of them holds which layer.
ALONE = 8


class Stuck(NamedTuple):
    """What :func:`still_zero` found."""

    #: The watched layers whose gradient stayed exactly zero.
    layers: set[str]
    #: Those of them, among the ones whose weight is exactly zero, that get a gradient
    #: once that weight is moved off zero: their zero holds a saddle (and of the
    #: ``movers``, those whose weight does).
    saddles: set[str]
    #: Those of them that get a gradient once the frozen zero parameters are moved off
    #: zero, with the parameters (qualified names) that hold them: each one that gives
    #: them a gradient moved alone (all of them, where only moved together they do, or
    #: where there are more than :data:`ALONE` to try).
    frozen_by: Mapping[str, tuple[str, ...]] = {}
    #: The stuck layers that get a gradient once the stuck zero weights are moved off
    #: zero: those weights hold them.
    opened: frozenset[str] = frozenset()


def still_zero(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    watched: Mapping[str, Sequence[int]],
    *,
    zero_weights: Collection[str] = (),
    movers: Mapping[str, Sequence[int]] | None = None,
    frozen_zeros: Mapping[str, Sequence[torch.Tensor]] | None = None,
    steps: int = STEPS,
    walk: ModelWalk | None = None,
) -> Stuck:
    """The names in ``watched`` whose parameters' gradients stay exactly zero over
    ``steps`` small gradient steps on every parameter in ``params``, and those of them in
    ``zero_weights`` (layers whose weight is exactly zero) that get a gradient when, after
    the steps, their parameters are moved off zero at random (one more pass, with the
    weights of ``movers``: other layers' weights that are exactly zero and get no
    gradient, by the indices into ``params``, while they still get none: a zero output
    projection whose bias learns locks a zero value projection before it), and those
    that get a gradient only when the tensors of ``frozen_zeros`` (parameters that do not
    require a gradient and are exactly zero, by name) are moved off zero too, with the
    ones that hold them (one more pass, and one per frozen zero where there are several:
    :attr:`Stuck.frozen_by`).

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
    movers = dict(movers or {})
    with preserved(model, walk=walk):
        for _ in range(steps):
            current = [_small_step(c, g) for c, g in zip(current, grads, strict=True)]
            grads = _gradients(model, batch, loss_fn, params, current, walk)
            zero -= _moving(grads, {n: watched[n] for n in zero})
            for n in _moving(grads, movers):
                del movers[n]
            if not zero:
                return Stuck(set(), set())
        gen = torch.Generator().manual_seed(0)
        # The stuck zero weights moved off zero at random, all at once, from the weights
        # the steps reached (where any layer that waited on another has opened).
        held = {n: watched[n] for n in zero if n in zero_weights}
        held.update({n: ids for n, ids in movers.items() if n not in held})
        moved = {i for indices in held.values() for i in indices}
        for i in sorted(moved):
            current[i] = _off_zero(current[i], gen)
        saddles: set[str] = set()
        opened: set[str] = set()
        if held:
            grads = _gradients(model, batch, loss_fn, params, current, walk)
            opened = _moving(grads, {n: watched[n] for n in zero})
            saddles = _moving(grads, held)
        frozen_by = (
            _frozen_holders(
                model,
                batch,
                loss_fn,
                params,
                current,
                walk,
                gen,
                frozen_zeros,
                {n: watched[n] for n in zero - opened},
            )
            if frozen_zeros
            else {}
        )
    return Stuck(zero, saddles, frozen_by, frozenset(opened))


def _frozen_holders(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    current: Sequence[torch.Tensor],
    walk: ModelWalk | None,
    gen: torch.Generator,
    frozen_zeros: Mapping[str, Sequence[torch.Tensor]],
    watched: Mapping[str, Sequence[int]],
) -> dict[str, tuple[str, ...]]:
    """For each of the ``watched`` stuck layers that gets a gradient once the frozen zero
    parameters are moved off zero (all at once; a frozen zero output convolution holds a
    trainable zero one before it, which the steps already moved), the ones that hold it:
    those that give it a gradient moved alone (up to :data:`ALONE` tried), else all."""
    off = {name: [_off_zero(p.detach(), gen) for p in ps] for name, ps in frozen_zeros.items()}

    def opens(names: Collection[str]) -> set[str]:
        others = {id(p): v for n in names for p, v in zip(frozen_zeros[n], off[n], strict=True)}
        return _moving(_gradients(model, batch, loss_fn, params, current, walk, others), watched)

    together = opens(list(frozen_zeros))
    alone = (
        {name: opens([name]) for name in frozen_zeros}
        if together and 1 < len(frozen_zeros) <= ALONE
        else {}
    )
    return {
        n: tuple(name for name, found in alone.items() if n in found) or tuple(frozen_zeros)
        for n in sorted(together)
    }


def _off_zero(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` moved by :data:`SIZE` at random (a new tensor)."""
    noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return t + SIZE * noise.to(t.device)


def _gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    walk: ModelWalk | None,
    others: Mapping[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """The gradient of the loss with ``values`` in place of ``params`` and ``others``
    (``id(parameter)`` → tensor, no gradient taken) in place of other parameters (swapped
    in, never written)."""
    leaves = [v.detach().requires_grad_(True) for v in values]
    swapped = {**(others or {}), **{id(p): c for p, c in zip(params, leaves, strict=True)}}
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


def _moving(grads: Sequence[torch.Tensor | None], groups: Mapping[str, Sequence[int]]) -> set[str]:
    """The names in ``groups`` (name → indices into ``grads``) with a gradient that is not
    exactly zero."""
    return {n for n, ids in groups.items() if not all(_is_zero(grads[i]) for i in ids)}


def _is_zero(g: torch.Tensor | None) -> bool:
    """Exactly zero (None: the loss does not reach it, the same), NaN and Inf are not."""
    return g is None or not bool(g.ne(0).any())
