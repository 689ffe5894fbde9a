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

Verdicts: at the end of training (and every ``diagnose_every`` optimizer steps) the
callback runs :func:`gradsight.diagnose` on the last training micro-batch it saw and
stores it with the run, so the report has its verdict table. The batch is the model's
own inputs with ``labels`` as targets, and the loss the model's own ``loss_function``
for its ``loss_type`` (causal or masked LM, sequence or token classification) applied
to ``outputs.logits``, used only after it reproduced the loss the model returned in
training (to 1e-4); the model is then diagnosed as returning its logits, so that the
Gauss-Newton curvature (step ratios, headroom) is measured too. Otherwise the labels
stay among the inputs and the loss is ``outputs.loss`` (the verdicts then rest on
signal flow alone, and the summary says so). The run is named after the Trainer's
output directory.

Needs ``transformers`` (``pip install 'gradsight[hf]'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gradsight._model_loss import checked_model_loss
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
        diagnose: Diagnose the model on the last training micro-batch at the end of
            training (the report's verdict table).
        diagnose_every: Also every this many optimizer steps (None: at the end only);
            the latest diagnosis is the one stored.
        **monitor_kwargs: Passed to :class:`~gradsight.Monitor` (``name`` defaults to
            the name of the Trainer's ``output_dir``).

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
        diagnose: bool = True,
        diagnose_every: int | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self.logdir = None if logdir is None else Path(logdir)
        self.every = every
        self.tensorboard = tensorboard
        self.histogram_every = histogram_every
        self.write_report = report
        self.overwrite = overwrite
        self.diagnose = diagnose
        self.diagnose_every = diagnose_every
        # The callback diagnoses itself (on the batch it saw), not the Monitor at close.
        monitor_kwargs["diagnose_at_close"] = False
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.report_path: Path | None = None
        self._tb: Any = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._warned = False
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._inputs: dict[str, Any] | None = None  # the last training micro-batch
        self._loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
        self._checked = False  # the model's loss_function was compared with its loss
        self._diagnosing = False

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
        self._model = model
        self._optimizer = inner if isinstance(inner, torch.optim.Optimizer) else None
        kwargs = dict(self.monitor_kwargs)
        kwargs.setdefault("name", _run_name(args.output_dir))
        self.monitor = Monitor(
            model,
            logdir=logdir,
            every=self.every,
            optimizer=self._optimizer,
            overwrite=self.overwrite,
            **kwargs,
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
        if not torch.is_grad_enabled() or self.monitor is None or self._diagnosing:
            return  # evaluation, or the diagnosis's own pass
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None:
            loss = getattr(output, "loss", None)
        if self.diagnose and not args:
            self._inputs = dict(kwargs)
            if not self._checked and isinstance(loss, torch.Tensor):
                self._checked = True
                self._loss_fn = checked_model_loss(
                    module, kwargs.get("labels"), output, loss, kwargs.get("num_items_in_batch")
                )
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

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        every = self.diagnose_every
        if (
            self.diagnose
            and every is not None
            and state.is_world_process_zero
            and state.global_step % every == 0
        ):
            self._diagnose(final=False)

    def _diagnose(self, *, final: bool) -> None:
        """Diagnose on the last micro-batch seen and store it with the run; never raises."""
        mon, model, inputs = self.monitor, self._model, self._inputs
        if mon is None or model is None or mon.stopped is not None:
            return
        if inputs is None:
            if final:
                warnings.warn(
                    "GradsightTrainerCallback: no verdicts for this run: the model was "
                    "called with no keyword inputs in training (the Trainer passes the "
                    "batch as keywords).",
                    stacklevel=2,
                )
            return
        batch, loss_fn = _split(inputs, self._loss_fn)
        if loss_fn is self._loss_fn:  # the model's loss function of its logits
            model = _Logits(model)
        if loss_fn is None:
            if final:
                warnings.warn(
                    "GradsightTrainerCallback: no verdicts for this run: the model returned "
                    "no loss in training (a Trainer subclass computing its own loss?); "
                    "diagnose with gradsight.diagnose(model, batch, loss_fn).",
                    stacklevel=2,
                )
            return
        self._diagnosing = True
        try:
            from gradsight.diagnosis import diagnose

            with mon.paused(), torch.inference_mode(False), torch.enable_grad():
                d = diagnose(model, batch, loss_fn, optimizer=_stepping(self._optimizer))
        except Exception as exc:  # the run's data matter more than the verdict
            warnings.warn(f"GradsightTrainerCallback: diagnosis failed: {exc}", stacklevel=2)
            return
        finally:
            self._diagnosing = False
        mon.write_diagnosis(d)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        mon = self.monitor
        if mon is None or mon.closed:
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.diagnose and state.is_world_process_zero:
            self._diagnose(final=True)
        mon.close()
        if self._tb is not None:
            self._tb.close()
        if self.write_report and state.is_world_process_zero:
            try:
                from gradsight.report import report as write_report

                self.report_path = write_report(mon.logdir)
            except Exception as exc:  # the run is stored; the report can be made later
                warnings.warn(f"GradsightTrainerCallback: report failed: {exc}", stacklevel=2)


#: Arguments of the model's forward that are not inputs of the diagnosis's batch.
_NOT_INPUTS = frozenset({"labels", "num_items_in_batch", "return_dict", "return_loss"})


def _run_name(output_dir: Any) -> str:
    """The run's name: the output directory's name (``out`` for ``./out/``)."""
    path = Path(str(output_dir))
    return path.name or path.resolve().name or "gradsight"


def _split(
    inputs: dict[str, Any], loss_fn: Callable[[Any, Any], torch.Tensor] | None
) -> tuple[tuple[dict[str, Any], Any], Callable[[Any, Any], torch.Tensor] | None]:
    """The diagnosis's ``(inputs, targets)`` and ``loss_fn`` from a training call's kwargs."""
    labels = inputs.get("labels")
    if loss_fn is not None:
        return ({k: v for k, v in inputs.items() if k not in _NOT_INPUTS}, labels), loss_fn
    if labels is None:
        return (inputs, None), None
    # The model computes its loss from the labels among its inputs.
    kept = {k: v for k, v in inputs.items() if k not in _NOT_INPUTS or k == "labels"}
    return (kept, labels), _returned_loss


def _returned_loss(outputs: Any, targets: Any) -> torch.Tensor:
    del targets  # among the inputs: the model computed its loss
    loss: torch.Tensor = outputs["loss"]
    return loss


def _stepping(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer for the diagnosis, unless a schedule has brought an lr to 0 (the end
    of a linear decay): the step a layer gets is then the stable one, 2/λmax."""
    if optimizer is None or any(not g.get("lr", 0) > 0 for g in optimizer.param_groups):
        return None
    return optimizer


class _Logits(torch.nn.Module):
    """The model as returning its ``logits`` tensor (for the Gauss-Newton curvature,
    which needs the tensor the loss is computed from), with the very same submodules,
    parameters and buffers: layer names, hooks and state are the model's own."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training
        object.__setattr__(self, "_inner", model)  # not a submodule: names stay unprefixed

    def forward(self, **inputs: Any) -> torch.Tensor:
        inner: torch.nn.Module = self.__dict__["_inner"]
        logits: torch.Tensor = inner(**inputs)["logits"]
        return logits
