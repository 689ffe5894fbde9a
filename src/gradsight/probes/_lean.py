"""The lean mode of :class:`~gradsight.probes.SignalProbe`: the Monitor's per-step hot path.

One forward hook and one tensor hook per parameter-owning module, a forward hook per
activation module, and three ways to read a step out: :meth:`LeanHooks.collect_columns`
(norms as device scalars, activation tensors handed to the deferred many-steps
reduction), :meth:`LeanHooks.pop_statistics` (those reductions when done) and, under
torch.distributed, :meth:`LeanHooks.activation_states` (the step's statistics as
summable states, for the cross-rank reduction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradsight.probes._accumulate import (
    ACTIVATION_SIGNAL_NORM,
    SIGNAL_NORM,
    ModuleAccumulator,
    differentiable,
    reduce_pending,
    strided,
    tensors,
)
from gradsight.probes._deferred import DeferredStatistics
from gradsight.probes._guard import SIGNALS, HookGuard
from gradsight.probes._kernel import ActivationStates
from gradsight.probes.activations import ModuleActivation

_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class LeanHooks:
    """The lean mode's hooks and readers, mixed into :class:`~gradsight.probes.SignalProbe`
    (which owns the state below and installs the hooks)."""

    _active: bool
    _order: list[ModuleAccumulator]
    _pending_owner: ModuleAccumulator | None
    _deferred: DeferredStatistics
    _guard: HookGuard
    activation_samples: int | None
    activation_entries: int | None

    def collect(self) -> list[tuple[str, str, torch.Tensor]]:
        raise NotImplementedError  # SignalProbe's

    def _lean_post_hook(self, acc: ModuleAccumulator) -> Callable[[nn.Module, Any, Any], None]:
        # The hot path of the lean mode: one Python call and one tensor hook per call.
        order = self._order
        grad_hook = self._guard.wrap(SIGNALS, self._norm_hook(acc.out_norms))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active or not torch.is_grad_enabled():  # e.g. an evaluation pass
                self._pending_owner = None  # nor may the activation after it be attributed
                return
            if acc.calls == 0:
                order.append(acc)
            acc.calls += 1
            if isinstance(output, torch.Tensor):
                if output.requires_grad:
                    output.register_hook(grad_hook)
            else:
                for t in tensors(output):
                    if differentiable(t):
                        t.register_hook(grad_hook)
            self._pending_owner = acc

        return hook

    def _norm_hook(self, norms: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        """A tensor hook for the lean mode: the gradient's norm, taken at once while the
        gradient is in cache (measured: cheaper than keeping it for a multi-tensor norm
        later, which also holds memory and defeats the allocator's reuse)."""
        norm = torch.linalg.vector_norm

        def grad_hook(grad: torch.Tensor) -> None:
            if self._active:
                with torch.no_grad():  # half precision: a float32 result (fp16 overflows)
                    norms.append(norm(grad, dtype=_WIDE.get(grad.dtype)))

        return grad_hook

    def _activation_hook(self, act: ModuleActivation) -> Callable[[nn.Module, Any, Any], None]:
        samples = self.activation_samples
        entries = self.activation_entries

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            owner = self._pending_owner
            if owner is None or not isinstance(output, torch.Tensor):
                return
            self._pending_owner = None
            t = output if act.from_output is not None else args[0]
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if samples is not None and t.ndim > 0 and t.shape[0] > samples:
                    t = t[:samples]
                if entries is not None and t.ndim > 2 and t.numel() > entries:
                    # Copied now, while the activation is in cache: a strided read of
                    # it at collect time costs a cache miss per entry.
                    t = strided(t.detach(), owner.unit_dim % t.ndim, entries).contiguous()
                if owner.pending is not None:  # a second call before collect(): reduce it
                    reduce_pending([owner])
                owner.pending = (act, t)  # read under no_grad in _reduce_pending
            if output.requires_grad:
                output.register_hook(owner.act_norm_hook)

        return hook

    def collect_columns(
        self, extra: list[torch.Tensor] | tuple[()] = (), tag: Any = None
    ) -> tuple[list[tuple[str, str]], list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`collect` as columns, for the per-step hot path of a monitor.

        Returns ``(keys, values, extra_norms)``: ``values[i]`` (a 0-d tensor on the
        device) is the measurement ``keys[i] = (module, metric)``, and ``extra_norms``
        the norms of the tensors in ``extra`` (e.g. parameter gradients), taken in one
        multi-tensor reduction (the lean hooks took the signal norms during backward).

        In the usual case (one call per module since the last collect) the activation
        statistics are not among ``values``: the step's activation tensors are copied
        aside, and many steps' are reduced together later; :meth:`pop_statistics`
        returns them, labelled with ``tag``. A few tensor operations per step in all,
        whatever the depth of the model.

        Example:
            >>> from gradsight.probes import SignalProbe
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> lean = dict(activations="modules", input_signals=False, output_norms=False)
            >>> with SignalProbe(model, **lean) as probe:
            ...     model(torch.randn(16, 4)).sum().backward()
            ...     keys, values, norms = probe.collect_columns([model[0].weight.grad], tag=7)
            >>> len(keys) == len(values), keys[0], len(norms)
            (True, ('0', 'signal_norm'), 1)
            >>> [(tag, keys[0]) for tag, keys, _ in probe.pop_statistics(final=True)]
            [(7, ('0', 'saturation'))]
        """
        accs = [acc for acc in self._order if acc.owns_params]
        simple = all(
            not acc.reduced
            and acc.activation is None
            and not acc.in_norms
            and not acc.value_norms
            and len(acc.out_norms) <= 1
            and len(acc.act_out_norms) <= 1
            for acc in accs
        )
        if not simple:  # several calls per step, or the full probe: the general path
            extra_norms = list(torch._foreach_norm(list(extra))) if extra else []
            rows = self.collect()
            return [(n, m) for n, m, _ in rows], [v for _, _, v in rows], extra_norms
        with torch.no_grad():
            extra_norms = list(torch._foreach_norm(list(extra))) if extra else []
        keys: list[tuple[str, str]] = []
        scalars: list[torch.Tensor] = []
        for acc in accs:
            if acc.out_norms:
                keys.append((acc.name, SIGNAL_NORM))
                scalars.append(acc.out_norms[0])
            if acc.act_out_norms:
                keys.append((acc.name, ACTIVATION_SIGNAL_NORM))
                scalars.append(acc.act_out_norms[0])
        self._defer_statistics(accs, tag)
        for acc in accs:
            acc.clear()
        self._pending_owner = None
        return keys, scalars, extra_norms

    def pop_statistics(
        self, final: bool = False
    ) -> list[tuple[Any, list[tuple[str, str]], torch.Tensor]]:
        """Activation statistics that :meth:`collect_columns` deferred, as ``(tag, keys,
        values)`` blocks (``values`` on the device, four per layer: ``saturation``,
        ``dead_fraction``, ``mean_derivative``, ``rms_derivative``); ``final``: also
        reduce the steps still waiting. Each block is returned once."""
        return self._deferred.pop(final)

    def _defer_statistics(self, accs: list[ModuleAccumulator], tag: Any) -> None:
        """Hand the pending activation tensors of ``accs`` to the deferred reduction, per
        group of layers with the same activation and shape, and clear them."""
        groups: dict[tuple[Any, ...], list[ModuleAccumulator]] = {}
        for acc in accs:
            if acc.pending is not None:
                act, t = acc.pending
                key = (act, acc.unit_dim % max(t.ndim, 1), t.shape, t.dtype, t.device)
                groups.setdefault(key, []).append(acc)
        for (act, unit_dim, _, _, _), members in groups.items():
            pending = [m.pending[1] for m in members]  # type: ignore[index]
            self._deferred.add(tag, [m.name for m in members], act, unit_dim, pending)
            for m in members:
                m.pending = None

    def activation_states(self) -> dict[str, ActivationStates]:
        """The activation statistics of the calls since the last collect, per layer, as
        summable states (entry counts, per-unit masks): what a cross-rank reduction needs
        besides the collected fractions. Call before :meth:`collect_columns`; it then
        returns the same step's values."""
        reduce_pending(self._order)
        out = {}
        for acc in self._order:
            if not acc.owns_params:
                continue
            acc.fold_reduced()
            if acc.activation is not None and acc.activation.states is not None:
                out[acc.name] = acc.activation.states
        return out
