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

Needs ``pytorch-lightning`` (or ``lightning``): ``pip install 'gradsight[lightning]'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
        **monitor_kwargs: Passed to :class:`~gradsight.Monitor` (e.g.
            ``activation_samples``, ``flush_secs``, ``diagnose_at_close``, ``name``).

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
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        self.logdir = None if logdir is None else Path(logdir)
        self.every = every
        self.log_metrics = log_metrics
        self.histogram_every = histogram_every
        self.write_report = report
        self.overwrite = overwrite
        monitor_kwargs.setdefault("diagnose_at_close", False)  # no batch/loss_fn here
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.report_path: Path | None = None
        self._loss: torch.Tensor | None = None
        self._sinks: list[Any] = []

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
        self._close(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
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
