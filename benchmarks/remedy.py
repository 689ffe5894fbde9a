"""Remedy benchmark: gradsight.optim.GaussNewton against SGD and Adam on deep sigmoid MLPs.

On digits (Xavier sigmoid MLP, width 64, batch 64), every SGD and Adam learning rate in
1e-4 … 1 gets the same epoch budget; the table gives each optimizer's best held-out
accuracy and the wall-clock training time (evaluation excluded) to 90 %. Exit status 1
when GaussNewton misses 90 % on the 6-layer net or reaches it later than the best
baseline.

    flock /tmp/gradsight-bench.lock python benchmarks/remedy.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradsight
from gradsight.data import load_digits
from gradsight.demo.models import mlp
from gradsight.optim import make_optimizer, step_on_batch

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
TARGET = 0.9


def run(
    depth: int, make: Callable[[nn.Module], torch.optim.Optimizer], epochs: int, seed: int = 0
) -> tuple[float, float | None, int | None]:
    """Best held-out accuracy, training seconds to TARGET (None if never), its epoch."""
    (x, y), (xt, yt) = load_digits()
    torch.manual_seed(seed)
    model = mlp(depth, 64)
    opt = make(model)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.functional.cross_entropy
    train_s, best, hit, hit_epoch = 0.0, 0.0, None, None
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            step_on_batch(opt, model, loss_fn, x[idx], y[idx])
        train_s += time.perf_counter() - t0
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).double().mean())
        best = max(best, acc)
        if acc >= TARGET and hit is None:
            hit, hit_epoch = train_s, epoch + 1
            if depth <= 6:
                break  # time-to-target is the measure; later epochs cannot change it
    return best, hit, hit_epoch


def diagnosis_line(depth: int) -> str:
    (x, y), _ = load_digits()
    torch.manual_seed(0)
    d = gradsight.diagnose(mlp(depth, 64), (x[:512], y[:512]), nn.CrossEntropyLoss(), lr=0.1)
    steps = [la.optimal_step for la in d.layers if la.optimal_step]
    statuses = ", ".join(f"{la.name}:{la.status}" for la in d.layers)
    return (
        f"diagnosis at init ({depth} layers): {statuses}; curvature-optimal steps span "
        f"{min(steps):.3g} … {max(steps):.3g} (×{max(steps) / min(steps):.2g})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short budget (under 10 min)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/remedy.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base_epochs = 30 if args.quick else 200
    gn_epochs = 15 if args.quick else 40
    lines = [
        f"# Remedy benchmark ({'quick' if args.quick else 'full'})",
        "",
        f"Machine: {_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Baselines: {base_epochs} epochs per learning "
        f"rate; GaussNewton: {gn_epochs} epochs, defaults. Batch 64, width 64, Xavier.",
        "",
    ]
    status = 0
    for depth in (6, 10):
        rows = []
        for name, factory in (
            ("SGD", lambda lr: lambda m: torch.optim.SGD(m.parameters(), lr=lr)),
            ("Adam", lambda lr: lambda m: torch.optim.Adam(m.parameters(), lr=lr)),
        ):
            for lr in LRS:
                best, hit, ep = run(depth, factory(lr), base_epochs)
                rows.append((f"{name} lr={lr:g}", best, hit, ep))
                print(rows[-1], flush=True)
        gn = run(depth, make_optimizer, gn_epochs)
        print(("GaussNewton", *gn), flush=True)
        hits = [r for r in rows if r[2] is not None]
        fastest = min(hits, key=lambda r: r[2]) if hits else None
        best_acc = max(rows, key=lambda r: r[1])
        lines += [
            f"## {depth}-layer sigmoid MLP",
            "",
            "| optimizer | best held-out acc | train s to 90 % | epoch |",
            "| --- | --- | --- | --- |",
        ]
        for label, best, hit, ep in [*rows, ("**gradsight GaussNewton**", *gn)]:
            lines.append(
                f"| {label} | {best:.1%} | {'—' if hit is None else f'{hit:.2f}'} | "
                f"{'—' if ep is None else ep} |"
            )
        lines += ["", f"Best baseline accuracy: {best_acc[0]} at {best_acc[1]:.1%}."]
        if fastest:
            ratio = "" if gn[1] is None else f"; GaussNewton/baseline time {gn[1] / fastest[2]:.2f}"
            lines.append(f"Fastest baseline to 90 %: {fastest[0]}, {fastest[2]:.2f} s{ratio}.")
        lines += ["", diagnosis_line(depth), ""]
        if depth == 6 and (gn[1] is None or (fastest is not None and gn[1] > fastest[2])):
            status = 1
    text = "\n".join(lines)
    print(text)
    if args.write:
        out = Path(__file__).parent / "results" / "remedy.md"
        out.write_text(text + "\n", encoding="utf-8")
    return status


def _cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if "Model name" in ln)
        cores = next(
            ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("CPU(s)")
        )
        return f"{model} ({cores} CPUs)"
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
