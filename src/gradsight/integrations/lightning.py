"""PyTorch Lightning: ``GradsightCallback`` records a :class:`~gradsight.Monitor` run.

The callback attaches a Monitor to the LightningModule when fit starts, records every
optimizer step (also under gradient accumulation and mixed precision), sends the
measurements to the trainer's loggers as ``gradsight/<layer>/<metric>``, and at the
end of training writes the run store and the HTML report::

    import pytorch_lightning as pl
    from gradsight.integrations.lightning import GradsightCallback

    trainer = pl.Trainer(max_epochs=3, callbacks=[GradsightCallback("runs/a")])
    trainer.fit(model, loader)   # then open runs/a/report.html

How steps are read: the Monitor steps after the ``backward()`` of the last micro-batch
of each optimizer step (``on_after_backward``), before Lightning unscales a
GradScaler's gradients, so that parameter gradients and backward signals carry the
same loss scale and both are divided by it (``precision="16-mixed"``); ``bf16-mixed``
has no scale. The loss recorded is the loss of the optimizer step: the mean of its
micro-batch losses, unscaled. Under DDP every rank measures its shard, the Monitor
reduces them, and global rank 0 writes the run, the report and the logger scalars.

Without a GradScaler (``32-true``, ``bf16-mixed``) Lightning runs the training step and
backward *inside* ``optimizer.step(closure)``; the Monitor's optimizer hooks account for
that, so ``update_ratio`` is recorded in every precision.

Verdicts: at the end of training (and every ``diagnose_every`` optimizer steps) the
callback runs :func:`gradsight.diagnose` on the last training batch it saw and stores it
with the run, so the report has its verdict table. It needs the batch split into
``(inputs, targets)`` and the loss as ``loss_fn(outputs, targets)``; nothing has to be
passed for the usual ``training_step`` (``x, y = batch; loss = some_loss(self(x), y)``):
on the first optimizer steps the callback sees which element of the batch the
module's ``forward`` received, and which loss function — a loss module held by the
LightningModule (``self.criterion = nn.CrossEntropyLoss()``) or one of cross-entropy,
NLL, MSE, L1, smooth L1 or BCE-with-logits — applied to ``forward``'s output and the
other element reproduces the loss ``training_step`` returned (to 1e-4). Pass
``loss_fn=`` when it is none of these; without a match the report has no verdicts and
a warning says why.

Needs ``pytorch-lightning`` (or ``lightning``): ``pip install 'gradsight[lightning]'``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradsight.integrations import LIGHTNING_AVAILABLE, _missing
from gradsight.integrations.tensorboard import tag
from gradsight.monitor import Monitor

if not LIGHTNING_AVAILABLE:  # pragma: no cover - depends on the environment
    raise _missing("lightning", "pytorch-lightning")

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - only the `lightning` meta-package
    import lightning.pytorch as pl  # type: ignore[no-redef]

__all__ = ["DEFAULT_LOGGED", "GradsightCallback"]

#: Metrics sent to the trainer's loggers by default (the run store keeps all of them).
DEFAULT_LOGGED = ("loss", "grad_norm", "signal_norm", "saturation", "dead_fraction", "update_ratio")


class _LoggerSink:
    """Forwards Monitor rows to the trainer's loggers (called on global rank 0 only)."""

    def __init__(self, trainer: pl.Trainer, metrics: frozenset[str] | None) -> None:
        self.trainer = trainer
        self.metrics = metrics

    def __call__(self, step: int, keys: Sequence[tuple[str, str]], values: np.ndarray) -> None:
        logged = {
            tag(layer, metric): value
            for (layer, metric), value in zip(keys, values.tolist(), strict=True)
            if self.metrics is None or metric in self.metrics
        }
        if logged:
            for logger in self.trainer.loggers:
                logger.log_metrics(logged, step=step)


class GradsightCallback(pl.Callback):
    """Record a gradsight Monitor run of a Lightning fit; write its report at the end.

    Args:
        logdir: The run directory (default: ``<trainer.log_dir or default_root_dir>/gradsight``).
        every: Measure every this many optimizer steps.
        log_metrics: Metrics sent to the trainer's loggers (True: all; False: none).
        histogram_every: Gradient histograms every this many optimizer steps into a
            TensorBoardLogger of the trainer, if it has one (None: none).
        report: Write ``report.html`` into the run directory at the end of training.
        overwrite: Replace a run already in ``logdir``.
        diagnose: Diagnose the model on the last training batch at the end of training
            (the report's verdict table).
        diagnose_every: Also every this many optimizer steps (None: at the end only);
            the latest diagnosis is the one stored. Each costs a few dozen
            Gauss-Newton-vector products per layer.
        loss_fn: ``loss_fn(outputs, targets)``, when the callback cannot find it (see
            the module docstring).
        **monitor_kwargs: Passed to :class:`~gradsight.Monitor` (e.g.
            ``activation_samples``, ``flush_secs``, ``name``).

    Attributes:
        monitor: The Monitor of the current fit (None before it starts).
        report_path: The report's path once written.
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        *,
        every: int = 1,
        log_metrics: bool | Sequence[str] = DEFAULT_LOGGED,
        histogram_every: int | None = None,
        report: bool = True,
        overwrite: bool = False,
        diagnose: bool = True,
        diagnose_every: int | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        self.logdir = None if logdir is None else Path(logdir)
        self.every = every
        self.log_metrics = log_metrics
        self.histogram_every = histogram_every
        self.write_report = report
        self.overwrite = overwrite
        self.diagnose = diagnose
        self.diagnose_every = diagnose_every
        self.loss_fn = loss_fn
        # The callback diagnoses itself (on a batch it splits), not the Monitor at close.
        monitor_kwargs["diagnose_at_close"] = False
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.report_path: Path | None = None
        self._loss: torch.Tensor | None = None
        self._sinks: list[Any] = []
        self._split = _BatchSplit(loss_fn)
        self._diagnosed_at: int | None = None

    # -------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logdir = self.logdir
        if logdir is None:
            logdir = Path(trainer.log_dir or trainer.default_root_dir) / "gradsight"
        optimizers = trainer.optimizers
        if len(optimizers) > 1:
            warnings.warn(
                "GradsightCallback: several optimizers; the learning rate and update "
                "ratios are not recorded (pass one optimizer to record them).",
                stacklevel=2,
            )
        self._split = _BatchSplit(self.loss_fn)  # afresh for each fit
        self._diagnosed_at = None
        if self.diagnose and _diagnoses_here(trainer, pl_module):
            self._split.attach(pl_module)
        self.monitor = Monitor(
            pl_module,
            logdir=logdir,
            every=self.every,
            optimizer=optimizers[0] if len(optimizers) == 1 else None,
            scaler=_scaler(trainer),
            overwrite=self.overwrite,
            **self.monitor_kwargs,
        )
        if self.log_metrics is not False and trainer.loggers:
            metrics = None if self.log_metrics is True else frozenset(self.log_metrics)
            self.monitor.add_sink(_LoggerSink(trainer, metrics))
        if self.histogram_every is not None:
            from gradsight.integrations.tensorboard import TensorBoardSink

            for logger in trainer.loggers:
                if isinstance(logger, pl.loggers.TensorBoardLogger):
                    sink = TensorBoardSink(writer=logger.experiment, metrics=())
                    sink.watch_gradients(self.monitor, every=self.histogram_every)
                    self._sinks.append(sink)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the loggers are finalized (the fit loop does that after this hook).
        self._split.detach()
        if self.diagnose and _diagnoses_here(trainer, pl_module):
            self._diagnose(trainer, pl_module, final=True)
        self._close(trainer)

    def _diagnose(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, final: bool = False
    ) -> None:
        """Diagnose on the last batch seen and store it with the run; never raises."""
        mon = self.monitor
        if mon is None or mon.stopped is not None:
            return
        batch, loss_fn = self._split.batch, self._split.loss_fn
        if batch is None or loss_fn is None:
            if not final:  # still looking for the split
                return
            warnings.warn(
                f"GradsightCallback: no verdicts for this run: {self._split.why()}",
                stacklevel=2,
            )
            return
        optimizers = trainer.optimizers
        try:
            from gradsight.diagnosis import diagnose

            with mon.paused(), torch.inference_mode(False), torch.enable_grad():
                d = diagnose(
                    pl_module,
                    batch,
                    loss_fn,
                    optimizer=_stepping(optimizers[0]) if len(optimizers) == 1 else None,
                )
        except Exception as exc:  # the run's data matter more than the verdict
            warnings.warn(f"GradsightCallback: diagnosis failed: {exc}", stacklevel=2)
            return
        mon.write_diagnosis(d)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._split.detach()
        self._close(trainer, report=False)  # keep what was measured

    def _close(self, trainer: pl.Trainer, *, report: bool = True) -> None:
        mon = self.monitor
        if mon is None or mon.closed:
            return
        for sink in self._sinks:
            sink.close()
        self._sinks.clear()
        mon.close()
        if report and self.write_report and trainer.is_global_zero:
            try:
                from gradsight.report import report as write_report

                self.report_path = write_report(mon.logdir)
            except Exception as exc:  # the run is stored; the report can be made later
                warnings.warn(f"GradsightCallback: report failed: {exc}", stacklevel=2)

    # -------------------------------------------------------------- steps
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Lightning passes the micro-batch loss divided by accumulate_grad_batches (and
        # multiplied by a GradScaler's scale): their sum is the step's mean loss.
        loss = loss.detach()
        self._split.last_loss = loss
        self._loss = loss if self._loss is None else self._loss + loss

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mon = self.monitor
        if mon is None or mon.closed or _accumulating(trainer):
            return
        loss, self._loss = self._loss, None
        scaler = _scaler(trainer)
        if loss is not None and scaler is not None and scaler.is_enabled():
            loss = loss / scaler.get_scale()
        mon.step(loss)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._split.see_batch(batch)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # The loss of the last micro-batch, as training_step returned it: the reference
        # against which a candidate loss function is checked.
        if not self._split.found and self._split.last_loss is not None:
            scaler = _scaler(trainer)
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
            self._split.match(self._split.last_loss * trainer.accumulate_grad_batches / scale)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every, step = self.diagnose_every, trainer.global_step
        if (
            self.diagnose
            and every is not None
            and _diagnoses_here(trainer, pl_module)
            and step > 0
            and step != self._diagnosed_at  # micro-batches of one optimizer step
            and step % every == 0
        ):
            self._diagnosed_at = step
            self._diagnose(trainer, pl_module)


def _diagnoses_here(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Rank 0 diagnoses (and writes); under FSDP2 every rank takes part, since gathering
    the sharded parameters is a collective."""
    from gradsight.diagnosis._sharded import is_sharded

    return trainer.is_global_zero or is_sharded(pl_module)


def _scaler(trainer: pl.Trainer) -> Any:
    """The GradScaler of a ``16-mixed`` precision plugin, else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _accumulating(trainer: pl.Trainer) -> bool:
    """Whether the current micro-batch is followed by more before the optimizer steps."""
    epoch_loop = trainer.fit_loop.epoch_loop
    should_accumulate = getattr(epoch_loop, "_should_accumulate", None)
    if should_accumulate is not None:  # Lightning's own decision
        return bool(should_accumulate())
    # Fallback, as Lightning 2 decides: step every accumulate_grad_batches batches and
    # on the last batch of the epoch.
    ready = epoch_loop.batch_progress.current.ready
    last = ready == trainer.num_training_batches or epoch_loop.batch_progress.is_last_batch
    return ready % trainer.accumulate_grad_batches != 0 and not last


#: Loss functions tried, in order, after the loss modules the LightningModule holds.
_CANDIDATES: tuple[tuple[str, Callable[[Any, Any], torch.Tensor]], ...] = (
    ("cross_entropy", nn.functional.cross_entropy),
    ("nll_loss", nn.functional.nll_loss),
    ("mse_loss", nn.functional.mse_loss),
    ("l1_loss", nn.functional.l1_loss),
    ("smooth_l1_loss", nn.functional.smooth_l1_loss),
    ("binary_cross_entropy_with_logits", nn.functional.binary_cross_entropy_with_logits),
)

#: Steps on which a loss function is looked for before giving up.
_MATCH_STEPS = 3


class _BatchSplit:
    """Finds, from what training shows, the ``(inputs, targets)`` split of a batch and
    the ``loss_fn(outputs, targets)`` that ``training_step`` computes.

    A forward hook on the LightningModule (removed once found) records the output of
    its outermost ``forward`` call and which element of the batch it received; at the
    optimizer step, each candidate loss of that output and the batch's other element
    is compared with the loss ``training_step`` returned. Only a loss that reproduces it
    (relative 1e-4) is used: the verdicts are then those of the very loss trained.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> None:
        self.given = loss_fn
        self.loss_fn = loss_fn
        self.batch: tuple[Any, Any] | None = None
        self.last_loss: torch.Tensor | None = None
        self._raw: Any = None
        self._index: int | None = None  # which element of the batch forward received
        self._output: torch.Tensor | None = None
        self._input_index: int | None = None  # of the forward call under way
        self._output_index: int | None = None  # of the call that gave _output
        self._module: nn.Module | None = None
        self._depth = 0
        self._handles: list[Any] = []
        self._tries = 0
        self._tried: list[str] = []

    @property
    def found(self) -> bool:
        return self.loss_fn is not None and self._index is not None

    def attach(self, module: nn.Module) -> None:
        self._module = module
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def see_batch(self, batch: Any) -> None:
        self._raw = batch
        self._depth = 0  # a forward that raised never ran its post hook
        if self._index is not None and _pair(batch):
            self.batch = (batch[self._index], batch[1 - self._index])

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._depth += 1
        if self._depth == 1:  # the outermost call: which batch element is its input?
            raw = self._raw
            self._input_index = None
            if _pair(raw) and len(args) == 1 and not kwargs:
                self._input_index = next((i for i in (0, 1) if args[0] is raw[i]), None)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            self._output = output.detach()
            self._output_index = self._input_index

    def match(self, reference: torch.Tensor) -> None:
        """Try the candidates against ``reference``, the loss training_step returned."""
        index, output, raw = self._output_index, self._output, self._raw
        self._output = None
        if index is None or output is None or not _pair(raw):
            self._give_up_later()
            return
        targets = raw[1 - index]
        ref = float(reference.float())
        found = self.given
        if found is None:
            self._tried = []
            for name, fn in self._candidates():
                self._tried.append(name)
                try:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # e.g. mse_loss's broadcasting
                        value = float(fn(output.float(), targets))
                except Exception:
                    continue
                if math.isfinite(ref) and abs(value - ref) <= 1e-4 * max(abs(ref), 1e-12):
                    found = fn
                    break
        if found is None:
            self._give_up_later()
            return
        self.loss_fn, self._index = found, index
        self.batch = (raw[index], targets)
        self.detach()

    def _candidates(self) -> list[tuple[str, Callable[[Any, Any], torch.Tensor]]]:
        held = []
        if self._module is not None:
            for name, m in self._module.named_modules():
                if isinstance(m, nn.modules.loss._Loss):
                    held.append((f"self.{name}", m))
        return held + list(_CANDIDATES)

    def _give_up_later(self) -> None:
        self._tries += 1
        if self._tries >= _MATCH_STEPS:
            self.detach()  # no more overhead; why() says what was missing

    def why(self) -> str:
        if (
            self.batch is None
            and self._raw is not None
            and not (isinstance(self._raw, (tuple, list)) and len(self._raw) == 2)
        ):
            return (
                "its batches are not (inputs, targets) pairs; pass loss_fn= and batches "
                "that are, or diagnose with gradsight.diagnose(model, batch, loss_fn)."
            )
        if self._index is None and self.loss_fn is None and self._tried:
            return (
                "training_step's loss is none of "
                + ", ".join(self._tried)
                + " of forward's output and the batch's targets; pass "
                "GradsightCallback(loss_fn=...) with loss_fn(outputs, targets)."
            )
        return (
            "training_step did not call forward (self(x)) on one element of an "
            "(inputs, targets) batch; pass GradsightCallback(loss_fn=...) and call self(x)."
        )


def _pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _stepping(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer for the diagnosis, unless a schedule has brought an lr to 0 (the end
    of a linear decay): the step a layer gets is then the stable one, 2/λmax."""
    if optimizer is None or any(not g.get("lr", 0) > 0 for g in optimizer.param_groups):
        return None
    return optimizer
