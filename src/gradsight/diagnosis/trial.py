"""Does SGD at this learning rate blow up? A short trial on the batch, and who carries it.

Gradient descent on a quadratic is stable when lr·λmax ≤ 2. At the starting point of a
real network that test decides little. On 46 runs of 12 transformers architectures and
the reference zoo, each with full-batch SGD for 50 steps, the Hessian's lr·λmax was above 2
in every run that diverged, but also in 49 of the 70 runs that trained: past 2 the loss's
nonlinearity often lowers the curvature (the catapult phase, Lewkowycz et al. 2020; the
edge of stability, Cohen et al. 2021). No threshold separated the two, whether on lr·λmax
of the blocks, of the whole model, or along the gradient, or on lr·‖g‖²/L: each made at
least 8 errors. A Falcon trained at lr·λmax = 26 while a Wav2Vec2 diverged at 2.2.

What separates them is the thing itself. :func:`sgd_trial` takes twenty full-batch SGD
steps at the learning rate, on the batch, from the current weights, on a copy of the
parameters. The model is *exploding* when the loss goes non-finite, or when it is still
above 1.1× its start at each of the last three steps, or when it rose above that and then
froze (a Mamba at lr 3 overflows its hidden states to 1e35, its last RMSNorm outputs
zero and the loss sits exactly at the uniform prediction's with a zero gradient): a
spike that falls back and keeps training (the catapult) is not. Against 114 runs (the 46
cases above, and 34 of them at two more seeds; truth from 50 steps) this makes no false
alarm and 4 misses, on their recorded SGD trajectories and again when diagnose reruns
them: divergences that start only after step 20, once training has raised the curvature.
Stopping at the first step above 1.2× within ten steps made 1 false alarm (a run that
spiked ×4·10¹² and fell back) and 9 misses; judging the end of ten steps, 10 misses.

Which layers carry the instability (:func:`carriers`) is not read off each block's own
lr·λmax either. In a Falcon at lr 10, four MLP blocks have lr·λmax of 7–12, yet each
trained alone lowers the loss; only the tied embedding, which holds most of the model's
sharpest direction, blows up. A layer carries the instability when it holds at least 20%
of the whole model's top Hessian eigenvector (its share of ‖v‖² = 1), or when its block's
lr·λmax is above 2 and one SGD step on it alone raises the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsight._batch import call_model, compute_loss, split_batch
from gradsight._state import preserved, swapped_parameters
from gradsight._walk import ModelWalk
from gradsight.curvature import HessianOperator, lanczos
from gradsight.curvature._blocks import resolve_params
from gradsight.diagnosis.headroom import loss_at

__all__ = ["Carrier", "SGDSettings", "Trial", "carriers", "sgd_settings", "sgd_trial"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Trial:
    """Full-batch SGD from the current weights.

    Attributes:
        lr: The step size (the first group's, where the optimizer has several).
        losses: The loss at the start and after each step taken.
        rise: The ratio to the start above which the loss has blown up.
        at: Where the loss blew up: the step after which it was non-finite (the trial
            stops there), or the last step when it was above ``rise`` × its start at
            each of the trial's last steps, or froze there after rising above it (a
            collapse); None where it did not blow up.
        momentum: The optimizer's momentum (the largest of its groups'), 0 for plain SGD.
    """

    lr: float
    losses: tuple[float, ...]
    rise: float
    at: int | None
    momentum: float = 0.0

    @property
    def blew_up(self) -> bool:
        return self.at is not None

    def outcome(self, baseline: float | None = None, plateau: float = 0.0) -> str:
        """What a trial that did not blow up shows, in words: the loss fell, or it did
        not blow up but did not fall either, or fell to no better than the best constant
        prediction's loss ``baseline`` (where known; within ``plateau`` of it counts as no
        better): a loss that wanders above what a constant achieves, or settles on it (a
        network collapsed to a constant output), has not steadied."""
        last = self.losses[-1]
        if last < self.losses[0] and (baseline is None or last < (1.0 - plateau) * baseline):
            return "training steadies itself by lowering that curvature (the catapult phase)"
        if last < self.losses[0]:
            return (
                "it does not blow up within those steps, though the loss ends no better than "
                f"predicting a constant ({baseline:.3g})"
            )
        return "it does not blow up within those steps, though the loss does not fall either"

    def describe(self) -> str:
        """The trial in words, with its numbers."""
        start, last = self.losses[0], self.losses[-1]
        steps = len(self.losses) - 1
        sgd = f"SGD (momentum {self.momentum:g})" if self.momentum else "SGD"
        if self.at is None:
            taken = (
                f"{steps} full-batch {sgd} steps" if steps != 1 else f"one full-batch {sgd} step"
            )
            return (
                f"{taken} at lr {self.lr:g} take{'s' if steps == 1 else ''} the loss from "
                f"{_apart(start, last)}{self._spike()}"
            )
        if not math.isfinite(last):
            return (
                f"full-batch {sgd} at lr {self.lr:g} turns the loss from {start:.3g} into "
                f"{last} at step {self.at}"
            )
        if not _past(last, start, self.rise):  # it spiked, then froze
            peak = self._peak()
            return (
                f"full-batch {sgd} at lr {self.lr:g} drives the loss from {start:.3g} up to "
                f"{self.losses[peak]:.3g} at step {peak}, after which it freezes at {last:.4g} "
                f"by step {self.at}: the network collapsed (its activations overflowed, "
                "saturated or died, so the gradient vanished), it did not recover"
            )
        by = (
            f"×{last / start:.3g}, above ×{self.rise:g}"
            if start > 0
            else f"up by {last - start:.3g}, more than {self.rise - 1:g}× its size"
        )
        return (
            f"full-batch {sgd} at lr {self.lr:g} raises the loss from {start:.3g} to {last:.3g} "
            f"({by}) by step {self.at}"
        )

    def _peak(self) -> int:
        """The step after which the loss was highest (0 for a trial of no step)."""
        return max(range(1, len(self.losses)), key=self.losses.__getitem__, default=0)

    def _spike(self) -> str:
        """Where a trial that did not blow up went above ``rise`` × its start on the way:
        its highest loss and the step, in words (empty where it did not)."""
        peak = self._peak()
        if peak == 0 or not _past(self.losses[peak], self.losses[0], self.rise):
            return ""
        return f", after a spike to {self.losses[peak]:.3g} at step {peak}"


def _apart(a: float, b: float) -> str:
    """``a to b`` with as many significant digits as it takes to tell them apart (3 to 6):
    5.8835e-08 to 5.8754e-08 is not "5.88e-08 to 5.88e-08"."""
    for digits in range(3, 7):
        left, right = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if left != right:
            break
    return f"{left} to {right}"


def _past(value: float, start: float, rise: float) -> bool:
    """Non-finite, or above ``rise`` × the start (for a loss of either sign)."""
    return not math.isfinite(value) or value > start + (rise - 1.0) * abs(start)


#: A loss that moves by less than this fraction of itself over a trial's last steps has
#: frozen: after a spike, the network collapsed (activations overflowed, saturated or
#: died, and the gradient vanished), which is not a recovery.
_FROZEN = 1e-6


def _ends_up(losses: Sequence[float], rise: float, window: int) -> bool:
    """Above ``rise`` × the start at each of the last ``window`` steps (all of them, for
    fewer steps)."""
    tail = losses[max(1, len(losses) - window) :]
    return bool(tail) and all(_past(v, losses[0], rise) for v in tail)


def _collapsed(losses: Sequence[float], rise: float, window: int) -> bool:
    """Above ``rise`` × the start at some step, and frozen over the last ``window`` steps
    (moving by less than :data:`_FROZEN` of itself) at half its start or more: a spike
    that ends in a network that no longer moves and has learned nothing, not one that
    came back down by training. (A loss frozen far below its start, such as exactly 0
    once every sample is fitted with saturated confidence, is a solved batch.)"""
    start = losses[0]
    if len(losses) < window + 2 or not any(_past(v, start, rise) for v in losses[1:]):
        return False
    tail = losses[-(window + 1) :]
    frozen = max(tail) - min(tail) <= _FROZEN * max(abs(v) for v in tail)
    return frozen and tail[-1] >= start - 0.5 * abs(start)


@dataclass(frozen=True)
class SGDSettings:
    """How ``torch.optim.SGD`` steps one parameter (its group's settings, and the momentum
    buffer its state holds, if any)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    buffer: torch.Tensor | None = None


def sgd_settings(
    optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor], lr: float
) -> list[SGDSettings]:
    """Each parameter's settings as ``optimizer`` (a ``torch.optim.SGD``) steps it, its
    momentum buffer copied; plain SGD at ``lr`` without one, or for a parameter it does
    not hold."""
    plain = SGDSettings(lr)  # one, shared by every parameter the optimizer does not hold
    if not isinstance(optimizer, torch.optim.SGD):
        return [plain] * len(params)
    group_of: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    out = []
    for p in params:
        held = group_of.get(id(p))
        if held is None:
            out.append(plain)
            continue
        group = held
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        out.append(
            SGDSettings(
                lr=float(group["lr"]),
                momentum=float(group.get("momentum", 0.0)),
                dampening=float(group.get("dampening", 0.0)),
                nesterov=bool(group.get("nesterov", False)),
                weight_decay=float(group.get("weight_decay", 0.0)),
                buffer=None if buffer is None else buffer.detach().clone(),
            )
        )
    return out


def sgd_trial(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    lr: float,
    *,
    steps: int = 20,
    rise: float = 1.1,
    window: int = 3,
    settings: Sequence[SGDSettings] | None = None,
    start: tuple[float, Sequence[torch.Tensor | None]] | None = None,
    walk: ModelWalk | None = None,
) -> Trial:
    """``steps`` full-batch SGD steps at ``lr`` on ``batch``, on a copy of ``params``.

    ``settings``: each parameter's, as the user's ``torch.optim.SGD`` steps it (momentum,
    Nesterov, weight decay, its group's lr, its momentum buffer; see
    :func:`sgd_settings`); plain SGD at ``lr`` without them. ``start``: the loss and the
    gradients of ``params`` at the current weights, where the caller has them (the same
    batch, RNG seed 0): the first step then needs no pass of its own. ``walk``: the
    model's, if already made.

    The model is left as it was: its parameters are never written (each step's weights
    are swapped in and out), and its buffers and the global RNG are restored (the passes
    run on a forked RNG with a fixed seed, so dropout masks are reproducible).

    The loss blows up when it goes non-finite (the trial stops there), or when it is
    above ``rise`` × the start at each of the last ``window`` steps (all of them, for a
    trial of fewer steps), or when it rose above that and then froze over the last
    ``window`` steps (the network collapsed: overflowed or saturated activations, a
    vanished gradient). A spike that falls back by the end and keeps moving is training's
    own way of lowering the curvature (the catapult), not a blow-up.
    """
    settings = list(settings) if settings is not None else [SGDSettings(lr)] * len(params)
    walk = walk or ModelWalk(model)
    buffers = [s.buffer for s in settings]
    plain = all(s.lr == lr and not s.momentum and not s.weight_decay for s in settings)
    current = [p.detach() for p in params]  # never written: each step makes new tensors
    losses: list[float] = []
    at = None
    inputs, targets = split_batch(batch)
    with preserved(model, walk=walk):
        for step in range(steps + 1):
            last = step == steps
            if step == 0 and start is not None:
                losses.append(float(start[0]))
                grads: Sequence[torch.Tensor | None] = start[1]
            else:
                leaves = current if last else [c.requires_grad_(True) for c in current]
                swapped = {id(p): c for p, c in zip(params, leaves, strict=True)}
                with swapped_parameters(model, swapped, walk), torch.set_grad_enabled(not last):
                    if last:  # the loss alone: no graph
                        losses.append(float(loss_fn(call_model(model, inputs), targets)))
                    else:
                        _, loss = compute_loss(model, batch, loss_fn)
                        losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    at = step
                    break
                if last:
                    if _ends_up(losses, rise, window) or _collapsed(losses, rise, window):
                        at = step
                    break
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                current = [c.detach() for c in leaves]
            if plain and all(g is not None for g in grads):
                # Plain SGD, one lr: one fused update for every parameter.
                update = [g for g in grads if g is not None]
                current = list(torch._foreach_add(current, update, alpha=-lr))
                continue
            stepped = []
            for i, (p, g, s) in enumerate(zip(current, grads, settings, strict=True)):
                if g is None:
                    stepped.append(p)
                    continue
                d = g if not s.weight_decay else g + s.weight_decay * p
                if s.momentum:  # as torch.optim.SGD: the buffer, then Nesterov's look-ahead
                    buf = buffers[i]
                    buf = d.clone() if buf is None else s.momentum * buf + (1 - s.dampening) * d
                    buffers[i] = buf
                    d = d + s.momentum * buf if s.nesterov else buf
                stepped.append(p - s.lr * d)
            current = stepped
    momentum = max((s.momentum for s in settings), default=0.0)
    return Trial(lr=lr, losses=tuple(losses), rise=rise, at=at, momentum=momentum)


@dataclass(frozen=True)
class Carrier:
    """Why a layer carries an instability that blows up SGD.

    Attributes:
        share: Its share of the whole model's top Hessian eigenvector (‖v_block‖²).
        alone: The loss after one SGD step on its block alone over the loss before,
            where that was tried (its block's lr·λmax above 2).
        frozen: The trial with this layer frozen, where freezing it stops the blow-up
            (the rest trains): the layer the instability needs.
        not_alone: Freezing it alone was tried and does not stop the blow-up (no layer
            tried does): it is named by its share or its step alone, and others share
            the instability.
    """

    share: float
    alone: float | None = None
    frozen: Trial | None = None
    not_alone: bool = False

    def describe(self) -> str:
        if self.frozen is not None:
            start, last = self.frozen.losses[0], self.frozen.losses[-1]
            steps = len(self.frozen.losses) - 1
            same = "the same step trains" if steps == 1 else f"the same {steps} steps train"
            return f"with it frozen {same} the rest, taking the loss from {_apart(start, last)}" + (
                f", and it holds {self.share:.0%} of the whole model's sharpest direction"
                if self.share >= 0.005
                else ""
            )
        if math.isnan(self.share) and self.alone is None:
            return "its block is the sharpest at this lr (its share was not measured)"
        parts = []
        if self.share >= 0.005:
            parts.append(
                f"it holds {self.share:.0%} of the whole model's sharpest direction (the "
                "Hessian's top eigenvector)"
            )
        if self.alone is not None:
            parts.append(
                "one SGD step on it alone "
                + (
                    f"raises the loss ×{self.alone:.3g}"
                    if math.isfinite(self.alone)
                    else "makes the loss non-finite"
                )
            )
        said = " and ".join(parts) or "it holds the largest share of the sharpest direction"
        if self.not_alone:
            said += (
                "; yet freezing it alone does not stop the blow-up (tried on a copy, as on "
                "the other likeliest layers): other layers share the instability"
            )
        return said


#: The most memory the Lanczos basis of :func:`carriers` may take (``max_matvecs``
#: vectors of the model's size): 30 vectors of a 4-million-parameter model in float32.
_BASIS_BYTES = 512 * 2**20


def carriers(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    blocks: Mapping[str, Sequence[torch.Tensor]],
    products: Mapping[str, float],
    lr: float,
    *,
    loss: float,
    share: float = 0.2,
    rise: float = 1.2,
    max_matvecs: int = 30,
    frozen_trial: Callable[[str], Trial | None] | None = None,
    candidates: int = 2,
) -> dict[str, Carrier]:
    """The layers that carry an instability, by name (see the module docstring).

    With ``frozen_trial`` (the trial rerun with the named layer frozen, or None where it
    could not run): the layers among the ``candidates`` largest by share of the top
    Hessian eigenvector and the ``candidates`` largest by gradient norm whose freezing
    stops the blow-up. Where none does, or without ``frozen_trial``: a share of the top
    eigenvector of at least ``share``, or ``products[name]`` (the block's lr·λmax) above 2
    and one SGD step on the block alone raising the loss above ``rise`` × ``loss`` (the
    loss at the start) or to NaN/Inf; at least one: the largest share, when no layer
    passes either test.

    The eigenvector is found for the loss divided by its start (the same direction at
    every scale of the loss, in float32's range), with at most ``max_matvecs``
    Hessian-vector products: by Lanczos where its basis fits in :data:`_BASIS_BYTES`, by
    power iteration (two vectors of memory, slower to converge) beyond. Each block tried
    alone costs one forward pass.
    """
    unique: dict[int, torch.Tensor] = {}
    for params in blocks.values():
        for p in params:
            unique.setdefault(id(p), p)
    scale = abs(loss) if math.isfinite(loss) and loss != 0 else 1.0

    def normalized(outputs: Any, targets: Any) -> torch.Tensor:
        return loss_fn(outputs, targets) / scale

    op = HessianOperator(model, batch, normalized, params=list(unique.values()))
    flat = [p for _, p in resolve_params(model, list(unique.values()))]  # the operator's order
    dim, itemsize = op.shape[0], op.gradient.element_size()
    if max_matvecs * dim * itemsize <= _BASIS_BYTES:
        vector = lanczos(op, 1, tol=1e-2, max_matvecs=max_matvecs).eigenvectors[:, 0]
    else:  # Lanczos keeps its whole basis: a large model gets power iteration's two vectors
        vector = _sharpest_direction(op, max_matvecs)
    sizes = [p.numel() for p in flat]
    mass = {id(p): float(v.square().sum()) for p, v in zip(flat, vector.split(sizes), strict=True)}
    grad = dict(zip(map(id, flat), (scale * op.gradient).split(sizes), strict=True))
    shares = {name: sum(mass[id(p)] for p in params) for name, params in blocks.items()}
    tried: set[str] = set()
    if frozen_trial is not None:
        found, tried = _frozen_carriers(blocks, shares, grad, frozen_trial, candidates, model)
        if found:
            return found
    out = {name: Carrier(s, not_alone=name in tried) for name, s in shares.items() if s >= share}
    for name, params in blocks.items():
        if name in out or products.get(name, 0.0) <= 2 or not params:
            continue
        step = {str(id(p)): -lr * grad[id(p)] for p in params}  # one SGD step, this block
        after = loss_at(model, batch, loss_fn, params, step)
        if _past(after, loss, rise):
            ratio = after / loss if loss > 0 and math.isfinite(after) else math.inf
            out[name] = Carrier(shares[name], alone=ratio, not_alone=name in tried)
    if not out and shares:
        top = max(shares, key=lambda name: shares[name])
        out[top] = Carrier(shares[top], not_alone=top in tried)
    return out


def _frozen_carriers(
    blocks: Mapping[str, Sequence[torch.Tensor]],
    shares: Mapping[str, float],
    grad: Mapping[int, torch.Tensor],
    frozen_trial: Callable[[str], Trial | None],
    candidates: int,
    model: nn.Module | None = None,
) -> tuple[dict[str, Carrier], set[str]]:
    """The candidates whose freezing stops the blow-up, so that the rest trains (the loss
    ends below its start): the ``candidates`` blocks largest by share of the top
    eigenvector, the ``candidates`` largest by gradient norm, and, of those with a
    gradient, the last (the output layer) and the last normalization layer of ``model``
    (forward order); and the candidates whose frozen trial ran. A
    language model's output layer carries it while holding little of the sharpest
    direction (its gradient is among the largest); a vision transformer's classifier
    and BLOOM's final LayerNorm carry it with neither."""
    norms = {
        name: math.fsum(float(grad[id(p)].square().sum()) for p in params)
        for name, params in blocks.items()
    }
    by_share = sorted(shares, key=lambda name: -shares[name])[:candidates]
    by_grad = sorted(norms, key=lambda name: -norms[name])[:candidates]
    ends = [] if model is None else _output_end(model, [n for n in blocks if norms[n] > 0])
    out, tried = {}, set()
    for name in dict.fromkeys([*by_share, *by_grad, *ends]):  # each once, in that order
        trial = frozen_trial(name)
        if trial is not None:
            tried.add(name)
        # The rest trains: no blow-up, and the loss ends below where it started.
        if trial is not None and not trial.blew_up and trial.losses[-1] < trial.losses[0]:
            out[name] = Carrier(shares[name], frozen=trial)
    return out, tried


def _output_end(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The last of ``names`` (forward order: the output layer) and the last of them that
    is a normalization layer (the final LayerNorm), where they can be found."""
    ends = list(names[-1:])
    for name in reversed(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if "Norm" in type(module).__name__:
            ends = [*ends, name]
            break
    return ends


def _sharpest_direction(op: HessianOperator, max_matvecs: int) -> torch.Tensor:
    """The unit eigenvector of the most positive curvature, by power iteration. Power
    iteration finds the eigenvalue μ of largest magnitude; where μ is negative, it runs
    again on H − μI, whose largest eigenvalue, λmax − μ, is also its largest in
    magnitude. The products are shared between the two runs."""
    gen = torch.Generator(device=op.gradient.device).manual_seed(0)
    start = torch.randn(
        op.shape[0], generator=gen, dtype=op.gradient.dtype, device=op.gradient.device
    )
    start = start / float(start.norm())
    v, mu, used = _power(op, start, 0.0, max_matvecs)
    if mu < 0 and used < max_matvecs:
        v, _, _ = _power(op, start, -mu, max_matvecs - used)
    return v


def _power(
    op: HessianOperator, v: torch.Tensor, shift: float, budget: int
) -> tuple[torch.Tensor, float, int]:
    """Power iteration on ``op + shift·I`` from ``v``: the unit vector, the Rayleigh
    quotient of ``op`` itself, and the products used (it stops when the quotient moves by
    less than 1e-4 of itself)."""
    previous = math.nan
    rayleigh = 0.0
    for used in range(1, budget + 1):
        w = op @ v
        rayleigh = float(v @ w)
        if shift:
            w = w + shift * v
        top = float(w.abs().max())
        if not math.isfinite(top) or top == 0:
            return v, rayleigh, used
        w = w / top
        v = w / float(w.norm())
        if abs(rayleigh - previous) <= 1e-4 * abs(rayleigh):
            return v, rayleigh, used
        previous = rayleigh
    return v, rayleigh, budget
