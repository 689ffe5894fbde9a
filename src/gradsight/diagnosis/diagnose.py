"""``gradsight.diagnose``: one forward and backward pass, per-layer verdicts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradsight._batch import compute_loss, split_batch, trainable_parameters, unwrap_compiled
from gradsight._collector import collector_paused
from gradsight._errors import GradsightError
from gradsight._model_loss import loss_of_outputs
from gradsight._norms import norms
from gradsight._outputs import tensor_output
from gradsight._precision import full_precision
from gradsight._state import preserved, renormed_weights_kept
from gradsight._walk import ModelWalk
from gradsight.diagnosis._sharded import gathered, is_sharded
from gradsight.diagnosis.advice import traits_of
from gradsight.diagnosis.baseline import constant_baseline_loss
from gradsight.diagnosis.headroom import (
    BlockCurvature,
    ModelHeadroom,
    layer_curvature,
)
from gradsight.diagnosis.result import Diagnosis, LayerDiagnosis
from gradsight.diagnosis.rules import first_order_overshoot
from gradsight.diagnosis.stability import hessian_lambda_max
from gradsight.diagnosis.steps import adaptive_step, optimizer_kind, optimizer_lr
from gradsight.diagnosis.stuck import Stuck, still_zero
from gradsight.diagnosis.trial import (
    Carrier,
    Trial,
    carriers,
    sgd_settings,
    sgd_trial,
)
from gradsight.diagnosis.verdict import (
    LayerEvidence,
    Thresholds,
    judge,
    step_grad_sq,
    worst_status,
    zero_gate,
    zero_scale_weight,
)
from gradsight.probes.signal import NonfiniteOutput, SignalFlow, SignalProbe

__all__ = ["diagnose"]


def diagnose(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    lr: float | None = None,
    *,
    curvature: bool = True,
    budget: float = 10.0,
    optimizer: torch.optim.Optimizer | None = None,
    thresholds: Thresholds | None = None,
) -> Diagnosis:
    """Diagnose, layer by layer, whether small gradients mean converged or vanished.

    Runs one forward and one backward pass of ``model`` on ``batch`` with hooks that
    keep only reductions, and judges each parameter-owning module (see
    :mod:`gradsight.diagnosis.verdict` for the scale-invariant rules).

    The model is left exactly as it was: parameters and their ``.grad`` (gradients are
    taken with ``torch.autograd.grad``), train/eval mode (the pass runs in the current
    mode), buffers such as BatchNorm running statistics (restored), and the global RNG
    state (the pass runs on a forked, fixed-seed RNG, so dropout masks are reproducible).

    A ``torch.compile``'d model is diagnosed through the eager module it wraps (same
    parameters and buffers); layer names are those of the original model, without the
    ``_orig_mod.`` prefix.

    Args:
        model: The model, in the mode it trains in.
        batch: ``(inputs, targets)``; ``model(inputs)`` (or ``model(*inputs)`` for a tuple,
            ``model(**inputs)`` for a dict) gives the outputs.
        loss_fn: ``loss_fn(outputs, targets)`` returns the scalar training loss.
        lr: The learning rate used in training, if known. Step ratios use it; without
            it the step a layer gets is the largest one stable for the whole model,
            2/λmax. Taken from ``optimizer`` when that is given. With curvature and SGD
            it is also tried: twenty full-batch SGD steps at ``lr`` on a copy of the
            parameters (twenty more forward and backward passes) decide whether the step
            blows up (:mod:`gradsight.diagnosis.trial`); where it does, the trial is
            rerun with one layer frozen, for up to four candidates (the largest shares
            of the top eigenvector of the whole model's Hessian, at most 30
            Hessian-vector products, and the largest gradients): the layers whose
            freezing lets the rest train carry it.
        optimizer: The optimizer training the model, if any. For SGD its lr is the step
            each layer gets. For Adam, AdamW, RMSprop and Adagrad the step a layer gets
            is the one the optimizer would take along the layer's gradient, gᵀΔ/gᵀg with
            Δ its update (read from its state, not applied), so that step ratios compare
            the curvature-optimal step with the step actually taken, not with the raw
            lr; the SGD trial is then skipped (an adaptive step's stability depends on
            its preconditioner). For other optimizers
            (Muon, ...) step ratios are left out. The optimizer is not changed.
        curvature: Also measure curvature (Gauss-Newton λmax, curvature-optimal step and
            Newton-decrement headroom per layer, and the whole model's headroom, with
            standard errors). Every layer at once from one forward pass and a few
            backward passes (:func:`~gradsight.diagnosis.headroom.layer_curvature`); ``False``
            gives the signal flow alone (one forward and backward pass).
        budget: Time allowed for exact per-layer refinements (layers whose estimate
            is within two standard errors of a verdict's threshold, and layers the
            one-pass estimate does not cover), as a multiple of one forward and
            backward pass; ``0`` for none, ``math.inf`` for all.

    Returns:
        A :class:`~gradsight.diagnosis.result.Diagnosis`.

    Raises:
        GradsightError: for a model without trainable parameters, a batch that is not
            an ``(inputs, targets)`` pair or that the model rejects, or a loss that is not
            a scalar.

    Example:
        >>> import gradsight
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(10):
        ...     layers += [nn.Linear(32, 32), nn.Sigmoid()]
        >>> model = nn.Sequential(*layers, nn.Linear(32, 4))
        >>> x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
        >>> d = gradsight.diagnose(model, (x, y), nn.functional.cross_entropy)
        >>> d.status, d.layer("0").status
        ('vanishing', 'vanishing')
    """
    model = unwrap_compiled(model)
    walk = ModelWalk(model)
    if is_sharded(model, walk):
        model = gathered(model)  # FSDP2: a plain copy with the full parameters (every rank)
        walk = ModelWalk(model)
    with collector_paused(), renormed_weights_kept(model, walk):
        return _diagnose(model, walk, batch, loss_fn, lr, curvature, budget, optimizer, thresholds)


def _diagnose(
    model: nn.Module,
    walk: ModelWalk,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    lr: float | None,
    curvature: bool,
    budget: float,
    optimizer: torch.optim.Optimizer | None,
    thresholds: Thresholds | None,
) -> Diagnosis:
    named = trainable_parameters(model, walk)
    kind = optimizer_kind(optimizer)
    if optimizer is not None and lr is None:
        lr = optimizer_lr(optimizer)
        if lr is not None and not lr > 0:
            lr = None  # a schedule at lr 0 (warm-up, the end of a decay): no step to judge
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise GradsightError(
            f"lr must be a positive number (the learning rate used in training), got {lr!r}. "
            "Pass e.g. lr=0.1, or leave it out."
        )
    model_inputs, targets = split_batch(batch)
    params = [p for _, p in named]
    with preserved(model, walk=walk):
        # Finiteness is checked at every module only when the pass turns out non-finite
        # (a second pass, below): on a finite pass those checks cost a hook per module.
        probe = SignalProbe(model, named_modules=walk.named_modules, gradient_edges=True)
        with probe, _TimeInputs(walk.named_modules) as inputs:
            started = time.perf_counter()
            outputs, loss = compute_loss(model, batch, loss_fn)
            probe.end_forward()
            # Tensors and autograd edges alike (the typing of grad has one or the other).
            wanted: list[Any] = [*params, *probe.extra_inputs, *probe.gradient_edges]
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
            probe.take_gradients(grads[len(params) + len(probe.extra_inputs) :])
            grads = grads[: len(params)]
            pass_seconds = time.perf_counter() - started  # with the probe's hooks: an upper bound
        flow = probe.result()
        loss_value = float(loss.detach())
        # The loss as a function of the outputs, for the baseline and curvature (which
        # replace the outputs): the model's own where the loss function returns it.
        of_outputs, of_targets = loss_of_outputs(
            model, model_inputs, targets, outputs, loss, loss_fn
        )
        baseline = (
            constant_baseline_loss(outputs, of_targets, of_outputs)
            if math.isfinite(loss_value)
            else None
        )
    grad_of = {id(p): g for p, g in zip(params, grads, strict=True)}
    evidence = _evidence(flow, grad_of, probe.owners)
    _idle_experts(evidence, walk, grad_of)
    for e in evidence:
        e.time_input_norms = inputs.norms.get(e.name)
    if kind == "adaptive" and optimizer is not None:
        for e in evidence:
            e.step = adaptive_step(optimizer, _trainable(model, e.name), grad_of)
    finite = math.isfinite(loss_value) and all(
        math.isfinite(v) for e in evidence for v in e.grad_norms.values()
    )
    blocks: dict[str, BlockCurvature] = {}
    hessian: dict[str, float] = {}
    whole: ModelHeadroom | None = None
    trial: Trial | None = None
    carried: dict[str, Carrier] = {}
    skipped = ""
    # The model as the user trains it, for the SGD trial: its first step is the
    # gradient just taken (the same batch and RNG seed).
    run = _Run(model, batch, loss_fn, params, (loss_value, grads), optimizer, walk)
    if curvature and finite:
        try:
            # The math attention kernel has the double backward that curvature products
            # need (the fused CPU/flash kernels do not); results agree to rounding.
            with sdpa_kernel(SDPBackend.MATH), full_precision():
                names = [e.name for e in evidence if e.signal is not None and not e.frozen]
                # A ModelOutput, a dict of heads or a tuple: curvature sees one tensor.
                adapted = tensor_output(model, outputs, of_outputs)
                cmodel, closs, prefix = (model, of_outputs, "") if adapted is None else adapted
                cbatch = batch if of_targets is targets else (model_inputs, of_targets)
                th = thresholds or Thresholds()
                blocks, whole = layer_curvature(
                    cmodel,
                    cbatch,
                    closs,
                    [prefix + n for n in names],
                    lr=lr,
                    budget=budget,
                    threshold=th.headroom,
                    unstable=th.unstable,
                    pass_seconds=pass_seconds,
                )
                blocks = {k.removeprefix(prefix): v for k, v in blocks.items()}
                if whole is None:
                    skipped = (
                        "\nThe whole model's headroom and λmax were not measured: the "
                        "one-pass estimate covers no layer (it needs the loss's curvature in "
                        "the model's outputs in a form it recognizes); the layers' values "
                        "come from exact products within the time budget."
                    )
                if lr is not None and kind in (None, "sgd"):
                    own = {n: _trainable(model, n) for n in names}
                    # lr·λmax is judged on the Hessian where it can differ from G.
                    hessian = hessian_lambda_max(cmodel, cbatch, closs, own, blocks, lr)
                    trial, carried, note = _sgd_stability(
                        run,
                        (cmodel, cbatch, closs, prefix),
                        own,
                        blocks,
                        hessian,
                        lr,
                        th,
                    )
                    skipped += note
        except Exception as exc:
            # Curvature is a refinement: without it the verdicts rest on signal flow (a
            # model it cannot handle costs the refinement, never the diagnosis).
            blocks, whole, hessian, trial, carried = {}, None, {}, None, {}
            skipped = (
                f"\nCurvature was not measured ({type(exc).__name__}: {exc}); the verdicts "
                "rest on signal flow alone."
            )
    if (
        not curvature
        and finite
        and lr is not None
        and kind in (None, "sgd")
        and first_order_overshoot(
            lr, step_grad_sq(evidence), loss_value, baseline, thresholds or Thresholds()
        )
        is not None
    ):
        # By first order the step overshoots; a claim this strong is checked by taking
        # the step (one forward pass: the curvature that would tell is not measured).
        trial, skipped = _trial(run, lr, 1, thresholds or Thresholds())
    traits = traits_of(
        model,
        [m.activation.name for m in flow.modules if m.activation is not None],
        kind,
        walk.modules,
    )

    def verdicts(stuck: Stuck | None = None) -> tuple[list[LayerDiagnosis], bool, str]:
        return judge(
            evidence,
            loss=loss_value,
            baseline_loss=baseline,
            lr=None if lr is None else float(lr),
            curvature=blocks,
            model=whole,
            hessian=hessian,
            thresholds=thresholds,
            traits=traits,
            trial=trial,
            carriers=carried,
            stuck=stuck,
        )

    layers, plateau, summary = verdicts()
    if finite:
        # Verdicts that rest on an exactly zero gradient ("converged", or "ok" until a
        # zero-weight layer's first update) hold only if the gradient leaves zero: tried.
        found = _stuck(run, evidence, layers)
        if found.layers:
            layers, plateau, summary = verdicts(found)
    origin = None
    if not finite:
        origin, where = _nonfinite_origin(model, walk, batch, loss_fn, params)
        summary = f"The loss or a gradient is NaN/Inf (loss {loss_value}); {where}.\n" + summary
    summary += skipped
    status = "nonfinite" if not finite else worst_status([layer.status for layer in layers])
    return Diagnosis(
        status=status,
        layers=layers,
        loss=loss_value,
        baseline_loss=baseline,
        plateau=plateau,
        lr=None if lr is None else float(lr),
        nonfinite_origin=origin,
        summary=summary,
        headroom=None if whole is None else min(whole.headroom, 1.0),
        realized_decrease=None if whole is None else whole.realized,
        lambda_max=None if whole is None else whole.lambda_max,
        trial_losses=None if trial is None else list(trial.losses),
        trial_blew_up=None if trial is None else trial.blew_up,
    )


def _nonfinite_origin(
    model: nn.Module,
    walk: ModelWalk,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    params: list[nn.Parameter],
) -> tuple[str | None, str]:
    """The first module whose own computation makes the output NaN/Inf (or, if the
    forward pass is finite, the backward signal), and the sentence that says where: the
    same pass again (same RNG seed, so the same dropout masks), with a finiteness check
    at every module."""
    probe = SignalProbe(
        model, check_finite=True, stop_at_nonfinite=True, named_modules=walk.named_modules
    )
    found: NonfiniteOutput | None = None
    with preserved(model, walk=walk), probe:
        try:
            _, loss = compute_loss(model, batch, loss_fn)
        except NonfiniteOutput as stopped:  # the forward pass stops where it turns NaN/Inf
            found = stopped
        else:
            probe.end_forward()
            found = probe.nonfinite_found  # found, but a model caught the signal
            if found is None:
                torch.autograd.grad(loss, params + probe.extra_inputs, allow_unused=True)
    if found is None:
        origin = probe.result().nonfinite_backward
        return origin, f"it starts at module {origin!r}"
    if found.in_inputs:
        return found.module, (
            f"it is in the model's inputs already (the first module to get it is {found.module!r})"
        )
    if found.passed_to is not None:
        return found.module, (
            f"it starts at module {found.module!r}, in its own code between its submodules: the "
            f"input it passes to {found.passed_to!r} already holds NaN/Inf, while every module "
            "before it has a finite output"
        )
    return found.module, f"it starts at module {found.module!r}"


class _Run(NamedTuple):
    """The model as the user trains it: for the SGD trial."""

    model: nn.Module
    batch: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    params: list[nn.Parameter]
    start: tuple[float, Sequence[torch.Tensor | None]]  # the loss and gradients taken
    optimizer: torch.optim.Optimizer | None
    walk: ModelWalk


def _trial(run: _Run, lr: float, steps: int, th: Thresholds) -> tuple[Trial | None, str]:
    """``steps`` SGD steps at ``lr`` on the model as the user trains it (its optimizer's
    settings where it is a ``torch.optim.SGD``), or None and a sentence for the summary
    where they could not run."""
    try:
        trial = sgd_trial(
            run.model,
            run.batch,
            run.loss_fn,
            run.params,
            lr,
            steps=steps,
            rise=th.trial_rise,
            window=th.trial_window,
            settings=sgd_settings(run.optimizer, run.params, lr),
            start=run.start,
            walk=run.walk,
        )
    except Exception as exc:
        return None, (
            f"\nThe SGD trial at lr {lr:g} could not run ({type(exc).__name__}: {exc}); "
            "stability is judged by first order alone."
        )
    return trial, ""


def _sgd_stability(
    run: _Run,
    adapted: tuple[nn.Module, Any, Callable[[Any, Any], torch.Tensor], str],
    blocks: Mapping[str, list[nn.Parameter]],
    curvature: Mapping[str, BlockCurvature],
    hessian: Mapping[str, float],
    lr: float,
    th: Thresholds,
) -> tuple[Trial | None, dict[str, Carrier], str]:
    """The SGD trial at ``lr`` (``th.trial_steps`` steps on the model as the user
    trains it) and, where it blows up, the layers that carry the instability (on
    ``adapted``: the model returning one tensor, its batch and loss, and the prefix of
    its layer names), with a sentence for the summary where they could not be found."""
    cmodel, cbatch, closs, prefix = adapted
    trial, note = _trial(run, lr, th.trial_steps, th)
    if trial is None or not trial.blew_up:
        return trial, {}, note
    products = {}
    for name in blocks:
        lam = hessian.get(name)
        if lam is None and name in curvature:
            lam = curvature[name].lambda_max
        if lam is not None:
            products[prefix + name] = lr * lam
    settings = sgd_settings(run.optimizer, run.params, lr)

    def frozen_trial(prefixed: str) -> Trial | None:
        """The trial again with this layer frozen (the rest stepped as before)."""
        held = {id(p) for p in blocks[prefixed.removeprefix(prefix)]}
        keep = [i for i, p in enumerate(run.params) if id(p) not in held]
        try:
            return sgd_trial(
                run.model,
                run.batch,
                run.loss_fn,
                [run.params[i] for i in keep],
                lr,
                steps=th.trial_steps,
                rise=th.trial_rise,
                window=th.trial_window,
                settings=[settings[i] for i in keep],
                start=(run.start[0], [run.start[1][i] for i in keep]),
                walk=run.walk,
            )
        except Exception:  # the layer stays a candidate of the next test only
            return None

    try:
        found = carriers(
            cmodel,
            cbatch,
            closs,
            {prefix + name: params for name, params in blocks.items()},
            products,
            lr,
            loss=trial.losses[0],
            share=th.carrier_share,
            rise=th.carrier_rise,
            frozen_trial=frozen_trial,
        )
    except Exception as exc:
        # The trial stands; the blocks sharpest at this lr stand in for the carriers.
        top = max(products.values(), default=0.0)
        found = {n: Carrier(math.nan) for n, v in products.items() if v == top and top > 0}
        return (
            trial,
            {k.removeprefix(prefix): v for k, v in found.items()},
            (
                f"\nWhich layers carry the instability was not measured ({type(exc).__name__}: "
                f"{exc}); the block with the largest lr·λmax is named."
            ),
        )
    return trial, {k.removeprefix(prefix): v for k, v in found.items()}, ""


def _stuck(run: _Run, evidence: Sequence[LayerEvidence], layers: Sequence[LayerDiagnosis]) -> Stuck:
    """The layers whose verdict rests on an exactly zero gradient (``converged``, ``ok``
    or ``vanishing``, with a backward signal measured, zero or not) and whose gradient
    stays zero over a few small gradient steps on every layer
    (:func:`~gradsight.diagnosis.stuck.still_zero`), and among them those held by a weight
    of exactly zero: one of their own whose zero holds a saddle
    (:attr:`~gradsight.diagnosis.stuck.Stuck.saddles`: moved off zero, it gets a gradient),
    or a frozen one (:attr:`~gradsight.diagnosis.stuck.Stuck.frozen_by`: moved off zero,
    it gives them one). The steps are taken only where a weight of exactly zero,
    trainable or frozen, could hold them; none where they could not be taken."""
    none = Stuck(set(), set())
    zero = [
        e
        for e, layer in zip(evidence, layers, strict=True)
        if layer.grad_norm == 0.0
        and layer.status in ("converged", "ok", "vanishing")
        and e.signal is not None
        and e.signal.signal_norm is not None
    ]
    if not zero:
        return none
    frozen = _frozen_zeros(run.model, evidence)
    index = {id(p): i for i, p in enumerate(run.params)}
    # Layers outside them whose weight is exactly zero and gets no gradient, while another
    # of their parameters does (a zero output projection whose bias learns).
    watched_names = {e.name for e in zero}
    movers = {
        e.name: [index[id(weight)]]
        for e in evidence
        if e.name not in watched_names
        and e.signal is not None
        and e.param_norms.get("weight") == 0.0
        and e.grad_norms.get("weight") == 0.0
        and (weight := run.model.get_submodule(e.name)._parameters.get("weight")) is not None
        and id(weight) in index
    }
    if not (frozen or movers or any(zero_scale_weight(e) or zero_gate(e) for e in zero)):
        return none
    watched = {
        e.name: [index[id(p)] for p in _trainable(run.model, e.name) if id(p) in index]
        for e in zero
    }
    watched = {name: indices for name, indices in watched.items() if indices}
    try:
        return still_zero(
            run.model,
            run.batch,
            run.loss_fn,
            run.params,
            run.start[1],
            watched,
            zero_weights={e.name for e in zero if zero_scale_weight(e) or zero_gate(e)},
            movers=movers,
            frozen_zeros=frozen,
            walk=run.walk,
        )
    except Exception:  # a model the steps cannot run on keeps the verdicts of one pass
        return none


def _frozen_zeros(model: nn.Module, evidence: Sequence[LayerEvidence]) -> dict[str, list[Any]]:
    """The frozen parameters (``requires_grad=False``) of the modules that ran that are
    exactly zero, biases aside (a zero bias gates nothing): ReZero's α, a zero BatchNorm
    weight, LoRA's B, by qualified name (``"blocks.0.alpha"``)."""
    found: dict[str, list[Any]] = {}
    for e in evidence:
        if e.signal is None:
            continue
        module = model.get_submodule(e.name)
        for k, p in module._parameters.items():
            if p is not None and not p.requires_grad and not k.endswith("bias") and _all_zero(p):
                found[f"{e.name}.{k}" if e.name else k] = [p]
    return found


def _all_zero(p: torch.Tensor) -> bool:
    return bool(p.numel()) and not bool(p.detach().ne(0).any())


def _idle_experts(
    evidence: Sequence[LayerEvidence],
    walk: ModelWalk,
    grad_of: Mapping[int, torch.Tensor | None],
) -> None:
    """For a mixture of experts' fused expert weights (transformers' ``MixtralExperts``,
    ``Qwen2MoeExperts``, ``OlmoeExperts``: parameters ``[experts, ...]`` in a module
    whose class is named ``*Experts``), the experts whose gradient is exactly zero in
    every one of them: the router sent them no token."""
    fused = [e for e in evidence if e.module_type.endswith("Experts") and not e.frozen]
    if not fused:
        return
    modules = dict(walk.named_modules)
    for e in fused:
        module = modules.get(e.name)
        if module is None:
            continue
        grads = [
            grad_of.get(id(p))
            for p in module.parameters(recurse=False)
            if p.requires_grad and p.ndim >= 3
        ]
        sizes = {g.shape[0] for g in grads if g is not None}
        if not grads or len(sizes) != 1 or any(g is None for g in grads):
            continue
        with torch.no_grad():
            busy = torch.stack([g.flatten(1).ne(0).any(dim=1) for g in grads if g is not None])
            idle = (~busy.any(dim=0)).nonzero().flatten().tolist()
        e.experts = sizes.pop()
        e.idle_experts = tuple(int(i) for i in idle)


def _trainable(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The module's own trainable parameters (its block)."""
    module = model.get_submodule(name)
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _evidence(
    flow: SignalFlow,
    grad_of: Mapping[int, torch.Tensor | None],
    owners: list[tuple[str, nn.Module]],
) -> list[LayerEvidence]:
    """Per-layer evidence in forward order.

    A module that did not run but whose parameters are in the loss's graph (a gradient,
    zero or not) is used directly by an enclosing module (``nn.MultiheadAttention``
    computes ``out_proj`` with ``F.linear(x, out_proj.weight, ...)``; a tied head; a
    parametrization) or through another module holding the same parameter (a tied
    embedding): it is judged from its own gradient and from the signal of that module
    (one that ran and holds its parameter, else the closest enclosing one that ran), and
    listed right after it. Modules the loss does not reach at all come last.
    """
    signals = {m.name: m for m in flow.modules}
    trainable: list[list[tuple[str, torch.Tensor]]] = [
        [
            (pname, p)
            for pname, p in module._parameters.items()
            if p is not None and id(p) in grad_of
        ]
        for _, module in owners
    ]  # frozen parameters are not in grad_of
    flat = [p for params in trainable for _, p in params]
    # Gradients' and parameters' norms in one pass and one copy to the host.
    values = norms([*(grad_of[id(p)] for p in flat), *flat])
    grad_values = iter(values[: len(flat)])
    param_values = iter(values[len(flat) :])
    out: dict[str, LayerEvidence] = {}
    seen: set[int] = set()  # a tied parameter is listed by each of its modules
    # Parameters the loss's graph reaches get a gradient tensor (zero or not); the others
    # get None. A module whose parameters it reaches is used, called or not.
    in_graph: dict[str, bool] = {}
    # A tied parameter of a module that ran (T5's `shared` embedding is called as
    # encoder.embed_tokens, a module of its own holding the same weight).
    ran_holder: dict[int, str] = {}
    for (name, module), params in zip(owners, trainable, strict=True):
        grad_norms, param_norms = {}, {}
        for pname, _ in params:
            grad_norms[pname] = next(grad_values)
            param_norms[pname] = next(param_values)
        ids = [id(p) for _, p in params]
        out[name] = LayerEvidence(
            name=name,
            module_type=type(module).__name__,
            signal=signals.get(name),
            grad_norms=grad_norms,
            param_norms=param_norms,
            shared=(
                frozenset(pname for (pname, _), i in zip(params, ids, strict=True) if i in seen)
                if not seen.isdisjoint(ids)
                else frozenset()
            ),
        )
        seen.update(ids)
        in_graph[name] = any(grad_of[i] is not None for i in ids)
        if name in signals:
            ran_holder.update(dict.fromkeys(ids, name))
    if seen and len(seen) < len(flat):  # some parameter is held by several modules
        holders: dict[int, list[str]] = {}
        for (name, _), params in zip(owners, trainable, strict=True):
            for _, p in params:
                holders.setdefault(id(p), []).append(name)
        for (name, _), params in zip(owners, trainable, strict=True):
            if params and all(len(holders[id(p)]) > 1 for _, p in params):
                common = set.intersection(*(set(holders[id(p)]) for _, p in params))
                out[name].tied = tuple(n for n in holders[id(params[0][1])] if n in common - {name})
    used_by: dict[str, list[str]] = {}
    unused = set(flow.unused)
    for name, params in zip((n for n, _ in owners), trainable, strict=True):
        if not unused or name not in unused or not in_graph[name]:
            continue
        e = out[name]
        tied = next((ran_holder[id(p)] for _, p in params if id(p) in ran_holder), None)
        user = tied or _enclosing(name, signals)
        if user is not None:
            e.used_by, e.signal = user, signals[user]
            used_by.setdefault(user, []).append(name)
    if not used_by and not unused:
        return [out[m.name] for m in flow.modules]
    order: list[str] = []
    for m in flow.modules:
        order += [m.name, *used_by.get(m.name, [])]
    order += [n for n in flow.unused if out[n].used_by is None]
    return [out[n] for n in order]


class _TimeInputs:
    """Records ‖x_t‖ of each recurrent layer's input at each time step (forward
    pre-hooks; reductions only), so that the verdict can tell whether the signal through
    time fades before the steps where the inputs are."""

    def __init__(self, named_modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.named_modules = named_modules
        self.norms: dict[str, tuple[float, ...]] = {}
        self._sq: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _TimeInputs:
        seen: set[int] = set()
        for name, module in self.named_modules:
            if isinstance(module, nn.RNNBase) and id(module) not in seen:
                seen.add(id(module))
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3):
                return  # a PackedSequence has no time axis to read
            with torch.no_grad():
                time_dim = 0 if x.ndim == 2 or not getattr(module, "batch_first", False) else 1
                dims = [d for d in range(x.ndim) if d != time_dim]
                sq = x.detach().to(torch.float64).square().sum(dim=dims)
            prev = self._sq.get(name)
            self._sq[name] = sq if prev is None or prev.shape != sq.shape else prev + sq

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self.norms = {k: tuple(v.sqrt().tolist()) for k, v in self._sq.items()}


def _enclosing(name: str, ran: Mapping[str, object]) -> str | None:
    """The closest enclosing module of ``name`` (by qualified name) that ran, if any."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:k])
        if parent in ran:
            return parent
    return None
