"""Time gradsight.diagnose (curvature included) against one forward+backward pass.

Models of issue 13: GPT-2 from transformers' ``GPT2Config(n_layer=4, n_embd=256,
n_head=4, vocab_size=2048)`` on 8×128 tokens; a 100-layer width-256 tanh MLP on 512
samples; a 12-layer residual CNN (16 channels, 8×8 inputs); transformers' ResNet with
its default config; and (``--large``) a GPT-2-small-shaped model (12 × 768, 4×256).

Per model it prints the parameter count, the layers diagnosed, the forward+backward time
(median of 3 steps before and 3 after diagnose, in the same process, so that both see
the same load), the diagnose time, their ratio, the same ratio in process CPU time (less
sensitive to other processes on a shared machine, though OpenMP threads that spin while
waiting for a descheduled sibling count too), the fraction of layers with curvature, and
the peak resident memory of diagnose over that of a training step (each measured in a
fresh subprocess, ``ru_maxrss``).

Run: ``python benchmarks/diagnose.py [--large] [--only NAME]`` (2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradsight

ce_loss = nn.functional.cross_entropy


class _Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.relu(self.c1(torch.relu(x))))


class _Logits(nn.Module):
    """A transformers model reduced to the tensor the loss uses."""

    def __init__(self, inner: nn.Module, key: str) -> None:
        super().__init__()
        self.inner = inner
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.inner(x), self.key)
        return out.transpose(1, 2) if out.ndim == 3 else out


def build(name: str) -> tuple[nn.Module, Any, Callable[[Any, Any], torch.Tensor]]:
    torch.manual_seed(0)
    ce = nn.functional.cross_entropy
    if name in ("gpt2", "gpt2-small"):
        from transformers import GPT2Config, GPT2LMHeadModel

        if name == "gpt2":
            cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048)
            n, t = 8, 128
        else:
            cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12)
            n, t = 4, 256
        cfg.attn_implementation = "eager"
        model = _Logits(GPT2LMHeadModel(cfg), "logits")
        ids = torch.randint(0, cfg.vocab_size, (n, t))
        return model, (ids, torch.roll(ids, -1, dims=1)), ce
    if name == "mlp":
        layers: list[nn.Module] = []
        for _ in range(100):
            layers += [nn.Linear(256, 256), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(256, 10))
        return model, (torch.randn(512, 256), torch.randint(0, 10, (512,))), ce
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            *[_Block(16) for _ in range(6)],
            nn.Flatten(),
            nn.Linear(16 * 64, 10),
        )
        return model, (torch.randn(128, 3, 8, 8), torch.randint(0, 10, (128,))), ce
    if name == "resnet":
        from transformers import ResNetConfig, ResNetForImageClassification

        model = _Logits(ResNetForImageClassification(ResNetConfig()), "logits")
        return model, (torch.randn(8, 3, 224, 224), torch.randint(0, 2, (8,))), ce
    raise SystemExit(f"unknown model {name}")


def _step(model: nn.Module, batch: Any, loss_fn: Any) -> None:
    loss = loss_fn(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    del grads


def measure(name: str, what: str) -> dict[str, Any]:
    """Run in a subprocess: time (or peak memory of) one kind of call."""
    torch.set_num_threads(2)
    model, batch, loss_fn = build(name)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    _step(model, batch, loss_fn)  # warm-up
    times, cpu = [], []
    for _ in range(3):
        start, c0 = time.perf_counter(), time.process_time()
        _step(model, batch, loss_fn)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - c0)
    if what == "diagnose":
        # One-time costs of a process (imports on first use) on a tiny model first.
        tiny = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        gradsight.diagnose(tiny, (torch.randn(16, 4), torch.randint(0, 3, (16,))), ce_loss)
        start, c0 = time.perf_counter(), time.process_time()
        d = gradsight.diagnose(model, batch, loss_fn)
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = time.process_time() - c0
        out["layers"] = len(d.layers)
        out["with_curvature"] = sum(layer.lambda_max is not None for layer in d.layers)
        out["status"] = d.status
        for _ in range(3):  # the step again, under the same load as diagnose
            start, c0 = time.perf_counter(), time.process_time()
            _step(model, batch, loss_fn)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - c0)
    out["step_seconds"] = statistics.median(times)
    out["step_cpu_seconds"] = statistics.median(cpu)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _sub(name: str, what: str) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, __file__, "--child", name, what],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true", help="add the GPT-2-small-shaped model")
    ap.add_argument("--only", default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    names = ["gpt2", "mlp", "cnn", "resnet"] + (["gpt2-small"] if args.large else [])
    if args.only:
        names = [args.only]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 2 threads; load average before: {os.getloadavg()}"
    )
    print()
    print(
        "| model | parameters | layers (with curvature) | forward+backward | diagnose | "
        "ratio | CPU-time ratio | peak memory ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        step = _sub(name, "step")  # peak memory of training steps alone
        diag = _sub(name, "diagnose")  # diagnose between steps, timed in one process
        if "error" in step or "error" in diag:
            print(f"| {name} | error: {step.get('error') or diag.get('error')} |")
            continue
        print(
            f"| {name} | {step['params'] / 1e6:.1f}M | {diag['layers']} "
            f"({diag['with_curvature']}) | {diag['step_seconds']:.3f} s | "
            f"{diag['seconds']:.2f} s | {diag['seconds'] / diag['step_seconds']:.1f}× | "
            f"{diag['cpu_seconds'] / diag['step_cpu_seconds']:.1f}× | "
            f"{diag['maxrss_mb'] / step['maxrss_mb']:.2f} ({diag['maxrss_mb']:.0f} / "
            f"{step['maxrss_mb']:.0f} MB) |",
            flush=True,
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
