"""Benchmark gradsight.curvature against PyHessian, with BackPACK's exact trace as reference.

Run in the benchmark venv (see benchmarks/requirements-curvature.txt):

    .venv-bench/bin/python benchmarks/curvature.py [--write]

Measures, in one process with 2 threads, on a 10-layer width-256 sigmoid MLP (digits,
batch 256, 545,546 parameters) and a small CNN: one gradient; one Hessian-vector product
(both of gradsight's methods, and PyHessian's); one GGN-vector product; traces (exact
from BackPACK's DiagHessian, PyHessian's Hutchinson with 100 probes, gradsight's
Hutch++ (the default), XTrace and Hutchinson with 50); the top eigenvalue (PyHessian's
power iteration at its default tolerance 1e-3, gradsight's Lanczos at tol 1e-3, against a
Lanczos reference at tol 1e-10). Prints a Markdown table; ``--write`` also saves it to
benchmarks/results/curvature.md with the machine it ran on.
"""

from __future__ import annotations

import copy
import inspect
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# glibc reads these at start-up: small-CNN step times move ~30% with the allocator's
# state (page faults), so fix it by re-executing with them set.
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in _MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC})

import torch  # noqa: E402
from backpack import backpack, extend  # noqa: E402
from backpack.extensions import DiagHessian  # noqa: E402
from pyhessian import hessian as pyhessian_hessian  # noqa: E402
from torch import nn  # noqa: E402

import gradsight.curvature as gc  # noqa: E402

# pyhessian/__init__ rebinds the name `hessian` to the class: reach the module itself.
_PYH_MODULE = sys.modules["pyhessian.hessian"]
from gradsight.data import load_digits  # noqa: E402

torch.set_num_threads(2)
SEEDS = range(5)
PYH_TRACE_PROBES = 100
GS_TRACE_PRODUCTS = 50


def sigmoid_mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 64
    for _ in range(9):
        layers += [nn.Linear(width, 256), nn.Sigmoid()]
        width = 256
    layers.append(nn.Linear(256, 10))
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def timeit(fn: Callable[[], Any], repeat: int = 7) -> float:
    """Fastest wall time in milliseconds after one warm-up call.

    The minimum, not the median: the benchmark machine is shared, and interference only
    ever adds time.
    """
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def exact_trace_backpack(model: nn.Module, batch: tuple[Any, Any]) -> float:
    m = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())
    loss = loss_fn(m(batch[0]), batch[1])
    with backpack(DiagHessian()):
        loss.backward()
    return float(sum(p.diag_h.sum() for p in m.parameters()))


class _CountingHVP:
    """Wraps PyHessian's hessian_vector_product to count its products."""

    def __init__(self) -> None:
        self.inner = _PYH_MODULE.hessian_vector_product
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.inner(*args)


def bench(name: str, model: nn.Module, batch: tuple[Any, Any]) -> dict[str, Any]:
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    r: dict[str, Any] = {"name": name, "params": sum(p.numel() for p in params)}

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)

    r["grad_ms"] = timeit(gradient, 21)
    H = gc.HessianOperator(model, batch, loss_fn)
    v = torch.randn(H.shape[0])
    r["hvp_db_ms"] = timeit(lambda: H @ v, 21)
    H_fr = gc.HessianOperator(model, batch, loss_fn, method="forward_over_reverse")
    r["hvp_fr_ms"] = timeit(lambda: H_fr @ v, 11)
    G = gc.GGNOperator(model, batch, loss_fn)
    r["ggn_ms"] = timeit(lambda: G @ v, 21)
    r["build_h_ms"] = timeit(lambda: gc.HessianOperator(model, batch, loss_fn), 11)

    pyh_model = copy.deepcopy(model)  # PyHessian writes .grad and calls .eval()
    pyh = pyhessian_hessian(pyh_model, loss_fn, data=batch, cuda=False)
    vs = [torch.randn_like(p) for p in pyh.params]
    r["hvp_pyh_ms"] = timeit(
        lambda: _PYH_MODULE.hessian_vector_product(pyh.gradsH, pyh.params, vs), 21
    )

    # Traces: exact reference, then estimators over seeds (time includes setup).
    exact = exact_trace_backpack(model, batch)
    r["exact_trace"] = exact
    # Interleaved per seed (PyHessian, then each gradsight method), so that load from
    # other processes on a shared machine hits both sides alike.
    methods = ("xtrace", "hutch++", "hutchinson")
    errs: dict[str, list[float]] = {m: [] for m in ("pyh", *methods)}
    secs: dict[str, list[float]] = {m: [] for m in ("pyh", *methods)}
    ses: dict[str, list[float]] = {m: [] for m in methods}
    for seed in SEEDS:
        torch.manual_seed(seed)
        start = time.perf_counter()
        ph = pyhessian_hessian(copy.deepcopy(model), loss_fn, data=batch, cuda=False)
        value = statistics.fmean(ph.trace(maxIter=PYH_TRACE_PROBES, tol=-1e9))
        secs["pyh"].append(time.perf_counter() - start)
        errs["pyh"].append(abs(value - exact) / abs(exact))
        for method in methods:
            start = time.perf_counter()
            est = gc.trace(
                model, batch, loss_fn, probes=GS_TRACE_PRODUCTS, method=method, seed=seed
            )
            secs[method].append(time.perf_counter() - start)
            errs[method].append(abs(est.estimate - exact) / abs(exact))
            ses[method].append(est.stderr / abs(exact))
    r["pyh_trace_err"] = statistics.median(errs["pyh"])
    r["pyh_trace_ms"] = 1e3 * min(secs["pyh"])
    for method in methods:
        r[f"{method}_err"] = statistics.median(errs[method])
        r[f"{method}_ms"] = 1e3 * min(secs[method])
        r[f"{method}_se"] = statistics.median(ses[method])
        # Per seed, gradsight's time over PyHessian's time in the same stretch of load.
        r[f"{method}_ratio"] = statistics.median(
            a / b for a, b in zip(secs[method], secs["pyh"], strict=True)
        )

    # Top eigenvalue.
    ref = gc.lanczos(H, k=1, tol=1e-10, max_matvecs=200).eigenvalues[0].item()
    r["lambda_max"] = ref
    pyh_n, pyh_e, pyh_ms = [], [], []
    for seed in SEEDS:
        torch.manual_seed(seed)
        ph = pyhessian_hessian(copy.deepcopy(model), loss_fn, data=batch, cuda=False)
        counter = _CountingHVP()
        _PYH_MODULE.hessian_vector_product = counter
        start = time.perf_counter()
        eig, _ = ph.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
        pyh_ms.append(time.perf_counter() - start)
        _PYH_MODULE.hessian_vector_product = counter.inner
        pyh_n.append(counter.calls)
        pyh_e.append(abs(eig[0] - ref) / abs(ref))
    r["pyh_eig_n"] = statistics.median(pyh_n)
    r["pyh_eig_err"] = statistics.median(pyh_e)
    r["pyh_eig_ms"] = 1e3 * min(pyh_ms)
    gs_n, gs_e, gs_ms = [], [], []
    for seed in SEEDS:
        start = time.perf_counter()
        op = gc.HessianOperator(model, batch, loss_fn)
        res = gc.lanczos(op, k=1, tol=1e-3, seed=seed)
        gs_ms.append(time.perf_counter() - start)
        gs_n.append(res.num_matvecs)
        gs_e.append(abs(res.eigenvalues[0].item() - ref) / abs(ref))
    r["gs_eig_n"] = statistics.median(gs_n)
    r["gs_eig_n_max"] = max(gs_n)
    r["gs_eig_err"] = statistics.median(gs_e)
    r["gs_eig_err_max"] = max(gs_e)
    r["gs_eig_ms"] = 1e3 * min(gs_ms)
    # Oracle counts: products each method needs before its estimate is within 1e-3 of
    # the reference (no stopping rule involved).
    lz, pw = [], []
    for seed in SEEDS:
        lz.append(
            next(
                m
                for m in range(1, 60)
                if abs(
                    gc.lanczos(H, 1, tol=0.0, max_matvecs=m, seed=seed).eigenvalues[0].item() - ref
                )
                <= 1e-3 * abs(ref)
            )
        )
        torch.manual_seed(seed)
        vec = [torch.randn_like(p) for p in pyh.params]
        nrm = torch.sqrt(sum((t * t).sum() for t in vec))
        vec = [t / nrm for t in vec]
        it = 0
        while it < 200:
            it += 1
            hv = _PYH_MODULE.hessian_vector_product(pyh.gradsH, pyh.params, vec)
            est = sum((a * b).sum() for a, b in zip(hv, vec, strict=True)).item()
            if abs(est - ref) <= 1e-3 * abs(ref):
                break
            nrm = torch.sqrt(sum((t * t).sum() for t in hv))
            vec = [t / nrm for t in hv]
        pw.append(it)
    r["oracle_lanczos"] = statistics.median(lz)
    r["oracle_power"] = statistics.median(pw)
    return r


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| measurement | "
        + " | ".join(f"{r['name']} ({r['params']:,} params)" for r in results)
        + " |"
    ]
    rows.append("|---|" + "---|" * len(results))

    def row(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
        rows.append(f"| {label} | " + " | ".join(fmt(r) for r in results) + " |")

    row("one gradient", lambda r: f"{r['grad_ms']:.1f} ms")
    row(
        "HVP, gradsight double backward (default)",
        lambda r: f"{r['hvp_db_ms']:.1f} ms = **{r['hvp_db_ms'] / r['grad_ms']:.2f}×** grad",
    )
    row(
        "HVP, gradsight forward-over-reverse",
        lambda r: f"{r['hvp_fr_ms']:.1f} ms = {r['hvp_fr_ms'] / r['grad_ms']:.2f}× grad",
    )
    row(
        "HVP, PyHessian",
        lambda r: f"{r['hvp_pyh_ms']:.1f} ms = {r['hvp_pyh_ms'] / r['grad_ms']:.2f}× grad",
    )
    row(
        "GGN-vector product, gradsight",
        lambda r: f"{r['ggn_ms']:.1f} ms = {r['ggn_ms'] / r['grad_ms']:.2f}× grad",
    )
    row("operator set-up (forward + graph of the gradient)", lambda r: f"{r['build_h_ms']:.1f} ms")
    row("exact trace (BackPACK DiagHessian)", lambda r: f"{r['exact_trace']:.4g}")
    row(
        f"PyHessian Hutchinson, {PYH_TRACE_PROBES} probes: median rel. error / time",
        lambda r: f"{r['pyh_trace_err']:.2%} / {r['pyh_trace_ms']:.0f} ms",
    )
    for method, label in (
        ("hutch++", "Hutch++ (default)"),
        ("xtrace", "XTrace"),
        ("hutchinson", "Hutchinson"),
    ):
        row(
            f"gradsight {label}, {GS_TRACE_PRODUCTS} products: median rel. error (stderr) / time",
            lambda r, m=method: (
                f"{r[m + '_err']:.2%} ({r[m + '_se']:.1%}) / {r[m + '_ms']:.0f} ms "
                f"= {r[m + '_ratio']:.2f}× PyHessian"
            ),
        )
    row("λ_max (Lanczos reference, tol 1e-10)", lambda r: f"{r['lambda_max']:.6g}")
    row(
        "PyHessian power iteration (tol 1e-3): products / median rel. error / time",
        lambda r: f"{r['pyh_eig_n']:g} / {r['pyh_eig_err']:.1e} / {r['pyh_eig_ms']:.0f} ms",
    )
    row(
        "gradsight Lanczos (tol 1e-3): products median (max) / rel. error median (max) / time",
        lambda r: (
            f"{r['gs_eig_n']:g} ({r['gs_eig_n_max']}) / {r['gs_eig_err']:.1e} "
            f"({r['gs_eig_err_max']:.1e}) / {r['gs_eig_ms']:.0f} ms"
        ),
    )
    row(
        "products until within 1e-3 of λ_max (oracle, median): power iteration / Lanczos",
        lambda r: f"{r['oracle_power']:g} / {r['oracle_lanczos']:g}",
    )
    return "\n".join(rows)


DEFAULT_TRACE = inspect.signature(gc.trace).parameters["method"].default


def goals(r: dict[str, Any]) -> list[str]:
    hvp_ratio = r["hvp_db_ms"] / r["grad_ms"]
    m = DEFAULT_TRACE  # the goal is judged on what gradsight.curvature.trace() uses
    trace_ok = r[m + "_err"] <= r["pyh_trace_err"] and r[m + "_ratio"] <= 0.5
    eig_ok = r["gs_eig_err_max"] <= 1e-3 and r["gs_eig_n"] <= 0.5 * r["pyh_eig_n"]
    mark = {True: "met", False: "NOT met"}
    return [
        f"- HVP ≤ 2.5× one gradient: {hvp_ratio:.2f}× — {mark[hvp_ratio <= 2.5]}",
        f"- trace with {GS_TRACE_PRODUCTS} products at ≤ PyHessian's {PYH_TRACE_PROBES}-probe "
        "error "
        f"({m}: {r[m + '_err']:.2%} vs {r['pyh_trace_err']:.2%}) in ≤ half its time "
        f"({r[m + '_ms']:.0f} vs {r['pyh_trace_ms']:.0f} ms, median per-seed ratio "
        f"{r[m + '_ratio']:.2f}): {mark[trace_ok]}",
        f"- top eigenvalue to 1e-3 (max error over seeds {r['gs_eig_err_max']:.1e}) with ≤ half "
        f"the products of PyHessian's power iteration (median {r['gs_eig_n']:g} vs "
        f"{r['pyh_eig_n']:g}; PyHessian's own error {r['pyh_eig_err']:.1e}): {mark[eig_ok]}",
    ]


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model_name = next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model_name = platform.processor() or "unknown CPU"
    return (
        f"{model_name}, {os.cpu_count()} cores (torch uses {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"MALLOC_MMAP_THRESHOLD_={_MALLOC['MALLOC_MMAP_THRESHOLD_']} "
        f"MALLOC_TRIM_THRESHOLD_={_MALLOC['MALLOC_TRIM_THRESHOLD_']}"
    )


def main() -> None:
    (x, y), _ = load_digits()
    batch = (x[:256], y[:256])
    torch.manual_seed(0)
    results = [bench("sigmoid MLP 10×256", sigmoid_mlp(), batch)]
    torch.manual_seed(0)
    results.append(bench("small CNN", small_cnn(), batch))
    text = [
        "# gradsight.curvature benchmark",
        "",
        f"Machine: {machine()}.",
        "",
        "Digits, batch 256, cross-entropy, float32. Errors are medians over seeds "
        f"{list(SEEDS)}; times are the fastest of the repeats (of the seeds for traces and "
        "eigenvalues), because the machine is shared and interference only adds time. "
        "Set-up is included for traces and eigenvalues (gradsight builds its operator, "
        "PyHessian its graph).",
        "",
        table(results),
        "",
        "Goals (measured on the MLP):",
        "",
        *goals(results[0]),
        "",
        "The same checks on the small CNN:",
        "",
        *goals(results[1]),
        "",
    ]
    out = "\n".join(text)
    print(out)
    if "--write" in sys.argv:
        path = Path(__file__).parent / "results" / "curvature.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out)


if __name__ == "__main__":
    main()
