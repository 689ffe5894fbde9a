"""Overhead of gradsight through the Lightning callback, next to a plain loop's Monitor.

Run:  flock /tmp/gradsight-bench.lock .venv/bin/python benchmarks/integrations.py

Same method as ``benchmarks/monitor.py``: one process, 2 CPU threads, allocator pinned
(re-executing with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set), blocks
of steps alternating between variants whose model copies share one initialization,
and the median time of a step per variant with its ratio to the plain median.

Variants, on the 10-layer width-256 MLP on digits (batch 256) and the small CNN:

* ``loop``: a plain PyTorch loop (zero_grad, forward, cross-entropy, backward, SGD);
* ``loop+monitor``: the same with ``gradsight.Monitor(..., optimizer=opt)``;
* ``lightning``: ``pl.Trainer.fit`` of the same model and batch (no logger, no
  checkpointing, no progress bar); a step is timed from ``on_train_batch_start`` to
  ``on_train_batch_end`` (forward, backward, optimizer step, callbacks);
* ``lightning+gradsight``: the same with ``GradsightCallback`` (every=1, no logger sink).

Each Lightning block is one ``fit`` of ``block`` steps on a fresh Trainer (the model
copy keeps training); the first step of each fit is left out (Trainer warm-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
VARIANTS = ("loop", "loop+monitor", "lightning", "lightning+gradsight")


def case(name: str) -> tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor]:
    """The cases of benchmarks/monitor.py (the same models and batches), so that the
    overheads of the two tables compare."""
    sys.path.insert(0, str(Path(__file__).parent))
    from monitor import case as monitor_case

    return monitor_case(name)


class LoopRunner:
    def __init__(self, model: nn.Module, logdir: Path | None) -> None:
        import gradsight

        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.mon = (
            None
            if logdir is None
            else gradsight.Monitor(
                model, logdir=logdir, optimizer=self.opt, diagnose_at_close=False
            )
        )

    def run(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.opt.zero_grad()
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            if self.mon is not None:
                self.mon.step(loss)
            self.opt.step()
            times.append(time.perf_counter() - t0)
        return times


class LightningRunner:
    def __init__(self, model: nn.Module, logdir: Path | None) -> None:
        import pytorch_lightning as pl

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = model

            def training_step(self, batch: Any, idx: int) -> torch.Tensor:
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.01)

        class Timer(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_train_batch_start(self, *args: Any) -> None:
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                self.times.append(time.perf_counter() - self.t0)

        self.pl = pl
        self.module = Module()
        self.timer_cls = Timer
        self.logdir = logdir
        self.fits = 0

    def run(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
        from gradsight.integrations.lightning import GradsightCallback

        data = torch.utils.data.TensorDataset(
            x.repeat(steps + 1, *[1] * (x.ndim - 1)), y.repeat(steps + 1)
        )
        loader = torch.utils.data.DataLoader(data, batch_size=len(x))
        timer = self.timer_cls()
        callbacks: list[Any] = [timer]
        if self.logdir is not None:
            # Each block is a fit: its end-of-training diagnosis (a one-off, outside the
            # timed steps) would only lengthen the run.
            callbacks.append(
                GradsightCallback(
                    self.logdir / f"fit{self.fits}", log_metrics=False, report=False, diagnose=False
                )
            )
        self.fits += 1
        trainer = self.pl.Trainer(
            max_epochs=1,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(self.module, loader)
        return timer.times[1:]


def time_case(name: str, rounds: int, block: int, logdir: Path) -> dict[str, list[float]]:
    factory, x, y = case(name)
    runners: dict[str, Any] = {}
    for v in VARIANTS:
        torch.manual_seed(0)
        model = factory()
        tracked = logdir / name / v if "+" in v else None
        runners[v] = (LoopRunner if v.startswith("loop") else LightningRunner)(model, tracked)
    for v in VARIANTS:  # warm-up
        runners[v].run(x, y, block)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            times[v] += runners[v].run(x, y, block)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=10, help="steps per block (default 10)")
    p.add_argument("--cases", nargs="*", default=["mlp-sigmoid", "small-cnn"])
    args = p.parse_args()
    if any(os.environ.get(k) != v for k, v in _ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_ENV})
    torch.set_num_threads(2)
    import logging

    for logger in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    import platform
    import subprocess

    cpu = platform.processor() or "unknown CPU"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    import pytorch_lightning as pl

    print(
        f"Machine: {cpu}; {os.cpu_count()} logical cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; pytorch-lightning {pl.__version__}"
    )
    print(f"{args.rounds} alternating rounds of {args.block} steps; medians per step\n")
    print("| case | variant | median step (ms) | ratio to its plain variant |")
    print("| --- | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            times = time_case(name, args.rounds, args.block, Path(tmp))
            med = {v: statistics.median(t) for v, t in times.items()}
            for v in VARIANTS:
                base = med["loop"] if v.startswith("loop") else med["lightning"]
                print(f"| {name} | {v} | {1e3 * med[v]:.2f} | {med[v] / base:.3f} |")


if __name__ == "__main__":
    main()
