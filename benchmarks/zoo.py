"""Time ``diagnose(..., curvature=False)`` against one forward+backward pass on the zoo.

The zoo is ``tests/zoo`` (GPT-2, BERT and ResNet from transformers configs, torch
Transformer encoder/decoder, RNN/LSTM/GRU, conv+BatchNorm, residual, frozen backbone,
dict multi-head, tanh and ReLU MLPs), both twins of each case. The goal (issue 12): the
signal-flow diagnosis costs at most 3× one forward+backward pass.

Both are timed in one process, alternately (so a change of machine load hits both), each
the median of ``--repeats`` runs after a warm-up; the forward+backward pass is
``torch.autograd.grad`` of the loss with respect to the trainable parameters, the same
pass ``diagnose`` makes.

Run: ``flock /tmp/gradsight-bench.lock python benchmarks/zoo.py [--write]`` (2 threads;
``--write`` also writes ``benchmarks/results/zoo.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradsight
from gradsight.probes import SignalProbe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo import CASES, Built  # the zoo lives with the tests

GOAL = 3.0
OUT = Path(__file__).with_name("results") / "zoo.md"


def _forward(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def step(built: Built) -> None:
    """One forward and backward pass, as training makes it."""
    inputs, targets = built.batch
    loss = built.loss_fn(_forward(built.model, inputs), targets)
    params = [p for p in built.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    del grads


def diagnose(built: Built, lr: float) -> None:
    gradsight.diagnose(built.model, built.batch, built.loss_fn, lr=lr, curvature=False)


def probed_step(built: Built) -> None:
    """The forward+backward pass with the signal probe's hooks as diagnose sets them, and
    nothing else: the part of diagnose's cost that is instrumentation."""
    params = [p for p in built.model.parameters() if p.requires_grad]
    with SignalProbe(built.model, gradient_edges=True) as probe:
        inputs, targets = built.batch
        loss = built.loss_fn(_forward(built.model, inputs), targets)
        probe.end_forward()
        extra = [*probe.extra_inputs, *probe.gradient_edges]
        grads = torch.autograd.grad(loss, [*params, *extra], allow_unused=True)
        probe.take_gradients(grads[len(params) + len(probe.extra_inputs) :])


def time_pair(built: Built, lr: float, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a forward+backward pass, of the same with the probe's hooks, and
    of diagnose, measured alternately."""
    step(built)
    probed_step(built)
    diagnose(built, lr)  # warm-up: first-call costs (kernels, lazy imports) are not timed
    steps, probed, diags = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        step(built)
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        probed_step(built)
        probed.append(time.perf_counter() - start)
        start = time.perf_counter()
        diagnose(built, lr)
        diags.append(time.perf_counter() - start)
    return statistics.median(steps), statistics.median(probed), statistics.median(diags)


def fixed_cost(repeats: int) -> tuple[float, float, float]:
    """diagnose's cost on a one-layer model (Linear(4, 2), 8 samples), and that model's
    forward+backward pass: what every call pays whatever the model."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 2)
    batch = (torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen))
    tiny = Built(model, batch, torch.nn.functional.cross_entropy)
    return time_pair(tiny, 0.1, repeats)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--write", action="store_true", help=f"write {OUT}")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    tiny_step, _, tiny_diag = fixed_cost(args.repeats * 3)
    rows = []
    met = 0
    total = 0
    for case in CASES:
        for name, twin in case.twins().items():
            built = twin.build(0)
            params = sum(p.numel() for p in built.model.parameters())
            fb, hooked, dg = time_pair(built, twin.lr, args.repeats)
            ratio = dg / fb
            total += 1
            met += ratio <= GOAL
            rows.append(
                f"| {case.key} | {name} | {params:,} | {fb * 1e3:.2f} ms | "
                f"{hooked / fb:.1f}× | {dg * 1e3:.2f} ms | {ratio:.1f}× | "
                f"{'met' if ratio <= GOAL else 'not met'} |"
            )
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    lines = [
        "# benchmarks/zoo.py — latest results",
        "",
        f"`diagnose(model, batch, loss_fn, lr, curvature=False)` over one forward+backward "
        f"pass, on every zoo model (tests/zoo), medians of {args.repeats} alternating runs in "
        f"one process after a warm-up. Goal: ≤ {GOAL:g}×.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, torch {torch.__version__}, 2 threads; run on "
        f"{datetime.date.today().isoformat()}. The machine is shared with other jobs: load "
        f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1-minute).",
        "",
        f"Every call has a fixed cost, in Python: on a one-layer model (Linear(4, 2), 8 "
        f"samples) diagnose takes {tiny_diag * 1e3:.2f} ms against a {tiny_step * 1e3:.2f} ms "
        "forward+backward pass, so the 3× goal cannot be met below a step of about "
        f"{tiny_diag / 2 * 1e3:.1f} ms; beyond it, each layer adds hooks, norms and a verdict.",
        "",
        "The column *hooks alone* is the forward+backward pass with the signal probe's hooks "
        "as diagnose sets them (forward hooks, the activation watcher, gradients taken at "
        "autograd edges) and nothing else, over the plain pass: the instrumentation's share; "
        "the rest of diagnose's cost is reducing the measurements and judging each layer. "
        "Where SGD's step overshoots by first order (lr·‖g‖² above twice the loss: the "
        "residual and multi-head sick twins), diagnose takes that step to check the claim: "
        "one forward pass more.",
        "",
        "| case | twin | parameters | forward+backward | hooks alone | "
        "diagnose(curvature=False) | ratio | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Goal met on {met} of {total} models.",
        "",
    ]
    if args.write:
        OUT.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[-3:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
