"""``gradsight.Monitor``: measure a real training run every few steps, into a run store."""

from __future__ import annotations

import contextlib
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradsight._errors import GradsightError
from gradsight.diagnosis._sharded import gathered
from gradsight.diagnosis.rules import Thresholds
from gradsight.monitor._columns import RowBuffer, StepLayout
from gradsight.monitor._curvature import CurvatureTier
from gradsight.monitor._distributed import (
    DistributedReducer,
    NullWriter,
    local,
    unwrap_parallel,
)
from gradsight.monitor._sinks import Sink, TeeWriter
from gradsight.probes.signal import SignalProbe, parameter_owners
from gradsight.store import RunWriter

__all__ = ["Monitor"]

#: Measured steps kept on the device between copies to the host (one copy, and on a GPU
#: one synchronisation, per this many steps or per flush).
_ROWS = 256

LossFn = Callable[[Any, Any], torch.Tensor]


class Monitor:
    """Record per-layer signal flow, gradients and (optionally) curvature during training.

    Use it as a context manager, or call :meth:`close` at the end; call :meth:`step`
    once per optimizer step, after ``backward()`` (and before ``optimizer.step()``)::

        with gradsight.Monitor(model, logdir="runs/a", optimizer=opt) as mon:
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()
        gradsight.report("runs/a")

    **Cheap tier** (every ``every`` steps): per parameter-owning module, ‖∂L/∂θ‖
    (``grad_norm``), the backward signal ‖∂L/∂output‖ (``signal_norm``) and at the
    output of the activation module after it (``activation_signal_norm``; their ratio is
    the activation factor, and ``activation_signal_norm`` of one layer over
    ``signal_norm`` of the next the weight factor), the activation's ``saturation``,
    ``dead_fraction``, ``mean_derivative`` and ``rms_derivative`` (on the first
    ``activation_samples`` samples), and with an optimizer the learning rate and the
    update-to-weight ratio ‖Δθ‖/‖θ‖ (``update_ratio``, every ``update_every``-th
    measurement). Model level (layer ``""``):
    ``loss``, ``lr``, ``loss_scale``. Everything stays on the device until a flush: no
    ``.item()`` per module.

    Limitation: activations are recognised as ``nn`` modules (``nn.ReLU()``), not as
    functions (``torch.relu`` in ``forward``); :func:`gradsight.diagnose` sees both.

    **Curvature tier** (every ``curvature_every`` steps, needs ``batch`` and
    ``loss_fn``): per layer, on the Gauss-Newton matrix G (the same engine as
    :func:`gradsight.diagnose`: one forward and a few backward passes serve every layer),
    the top eigenvalue (``lambda_max`` ± ``lambda_max_err``, and ``lr_lambda_max``: above
    2 the step oscillates along the block's sharpest direction), the trace
    (± ``trace_stderr``), the curvature-optimal step α* = gᵀg/gᵀGg over the learning rate
    (``step_ratio``) and ``headroom``
    (± ``headroom_err``), the damped Gauss-Newton decrease along the gradient relative to
    the loss. Layers the engine does not cover (recurrent layers, say) get the same
    quantities from per-layer G-vector products.

    **Gradient accumulation**: call :meth:`step` once per optimizer step, after the last
    ``backward()``, with the loss of the whole step: the mean of the micro-batch losses
    (the sum of ``loss / accum`` as backpropagated), the loss whose gradient the
    parameters hold, not the last micro-batch's alone. Signal norms of all
    micro-batches combine in quadrature, activation statistics come from the last
    micro-batch. **Mixed precision**: pass ``scaler=``
    (a ``torch.amp.GradScaler``) or ``loss_scale=``; recorded norms are unscaled, and
    :meth:`step` takes the unscaled loss.

    Measuring does not change training: hooks only read tensors, and parameters after
    any number of steps are bitwise those of the same run without the monitor.

    **It never breaks training.** Once constructed (the constructor checks that it can
    write ``logdir``), nothing the Monitor does raises into the training loop: when
    measuring or writing fails (an unsupported layer, a full disk, a file system turned
    read-only, a sink that raises), it warns once, saying from which step nothing more is
    recorded, removes its hooks and keeps every part file already written (``run.json``
    gets ``stopped``: where and why, when it can still be written); :attr:`stopped` holds
    the reason. Parameters stay bitwise those of a run without it. Misuse still raises
    :class:`~gradsight.GradsightError` (bad arguments, :meth:`step` after :meth:`close`).

    **Cost** (``benchmarks/results/monitor.md``, on CPU): at ``every=1`` about 1.02× a
    plain step on a 4-layer GPT-2 (AdamW, 8×128 tokens), 1.12–1.23× on a 10-layer
    width-256 MLP and 1.06–1.09× on a small CNN, of which 1.06–1.15× and 1.04–1.06× is
    the price of hooking every layer's output and reducing every backward signal at all
    (bare hooks taking the same norms). Where that is too much, ``every=10`` costs
    1.01–1.05×; the curvature tier costs what its products cost, so give it a
    ``curvature_every`` of hundreds of steps.

    Args:
        model: The model being trained.
        logdir: Directory of the run store (see :mod:`gradsight.store`).
        every: Measure the cheap tier every this many steps.
        curvature_every: Measure the curvature tier every this many steps (None: never).
        optimizer: The optimizer, for the learning rate and the update-to-weight ratios.
        update_every: Measure the update-to-weight ratio at every this many cheap-tier
            measurements (default 10): it needs a copy of the parameters before the
            optimizer step and three passes over them, which at every step would cost
            more than the rest of the cheap tier together.
        scaler: A GradScaler whose scale the losses are multiplied by.
        loss_scale: A fixed loss scale (instead of ``scaler``).
        batch, loss_fn: ``(inputs, targets)`` and ``loss_fn(outputs, targets)`` for the
            curvature tier and the diagnosis at close; :meth:`step` can pass them too.
        activation_samples: Samples per batch for the activation statistics (None: all).
        activation_entries: At most about this many entries per layer for the activation
            statistics: conv feature maps beyond it are read on a strided spatial grid
            (None: no cap). Saturation is then an estimate, and ``dead_fraction`` (units
            flat on every entry read) an upper bound of the batch's; :func:`gradsight.diagnose`
            measures both on the whole batch.
        flush_secs: Write buffered measurements at most this many seconds apart; a crash
            loses at most that much.
        diagnose_at_close: Run :func:`gradsight.diagnose` at :meth:`close` (when a batch
            and loss_fn are known) and store it as ``diagnosis.json``.
        name: Run name shown in reports (default: the logdir's name).
        overwrite: Replace a run already in ``logdir`` (default: refuse).
        curvature_probes: Budget of curvature-vector products per layer for the trace, for
            the layers measured by products (those the engine does not cover).
        distributed: Under ``torch.distributed`` with several ranks (None: detected),
            reduce each step's measurements across ranks so that they equal a single
            process on the global batch, and write from rank 0 only (see
            :mod:`gradsight.monitor._distributed`; the curvature engine gathers each
            layer's inputs and backward vectors from every rank, and the diagnosis at
            close is rank 0's shard). False: every rank records on its own.
        thresholds: Decision thresholds for the verdicts of the diagnosis at close
            (:class:`gradsight.Thresholds`; default: its defaults).

    Example:
        >>> import tempfile
        >>> import gradsight
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> logdir = tempfile.mkdtemp()
        >>> with gradsight.Monitor(model, logdir=logdir, optimizer=opt) as mon:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward()
        ...         mon.step(loss)
        ...         opt.step()
        >>> run = gradsight.store.load_run(logdir)
        >>> sorted(run.series("grad_norm")), len(run.series("loss")[""][0])
        (['0', '2'], 3)
    """

    def __init__(
        self,
        model: nn.Module,
        logdir: str | Path = "gradsight-runs/run",
        *,
        every: int = 1,
        curvature_every: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        loss_scale: float | None = None,
        batch: Any = None,
        loss_fn: LossFn | None = None,
        activation_samples: int | None = 32,
        activation_entries: int | None = 8192,
        update_every: int = 10,
        flush_secs: float = 10.0,
        diagnose_at_close: bool = True,
        name: str | None = None,
        overwrite: bool = False,
        curvature_probes: int = 20,
        distributed: bool | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradsightError(
                f"Monitor expects a torch.nn.Module, got {type(model).__name__}; "
                "pass the model being trained."
            )
        for arg, value in (
            ("every", every),
            ("curvature_every", curvature_every),
            ("update_every", update_every),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise GradsightError(f"{arg} must be a positive int, got {value!r}.")
            if value is not None and value < 1:
                raise GradsightError(f"{arg} must be a positive int, got {value!r}.")
        if scaler is not None and loss_scale is not None:
            raise GradsightError("pass either scaler= or loss_scale=, not both.")
        if loss_scale is not None and not loss_scale > 0:
            raise GradsightError(f"loss_scale must be positive, got {loss_scale!r}.")
        model = unwrap_parallel(model)  # DDP's inner module: plain names, no collectives
        self._dist = DistributedReducer.detect(distributed, model)
        self.model = model
        self.logdir = Path(logdir)
        self.every = every
        self.update_every = update_every
        self.curvature_every = curvature_every
        self.optimizer = optimizer
        self.scaler = scaler
        self.loss_scale = loss_scale
        self.batch = batch
        self.loss_fn = loss_fn
        self.flush_secs = flush_secs
        self.diagnose_at_close = diagnose_at_close
        self.thresholds = thresholds
        self.steps = 0  # step() calls so far; the next step() records step number `steps`
        self._closed = False
        self._last_flush = time.monotonic()
        self._warned: set[str] = set()
        #: Why recording stopped (a failure of the Monitor itself), else None.
        self.stopped: str | None = None
        # Measured steps not yet handed to the writer: raw step vectors per layout, and
        # finished blocks (step, keys, values), all on the device.
        self._rows: dict[int, RowBuffer] = {}
        self._pending: list[tuple[int, list[tuple[str, str]], torch.Tensor]] = []
        self._last_layout: StepLayout | None = None

        owners = parameter_owners(model)
        self._layers = [name_ for name_, _ in owners]
        # Trainable parameters, and for each the layer it belongs to (first owner).
        layer_of: dict[int, int] = {}
        for i, (_, module) in enumerate(owners):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    layer_of.setdefault(id(p), i)
        self._params = [p for p in model.parameters() if id(p) in layer_of]
        self._param_layer = [layer_of[id(p)] for p in self._params]
        if not self._params:
            raise GradsightError(
                f"{type(model).__name__} has no trainable parameters to monitor; "
                "check requires_grad."
            )

        writer = RunWriter if self._dist is None or self._dist.is_writer else NullWriter
        self._writer: RunWriter | NullWriter | TeeWriter = writer(
            self.logdir,
            {
                "name": name or self.logdir.name,
                "format": 1,
                "status": "running",
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": type(model).__name__,
                "layers": [
                    {
                        "name": n,
                        "type": type(m).__name__,
                        "parameters": sum(p.numel() for p in m.parameters(recurse=False)),
                    }
                    for n, m in owners
                ],
                "every": every,
                "curvature_every": curvature_every,
                "optimizer": None if optimizer is None else type(optimizer).__name__,
                "lr": None if optimizer is None else _lrs(optimizer)[0],
                "versions": {
                    "gradsight": _version(),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "steps": 0,
            },
            overwrite=overwrite,
        )
        self._probe = SignalProbe(
            model,
            activations="modules",
            input_signals=False,
            output_norms=False,
            activation_samples=activation_samples,
            activation_entries=activation_entries,
        )
        self._probe.__enter__()
        self._opt_handles: list[RemovableHandle] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._stepped = False  # step() ran since the last optimizer update
        self._update_step: int | None = None  # the step whose update is being measured
        self._measured = 0  # cheap-tier measurements so far
        self._sgd_shortcut = False
        if optimizer is not None:
            self._attach_optimizer(optimizer)
        self._curvature = CurvatureTier(
            model,
            self._layers,
            probes=curvature_probes,
            # Under DDP every product is averaged over the ranks' shards (in lockstep).
            group=self._dist.group if self._dist is not None else None,
            distributed=self._dist is not None,
        )

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove all hooks, write what is buffered, the diagnosis and the final metadata.

        Safe to call more than once.
        """
        if self._closed:
            return
        self._closed = True
        self._probe.__exit__(None, None, None)
        for h in self._opt_handles:
            h.remove()
        if self.stopped is None:
            try:
                self._drain(final=True)
                self._writer.flush()
            except Exception as exc:
                self._stop("close()", exc)
        diagnosed = False
        if (
            self.diagnose_at_close
            and self.batch is not None
            and self.loss_fn is not None
            # FSDP: every rank takes part in gathering the parameters; rank 0 writes.
            and (self._dist is None or self._dist.is_writer or self._dist.sharded)
        ):
            try:
                from gradsight.diagnosis import diagnose

                # The optimizer, not its lr alone: for Adam-like optimizers the verdicts
                # compare each layer's curvature-optimal step with the step taken.
                d = diagnose(
                    self.model,
                    self.batch,
                    self.loss_fn,
                    optimizer=self.optimizer,
                    thresholds=self.thresholds,
                )
                self.write_diagnosis(d)
                diagnosed = True
            except Exception as exc:  # the run's data matter more than the verdict
                warnings.warn(f"gradsight: diagnosis at close failed: {exc}", stacklevel=2)
        try:
            self._writer.update_metadata(
                status="closed",
                steps=self.steps,
                closed=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                diagnosis=diagnosed or bool(self._writer.metadata.get("diagnosis")),
            )
        except Exception as exc:
            self._stop("close()", exc)

    @property
    def closed(self) -> bool:
        return self._closed

    def write_diagnosis(self, diagnosis: Any) -> Path | None:
        """Store a :class:`~gradsight.diagnosis.Diagnosis` with the run (``diagnosis.json``),
        for the report's verdict table; also after :meth:`close`. Returns its path, or
        None when it could not be written (a warning says why)."""
        try:
            path = self._writer.write_json("diagnosis.json", diagnosis.to_dict())
            self._writer.update_metadata(diagnosis=True)
        except Exception as exc:
            self._stop("write_diagnosis()", exc)
            return None
        return path

    # ------------------------------------------------------------------ measuring
    def step(
        self,
        loss: torch.Tensor | float | None = None,
        *,
        batch: Any = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        """Record this training step; call after ``backward()``, before ``optimizer.step()``.

        Args:
            loss: The (unscaled) loss of the step, a tensor or a float.
            batch: The step's ``(inputs, targets)``, for the curvature tier and the
                diagnosis at close (the latest one given is kept).
            loss_fn: ``loss_fn(outputs, targets)``, likewise.
        """
        if self._closed:
            raise GradsightError("this Monitor is closed; create a new one to keep recording.")
        if self.stopped is not None:
            self.steps += 1
            return
        try:
            self._step(loss, batch, loss_fn)
        except Exception as exc:  # never into the training loop: see _stop
            self._stop("mon.step()", exc)

    def _step(self, loss: torch.Tensor | float | None, batch: Any, loss_fn: LossFn | None) -> None:
        if batch is not None:
            self.batch = batch
        if loss_fn is not None:
            self.loss_fn = loss_fn
        step = self.steps
        self.steps += 1
        if step % self.every == 0:
            self._record(step, loss)
        else:
            self._probe.collect()  # hooks were off: nothing to keep, but reset
        if self.curvature_every is not None and step % self.curvature_every == 0:
            self._record_curvature(step, loss)
        self._stepped = True  # the next optimizer update belongs to this step
        # Hooks run only in the passes of steps that are measured.
        self._probe.recording = self.steps % self.every == 0
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block, forward and backward passes are not recorded.

        For passes that are not the training step's: an optimizer's own backward passes
        (a Gauss-Newton or Hessian-free optimizer's curvature passes), a probe of
        gradients with grad enabled. Evaluation under ``torch.no_grad()`` needs nothing.

        Example:
            >>> import tempfile
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
            >>> with Monitor(model, logdir=tempfile.mkdtemp(), diagnose_at_close=False) as mon:
            ...     with mon.paused():
            ...         model(torch.randn(8, 3)).sum().backward()  # not recorded
            ...     loss = model(torch.randn(8, 3)).pow(2).mean()
            ...     loss.backward()
            ...     mon.step(loss)
        """
        was = self._probe.recording
        self._probe.recording = False
        try:
            yield
        finally:
            self._probe.recording = was

    def add_sink(self, sink: Sink) -> None:
        """Also send every block of rows written to the run store to ``sink(step, keys,
        values)`` (TensorBoard, a Lightning logger: see :mod:`gradsight.integrations`).

        Blocks arrive as they are written: device measurements at each flush, host ones
        (``lr``, :meth:`log`) at once. Under torch.distributed, on rank 0 only, reduced.
        """
        if self._dist is None or self._dist.is_writer:
            self._writer = TeeWriter.wrap(self._writer, sink)

    def log(self, metrics: dict[str, float], step: int | None = None, layer: str = "") -> None:
        """Record extra scalars (e.g. held-out accuracy) at ``step`` (default: the last)."""
        if self._closed:
            raise GradsightError("this Monitor is closed; create a new one to keep recording.")
        if self.stopped is not None:
            return
        try:
            keys = [(layer, str(k)) for k in metrics]
            values = np.array([float(v) for v in metrics.values()], dtype=np.float64)
            self._writer.append(max(self.steps - 1, 0) if step is None else step, keys, values)
        except Exception as exc:
            self._stop("mon.log()", exc)

    def flush(self) -> None:
        """Write buffered measurements now (a new part file)."""
        if self.stopped is not None or self._closed:
            return
        try:
            self._drain(final=True)
            self._writer.flush()
            self._writer.update_metadata(steps=self.steps)
        except Exception as exc:
            self._stop("flush()", exc)
        self._last_flush = time.monotonic()

    def _stop(self, where: str, exc: Exception) -> None:
        """Stop recording after a failure of the Monitor itself, so that training goes on.

        A failure while measuring or writing (an unsupported layer or dtype, a full disk,
        a read-only file system, a sink that raises) must never reach the training loop.
        The hooks are removed (the training step is then exactly a plain one), what is
        buffered is written if the store still can be, and one warning says what stops
        being recorded; every later call is a no-op. The optimizer hooks stay registered
        until :meth:`close` (this may run inside ``optimizer.step()``, which iterates
        them) but return at once.

        Under torch.distributed a failure that only some ranks meet leaves the others
        waiting in the step's all-reduce; a full or read-only disk meets rank 0 alone,
        so there only writing stops and the ranks go on measuring in lockstep.
        """
        reason = f"{type(exc).__name__}: {exc}"
        if self._dist is not None and isinstance(exc, OSError):
            # Rank 0's disk: keep measuring (the collectives in lockstep), write nothing.
            self._writer = NullWriter(self.logdir, self._writer.metadata)
            if "store" not in self._warned:
                self._warned.add("store")
                self._warn_stopped(where, reason, writes_only=True)
            return
        first = self.stopped is None
        if first:
            self.stopped = f"{where} failed at step {max(self.steps - 1, 0)}: {reason}"
        with contextlib.suppress(Exception):
            self._probe.__exit__(None, None, None)  # hooks off: a plain step from here
        self._rows.clear()
        self._pending = []
        self._snapshot = None
        if first:
            try:  # keep what was measured before the failure, if the store can take it
                if not isinstance(exc, OSError):
                    self._drain(final=True)
                    self._writer.flush()
                self._writer.update_metadata(steps=self.steps, stopped=self.stopped)
            except Exception:
                pass  # the warning below says it all; the parts written earlier stay
            self._warn_stopped(where, reason, writes_only=False)

    def _warn_stopped(self, where: str, reason: str, *, writes_only: bool) -> None:
        step = max(self.steps - 1, 0)
        rows = int(getattr(self._writer, "rows_written", 0))
        what = "nothing more is written to" if writes_only else "nothing more is recorded in"
        warnings.warn(
            f"gradsight.Monitor: {where} failed at step {step} ({reason}); from step {step} "
            f"on {what} the run store {self.logdir} (the {rows} values already written there "
            "stay readable). Training goes on unaffected: the Monitor only reads tensors.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _scale(self) -> torch.Tensor | float | None:
        if self.loss_scale is not None:
            return float(self.loss_scale)
        if self.scaler is None or not getattr(self.scaler, "is_enabled", lambda: True)():
            return None
        scale = getattr(self.scaler, "_scale", None)  # a device tensor: no sync
        return scale if isinstance(scale, torch.Tensor) else float(self.scaler.get_scale())

    def _record(self, step: int, loss: torch.Tensor | float | None) -> None:
        grads, owners = [], []
        for p, layer in zip(self._params, self._param_layer, strict=True):
            if p.grad is not None:
                grads.append(p.grad)
                owners.append(layer)
        if self._dist is not None and self._dist.sharded:  # FSDP: this rank's shards
            grads = [local(g) for g in grads]
        if self._dist is not None:  # counts and unit masks, before the probe folds them
            self._dist.capture(self._probe)
        # One multi-tensor norm of the parameter gradients (the probe's hooks took the
        # backward-signal norms during backward); activation statistics are deferred.
        keys, values, grad_norms = self._probe.collect_columns(grads, tag=step)
        parts = grad_norms + values
        has_loss = isinstance(loss, torch.Tensor)
        if has_loss:
            parts.append(loss.detach().reshape(()))  # type: ignore[union-attr]
        scale = self._scale()
        if scale is not None and parts:
            parts.append(torch.as_tensor(scale, device=parts[0].device).reshape(()))
        if parts:
            layout = self._layout(owners, keys, has_loss, scale is not None)
            if self._dist is not None:  # reduce this step's finished metrics now
                raw = torch.stack([t.to(parts[0].device, torch.float64) for t in parts])
                finished = layout.finish(raw.unsqueeze(0))[0]
                self._pending.append((step, layout.keys, self._dist.reduce(layout.keys, finished)))
            else:
                rows = self._rows.get(id(layout))
                if rows is None:
                    if len(self._rows) >= 8:  # layouts that keep changing: start afresh
                        self._drain()
                        self._rows.clear()
                    rows = RowBuffer(layout, _ROWS, parts[0].device)
                    self._rows[id(layout)] = rows
                rows.add(step, parts)
                if rows.full:
                    self._drain()
        self._pending += self._probe.pop_statistics()
        host = {}
        if loss is not None and not isinstance(loss, torch.Tensor):
            host["loss"] = float(loss)
        if self.optimizer is not None:
            host["lr"] = _lrs(self.optimizer)[0]
        if host:
            self._writer.append(step, [("", k) for k in host], np.array(list(host.values())))
        self._measured += 1

    def _layout(
        self, owners: list[int], keys: list[tuple[str, str]], has_loss: bool, has_scale: bool
    ) -> StepLayout:
        """The step's layout: the last one when nothing changed (the usual case)."""
        last = self._last_layout
        if (
            last is not None
            and last.has_loss == has_loss
            and last.has_scale == has_scale
            and len(last.owners) == len(owners)
            and last.probe_keys == tuple(keys)
            and last.owners == tuple(owners)
        ):
            return last
        self._last_layout = StepLayout(
            tuple(self._layers), tuple(owners), tuple(keys), has_loss, has_scale
        )
        return self._last_layout

    def _emit(self, step: int, keys: list[tuple[str, str]], values: torch.Tensor) -> None:
        """Buffer device values; they reach the host with the next drain of the rows."""
        self._pending.append((step, keys, values))

    def _drain(self, final: bool = False) -> None:
        """Copy the buffered measurements to the host in one go and hand them to the
        writer (it writes them at the next flush); ``final``: also the activation
        statistics still waiting to be reduced."""
        finished = [rows.take() for rows in self._rows.values() if rows.steps]
        pending, self._pending = self._pending, []
        pending += self._probe.pop_statistics(final=final)
        finished += [([step], keys, v.reshape(1, -1)) for step, keys, v in pending]
        if not finished:
            return
        host = torch.cat([v.reshape(-1).double().cpu() for _, _, v in finished]).numpy()
        start = 0
        for steps, keys, _ in finished:
            n = len(keys)
            for step in steps:
                self._writer.append(step, keys, host[start : start + n])
                start += n

    def _record_curvature(self, step: int, loss: torch.Tensor | float | None) -> None:
        if self.batch is None or self.loss_fn is None:
            self._warn_once(
                "curvature",
                "gradsight.Monitor: the curvature tier needs a batch and a loss function; "
                "pass step(loss, batch=(x, y), loss_fn=...) or Monitor(..., batch=, loss_fn=). "
                "Skipping it until both are given.",
            )
            return
        lr = None if self.optimizer is None else _lrs(self.optimizer)[0]
        # The curvature engine runs its own passes (under torch.func transforms): the
        # cheap tier's hooks must not see them.
        self._probe.recording = False
        sharded = self._dist is not None and self._dist.sharded
        try:
            if sharded:  # FSDP: on a plain copy with the full parameters, every rank
                self._curvature.model = gathered(self.model)
            rows = self._curvature.measure(self.batch, self.loss_fn, lr=lr)
        except Exception as exc:  # a model the curvature engine cannot handle
            self._warn_once("curvature-failed", f"gradsight.Monitor: curvature tier failed: {exc}")
            return
        finally:
            self._probe.recording = True
            self._curvature.model = self.model  # the copy's memory is freed at once
        if self._curvature.failed:
            failed = self._curvature.failed
            self._warn_once(
                "curvature-layers",
                f"gradsight.Monitor: the curvature of {len(failed)} layer(s) could not be "
                f"measured (first: {next(iter(failed))!r}, {next(iter(failed.values()))}); "
                "the other layers' curvature is recorded.",
            )
        if rows:
            keys = [(layer, metric) for layer, metric, _ in rows]
            self._writer.append(step, keys, np.array([v for _, _, v in rows], dtype=np.float64))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ optimizer
    def _attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        ours = {id(p) for p in self._params}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in ours:
                    raise GradsightError(
                        "the optimizer updates a parameter that is not a trainable parameter "
                        "of the monitored model; pass the optimizer of this model."
                    )
        self._opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        self._opt_layer = [self._layer_index(p) for p in self._opt_params]
        if self._dist is not None and self._dist.sharded:  # FSDP: the shards the optimizer
            self._opt_params = [local(p) for p in self._opt_params]  # updates in place
        self._opt_handles.append(optimizer.register_step_pre_hook(self._before_update))
        self._opt_handles.append(optimizer.register_step_post_hook(self._after_update))

    def _layer_index(self, p: torch.Tensor) -> int:
        for q, i in zip(self._params, self._param_layer, strict=True):
            if q is p:
                return i
        raise AssertionError("unreachable: checked in _attach_optimizer")

    def _update_measured(self, step: int) -> bool:
        """Whether the optimizer update that follows ``step`` gets an update ratio."""
        return step % self.every == 0 and (step // self.every) % self.update_every == 0

    def _before_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.stopped is not None:
            return
        try:
            self._before_update_()
        except Exception as exc:  # inside optimizer.step(): never into training
            self._stop("the optimizer pre-step hook", exc)

    def _after_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.stopped is not None:
            return
        try:
            self._after_update_()
        except Exception as exc:
            self._stop("the optimizer post-step hook", exc)

    def _before_update_(self) -> None:
        # In a plain loop step() has run for this update; with a closure
        # (optimizer.step(closure): LBFGS, Lightning) it runs inside, after this hook.
        step = self.steps - 1 if self._stepped else self.steps
        self._update_step = step if self._update_measured(step) else None
        if self._update_step is None:
            return
        with torch.no_grad():
            if self._snapshot is None:
                self._snapshot = [torch.empty_like(p) for p in self._opt_params]
            torch._foreach_copy_(self._snapshot, self._opt_params)

    def _after_update_(self) -> None:
        self._stepped = False
        step, self._update_step = self._update_step, None
        if step is None or self._snapshot is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(self._snapshot, self._opt_params)
            both = torch.stack(
                torch._foreach_norm(self._snapshot) + torch._foreach_norm(self._opt_params)
            ).double()
        n = len(self._opt_params)
        index = torch.tensor(self._opt_layer, device=both.device)
        sq = both.square()
        dl = torch.zeros(len(self._layers), dtype=sq.dtype, device=sq.device)
        wl = torch.zeros_like(dl)
        dl.index_add_(0, index, sq[:n])
        wl.index_add_(0, index, sq[n:])
        if self._dist is not None and self._dist.sharded:  # FSDP: sum the shards' squares
            self._dist.all_reduce_sum(dl, wl)
        used = list(dict.fromkeys(self._opt_layer))
        ratio = (dl.sqrt() / wl.sqrt())[used]
        self._emit(step, [(self._layers[i], "update_ratio") for i in used], ratio)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _version() -> str:
    from gradsight import __version__

    return __version__
