"""Signal-flow probe: how the backward signal travels through a model, per module.

For a chain of layers z_{l+1} = W_{l+1} φ(z_l) + b_{l+1}, the backward signal
δ_l = ∂L/∂z_l obeys the chain rule

    δ_l = φ'(z_l) ⊙ (W_{l+1}ᵀ δ_{l+1}),

so the gradient of an early layer is a product of every later layer's factors. The
probe measures, per parameter-owning module (a module with parameters of its own,
``recurse=False``), with forward hooks and tensor hooks only:

* ``signal_norm`` ‖∂L/∂output‖ (the norm of δ over the batch, all calls, all outputs);
* ``output_norm`` ‖z‖, the norm of the module's output;
* ``input_signal_norm`` ‖∂L/∂input‖ through this module alone, so that
  ``input_signal_norm / signal_norm`` is the module's *weight factor*
  (‖W_{l+1}ᵀ δ_{l+1}‖ / ‖δ_{l+1}‖ for a linear layer);
* statistics of the first activation applied after the module (module or function
  form): mean and RMS derivative, saturated fraction and dead units.

Lean mode, for monitoring every training step (:class:`gradsight.Monitor`):
``activations="modules"``, ``input_signals=False``, ``output_norms=False`` and
``activation_samples=n`` keep the hot path to one forward hook and one tensor hook per
module. Activations are then recognised only in module form (``nn.Sigmoid()``, not
``torch.sigmoid``), since watching every torch function call costs more than the step
itself; the weight factor comes from ``activation_signal_norm``, the signal at the
output of the activation before the next layer, instead of a view of each input;
activation statistics are computed once per :meth:`SignalProbe.collect` for all layers
of one shape at a time, on the first ``n`` samples of the batch, from tensors that
autograd keeps for the backward pass anyway.

Only reductions are kept (a few scalars per module call); no activation or gradient
tensor outlives its hook. Hooks are tensor hooks registered from forward hooks rather
than ``register_full_backward_hook``, which fails on modules followed by in-place
activations (pytorch/pytorch#61519); a tensor hook stays on the node that produced the
output, so it receives ∂L/∂z even after ``ReLU(inplace=True)`` overwrote z.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from gradsight._errors import GradsightError
from gradsight._norms import norm_tensors
from gradsight.probes._accumulate import (
    ACTIVATION_SIGNAL_NORM,
    INPUT_SIGNAL_NORM,
    OUTPUT_NORM,
    SIGNAL_NORM,
    ActivationAccumulator,
    ModuleAccumulator,
    differentiable,
    map_tensors,
    reduce_kept,
    reduce_pending,
    tensors,
)
from gradsight.probes._deferred import DeferredStatistics
from gradsight.probes._guard import ACTIVATIONS, SIGNALS, TIME, HookGuard
from gradsight.probes._kernel import ACTIVATION_METRICS
from gradsight.probes._lean import LeanHooks
from gradsight.probes._results import ActivationStats, ModuleSignal, SignalFlow
from gradsight.probes.activations import (
    ActivationSpec,
    is_activation_function,
    match_activation,
    module_activation,
)

__all__ = [
    "ActivationStats",
    "ModuleSignal",
    "NonfiniteOutput",
    "SignalFlow",
    "SignalProbe",
    "parameter_owners",
]


def parameter_owners(
    model: nn.Module, named_modules: Sequence[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly (``recurse=False``), as named_modules() names
    (``named_modules``: ``model.named_modules()``, if already listed).

    A module reached under several names is listed once, under its first name.
    """
    # named_modules() lists each module once; a module's own parameters are the
    # non-None entries of its _parameters (what parameters(recurse=False) iterates).
    return [
        (name, module)
        for name, module in (model.named_modules() if named_modules is None else named_modules)
        if any(p is not None for p in module._parameters.values())
    ]


#: At most this many entries (gradients, pre-activations) are kept per pass, to be
#: reduced all at once in :meth:`SignalProbe.result`; beyond it each is reduced at once.
_KEPT_ENTRIES = 1 << 20


class NonfiniteOutput(BaseException):
    """Raised from a forward hook by a probe with ``stop_at_nonfinite``: ``module`` is the
    first module whose own computation made a NaN/Inf; the rest of the forward pass does
    not run. Where the first module with a NaN/Inf output got it in its input from the
    code of the module around it (between that module's submodules: Mamba's selective
    scan), ``module`` is that enclosing module and ``passed_to`` the submodule; where no
    module made it (the model's inputs hold it), ``module`` is the first module that got
    it and ``in_inputs`` is True."""

    def __init__(self, module: str, passed_to: str | None = None, in_inputs: bool = False) -> None:
        super().__init__(module)
        self.module = module
        self.passed_to = passed_to
        self.in_inputs = in_inputs


def _nonfinite_input(args: Any) -> bool:
    """Whether a floating tensor among a module's inputs holds a NaN/Inf."""
    return any(
        (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t.detach()).all())
        for t in tensors(args)
    )


class _ActivationWatcher(TorchFunctionMode):
    """Sees torch function calls in the forward pass and records activations.

    It is on the mode stack only while a layer's activation is pending: from the
    layer's forward hook to the next layer's pre-hook (or the end of the forward pass),
    so that the other calls of the pass, and those the probe's own hooks make, do not
    each pay a Python round trip. It is pushed only where the stack is as the probe found
    it (a mode the model entered itself is never popped in its place) and popped only
    from the top.
    """

    def __init__(self, probe: SignalProbe) -> None:
        super().__init__()
        self.probe = probe
        self.depth = torch._C._len_torch_function_stack()
        self.on = False
        # Guarded, and bound to the probe rather than to this mode: the mode holding a
        # reference to its own method would be a reference cycle.
        self.record = probe._guard.wrap(ACTIVATIONS, functools.partial(_record, probe))

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.probe._pending_owner is not None and args:
            if isinstance(args[0], torch.Tensor) and is_activation_function(func):
                self.record(func, args, kwargs)  # guarded: the call below happens regardless
            elif _weight_among(args, kwargs):
                # Another layer computes here, from a weight used directly (Mamba's
                # F.linear(x, dt_proj.weight)): an activation next follows it, not the
                # pending one.
                self.probe._pending_owner = None
        return func(*args, **(kwargs or {}))

    def watch(self) -> None:
        """Push onto the stack, unless it is on it or another mode came in since."""
        if not self.on and torch._C._len_torch_function_stack() == self.depth:
            self.__enter__()
            self.on = True

    def unwatch(self) -> None:
        """Pop from the stack if it is on top (from a forward hook, on the forward thread)."""
        n = torch._C._len_torch_function_stack()
        if self.on and n == self.depth + 1 and torch._C._get_function_stack_at(n - 1) is self:
            self.__exit__(None, None, None)
            self.on = False

    def remove(self) -> None:
        """Off the stack wherever it is (the probe's exit): modes above it stay, in order."""
        if not self.on:
            return
        above = []
        while torch._C._len_torch_function_stack() > 0:
            top = torch._C._pop_torch_function_stack()
            if top is self:
                break
            above.append(top)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)
        self.on = False


def _weight_among(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> bool:
    """Whether a call takes a parameter of two or more dimensions (a weight matrix or
    kernel, which mixes units; an elementwise scale does not)."""
    values = args if not kwargs else (*args, *kwargs.values())
    # Leaves first: the Parameter check runs in Python, activations are never leaves.
    return any(
        isinstance(v, torch.Tensor) and v.is_leaf and v.ndim >= 2 and isinstance(v, nn.Parameter)
        for v in values
    )


def _record(
    probe: SignalProbe, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None
) -> None:
    """Statistics of the activation ``func`` computes, for the layer before it (if any)."""
    owner = probe._pending_owner
    spec = match_activation(func, args, kwargs)
    if owner is not None and spec is not None:
        probe._pending_owner = None
        z = args[0]
        if not _in_place(func, kwargs) and z.numel() + probe._kept_entries <= _KEPT_ENTRIES:
            # Kept (autograd often keeps it anyway), and reduced in result() together with
            # every other layer's of the same activation and shape: one kernel call each.
            probe._kept_entries += z.numel()
            probe._kept_activations.append((owner, spec, z.detach(), z._version))
            return
        # The input is read before the call: in-place variants overwrite it.
        _add_activation(owner, spec).add_tensor(z, owner.unit_dim)


def _in_place(func: Any, kwargs: dict[str, Any] | None) -> bool:
    """Whether the call overwrites its input: ``relu_``, or ``inplace=True`` (the functional
    forms reach a mode with their flag as a keyword, also when called with it by position)."""
    return getattr(func, "__name__", "").endswith("_") or bool(kwargs and kwargs.get("inplace"))


def _add_activation(owner: ModuleAccumulator, spec: ActivationSpec) -> ActivationAccumulator:
    """The owner's activation accumulator for ``spec`` (a change of activation restarts)."""
    if owner.activation is None or owner.activation.spec != spec:
        owner.activation = ActivationAccumulator(spec)
    return owner.activation


class SignalProbe(LeanHooks):
    """Context manager that records signal flow through ``model`` on forward+backward.

    Run one forward pass and one backward pass (``loss.backward()`` or
    ``torch.autograd.grad``) inside the ``with`` block, then read :meth:`result`.
    All hooks are removed on exit, also when the block raises.

    Args:
        model: The model to observe.
        activations: Record statistics of the activation following each module:
            ``True`` (or ``"functions"``) watches torch function calls during the block,
            which finds functional activations too; ``"modules"`` hooks only ``nn``
            activation modules (much cheaper, and also records
            ``activation_signal_norm``); ``False`` records none.
        check_finite: Also watch every module (not only parameter owners) for
            NaN/Inf outputs and backward signals, to locate where they start.
        stop_at_nonfinite: With ``check_finite``: end the forward pass at the first
            module whose output is NaN/Inf, by raising :class:`NonfiniteOutput` (a
            ``BaseException``, so that no ``except Exception`` in the model swallows it)
            from its forward hook; catch it around the forward pass.
        input_signals: Record ‖∂L/∂input‖ through each module (one view and one tensor
            hook per input and call). Without it ``weight_factor`` is None.
        output_norms: Record ‖output‖ (one reduction per call).
        activation_samples: With ``activations="modules"``: activation statistics from
            the first this many samples (dim 0) of each call only (None: all).
        activation_entries: With ``activations="modules"``: at most about this many
            entries per call for the statistics; beyond it, tensors with dimensions
            other than samples and units (conv feature maps) are subsampled on an
            evenly strided grid of those dimensions (None: no cap).
        named_modules: ``model.named_modules()``, where the caller has listed them
            already (the model's structure must not change before the probe enters).
        gradient_edges: For a caller that runs the backward pass itself with
            ``torch.autograd.grad``: the backward signals at parameter-owning modules
            are taken as gradients at their autograd edges (:attr:`gradient_edges`),
            which the caller asks for along with its own inputs and hands to
            :meth:`take_gradients`, instead of by tensor hooks (a Python call each in
            the backward pass). Up to the probe's budget of entries kept per pass;
            beyond it, and with ``check_finite``, tensor hooks as without it.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
        >>> x = torch.randn(16, 4)
        >>> with SignalProbe(model) as probe:
        ...     model(x).pow(2).mean().backward()
        >>> flow = probe.result()
        >>> [m.name for m in flow.modules], flow["0"].activation.name
        (['0', '2'], 'sigmoid')
        >>> flow["0"].activation.max_derivative
        0.25
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        activations: bool | Literal["functions", "modules"] = True,
        check_finite: bool = False,
        stop_at_nonfinite: bool = False,
        input_signals: bool = True,
        output_norms: bool = True,
        activation_samples: int | None = None,
        activation_entries: int | None = None,
        named_modules: Sequence[tuple[str, nn.Module]] | None = None,
        gradient_edges: bool = False,
    ) -> None:
        if activations not in (True, False, "functions", "modules"):
            raise GradsightError(
                f"activations must be True, False, 'functions' or 'modules', got {activations!r}."
            )
        if activation_samples is not None and activation_samples < 1:
            raise GradsightError(
                f"activation_samples must be a positive int or None, got {activation_samples!r}."
            )
        self.model = model
        self.activations = activations
        self.check_finite = check_finite
        self.stop_at_nonfinite = stop_at_nonfinite
        self.input_signals = input_signals
        self.output_norms = output_norms
        self.activation_samples = activation_samples
        self.activation_entries = activation_entries
        self._named_modules = named_modules
        self._accs: dict[int, ModuleAccumulator] = {}
        self._order: list[ModuleAccumulator] = []
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        #: Leaves the probe made (inputs of recurrent layers) whose gradients it reads:
        #: pass them to torch.autograd.grad along with the parameters.
        self.extra_inputs: list[torch.Tensor] = []
        #: With ``gradient_edges``: the autograd edges of the signals the probe reads, in
        #: the order :meth:`take_gradients` expects their gradients.
        self.gradient_edges: list[GradientEdge] = []
        self._use_edges = gradient_edges and not check_finite
        self._edge_norms: list[list[torch.Tensor]] = []  # where each edge's gradient goes
        self._mode: _ActivationWatcher | None = None
        self._pending_owner: ModuleAccumulator | None = None
        self._active = False
        self._events = 0
        #: The modules that own parameters, as :func:`parameter_owners` lists them on entry.
        self.owners: list[tuple[str, nn.Module]] = []
        self._kept_entries = 0  # entries kept for reducing later: gradients, activations
        self._kept_activations: list[
            tuple[ModuleAccumulator, ActivationSpec, torch.Tensor, int]
        ] = []
        self._nonfinite_forward: str | None = None
        self._nonfinite_found: NonfiniteOutput | None = None
        # With check_finite: the modules whose forward is running, outermost first, and
        # whether their inputs held a NaN/Inf.
        self._running: list[tuple[str, bool]] = []
        self._first_bad_grad: tuple[str, str] | None = None  # (module name, "in"/"out")
        # collect_columns: activation tensors copied aside, reduced many steps at a time
        self._deferred = DeferredStatistics()
        # Every hook below is registered through it: a hook that raises never reaches
        # the user's forward or backward pass.
        self._guard = HookGuard(type(self).__name__)

    # -- lifecycle
    @property
    def recording(self) -> bool:
        """Whether the hooks record; set False to pause them between measured steps."""
        return self._active

    @recording.setter
    def recording(self, on: bool) -> None:
        if self._handles:  # only while entered
            self._active = bool(on)

    def __enter__(self) -> SignalProbe:
        self.owners = parameter_owners(self.model, self._named_modules)
        owners = {id(m) for _, m in self.owners}
        guard = self._guard.wrap
        pre = guard(SIGNALS, self._pre_hook())
        post = guard(SIGNALS, self._post_hook())
        try:
            for name, module in (
                self.owners
                if not self.check_finite
                else self._named_modules or self.model.named_modules()
            ):
                owns = id(module) in owners
                acc = ModuleAccumulator(name, module, owns)
                if self.activations == "modules":
                    acc.act_norm_hook = guard(ACTIVATIONS, self._norm_hook(acc.act_out_norms))
                self._accs[id(module)] = acc
                if self.input_signals or self.check_finite:
                    self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                if self.input_signals or self.check_finite or self.output_norms:
                    self._handles.append(module.register_forward_hook(post))
                else:
                    hook = guard(SIGNALS, self._lean_post_hook(acc))
                    self._handles.append(module.register_forward_hook(hook))
            if self.activations == "modules":
                for _, module in self._named_modules or self.model.named_modules():
                    act = module_activation(module)
                    if act is not None and id(module) not in self._accs:
                        self._handles.append(
                            module.register_forward_hook(
                                guard(ACTIVATIONS, self._activation_hook(act))
                            )
                        )
            elif self.activations:
                self._mode = _ActivationWatcher(self)
                # Past the model's own forward, an activation still pending (a sigmoid
                # inside the loss) is watched for; with none pending the mode goes.
                self._handles.append(
                    self.model.register_forward_hook(guard(ACTIVATIONS, self._forward_done))
                )
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        self._active = False
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.remove()
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self.gradient_edges = []  # they hold the graph: a caller that did not take them
        self._edge_norms.clear()
        self._pending_owner = None
        for acc in self._accs.values():
            # They refer to the probe: no reference cycle is left.
            acc.act_norm_hook = acc.in_hook = acc.out_hook = None

    # -- hooks
    def _pre_hook(self) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
        """One forward pre-hook for every module (each finds its accumulator by the module
        it is called with: no closure per module)."""
        accs = self._accs

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if not self._active:
                return None
            acc = accs[id(module)]
            if self.check_finite:
                self._running.append((acc.name, _nonfinite_input((args, kwargs))))
            if acc.owns_params:
                self._pending_owner = None  # a new layer starts: no activation is pending
                if self._mode is not None:
                    self._mode.unwatch()
                if acc.calls == 0:
                    self._order.append(acc)
            acc.calls += 1
            if not self.input_signals:
                return None
            if isinstance(module, nn.RNNBase) and args and isinstance(args[0], torch.Tensor):
                args = (self._watch_time(module, acc, args[0]), *args[1:])
            # Route each differentiable input through its own view so that the tensor
            # hook sees the gradient through this module only (not, e.g., a skip path).
            # One view per distinct tensor keeps `query is key`-style checks intact.
            if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
                x = args[0]  # the usual call, one tensor: no search through the arguments
                if not differentiable(x):
                    return None
                view = x.view_as(x)
                self._on_gradient(view, acc, "in")
                return (view,), kwargs
            views: dict[int, torch.Tensor] = {}

            def view_of(t: torch.Tensor) -> torch.Tensor:
                if not differentiable(t):
                    return t
                if id(t) not in views:
                    view = t.view_as(t)
                    self._on_gradient(view, acc, "in")
                    views[id(t)] = view
                return views[id(t)]

            if not any(differentiable(t) for t in tensors((args, kwargs))):
                return None
            return map_tensors(args, view_of), map_tensors(kwargs, view_of)

        return hook

    def _watch_time(
        self, module: nn.RNNBase, acc: ModuleAccumulator, seq: torch.Tensor
    ) -> torch.Tensor:
        """Hook the input sequence of a recurrent layer for per-time-step norms."""
        if not seq.is_floating_point() or seq.ndim < 2:
            return seq
        if seq.requires_grad:
            seq = seq.view_as(seq)
        else:
            # Data needs no gradient; a leaf copy gets one. Callers that take gradients
            # with torch.autograd.grad must ask for these leaves too (extra_inputs).
            seq = seq.detach().requires_grad_(True)
            self.extra_inputs.append(seq)
        time_dim = 1 if module.batch_first and seq.ndim == 3 else 0

        def hook(grad: torch.Tensor) -> None:
            if self._active:
                dims = [d for d in range(grad.ndim) if d != time_dim]
                acc.time_sq.append(grad.detach().pow(2).sum(dim=dims))

        self._tensor_handles.append(seq.register_hook(self._guard.wrap(TIME, hook)))
        return seq

    def _post_hook(self) -> Callable[[nn.Module, Any, Any], None]:
        """One forward hook for every module (see :meth:`_pre_hook`)."""
        accs = self._accs

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            acc = accs[id(module)]
            if self.check_finite and self._running:
                self._running.pop()
            if not self.input_signals and not self.check_finite:  # no pre-hook counted it
                if acc.owns_params and acc.calls == 0:
                    self._order.append(acc)
                acc.calls += 1
            for t in (output,) if isinstance(output, torch.Tensor) else tensors(output):
                if (
                    self.output_norms
                    and acc.owns_params
                    and (t.is_floating_point() or t.is_complex())
                ):
                    # Of a detached tensor: no graph is recorded, no grad mode needed.
                    acc.value_norms.append(torch.linalg.vector_norm(t.detach()))
                if (
                    self.check_finite
                    and self._nonfinite_forward is None
                    and (t.is_floating_point() or t.is_complex())
                    and not bool(torch.isfinite(t.detach()).all())
                ):
                    origin, passed_to, in_inputs = acc.name, None, False
                    if _nonfinite_input(args):
                        # Made by code between submodules: that of the innermost module
                        # around it whose own input was finite; none: the model's inputs.
                        makers = [name for name, bad in reversed(self._running) if not bad]
                        if makers:
                            origin, passed_to = makers[0], acc.name
                        else:
                            in_inputs = True
                    self._nonfinite_forward = origin
                    self._nonfinite_found = NonfiniteOutput(origin, passed_to, in_inputs)
                    if self.stop_at_nonfinite:
                        raise self._nonfinite_found  # not an Exception: past the guard
                if differentiable(t):
                    self._on_gradient(t, acc, "out")
            if acc.owns_params:
                self._pending_owner = acc
                if self._mode is not None:
                    self._mode.watch()

        return hook

    def _forward_done(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._pending_owner is None and self._mode is not None:
            self._mode.unwatch()

    @property
    def nonfinite_forward(self) -> str | None:
        """With ``check_finite``: the first module whose own computation made a NaN/Inf so
        far (see :class:`NonfiniteOutput`)."""
        return self._nonfinite_forward

    @property
    def nonfinite_found(self) -> NonfiniteOutput | None:
        """With ``check_finite``: where the first NaN/Inf of the forward pass was made."""
        return self._nonfinite_found

    def end_forward(self) -> None:
        """The forward pass and the loss are computed: stop watching torch functions
        (no activation is recorded after this), so that the backward pass's hooks run
        without the mode. Optional; call it between the loss and ``backward()``."""
        self._pending_owner = None
        if self._mode is not None:
            self._mode.unwatch()

    def _on_gradient(self, t: torch.Tensor, acc: ModuleAccumulator, where: str) -> None:
        """Have ∂L/∂t recorded for ``acc``, at its output (``where="out"``) or an input
        (``"in"``): at its autograd edge, for the caller's gradient call, where the probe
        takes gradient edges and the budget of kept entries allows; by a tensor hook
        otherwise (made on first use: most passes take every gradient at its edge)."""
        if (
            self._use_edges
            and t.ndim > 0  # kept gradients are told from norms (0-d) by their shape
            and t.numel() + self._kept_entries <= _KEPT_ENTRIES
        ):
            self._kept_entries += t.numel()
            self.gradient_edges.append(get_gradient_edge(t))
            self._edge_norms.append(acc.out_norms if where == "out" else acc.in_norms)
            return
        hook = acc.out_hook if where == "out" else acc.in_hook
        if hook is None:
            hook = self._guard.wrap(SIGNALS, self._grad_hook(acc, where))
            if where == "out":
                acc.out_hook = hook
            else:
                acc.in_hook = hook
        self._tensor_handles.append(t.register_hook(hook))

    def take_gradients(self, grads: Sequence[torch.Tensor | None]) -> None:
        """With ``gradient_edges``: the gradients ``torch.autograd.grad`` returned for
        :attr:`gradient_edges` (in that order; None where the loss does not reach one)."""
        if len(grads) != len(self._edge_norms):
            raise GradsightError(
                f"take_gradients expects one gradient per gradient edge "
                f"({len(self._edge_norms)}), got {len(grads)}: pass the gradients "
                "torch.autograd.grad returned for probe.gradient_edges, in their order."
            )
        if self._active:
            for norms, grad in zip(self._edge_norms, grads, strict=True):
                if grad is not None:
                    norms.append(grad)
        self._edge_norms.clear()
        self.gradient_edges = []

    def _grad_hook(self, acc: ModuleAccumulator, where: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self._active:
                return
            norms = acc.out_norms if where == "out" else acc.in_norms
            if (
                acc.owns_params
                and not self.check_finite
                and grad.ndim > 0  # kept ones are told from norms (0-d) by their shape
                and grad.numel() + self._kept_entries <= _KEPT_ENTRIES
            ):
                # A small gradient is kept; its norm is taken in result(), with the
                # other kept ones of its shape in one call (the engine does not reuse a
                # buffer that is referenced, so the values stay as they were).
                self._kept_entries += grad.numel()
                norms.append(grad.detach())
                return
            with torch.no_grad():
                norm = torch.linalg.vector_norm(grad.detach())
            if acc.owns_params:
                norms.append(norm)
            if (
                self.check_finite
                and self._first_bad_grad is None
                and not bool(torch.isfinite(norm))
                and not bool(torch.isfinite(grad).all())
            ):
                self._first_bad_grad = (acc.name, where)

        return hook

    def collect(self) -> list[tuple[str, str, torch.Tensor]]:
        """Measurements since the last ``collect()``, as ``(module, metric, value)``; reset.

        For monitoring: values are 0-d tensors on the model's device (nothing is copied
        to the host, so there is no synchronisation); norms of several calls combine in
        quadrature. Metrics: ``signal_norm``, ``input_signal_norm``, ``output_norm``,
        ``activation_signal_norm`` (lean mode), ``saturation``, ``dead_fraction``,
        ``mean_derivative``, ``rms_derivative``. Absent values are left out.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
            >>> with SignalProbe(model, activations="modules", input_signals=False) as probe:
            ...     model(torch.randn(16, 4)).sum().backward()
            ...     rows = probe.collect()
            >>> sorted({metric for _, metric, _ in rows})[:3]
            ['activation_signal_norm', 'dead_fraction', 'mean_derivative']
            >>> probe.collect()
            []
        """
        reduce_pending(self._order)
        self._take_deferred_norms()
        rows: list[tuple[str, str, torch.Tensor]] = []
        for acc in self._order:
            if not acc.owns_params:
                continue
            for metric, norms in (
                (SIGNAL_NORM, acc.out_norms),
                (INPUT_SIGNAL_NORM, acc.in_norms),
                (OUTPUT_NORM, acc.value_norms),
                (ACTIVATION_SIGNAL_NORM, acc.act_out_norms),
            ):
                if len(norms) == 1:
                    rows.append((acc.name, metric, norms[0]))
                elif norms:
                    rows.append((acc.name, metric, torch.linalg.vector_norm(torch.stack(norms))))
            rows += [
                (acc.name, metric, value)
                for metric, value in zip(ACTIVATION_METRICS, acc.activation_metrics(), strict=False)
            ]
            acc.clear()
        self._pending_owner = None
        return rows

    def _reduce_kept_activations(self) -> None:
        """Activation statistics of the kept pre-activations (guarded: a failure leaves
        them out, with one warning, and the other measurements stand)."""
        kept, self._kept_activations = self._kept_activations, []
        if not kept or ACTIVATIONS in self._guard.failed:
            return
        reduced = self._guard.wrap(ACTIVATIONS, reduce_kept)(kept)
        for i, (owner, spec, _, _) in enumerate(kept):  # in call order, as recorded
            if reduced is not None and i in reduced:
                states, metrics = reduced[i]
                _add_activation(owner, spec).add(states, metrics=metrics)

    def _take_deferred_norms(self) -> None:
        """Norms of the gradients kept whole (small ones), in one call for all."""
        self._reduce_kept_activations()
        if not self._kept_entries:
            return
        kept = [
            (norms, i)
            for acc in self._order
            for norms in (acc.out_norms, acc.in_norms)
            for i, t in enumerate(norms)
            if isinstance(t, torch.Tensor) and t.ndim > 0  # floats: a former result()'s
        ]
        if kept:
            values = norm_tensors([norms[i] for norms, i in kept])
            for (norms, i), value in zip(kept, values, strict=True):
                norms[i] = value
        self._kept_entries = 0

    def _norms_to_host(self) -> None:
        """Every recorded norm as a Python float, in one copy to the host (where they share
        a device; else each on its own)."""
        self._take_deferred_norms()
        lists = [
            norms
            for acc in self._order
            for norms in (acc.out_norms, acc.in_norms, acc.value_norms, acc.act_out_norms)
            if norms
        ]
        # Python floats where a former result() took them already.
        tensors = [t for norms in lists for t in norms if isinstance(t, torch.Tensor)]
        if not tensors:
            return
        with torch.no_grad():
            try:
                values = iter(torch.stack(tensors).tolist())
            except RuntimeError:  # norms on several devices
                values = iter([float(t) for t in tensors])
        for norms in lists:
            norms[:] = [next(values) if isinstance(t, torch.Tensor) else t for t in norms]

    def result(self) -> SignalFlow:
        """Reduce what was recorded into a :class:`SignalFlow` (forward order)."""
        reduce_pending(self._order)
        self._norms_to_host()
        for acc in self._order:
            acc.fold_reduced()
        modules = [acc.result() for acc in self._order]
        called = {id(acc.module) for acc in self._order}
        unused = [name for name, m in self.owners if id(m) not in called]
        # Hooks fire in backward order, and on one tensor innermost module first, so the
        # first non-finite gradient seen belongs to the first module (walking back from
        # the loss) whose backward signal is non-finite: at its input if the module
        # itself turned it non-finite, at its output if it arrived so.
        backward_origin = None if self._first_bad_grad is None else self._first_bad_grad[0]
        return SignalFlow(
            modules=modules,
            unused=unused,
            nonfinite_forward=self._nonfinite_forward,
            nonfinite_backward=backward_origin,
        )
