"""Time gradsight.diagnose on the 10-layer width-64 sigmoid MLP, batch 512 (target < 10 s).

Prints a table of the signal-only pass (curvature=False) and the full diagnosis against
the baseline of one plain forward+backward pass, medians of several runs in one process.

Run: ``python benchmarks/diagnose.py`` (2 threads, as on the CI machine).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradsight
from gradsight.data import load_digits
from gradsight.demo.models import mlp


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    (x, y), _ = load_digits()
    batch = (x[:512], y[:512])
    ce = nn.functional.cross_entropy
    rows = []
    for activation, init in (("sigmoid", "xavier"), ("relu", "he")):
        model = mlp(10, 64, activation=activation, init=init)

        def plain(model: nn.Module = model) -> None:
            grads = torch.autograd.grad(ce(model(batch[0]), batch[1]), list(model.parameters()))
            del grads

        def signal(model: nn.Module = model) -> None:
            gradsight.diagnose(model, batch, ce, curvature=False)

        def full(model: nn.Module = model) -> None:
            gradsight.diagnose(model, batch, ce)

        full()  # warm-up
        base = _median_seconds(plain, 20)
        t_signal = _median_seconds(signal, 5)
        t_full = _median_seconds(full, 5)
        rows.append((activation, base, t_signal, t_full))
    print(
        f"diagnose(), 10-layer width-64 MLP on digits, batch 512, {torch.get_num_threads()} threads"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print()
    print("| model | forward+backward | diagnose(curvature=False) | diagnose() | target |")
    print("| --- | --- | --- | --- | --- |")
    for act, base, t_signal, t_full in rows:
        verdict = "met" if t_full < 10 else "MISSED"
        print(
            f"| {act} | {base * 1e3:.1f} ms | {t_signal * 1e3:.1f} ms ({t_signal / base:.1f}×) | "
            f"{t_full:.2f} s ({t_full / base:.0f}×) | < 10 s: {verdict} |"
        )


if __name__ == "__main__":
    main()
