"""The lab's experiments: measured tables and plotly figure specs (plain dicts).

- :func:`step_size_sweep`: on a test function rescaled by ``c`` (loss) or ``k``
  (variable), the best fixed GD step and its iterations to tolerance, the iterations of
  the step tuned for the unscaled function, and Newton's iterations.
- :func:`layer_steps`: the curvature-optimal step ``α* = gᵀg / gᵀGg`` of every layer of
  a deep sigmoid MLP on digits, from :func:`gradsight.diagnose`.
- :func:`run_lab`: all of it, with figures; :func:`write_lab_html` writes the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradsight.lab.functions import TestFunction, quadratic, rosenbrock, scaled, softplus_bowl
from gradsight.lab.runners import best_fixed_step, gradient_descent, newton

__all__ = ["LabResult", "layer_steps", "run_lab", "step_size_sweep", "write_lab_html"]


def step_size_sweep(
    fn: TestFunction,
    factors: list[float],
    which: str = "c",
    iterations: int = 2000,
    tol: float = 1e-6,
) -> list[dict[str, Any]]:
    """For each factor, GD's best fixed step and iterations, the unscaled step's, Newton's.

    Args:
        fn: the unscaled function ``f``.
        factors: values of ``c`` (``which="c"``, ``c·f``) or ``k`` (``which="k"``,
            ``f(k·(x − x*))``).

    Returns:
        One row per factor: ``factor``, ``best_step``, ``gd_iterations`` (at the best
        step), ``fixed_step_iterations`` (at the step that is best for ``f``; ``None``
        when it no longer converges), ``newton_iterations``.

    Example:
        >>> rows = step_size_sweep(quadratic(10.0, 2), [1.0, 100.0], "c")
        >>> [r["newton_iterations"] for r in rows], rows[1]["best_step"] < rows[0]["best_step"]
        ([1, 1], True)
    """
    base_step, _ = best_fixed_step(fn, iterations=iterations, tol=tol)
    rows = []
    for factor in factors:
        g = scaled(fn, c=factor) if which == "c" else scaled(fn, k=factor)
        step, its = best_fixed_step(g, iterations=iterations, tol=tol)
        fixed = gradient_descent(g, base_step, iterations, tol) if base_step is not None else None
        rows.append(
            {
                "factor": factor,
                "best_step": step,
                "gd_iterations": its,
                "fixed_step_iterations": None
                if fixed is None or fixed.diverged
                else fixed.iterations_to_tol,
                "newton_iterations": newton(g, tol=tol).iterations_to_tol,
            }
        )
    return rows


def layer_steps(
    depth: int = 10, width: int = 64, batch_size: int = 512, seed: int = 0
) -> list[dict]:
    """Per-layer curvature-optimal steps of a Xavier sigmoid MLP on digits, at initialization.

    Returns:
        One row per layer: ``layer``, ``optimal_step`` (``α*``), ``grad_norm``, ``status``.
    """
    import torch
    from torch import nn

    from gradsight.data import load_digits
    from gradsight.demo.models import mlp
    from gradsight.diagnosis import diagnose

    (x, y), _ = load_digits()
    torch.manual_seed(seed)
    model = mlp(depth, width)
    d = diagnose(model, (x[:batch_size], y[:batch_size]), nn.CrossEntropyLoss(), lr=0.1)
    return [
        {
            "layer": layer.name,
            "optimal_step": layer.optimal_step,
            "grad_norm": layer.grad_norm,
            "status": layer.status,
        }
        for layer in d.layers
    ]


@dataclass
class LabResult:
    """The lab's tables and figure specs (plotly JSON dicts, drawn by any plotly.js)."""

    sweeps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def layer_step_spread(self) -> float:
        """``max α* / min α*`` over the layers (orders of magnitude between layers)."""
        steps = [r["optimal_step"] for r in self.layers if r["optimal_step"]]
        steps = [s for s in steps if math.isfinite(s) and s > 0]
        return max(steps) / min(steps) if steps else math.nan


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _sweep_figure(title: str, rows_by_fn: dict[str, list[dict]], axis: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for name, rows in rows_by_fn.items():
        xs = [r["factor"] for r in rows]
        data.append(
            {
                "x": xs,
                "y": [_num(r["gd_iterations"]) for r in rows],
                "name": f"GD, best step per case — {name}",
                "mode": "lines+markers",
            }
        )
        data.append(
            {
                "x": xs,
                "y": [_num(r["fixed_step_iterations"]) for r in rows],
                "name": f"GD, step tuned for f — {name}",
                "mode": "lines+markers",
                "line": {"dash": "dot"},
            }
        )
        data.append(
            {
                "x": xs,
                "y": [_num(r["newton_iterations"]) for r in rows],
                "name": f"Newton — {name}",
                "mode": "lines+markers",
                "line": {"dash": "dash"},
            }
        )
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "xaxis": {"type": "log", "title": {"text": axis}},
            "yaxis": {"type": "log", "title": {"text": "iterations to f − f* ≤ 1e-6·(f₀ − f*)"}},
            "height": 420,
        },
    }


def _step_figure(rows_by_fn: dict[str, list[dict]], axis: str) -> dict[str, Any]:
    return {
        "data": [
            {
                "x": [r["factor"] for r in rows],
                "y": [_num(r["best_step"]) for r in rows],
                "name": name,
                "mode": "lines+markers",
            }
            for name, rows in rows_by_fn.items()
        ],
        "layout": {
            "title": {"text": f"Best fixed GD step size as {axis} varies (Newton needs none)"},
            "xaxis": {"type": "log", "title": {"text": axis}},
            "yaxis": {"type": "log", "title": {"text": "best step ε"}},
            "height": 380,
        },
    }


def _best_final_step(fn: TestFunction, iterations: int) -> float:
    """The grid step with the lowest ``f`` after ``iterations`` (for slow problems)."""
    best, best_gap = 1e-3, math.inf
    for eps in np.logspace(-6, 0, 19):
        run = gradient_descent(fn, float(eps), iterations, tol=1e-12)
        if not run.diverged and run.gaps[-1] < best_gap:
            best, best_gap = float(eps), float(run.gaps[-1])
    return best


def run_lab(*, quick: bool = False, with_network: bool = True) -> LabResult:
    """Run every experiment and build the figures.

    Args:
        quick: fewer factors (seconds instead of tens of seconds).
        with_network: also measure the per-layer steps of the 10-layer sigmoid MLP.

    Example:
        >>> lab = run_lab(quick=True, with_network=False)
        >>> rows = lab.sweeps["c: quadratic κ=100"]
        >>> sorted(lab.figures)[:2], all(r["newton_iterations"] == 1 for r in rows)
        (['convergence', 'scale_c'], True)
    """
    factors = [1e-2, 1.0, 1e2] if quick else [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3]
    iters = 1000 if quick else 3000
    fns = {
        "quadratic κ=100": quadratic(100.0, 4),
        "Rosenbrock": rosenbrock(),
        "softplus bowl (1-D)": softplus_bowl(),
    }
    result = LabResult()
    by_c = {n: step_size_sweep(f, factors, "c", iters) for n, f in fns.items()}
    by_k = {n: step_size_sweep(f, factors, "k", iters) for n, f in fns.items()}
    for n in fns:
        result.sweeps[f"c: {n}"] = by_c[n]
        result.sweeps[f"k: {n}"] = by_k[n]
    result.figures["scale_c"] = _sweep_figure("Loss rescaled: c·f(x)", by_c, "c")
    result.figures["scale_k"] = _sweep_figure("Variable rescaled: f(k·(x − x*))", by_k, "k")
    result.figures["step_c"] = _step_figure(by_c, "c")
    result.figures["step_k"] = _step_figure(by_k, "k")
    ros = rosenbrock()
    step = _best_final_step(ros, iters)
    gd = gradient_descent(ros, step, iters, tol=1e-12)
    nt = newton(ros)
    result.curves["Rosenbrock"] = {"gd": gd.gaps.tolist(), "newton": nt.gaps.tolist()}
    result.figures["convergence"] = {
        "data": [
            {"y": gd.gaps.tolist(), "name": f"GD, best fixed step {step:.3g}", "mode": "lines"},
            {"y": nt.gaps.tolist(), "name": "Newton (backtracking)", "mode": "lines+markers"},
        ],
        "layout": {
            "title": {"text": "Rosenbrock from (−1.2, 1): f − f* per iteration"},
            "xaxis": {"type": "log", "title": {"text": "iteration"}},
            "yaxis": {"type": "log", "title": {"text": "f − f*"}},
            "height": 380,
        },
    }
    if with_network:
        result.layers = layer_steps()
        names = [r["layer"] for r in result.layers]
        result.figures["layers"] = {
            "data": [
                {
                    "type": "bar",
                    "x": names,
                    "y": [_num(r["optimal_step"]) for r in result.layers],
                    "text": [r["status"] for r in result.layers],
                    "name": "α* = gᵀg / gᵀGg",
                }
            ],
            "layout": {
                "title": {
                    "text": "10-layer sigmoid MLP on digits: each layer's curvature-optimal "
                    f"step (spread ×{result.layer_step_spread():.2g})"
                },
                "xaxis": {"title": {"text": "layer (module name)"}},
                "yaxis": {"type": "log", "title": {"text": "α*"}},
                "height": 380,
            },
        }
    return result


def write_lab_html(
    path: str | Path, result: LabResult | None = None, *, quick: bool = False
) -> Path:
    """Write the lab as one self-contained HTML page (plotly.js inlined, works offline)."""
    from gradsight.report._html import esc, figure, page

    lab = result if result is not None else run_lab(quick=quick)
    parts = [
        "<h1>Step-size lab: why a fixed step fails and curvature fixes the scale</h1>",
        "<p>Gradient descent x ← x − ε∇f(x) needs a step ε matched to the problem's scale: "
        "rescale the loss (c·f) or the variable (f(k·(x − x*))) and the best ε moves by 1/c "
        "or 1/k², while Newton's method x ← x − ∇²f⁻¹∇f takes the same iterations "
        "whatever c and k are. A deep network is many differently scaled problems at once: "
        "its layers' curvature-optimal steps differ by orders of magnitude.</p>",
    ]
    for key in ("scale_c", "step_c", "scale_k", "step_k", "convergence", "layers"):
        if key in lab.figures:
            parts.append(figure(lab.figures[key], f"lab-{key}"))
    if lab.layers:
        rows = "".join(
            f"<tr><td>{esc(r['layer'])}</td><td>{_num(r['optimal_step']):.3g}</td>"
            f"<td>{_num(r['grad_norm']):.3g}</td><td>{esc(r['status'])}</td></tr>"
            for r in lab.layers
        )
        parts.append(
            f"<table><tr><th>layer</th><th>α*</th><th>|g|</th><th>status</th></tr>{rows}</table>"
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page("gradsight lab", "\n".join(parts), with_plots=True), encoding="utf-8")
    return out
