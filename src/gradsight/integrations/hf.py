"""Hugging Face ``transformers``: ``GradsightTrainerCallback`` for the ``Trainer``.

Attaches a :class:`~gradsight.Monitor` to the model when training begins, records each
optimizer step, and at the end writes the run store and the HTML report::

    from transformers import Trainer, TrainingArguments
    from gradsight.integrations.hf import GradsightTrainerCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", report_to=[]),
                      train_dataset=ds, callbacks=[GradsightTrainerCallback()])
    trainer.train()   # then open out/gradsight/report.html

Every parameter-owning module is a layer: embeddings, the attention projections, the
MLP blocks and the LayerNorms, under their ``named_modules()`` names.

How steps are read: the Monitor steps at ``on_pre_optimizer_step``, once per optimizer
step after all micro-batches of gradient accumulation. The Trainer has clipped the
gradients by then (``max_grad_norm``, 1.0 by default), so ``grad_norm`` is the
gradient the optimizer applies; set ``max_grad_norm=0`` to record unclipped ones. The
loss is read off the model outputs' ``loss`` (the step's mean over micro-batches).
With ``fp16=True`` (a GradScaler) the Trainer unscales gradients while clipping but
not the backward signals, and the Monitor divides both or neither: this callback
records gradient norms unscaled and warns that signal norms carry the loss scale
(the Lightning callback, which reads the step before unscaling, has no such gap).
Under DDP (``torchrun``), every rank measures its shard, the Monitor reduces them, and
the world's main process writes. ``tensorboard=True`` also writes
``gradsight/<layer>/<metric>`` into ``logging_dir`` (``<output_dir>/runs`` without it).

Needs ``transformers`` (``pip install 'gradsight[hf]'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gradsight.integrations import HF_AVAILABLE, _missing
from gradsight.monitor import Monitor

if not HF_AVAILABLE:  # pragma: no cover - depends on the environment
    raise _missing("hf", "transformers")

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["GradsightTrainerCallback"]


class GradsightTrainerCallback(TrainerCallback):
    """Record a gradsight Monitor run of a ``transformers.Trainer``; report at the end.

    Args:
        logdir: The run directory (default: ``<output_dir>/gradsight``).
        every: Measure every this many optimizer steps.
        tensorboard: Also write scalars (and, with ``histogram_every``, gradient
            histograms) to TensorBoard in ``args.logging_dir`` (or this directory).
        histogram_every: With ``tensorboard``: histograms every this many steps.
        report: Write ``report.html`` into the run directory at the end of training.
        overwrite: Replace a run already in ``logdir``.
        **monitor_kwargs: Passed to :class:`~gradsight.Monitor`.

    Attributes:
        monitor: The Monitor of the current training (None before it starts).
        report_path: The report's path once written.
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        *,
        every: int = 1,
        tensorboard: bool | str | Path = False,
        histogram_every: int | None = None,
        report: bool = True,
        overwrite: bool = False,
        **monitor_kwargs: Any,
    ) -> None:
        self.logdir = None if logdir is None else Path(logdir)
        self.every = every
        self.tensorboard = tensorboard
        self.histogram_every = histogram_every
        self.write_report = report
        self.overwrite = overwrite
        monitor_kwargs.setdefault("diagnose_at_close", False)  # no batch/loss_fn here
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.report_path: Path | None = None
        self._tb: Any = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._warned = False

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise _missing("hf", "a Trainer that passes the model to callbacks")
        logdir = self.logdir or Path(str(args.output_dir)) / "gradsight"
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
        scaler = getattr(optimizer, "scaler", None)
        self.monitor = Monitor(
            model,
            logdir=logdir,
            every=self.every,
            optimizer=inner if isinstance(inner, torch.optim.Optimizer) else None,
            overwrite=self.overwrite,
            **self.monitor_kwargs,
        )
        self._scaler = scaler
        self._hook = model.register_forward_hook(self._read_loss, with_kwargs=True)
        if self.tensorboard is not False:
            from gradsight.integrations.tensorboard import TensorBoardSink

            tb_dir = self.tensorboard
            if tb_dir is True:  # transformers < 5 has logging_dir; 5 logs under output_dir
                tb_dir = getattr(args, "logging_dir", None) or Path(str(args.output_dir)) / "runs"
            self._tb = TensorBoardSink.attach(
                self.monitor, tb_dir, histogram_every=self.histogram_every
            )

    def _read_loss(
        self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not torch.is_grad_enabled() or self.monitor is None:
            return  # evaluation
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None:
            loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().reshape(()))
            # With num_items_in_batch the model normalizes by the items of the whole
            # accumulation window: micro-batch losses then add up to the step's loss.
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        mon = self.monitor
        if mon is None or mon.closed:
            return
        losses, self._losses = self._losses, []
        loss = None
        if losses:
            total = torch.stack(losses).sum()
            loss = total if self._summed else total / len(losses)
        scaler = self._scaler
        if scaler is not None and scaler.is_enabled() and not self._warned:
            self._warned = True
            warnings.warn(
                "GradsightTrainerCallback with fp16: the Trainer unscales parameter "
                "gradients while clipping, but the backward signals it measured still "
                "carry the loss scale; signal norms of this run are multiplied by it.",
                stacklevel=2,
            )
        mon.step(loss)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        mon = self.monitor
        if mon is None or mon.closed:
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        mon.close()
        if self._tb is not None:
            self._tb.close()
        if self.write_report and state.is_world_process_zero:
            try:
                from gradsight.report import report as write_report

                self.report_path = write_report(mon.logdir)
            except Exception as exc:  # the run is stored; the report can be made later
                warnings.warn(f"GradsightTrainerCallback: report failed: {exc}", stacklevel=2)
