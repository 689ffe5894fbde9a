"""TensorBoard: a Monitor's measurements as TensorBoard scalars, gradients as histograms.

Tags follow one scheme, ``gradsight/<layer>/<metric>``, with ``layer`` the module's
qualified name as in ``model.named_modules()`` and ``model`` for model-level metrics
(``gradsight/model/loss``, ``gradsight/0/grad_norm``, ``gradsight/0/saturation``).
Histograms of each layer's parameter gradients (unscaled: they are taken when the
optimizer steps, after a GradScaler unscaled them) are ``gradsight/<layer>/grad``.

Needs ``tensorboard`` (``pip install 'gradsight[tensorboard]'``); events are written by
``torch.utils.tensorboard.SummaryWriter``. Under torch.distributed, rank 0 writes.

Example::

    from gradsight.integrations.tensorboard import TensorBoardSink

    with gradsight.Monitor(model, logdir="runs/a", optimizer=opt) as mon:
        tb = TensorBoardSink.attach(mon, "tb/a", histogram_every=100)
        ...  # train, calling mon.step(loss) after backward()
    tb.close()
    # tensorboard --logdir tb
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradsight.integrations import TENSORBOARD_AVAILABLE, _missing
from gradsight.integrations.distributed import is_writer
from gradsight.monitor import Monitor
from gradsight.probes.signal import parameter_owners

__all__ = ["TensorBoardSink", "tag"]

#: The layer name used in tags for model-level metrics (layer ``""`` in the run store).
MODEL = "model"


def tag(layer: str, metric: str) -> str:
    """The TensorBoard tag of a measurement: ``gradsight/<layer>/<metric>``.

    Example:
        >>> tag("encoder.0", "grad_norm"), tag("", "loss")
        ('gradsight/encoder.0/grad_norm', 'gradsight/model/loss')
    """
    return f"gradsight/{layer or MODEL}/{metric}"


class TensorBoardSink:
    """Writes the rows a :class:`~gradsight.Monitor` records as TensorBoard scalars.

    Build it with :meth:`attach` (which also adds gradient histograms), or pass it to
    ``monitor.add_sink`` yourself.

    Args:
        log_dir: TensorBoard log directory (ignored when ``writer`` is given).
        writer: An existing ``SummaryWriter`` (or anything with ``add_scalar``,
            ``add_histogram``, ``flush``), e.g. a Lightning TensorBoardLogger's
            ``experiment``.
        metrics: Only these metrics (None: all).

    Raises:
        GradsightError: ``tensorboard`` is not installed.
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: Any = None,
        metrics: Sequence[str] | None = None,
    ) -> None:
        self._owns = writer is None
        if writer is None and is_writer():
            if not TENSORBOARD_AVAILABLE:
                raise _missing("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer  # None on ranks other than 0: they write nothing
        self.metrics = None if metrics is None else frozenset(metrics)
        self._hooks: list[Any] = []

    @classmethod
    def attach(
        cls,
        monitor: Monitor,
        log_dir: str | Path | None = None,
        *,
        writer: Any = None,
        metrics: Sequence[str] | None = None,
        histogram_every: int | None = None,
    ) -> TensorBoardSink:
        """A sink added to ``monitor``; with ``histogram_every`` (and the monitor's
        optimizer), gradient histograms every this many optimizer steps."""
        sink = cls(log_dir, writer=writer, metrics=metrics)
        monitor.add_sink(sink)
        if histogram_every is not None:
            sink.watch_gradients(monitor, every=histogram_every)
        return sink

    def __call__(self, step: int, keys: Sequence[tuple[str, str]], values: np.ndarray) -> None:
        if self.writer is None:
            return
        for (layer, metric), value in zip(keys, values.tolist(), strict=True):
            if self.metrics is None or metric in self.metrics:
                self.writer.add_scalar(tag(layer, metric), value, step)

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        """Add one histogram of each parameter-owning layer's gradient entries now."""
        if self.writer is None:
            return
        for name, module in parameter_owners(model):
            grads = [
                p.grad.detach().reshape(-1)
                for p in module.parameters(recurse=False)
                if p.grad is not None
            ]
            if grads:
                values = torch.cat(grads).float().cpu()
                if torch.isfinite(values).all():
                    self.writer.add_histogram(tag(name, "grad"), values, step)

    def watch_gradients(self, monitor: Monitor, *, every: int) -> None:
        """Histograms of the gradients every ``every`` optimizer steps of the monitor's
        optimizer (taken just before it steps: after a GradScaler unscaled them)."""
        opt = monitor.optimizer
        if opt is None:
            from gradsight._errors import GradsightError

            raise GradsightError(
                "gradient histograms are taken when the optimizer steps; pass "
                "Monitor(..., optimizer=opt), or call sink.histograms(model, step) yourself."
            )

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            step = max(monitor.steps - 1, 0)
            if step % every == 0:
                self.histograms(monitor.model, step)

        self._hooks.append(opt.register_step_pre_hook(hook))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Remove the gradient hooks; flush, and close a writer this sink opened."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.writer is not None:
            self.writer.flush()
            if self._owns:
                self.writer.close()
