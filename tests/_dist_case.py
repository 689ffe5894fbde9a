"""A small deterministic training case shared by the distributed tests and their workers.

The same global batches are trained by one process (the reference) and by W ranks that
each take a contiguous shard of every batch (DDP), so their measurements can be compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradsight

STEPS = 3
GLOBAL_BATCH = 32
LR = 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():  # some ReLU units dead on part of the batch, some on all of it
        model[2].bias.copy_(torch.linspace(-3.0, 1.0, 16, dtype=torch.float64))
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> Any:
    n = GLOBAL_BATCH // world
    x, y = batch
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def train(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    logdir: Path,
    *,
    forward: nn.Module | None = None,
    distributed: bool | None = None,
    diagnose: bool = False,
    curvature_every: int | None = 2,
) -> gradsight.Monitor:
    """Train ``STEPS`` SGD steps under a Monitor (``forward``: e.g. the DDP wrapper)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    run = forward if forward is not None else model
    with gradsight.Monitor(
        run,
        logdir=logdir,
        optimizer=opt,
        activation_samples=None,
        diagnose_at_close=diagnose,  # diagnose() is tested elsewhere; it costs seconds
        distributed=distributed,
        curvature_every=curvature_every,  # steps 0 and 2: products averaged over ranks
    ) as mon:
        for x, y in data:
            opt.zero_grad()
            loss = loss_fn(run(x), y)
            loss.backward()
            mon.step(loss, batch=(x, y), loss_fn=loss_fn)
            opt.step()
    return mon


def torchrun(script: Path, *args: str, timeout: float = 150) -> None:
    """Run ``script`` on 2 CPU ranks (gloo) with torchrun; fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def table(run: gradsight.store.Run) -> dict[tuple[int, str, str], float]:
    """A run's values by (step, layer, metric)."""
    return {
        (int(s), str(layer), str(m)): float(v)
        for s, layer, m, v in zip(run.steps, run.layers, run.metrics, run.values, strict=True)
    }
