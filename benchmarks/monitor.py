"""Overhead of ``gradsight.Monitor`` on a training step, and its peak memory.

Run:  flock /tmp/gradsight-bench.lock .venv/bin/python benchmarks/monitor.py

One process, two copies of each model (same initialization): one plain, one with a
Monitor attached for the whole run. Blocks of steps alternate between the variants,
and the table reports the median time of a step per variant and its ratio to the plain
step's median. 2 CPU threads (``--threads``); the allocator is pinned (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``: small-CNN step times otherwise move 30% with page faults),
re-executing this script with those variables set if they are not.

Peak memory: each variant runs alone in a fresh subprocess; after two warm-up steps (and
a first write of the run store, which loads pyarrow's writer) the table gives the peak
resident set while training (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
the resident set just before.

Cases: ``mlp-sigmoid``, ``mlp-relu``: 10-layer width-256 MLP on digits, batch 256, SGD;
``cnn``: three conv blocks and a two-layer head, batch 64 of 3×32×32, SGD; ``gpt2``: a
GPT-2 from ``transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048)``
(dropout on, as configured), language-model loss on a batch of 8×128 random tokens,
AdamW (lr 1e-4). Every runner keeps its own RNG state (dropout masks), so that after the
timing the parameters of every variant are compared bitwise with the plain run's (the
``bitwise`` column).

Variants:

* ``plain``: zero_grad, forward, loss, backward, optimizer step;
* ``floor``: the least that any hook-based per-layer monitor does, for reference: a
  forward hook on every parameter-owning and activation module that puts a tensor hook
  on its output, the hook taking the gradient's norm, and after backward one
  ``torch._foreach_norm`` of the parameter gradients and a ``torch.stack`` of all norms
  (no activation statistics, no bookkeeping, nothing stored);
* ``monitor``: the same with ``mon.step(loss)`` after backward (cheap tier, every=1):
  grad norms, signal norms, activation statistics, the loss;
* ``monitor+opt``: ``Monitor(..., optimizer=opt)``: also the learning rate and, every
  10th step (``update_every``), the update-to-weight ratio ‖Δθ‖/‖θ‖, which needs a copy
  of the parameters before the optimizer step;
* ``monitor every=10``: the cheap tier on every 10th step only (hooks idle in between).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradsight
from gradsight.data import load_digits
from gradsight.demo.models import mlp
from gradsight.probes.activations import module_activation

_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
VARIANTS = ("plain", "floor", "monitor", "monitor+opt", "monitor every=10")


def small_cnn() -> nn.Sequential:
    """Three conv blocks (32, 64, 64 channels) and a two-layer head, for 3×32×32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def gpt2() -> nn.Module:
    """GPT-2 with 4 layers of width 256 and a 2048-token vocabulary (built, not downloaded)."""
    import transformers

    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048)
    config.bos_token_id = config.eos_token_id = 0  # the default 50256 is outside this vocabulary
    return transformers.GPT2LMHeadModel(config)


def case(name: str) -> tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor]:
    """Model factory and one fixed batch for a benchmark case."""
    if name == "gpt2":
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 2048, (8, 128), generator=gen)
        return gpt2, tokens, tokens
    if name.startswith("mlp"):
        activation = name.split("-")[1]
        (x, y), _ = load_digits()
        init = "he" if activation == "relu" else "xavier"
        return lambda: mlp(10, 256, activation=activation, init=init), x[:256], y[:256]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return small_cnn, x, y


class Runner:
    """One model copy, its optimizer and (optionally) a Monitor; ``run(n)`` trains n steps."""

    def __init__(self, variant: str, factory: Callable[[], nn.Module], logdir: Path) -> None:
        torch.manual_seed(0)
        self.model = factory()
        self.lm = factory is gpt2
        self.opt: torch.optim.Optimizer = (
            torch.optim.AdamW(self.model.parameters(), lr=1e-4)
            if self.lm
            else torch.optim.SGD(self.model.parameters(), lr=0.01)
        )
        self.rng = torch.get_rng_state()  # this copy's own dropout masks
        self.mon = None
        self.cpu = 0.0
        self.floor: Callable[[], torch.Tensor] | None = None
        if variant == "floor":
            self.floor = bare_hooks(self.model)
        if variant not in ("plain", "floor"):
            self.mon = gradsight.Monitor(
                self.model,
                logdir=logdir / variant.replace(" ", "-"),
                every=10 if variant.endswith("every=10") else 1,
                optimizer=self.opt if variant == "monitor+opt" else None,
                diagnose_at_close=False,
            )

    def run(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
        """Seconds of wall-clock time per step; ``self.cpu``: process CPU seconds per step."""
        model, opt, mon = self.model, self.opt, self.mon
        torch.set_rng_state(self.rng)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            if self.lm:
                loss = model(input_ids=x, labels=y).loss
            else:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if mon is not None:
                mon.step(loss)
            elif self.floor is not None:
                self.floor()
            opt.step()
        wall = (time.perf_counter() - t0) / steps
        self.cpu = (time.process_time() - c0) / steps
        self.rng = torch.get_rng_state()
        return wall


def bare_hooks(model: nn.Module) -> Callable[[], torch.Tensor]:
    """Install the ``floor`` variant's hooks; returns what it calls after backward."""
    norms: list[torch.Tensor] = []
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_hook(grad: torch.Tensor) -> None:
        with torch.no_grad():
            norms.append(torch.linalg.vector_norm(grad))

    def forward_hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(grad_hook)

    for m in model.modules():
        owns = any(True for _ in m.parameters(recurse=False))
        # The activation modules the Monitor hooks too (GPT-2's NewGELUActivation included).
        if owns or module_activation(m) is not None:
            m.register_forward_hook(forward_hook)

    def after_backward() -> torch.Tensor:
        with torch.no_grad():
            grad_norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
            out = torch.stack([*grad_norms, *norms])
        norms.clear()
        return out

    return after_backward


def bitwise_equal(a: nn.Module, b: nn.Module) -> bool:
    """Whether every parameter of ``a`` has exactly the bits of ``b``'s (NaN included)."""
    return all(
        torch.equal(p.detach().view(torch.uint8), q.detach().view(torch.uint8))
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def time_case(name: str, rounds: int, block: int) -> dict[str, float]:
    factory, x, y = case(name)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {v: Runner(v, factory, Path(tmp)) for v in VARIANTS}
        for r in runners.values():  # warm-up: allocator, hooks, first flush
            r.run(x, y, 2 * block)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(rounds):  # alternate, reversing the order every other round
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for v in order:
                times[v].append(runners[v].run(x, y, block))
                cpu[v].append(runners[v].cpu)
        # Every variant ran the same steps on the same batch with the same dropout masks.
        same = {
            v: float(bitwise_equal(r.model, runners["plain"].model)) for v, r in runners.items()
        }
        for r in runners.values():
            if r.mon is not None:
                r.mon.close()
    return {
        **{f"{v}:bitwise": same[v] for v in VARIANTS},
        **{v: statistics.median(t) for v, t in times.items()},
        **{f"{v}:min": min(t) for v, t in times.items()},
        **{f"{v}:cpu": statistics.median(t) for v, t in cpu.items()},
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak(name: str, variant: str, steps: int) -> float:
    """Peak RSS growth (MiB) over the RSS before training; run in a fresh process."""
    factory, x, y = case(name)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(variant, factory, Path(tmp))
        runner.run(x, y, 2)  # first allocations and, below, the run store's first write
        if runner.mon is not None:
            runner.mon.flush()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        runner.run(x, y, steps)
        peak = _status_kib("VmHWM")
        if runner.mon is not None:
            runner.mon.close()
    return (peak - before) / 1024


def peak_memory(name: str, variant: str, steps: int, threads: int = 2) -> float:
    """:func:`measure_peak` in a fresh subprocess (so that variants do not share a heap)."""
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import monitor as b; "
        f"torch.set_num_threads({threads}); "
        f"print(b.measure_peak({name!r}, {variant!r}, {steps}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    return float(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="alternation rounds (default 30)")
    p.add_argument("--block", type=int, default=10, help="steps per block (default 10)")
    p.add_argument("--cases", nargs="+", default=["mlp-sigmoid", "mlp-relu", "cnn", "gpt2"])
    p.add_argument("--memory-steps", type=int, default=20)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2; 1 on a machine whose cores other jobs load: "
        "two threads then wait on each other)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args()
    if any(os.environ.get(k) != v for k, v in _ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_ENV})
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"{args.rounds} alternating rounds of {args.block} steps; medians per step\n")
    print(
        "| case | variant | median step (ms) | ratio of medians | ratio of fastest blocks "
        "| ratio of CPU time | peak RSS growth (MiB) | bitwise |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    results = {}
    for name in args.cases:
        med = time_case(name, args.rounds, args.block)
        mem = {v: peak_memory(name, v, args.memory_steps, args.threads) for v in VARIANTS}
        results[name] = {"median_s": med, "peak_rss_mib": mem}
        for v in VARIANTS:
            print(
                f"| {name} | {v} | {med[v] * 1e3:.2f} | {med[v] / med['plain']:.3f} | "
                f"{med[v + ':min'] / med['plain:min']:.3f} | "
                f"{med[v + ':cpu'] / med['plain:cpu']:.3f} | {mem[v]:.1f} | "
                f"{'yes' if med[v + ':bitwise'] else 'NO'} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
