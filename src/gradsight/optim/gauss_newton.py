"""A Gauss-Newton optimizer whose every layer gets the step its own curvature calls for.

Gradient descent's step ``θ ← θ − ε∇L`` has no scale of its own: multiply the loss by
``c`` or a layer's variables by ``k`` and the good ``ε`` changes. In a deep sigmoid
network each layer is a differently scaled problem (their curvature-optimal steps differ
by orders of magnitude), so one global ``ε`` is too large for some layers and useless
for the rest. This optimizer combines published ingredients, each chosen by measurement
(``benchmarks/remedy.py``, ``docs/optimizer.md``):

1. **Per-layer Gauss-Newton directions** from a block-diagonal approximation of the
   generalized Gauss-Newton matrix ``G = Jᵀ H_out J``, one block per layer, its kind set
   by the layer's type (:mod:`gradsight.optim.blocks`): Kronecker factors ``A ⊗ S`` for
   linear layers (K-FAC, Martens & Grosse 2015) and convolutions (KFC, Grosse & Martens
   2016), the diagonal for anything else. The output factor ``S`` is built from backward
   signals whose covariance is the exact output Hessian ``H_out``, so it is the GGN, not
   the empirical Fisher whose scale is wrong (Kunstner et al. 2019). Each factor is
   damped *relative* to its own mean eigenvalue (factored Tikhonov damping, Martens &
   Grosse 2015 §6.3) by ``factor_damping``, and the direction preconditions the
   (Nesterov) momentum of the gradient.
2. **Amortized curvature** (Martens & Grosse 2015 §8; Ba, Grosse & Martens 2017): the
   factors are running averages refreshed, and their inverses recomputed in one batched
   Cholesky factorization per factor size, every ``update_every`` steps (every step for
   the first ``warmup``); a step in between costs one gradient and two small matrix
   products per layer. A factor much larger than the other one of its layer (a
   classifier head's 513 inputs against 10 outputs) keeps its Cholesky factor and is
   solved with at every step instead: cheaper than its inverse at every refresh.
3. **A per-layer step length.** Each layer's step is its Gauss-Newton direction scaled
   to a root-mean-square per entry of ``lr`` times the layer's own root-mean-square at
   its first step (its initialization scale): a trust region of fixed radius per layer,
   in the spirit of the layer-wise trust ratios of LARS/LAMB (You et al. 2017, 2020) and
   of Muon's normalized updates (Jordan et al. 2024). The curvature sets each layer's
   direction (which combinations of its weights to move, and how much relative to each
   other); the trust region sets how far each layer moves, whatever the size of the
   signal that reaches it. Measured: a layer that receives 10⁻⁶ of the last layer's
   signal has a Gauss-Newton step 10⁶ times too long for its sigmoid units (they
   saturate), and a step along the curvature's own length trains the 10-layer sigmoid
   MLP to chance level only.
4. **The step shrinks with the gradient's signal-to-noise ratio.** The radius is
   multiplied by the layer's ratio ``√mean(m̂²/v̂)`` (at most 1) of the bias-corrected
   averages of the gradient ``m̂`` (the momentum) and of its square ``v̂`` (decay
   ``snr_decay``): Adam's per-entry step size (Kingma & Ba 2015), used only as a length,
   as Shampoo grafts Adam's step norm onto its own direction (Gupta et al. 2018; Anil
   et al. 2020). A layer whose gradient is consistent moves the full radius; one whose
   gradient is mostly minibatch noise (ratio ≈ 0.23 at momentum 0.9) moves about a
   tenth of it (``0.23²/0.5``, the knee below). Measured (``benchmarks/remedy.py``):
   without it the 2-layer GPT-2 never came within 0.9 nats of the entropy rate at the
   default lr and the small CNN's held-out accuracy fell from 97% to 87% mid-run; with
   it both train at the same defaults as the sigmoid MLPs. Below a knee (``snr_knee`` =
   0.5) the length follows the ratio's square instead (``r²/0.5``, continuous at the
   knee): the step that minimizes the expected loss along a noisy gradient scales with
   its signal fraction ``m̂²/v̂`` (Schaul, Zhang & LeCun 2013), and a layer whose
   gradient is mostly noise is past the phase where Adam-sized steps pay. Early steps
   (ratio ≥ 0.5) keep their length; later ones, in the interpolating sigmoid MLPs, are
   2.5–6× shorter.
5. **The data are not whitened.** A Kronecker layer whose input depends on no trained
   parameter (the data, or fixed features) has the data's second moment as its input
   factor; preconditioning with its inverse whitens the data, which makes the
   information in the data's spectrum unusable for generalization (Wadia et al. 2021).
   Such a layer's direction is ``S⁻¹ M`` (its input factor is not even accumulated)
   unless ``whiten_data=True``. Measured on the digits MLPs (12 runs, 6 seeds × 2
   splits): with the knee, the final held-out accuracy rises from 96.7% to 97.5%
   (6 layers) and from 96.4% to 97.6% (10 layers) in the median, with the same epochs
   to 90%; neither change alone does it (``docs/optimizer.md``).

Every quantity is invariant to multiplying the loss by ``c > 0`` (the momentum, ``S``
and ``g`` all scale by ``c``; the damping is relative, the step length normalized and
the signal-to-noise ratio a ratio),
so the iterates on ``c·L`` equal those on ``L``, which no fixed SGD learning rate
achieves.

The optimizer is a conventional :class:`torch.optim.Optimizer`: parameter groups, every
hyperparameter in ``defaults``/``param_groups``, and every piece of state (factors,
inverses, momentum, the step counter, the random generator's state) in ``self.state``,
so ``state_dict()`` is the whole checkpoint and a resumed run continues bit for bit.

References:
    J. Martens, R. Grosse (2015). Optimizing neural networks with Kronecker-factored
    approximate curvature. ICML.
    R. Grosse, J. Martens (2016). A Kronecker-factored approximate Fisher matrix for
    convolution layers. ICML.
    J. Ba, R. Grosse, J. Martens (2017). Distributed second-order optimization using
    Kronecker-factored approximations. ICLR.
    Y. You, I. Gitman, B. Ginsburg (2017). Large batch training of convolutional
    networks (LARS). arXiv:1708.03888.
    Y. You et al. (2020). Large batch optimization for deep learning: training BERT in
    76 minutes (LAMB). ICLR.
    K. Jordan et al. (2024). Muon: an optimizer for hidden layers in neural networks.
    D. Kingma, J. Ba (2015). Adam: a method for stochastic optimization. ICLR.
    T. Schaul, S. Zhang, Y. LeCun (2013). No more pesky learning rates. ICML.
    N. Wadia et al. (2021). Whitening and second order optimization both make
    information in the dataset unusable during training, and can reduce or prevent
    generalization. ICML.
    V. Gupta, T. Koren, Y. Singer (2018). Shampoo: preconditioned stochastic tensor
    optimization. ICML.
    R. Anil et al. (2020). Scalable second order optimization for deep learning.
    arXiv:2002.09018 (grafting).
    N. Schraudolph (2002). Fast curvature matrix-vector products for second-order
    gradient descent. Neural Computation 14(7).
    F. Kunstner, L. Balles, P. Hennig (2019). Limitations of the empirical Fisher
    approximation for natural gradient descent. NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradsight._errors import GradsightError
from gradsight.curvature.hessian import _double_backward
from gradsight.optim._closure_ggn import check_closure_loss
from gradsight.optim.blocks import CurvatureBlock, KroneckerBlock, block_for
from gradsight.optim.kfac import damped_choleskys, inverses_from_choleskys

__all__ = ["GaussNewton", "StepInfo"]

Closure = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What the last :meth:`GaussNewton.step` did (for inspection; not state).

    Attributes:
        loss: the closure's loss before the step.
        refreshed: whether this step refreshed the curvature factors and inverses.
        step_norms: per block name, the norm of the update applied to its parameters.
        signal_to_noise: per block name, the block's signal-to-noise ratio ``r`` (at
            most 1; 1 where ``snr_decay`` is 0): its step shrank by ``r``, and by
            ``r / snr_knee`` more where ``r`` is below ``snr_knee``.
    """

    loss: float
    refreshed: bool
    step_norms: dict[str, float]
    signal_to_noise: dict[str, float] = field(default_factory=dict)


class GaussNewton(torch.optim.Optimizer):
    """Per-layer Gauss-Newton directions (K-FAC, KFC, diagonal), each layer's step normalized.

    :meth:`step` takes a closure that *returns the loss without calling backward*: the
    optimizer differentiates it itself (the gradient, and on curvature-refresh steps the
    output Hessian and the backward signals of the factors). The curvature needs the
    model's output and its layers' inputs, so the optimizer is told the model once, with
    ``model=`` or :meth:`register`; it keeps a reference to the modules (not in its
    state) and hooks them only during a refresh step's forward pass.

    Args:
        params: the parameters or parameter groups to optimize (as for any torch
            optimizer); an ``nn.Module`` is taken as ``model.parameters()`` with
            ``model=`` that module.
        lr: each layer's largest update: its root-mean-square per entry is ``lr`` times
            the layer's root-mean-square at its first step (a per-layer trust region
            radius, relative to the layer's initialization scale), times the layer's
            signal-to-noise ratio (``snr_decay``, ``snr_knee``). Schedulers may change it
            like any learning rate. The default 0.5 was chosen with a cosine schedule to
            0 (the benchmark's, for every optimizer); at a constant rate the step still
            shrinks with the ratio, but a long run does better at a smaller rate (the
            10-layer digits MLP after 40 epochs: 97.5% held-out at 0.5, 98.9% at 0.1).
        model: the module whose forward pass the closure calls; its layers' types choose
            their curvature blocks (:mod:`gradsight.optim.blocks`). Without it, call
            :meth:`register` before the first step.
        momentum: Nesterov momentum of the gradient, preconditioned with the curvature.
        factor_damping: ``γ``, Tikhonov damping of every factor relative to its mean
            eigenvalue (large values tend to per-layer normalized gradient descent).
        factor_decay: running-average decay of the factors.
        update_every: refresh the factors and their inverses every ``update_every`` steps.
        warmup: refresh them at every one of the first ``warmup`` steps.
        exact_outputs: compute the Kronecker output factors exactly (one batched
            backward pass over the output basis, ``C`` backward passes' worth) when the
            model's output is ``(batch, C)`` with ``C ≤ exact_outputs``; otherwise from
            one random probe per output row (one backward pass). The default 0 always
            probes: the running average over refreshes absorbs the probe's noise, and
            on the small CNN the exact factor made a refresh 1.6× as costly (21.6 against
            13.5 ms) for no fewer epochs (``docs/optimizer.md``).
        weight_decay: decoupled weight decay, ``θ ← θ·(1 − lr·weight_decay)`` per step.
        snr_decay: decay of the running average of the squared gradient whose ratio to
            the momentum shrinks each layer's step (item 4 above); 0 turns the scaling
            off (a fixed radius ``lr`` times the initial scale).
        snr_knee: below this signal-to-noise ratio ``r`` the step shrinks by a further
            ``r / snr_knee`` (its length follows ``r²``, item 4 above); 0 turns that off
            (the length follows ``r``), 1 makes it ``r²`` throughout.
        whiten_data: also precondition the layers that read the data with their input
            factor ``A`` (item 5 above). By default (False) such a layer's direction is
            ``S⁻¹ M``: faster to compute, and on the digits MLPs it generalizes better.
        seed: seed of the optimizer's own random generator (the global RNG is not used);
            its state is kept in ``state``.

    The refresh schedule (``update_every``, ``warmup``, ``exact_outputs``, ``seed``) is one
    curvature pass over the whole model, so it is read from the first parameter group;
    every other hyperparameter applies per group.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 5)
        >>> y = (x @ torch.randn(5, 1)).squeeze(1).gt(0).long()
        >>> model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> opt = GaussNewton(model.parameters(), model=model)
        >>> for _ in range(100):
        ...     loss = opt.step(lambda: nn.functional.cross_entropy(model(x), y))
        >>> float(loss) < 0.15
        True
        >>> sorted(opt.state_dict()["state"][2])  # the second layer's weight: all its state
        ... # doctest: +NORMALIZE_WHITESPACE
        ['A', 'A_inv', 'S', 'S_inv', 'factor_steps', 'grad_sq', 'init_rms',
         'momentum_buffer', 'step']
        >>> sorted(opt.state_dict()["state"][0])  # the first reads the data: no input factor
        ... # doctest: +NORMALIZE_WHITESPACE
        ['S', 'S_inv', 'factor_steps', 'grad_sq', 'init_rms', 'momentum_buffer',
         'rng_state', 'step']

        (``rng_state``, the probes' generator, lives with the first parameter; a large
        factor is kept as ``A_chol``/``S_chol`` instead of its inverse; a diagonal
        block's parameters hold ``diagonal``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | nn.Module,
        lr: float = 0.5,
        *,
        model: nn.Module | None = None,
        momentum: float = 0.9,
        factor_damping: float = 0.1,
        factor_decay: float = 0.95,
        update_every: int = 10,
        warmup: int = 10,
        exact_outputs: int = 0,
        weight_decay: float = 0.01,
        snr_decay: float = 0.99,
        snr_knee: float = 0.5,
        whiten_data: bool = False,
        seed: int = 0,
    ) -> None:
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise GradsightError(
                    "GaussNewton got a module as params and a different model=; pass "
                    "GaussNewton(model.parameters(), model=model)."
                )
            model, params = params, params.parameters()
        for name, value in (("lr", lr), ("factor_damping", factor_damping)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise GradsightError(
                    f"{name} must be a positive finite number, got {value!r}; e.g. "
                    f"GaussNewton(params, {name}=0.1)."
                )
        if not 0.0 <= factor_decay < 1.0:
            raise GradsightError(f"factor_decay must lie in [0, 1), got {factor_decay!r}.")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise GradsightError(f"momentum must lie in [0, 1), got {momentum!r}.")
        if not (isinstance(snr_decay, (int, float)) and 0.0 <= snr_decay < 1.0):
            raise GradsightError(
                f"snr_decay must lie in [0, 1) (0 turns the signal-to-noise scaling off), "
                f"got {snr_decay!r}; e.g. GaussNewton(params, snr_decay=0.99)."
            )
        if not (isinstance(snr_knee, (int, float)) and 0.0 <= snr_knee <= 1.0):
            raise GradsightError(
                f"snr_knee must lie in [0, 1] (0: the step follows the ratio alone), got "
                f"{snr_knee!r}; e.g. GaussNewton(params, snr_knee=0.5)."
            )
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
            raise GradsightError(f"weight_decay must be ≥ 0, got {weight_decay!r}.")
        for name, count, least in (
            ("update_every", update_every, 1),
            ("warmup", warmup, 0),
            ("exact_outputs", exact_outputs, 0),
        ):
            if not (isinstance(count, int) and count >= least):
                raise GradsightError(f"{name} must be an integer ≥ {least}, got {count!r}.")
        defaults = {
            "lr": float(lr),
            "momentum": float(momentum),
            "factor_damping": float(factor_damping),
            "factor_decay": float(factor_decay),
            "update_every": update_every,
            "warmup": warmup,
            "exact_outputs": exact_outputs,
            "weight_decay": float(weight_decay),
            "snr_decay": float(snr_decay),
            "snr_knee": float(snr_knee),
            "whiten_data": bool(whiten_data),
            "seed": int(seed),
        }
        super().__init__(params, defaults)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise GradsightError("no trainable parameters (requires_grad=True) to optimize.")
        self._model: nn.Module | None = None
        self._group_index_of: dict[int, int] = {}
        self._blocks: list[CurvatureBlock] = []
        self.last: StepInfo | None = None
        if model is not None:
            self.register(model)

    # -- construction -------------------------------------------------------------------

    def register(self, model: nn.Module) -> GaussNewton:
        """Tell the optimizer which model the closure runs; returns ``self``.

        Every optimized parameter must belong to ``model``; each module's own
        parameters form one block of the kind its type is registered for.
        """
        if not isinstance(model, nn.Module):
            raise GradsightError(
                f"register takes the model (an nn.Module), got {type(model).__name__}: "
                "GaussNewton(model.parameters(), model=model) or opt.register(model)."
            )
        mine = {id(p) for g in self.param_groups for p in g["params"] if p.requires_grad}
        claimed: set[int] = set()
        blocks: list[CurvatureBlock] = []
        for name, module in model.named_modules():
            own = [
                p
                for p in module.parameters(recurse=False)
                if id(p) in mine and id(p) not in claimed
            ]
            if not own:
                continue
            weight = getattr(module, "weight", None)
            own.sort(key=lambda p: 0 if p is weight else 1)  # the weight first
            claimed.update(id(p) for p in own)
            blocks.append(block_for(name, module, own))
        missing = mine - claimed
        if missing:
            raise GradsightError(
                f"{len(missing)} optimized parameter(s) do not belong to the registered "
                "model; expected the model whose parameters were passed. Pass "
                "GaussNewton(model.parameters(), model=model)."
            )
        self._model = model
        self._blocks = blocks
        return self

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as any optimizer does; its parameters join their layers' blocks."""
        super().add_param_group(param_group)
        if getattr(self, "_model", None) is not None:  # None while __init__ adds groups
            assert self._model is not None
            self.register(self._model)

    @property
    def blocks(self) -> list[CurvatureBlock]:
        """The curvature blocks, in module order (what each layer gets)."""
        return list(self._blocks)

    def _anchor(self) -> torch.Tensor:
        """The parameter whose state holds the optimizer-wide entries (step, RNG)."""
        return self._blocks[0].params[0]

    # -- the step -----------------------------------------------------------------------

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One step on the batch the closure evaluates.

        Args:
            closure: ``() -> loss``, the scalar loss of this step's batch, e.g.
                ``lambda: loss_fn(model(x), y)``; it must call ``model`` once and must
                not call ``backward`` (the optimizer differentiates the loss itself).

        Returns:
            The loss before the step (detached).

        Raises:
            GradsightError: without a closure, without a registered model, or with a
                closure that does not return a scalar loss computed from the model's
                output with gradients enabled.
        """
        if closure is None or not callable(closure):
            got = "no closure" if closure is None else f"a {type(closure).__name__}"
            raise GradsightError(
                "GaussNewton.step needs a closure that returns the batch's loss, e.g. "
                f"opt.step(lambda: loss_fn(model(x), y)); got {got}. Unlike SGD it "
                "differentiates the loss itself (gradient and Gauss-Newton products), so do "
                "not call loss.backward() first; gradsight.optim.step_on_batch(opt, model, "
                "loss_fn, x, y) does this for any optimizer."
            )
        if self._model is None:
            raise GradsightError(
                "GaussNewton needs the model its closure runs (for the layers' inputs and "
                "the output Hessian); got none. Pass GaussNewton(params, model=model) or "
                "call opt.register(model) before the first step."
            )
        head = self.param_groups[0]
        anchor = self.state[self._anchor()]
        count = int(anchor.get("step", 0))
        refresh = count < head["warmup"] or count % head["update_every"] == 0
        params = [p for b in self._blocks for p in b.params]
        if refresh:
            loss, outputs, captured = self._evaluate_captured(closure)
            with _explain_freed_graph():
                raw = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads = _dense(raw, params)
            self._refresh(loss, outputs, captured)
            del captured, outputs
        else:
            with torch.enable_grad():
                loss = check_closure_loss(closure())
            with _explain_freed_graph():
                raw = torch.autograd.grad(loss, params, allow_unused=True)
            grads = _dense(raw, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        norms, ratios = self._update(grads)
        for p in params:
            self.state[p]["step"] = count + 1
        self.last = StepInfo(float(loss.detach()), refresh, norms, ratios)
        return loss.detach()

    def _evaluate_captured(self, closure: Closure) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The closure's loss, the model's output and every Kronecker layer's input/output."""
        assert self._model is not None
        captured: dict[str, Any] = {"outputs": [], "inputs": {}, "layer_out": {}, "reads_data": {}}
        handles = [self._model.register_forward_hook(_capture_root(captured))]
        for i, b in enumerate(self._blocks):
            if b.kronecker:
                handles.append(b.module.register_forward_hook(_capture_layer(captured, i)))
        try:
            with torch.enable_grad():
                loss = check_closure_loss(closure())
        finally:
            for h in handles:
                h.remove()
        outs = captured["outputs"]
        if len(outs) != 1 or not isinstance(outs[0], torch.Tensor) or outs[0].ndim < 1:
            raise GradsightError(
                "the closure must call the model exactly once and return a loss computed "
                f"from its output (a tensor, or an output with .logits); the model was called "
                f"{len(outs)} times or returned something else. Use "
                "`lambda: loss_fn(model(x), y)`."
            )
        return loss, outs[0], captured

    def _rng(self) -> torch.Generator:
        anchor = self.state[self._anchor()]
        gen = torch.Generator()
        state = anchor.get("rng_state")
        if state is None:
            gen.manual_seed(int(self.param_groups[0]["seed"]))
        else:  # load_state_dict casts every state tensor to the parameter's dtype
            gen.set_state(state.to(device="cpu", dtype=torch.uint8))  # bytes: exact
        return gen

    def _refresh(self, loss: torch.Tensor, outputs: torch.Tensor, captured: dict) -> None:
        """Average this batch's curvature into every block's factors; recompute inverses.

        Rows of the output are its positions (all dimensions but the last), and the
        output Hessian is taken block-diagonal over them, which is exact for losses that
        sum or average over samples and positions (cross-entropy, squared error). The
        Kronecker output factors are exact when there are at most ``exact_outputs``
        outputs per position: one batched backward pass of the ``C`` columns of every
        ``R_n`` (``R_n R_nᵀ = H_n``) gives ``S = Σₙ Jₙᵀ Hₙ Jₙ``. Otherwise, and for the
        diagonal blocks, one backward pass of a probe ``R_n ε_n`` (covariance ``H_n``)
        gives an unbiased estimate.
        """
        head = self.param_groups[0]
        blocks = self._blocks
        kron = [i for i, b in enumerate(blocks) if b.kronecker and i in captured["inputs"]]
        diag = [i for i, b in enumerate(blocks) if not b.kronecker]
        layer_outs = [o for i in kron for o in captured["layer_out"][i]]
        diag_params = [p for i in diag for p in blocks[i].params]
        c = outputs.shape[-1]
        with _explain_freed_graph():
            (g_out,) = torch.autograd.grad(loss, outputs, create_graph=True)
        roots = None
        if g_out.requires_grad:  # else the loss is linear in the output: no curvature
            roots = self._output_roots(g_out, outputs)
        # Sequence outputs (N, T, C) have many rows per sample, so one probe per row
        # averages out; the exact factor would cost C backward passes of the whole model.
        exact = c <= head["exact_outputs"] and outputs.ndim <= 2
        out_factor: dict[int, torch.Tensor] = {}
        if roots is not None and exact and layer_outs:
            # cotangent j is column j of every R_n: Σ_j (Jₙᵀ R_n e_j)(…)ᵀ = Jₙᵀ Hₙ Jₙ
            cot = roots.permute(2, 0, 1).reshape(c, *outputs.shape).contiguous()
            signals = torch.autograd.grad(
                outputs,
                layer_outs,
                cot,
                retain_graph=bool(diag_params),
                allow_unused=True,
                is_grads_batched=True,
            )
            self._collect(kron, captured, signals, out_factor)
        probe_targets = ([] if exact else layer_outs) + diag_params
        signals_p: tuple[torch.Tensor | None, ...] = ()
        if roots is not None and probe_targets:
            gen = self._rng()
            eps = torch.randn(roots.shape[0], c, 1, generator=gen, dtype=torch.float64)
            self.state[self._anchor()]["rng_state"] = gen.get_state()
            probe = (roots @ eps.to(device=roots.device, dtype=roots.dtype)).reshape(outputs.shape)
            signals_p = torch.autograd.grad(outputs, probe_targets, probe, allow_unused=True)
            if not exact:
                self._collect(kron, captured, signals_p[: len(layer_outs)], out_factor)
        diag_signals = signals_p[len(signals_p) - len(diag_params) :] if diag_params else ()
        k = 0
        for i in diag if diag_signals else ():  # diagonal GGN: E[(Jᵀ R ε)²] is diag(Jᵀ H J)
            b = blocks[i]
            sq = [
                s.detach() ** 2 if s is not None else torch.zeros_like(p)
                for s, p in zip(diag_signals[k : k + len(b.params)], b.params, strict=True)
            ]
            k += len(b.params)
            first = self.state[b.params[0]]
            rho = self._rho(b, first.get("factor_steps", 0))
            for p, s in zip(b.params, sq, strict=True):
                st = self.state[p]
                if "diagonal" not in st:
                    st["diagonal"] = torch.zeros_like(p)
                st["diagonal"].mul_(rho).add_(s, alpha=1.0 - rho)
            first["factor_steps"] = first.get("factor_steps", 0) + 1
        # (state, input width, whether the input factor is used) per Kronecker block
        kfs: list[tuple[dict[str, Any], int, bool]] = []
        gammas: list[float] = []
        for i in kron:
            b = blocks[i]
            assert isinstance(b, KroneckerBlock)
            a = torch.cat([b.input_rows(t) for t in captured["inputs"][i]])
            s_batch = out_factor.get(i)
            st = self.state[b.params[0]]
            if s_batch is None:
                if "S" not in st:
                    continue
                s_batch = torch.zeros_like(st["S"])
            group = self._group_of(b.params[0])
            # a layer that reads the data (its input depends on no trained parameter) is
            # not whitened unless asked: its input factor is then the identity
            whitened = bool(group["whiten_data"]) or not captured["reads_data"].get(i, False)
            if "S" not in st:
                st["S"] = torch.zeros_like(s_batch)
                st["factor_steps"] = 0
            if not whitened:
                for key in ("A", "A_inv", "A_chol"):
                    st.pop(key, None)
            elif "A" not in st:
                st["A"] = torch.zeros(a.shape[1], a.shape[1], dtype=a.dtype, device=a.device)
            rho = self._rho(b, st["factor_steps"])
            if whitened:
                st["A"].mul_(rho).add_(a.T @ a, alpha=(1.0 - rho) / a.shape[0])
            st["S"].mul_(rho).add_(s_batch, alpha=1.0 - rho)
            st["factor_steps"] += 1
            kfs.append((st, a.shape[1], whitened))
            gammas.append(group["factor_damping"])
        every = int(head["update_every"])
        for gamma in sorted(set(gammas)):
            for key in ("S", "A"):
                sel = [
                    (st, width)
                    for (st, width, whitened), g in zip(kfs, gammas, strict=True)
                    if g == gamma and (whitened or key == "S")
                ]
                if not sel:
                    continue
                chols = damped_choleskys([st[key] for st, _ in sel], gamma)
                keep = [
                    _solves_with_cholesky(
                        st[key].shape[0], width if key == "S" else st["S"].shape[0], every
                    )
                    for st, width in sel
                ]
                invs = iter(
                    inverses_from_choleskys([c for c, k in zip(chols, keep, strict=True) if not k])
                )
                for (st, _), chol, k in zip(sel, chols, keep, strict=True):
                    # one of "{key}_inv" (the inverse) or "{key}_chol" (its Cholesky factor)
                    st.pop(f"{key}_inv" if k else f"{key}_chol", None)
                    if k:
                        st[f"{key}_chol"] = chol
                    else:
                        st[f"{key}_inv"] = next(invs)

    def _collect(
        self,
        kron: list[int],
        captured: dict,
        signals: tuple[torch.Tensor | None, ...],
        out_factor: dict[int, torch.Tensor],
    ) -> None:
        """Each Kronecker block's batch output factor ``Σ eeᵀ`` from its output signals."""
        k = 0
        for i in kron:
            b = self._blocks[i]
            assert isinstance(b, KroneckerBlock)
            outs = captured["layer_out"][i]
            total = None
            for s in signals[k : k + len(outs)]:
                if s is None:
                    continue
                e = b.output_rows(s.detach())
                total = e.T @ e if total is None else total + e.T @ e
            k += len(outs)
            if total is not None:
                out_factor[i] = total

    def _rho(self, block: CurvatureBlock, steps: int) -> float:
        decay = float(self._group_of(block.params[0])["factor_decay"])
        return min(decay, 1.0 - 1.0 / (steps + 1))  # early estimates are plain means

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        # group dicts are replaced by load_state_dict and added by add_param_group:
        # cache the index, rebuilt when the number of groups changes
        if len(self._group_index_of) != sum(len(g["params"]) for g in self.param_groups):
            self._group_index_of = {
                id(q): j for j, g in enumerate(self.param_groups) for q in g["params"]
            }
        return self.param_groups[self._group_index_of[id(p)]]

    @staticmethod
    def _output_roots(g_out: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Per output row ``n``, a square root ``R_n`` (``R_n R_nᵀ = H_n``) of ``H_out``.

        ``H_out``'s ``C`` columns come from ``C`` output-space products (one vmapped
        double-backward pass through the loss).
        """
        c = outputs.shape[-1]
        n = outputs.numel() // c
        eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device)
        basis = eye[:, None, :].expand(c, n, c).reshape(c, *outputs.shape).contiguous()
        (hb,) = _double_backward([g_out], [0], [outputs], [basis])  # hb[j] = H e_j
        h = hb.reshape(c, n, c).permute(1, 2, 0).double()  # float64: H_n is near singular
        h = 0.5 * (h + h.transpose(1, 2))
        # A Cholesky factor is a square root as good as the symmetric one and ~10× cheaper
        # than eigh for many tiny matrices. H_n is often singular (softmax: rank C − 1)
        # and, computed in float32, off by ~1e-7 of its largest entry; a jitter of 100
        # rounding units of that entry makes it definite and changes H_n by far less than
        # the factors' running average moves in one step. Indefinite blocks use eigh.
        unit = 100.0 * torch.finfo(outputs.dtype).eps
        jitter = unit * h.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1e-30)
        chol, info = torch.linalg.cholesky_ex(h + jitter[:, None, None] * eye.double())
        bad = info != 0
        if bool(bad.any()):
            evals, evecs = torch.linalg.eigh(h[bad])
            root = evecs * evals.clamp_min(0.0).sqrt()[:, None, :]
            chol[bad] = root @ evecs.transpose(1, 2)
        return chol.to(outputs.dtype)

    def _direction(self, block: CurvatureBlock, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The block's damped Gauss-Newton-preconditioned ``grads`` (not negated)."""
        first = self.state[block.params[0]]
        gamma = float(self._group_of(block.params[0])["factor_damping"])
        if isinstance(block, KroneckerBlock) and ("S_inv" in first or "S_chol" in first):
            d = block.to_matrix(grads)
            s_inv, a_inv = first.get("S_inv"), first.get("A_inv")
            d = s_inv @ d if s_inv is not None else torch.cholesky_solve(d, first["S_chol"])
            if a_inv is not None:
                d = d @ a_inv
            elif "A_chol" in first:
                d = torch.cholesky_solve(d.T, first["A_chol"]).T
            # else a layer that reads the data, not whitened: S⁻¹ M alone
            return block.from_matrix(d)
        diagonals = [self.state[p].get("diagonal") for p in block.params]
        if any(t is None for t in diagonals):  # no curvature measured: the gradient
            return list(grads)
        diags = [t for t in diagonals if t is not None]
        count = sum(t.numel() for t in diags)
        mean = float(sum(float(t.sum()) for t in diags)) / max(count, 1)
        if not mean > 0.0:  # no curvature reaches the block: nothing sets its scale
            return list(grads)
        return [g / (d + gamma * mean) for g, d in zip(grads, diags, strict=True)]

    def _signal_to_noise(
        self, block: CurvatureBlock, grads: list[torch.Tensor], groups: list[dict[str, Any]]
    ) -> float:
        """The block's signal-to-noise ratio: Adam's per-entry ``|m̂|/√v̂``, RMS over the block.

        ``m̂`` is the bias-corrected average of the gradient that the momentum buffer
        holds (the gradient itself without momentum), ``v̂`` the bias-corrected running
        average of its square (decay ``snr_decay``). An entry whose gradient has always
        been 0 counts as 0. The ratio is 1 for a gradient that does not change from step
        to step and about ``√((1 − β)/(1 + β))`` for pure noise; it is capped at 1.
        """
        total = 0.0
        count = 0
        for p, gi, group in zip(block.params, grads, groups, strict=True):
            decay = float(group["snr_decay"])
            st = self.state[p]
            t = int(st.get("step", 0)) + 1
            v = st.get("grad_sq")
            if v is None:
                v = st["grad_sq"] = torch.zeros_like(gi)
            v.mul_(decay).addcmul_(gi, gi, value=1.0 - decay)
            beta = float(group["momentum"])
            m, scale = gi, 1.0
            if beta > 0.0:  # the buffer is Σ β^(t−k) g_k: (1 − β)/(1 − βᵗ) makes it a mean
                m, scale = st["momentum_buffer"], ((1.0 - beta) / (1.0 - beta**t)) ** 2
            # Σ m̂²/v̂ with v̂ = v/(1 − decayᵗ); an entry with v = 0 never had a gradient
            # (m = 0 too), and nansum drops its 0/0
            total += scale * (1.0 - decay**t) * float(torch.nansum(m.square() / v))
            count += m.numel()
        return min(1.0, math.sqrt(total / max(count, 1)))

    def _update(self, grads: list[torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
        """Momentum, preconditioning and each block's normalized step."""
        k = 0
        norms: dict[str, float] = {}
        ratios: dict[str, float] = {}
        with torch.no_grad():
            for b in self._blocks:
                g = grads[k : k + len(b.params)]
                k += len(b.params)
                groups = [self._group_of(p) for p in b.params]
                mixed = []
                for p, gi, group in zip(b.params, g, groups, strict=True):
                    beta = float(group["momentum"])
                    if beta == 0.0:
                        mixed.append(gi)
                        continue
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = torch.zeros_like(gi)
                    buf.mul_(beta).add_(gi)
                    mixed.append(gi.add(buf, alpha=beta))  # Nesterov
                snr = 1.0
                if all(float(group["snr_decay"]) > 0.0 for group in groups):
                    snr = self._signal_to_noise(b, g, groups)  # after the momentum update
                ratios[b.name] = snr
                knee = float(groups[0]["snr_knee"])
                if snr < knee:  # below the knee, the length follows the ratio's square
                    snr *= snr / knee
                d = self._direction(b, mixed)
                length = math.sqrt(sum(float(t.square().sum()) for t in d))
                count = sum(t.numel() for t in d)
                if not (length > 0.0 and math.isfinite(length)):
                    norms[b.name] = 0.0
                    continue
                applied = 0.0
                first = self.state[b.params[0]]
                if "init_rms" not in first:
                    first["init_rms"] = _init_rms(b)
                # the trust radius: lr × the layer's initial RMS per entry, shrunk by its
                # signal-to-noise ratio (an Adam-sized step, in the layer's own units)
                radius = first["init_rms"] * math.sqrt(count) * snr
                for p, t, group in zip(b.params, d, groups, strict=True):
                    lr = float(group["lr"])
                    wd = float(group["weight_decay"])
                    if wd > 0.0:
                        p.mul_(1.0 - lr * wd)
                    scale = lr * radius / length
                    p.add_(t, alpha=-scale)
                    applied += (scale * float(t.norm())) ** 2
                norms[b.name] = math.sqrt(applied)
        return norms, ratios


def _solves_with_cholesky(size: int, other: int, every: int) -> bool:
    """Whether a factor is kept as its Cholesky factor (two triangular solves per step)
    instead of inverted at each refresh: when that is cheaper. Inverting costs about
    ``size³/3`` flops per refresh (every ``every`` steps); the solves cost about
    ``size²·other`` more per step than a product with the inverse (``other``: the other
    factor's size, the columns of the gradient matrix). Below 256 the call overhead of the
    solves dominates. Measured on the small CNN's head (513 × 10): 2.5 ms of inverse per
    refresh against 0.13 ms more per step.
    """
    return size >= 256 and size > 3 * other * every


def _init_rms(block: CurvatureBlock) -> float:
    """The root-mean-square of the block's parameters when first stepped (its scale).

    A block initialized to zero gets the scale of PyTorch's default initialization of a
    matrix with its fan-in, ``1/√fan_in`` (1 for a diagonal block).
    """
    count = sum(p.numel() for p in block.params)
    rms = math.sqrt(sum(float(p.detach().double().square().sum()) for p in block.params) / count)
    if rms > 0.0 and math.isfinite(rms):
        return rms
    if isinstance(block, KroneckerBlock):
        return 1.0 / math.sqrt(block.to_matrix([p.detach() for p in block.params]).shape[1])
    return 1.0


def _dense(raw: tuple[torch.Tensor | None, ...], params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(raw, params, strict=True)]


def _capture_root(captured: dict) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        del module, args  # only the output matters
        if not isinstance(output, torch.Tensor):
            # Hugging Face models return an output object; the logits are the output
            output = getattr(output, "logits", output)
        captured["outputs"].append(output)

    return hook


def _capture_layer(captured: dict, index: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        del module  # the index identifies the block
        captured["inputs"].setdefault(index, []).append(args[0].detach())
        # the layer reads the data when no call's input depends on a trained parameter
        reads = captured["reads_data"]
        reads[index] = reads.get(index, True) and not args[0].requires_grad
        captured["layer_out"].setdefault(index, []).append(output)

    return hook


@contextmanager
def _explain_freed_graph() -> Any:
    """Turn autograd's error for a closure that already called backward into advice."""
    try:
        yield
    except RuntimeError as exc:
        if "second time" in str(exc) or "does not require grad" in str(exc):
            raise GradsightError(
                "the closure's loss has no usable graph: it looks like the closure called "
                "loss.backward() (which frees the graph) or detached the output. "
                "GaussNewton differentiates the loss itself: return "
                "loss_fn(model(x), y) without calling backward."
            ) from None
        raise
