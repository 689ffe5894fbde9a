"""Plotly figure specs (plain dicts) from a recorded run; no plotly import needed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradsight.report._html import label
from gradsight.store import Run

__all__ = [
    "attenuation_chain",
    "comparison_figures",
    "curvature_figures",
    "heatmap",
    "learning_curves",
    "run_figures",
    "timeline",
]

Figure = dict[str, Any]

#: Most columns a heat map shows; longer runs are thinned to evenly spaced steps.
MAX_COLUMNS = 400
_FONT = {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12}


def _layout(title: str, x_title: str, y_title: str, *, log_y: bool = False, **extra: Any) -> Figure:
    layout: Figure = {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        "font": _FONT,
        "margin": {"l": 70, "r": 20, "t": 50, "b": 50},
        "xaxis": {"title": {"text": x_title}, "zeroline": False},
        "yaxis": {"title": {"text": y_title}, "zeroline": False},
        "legend": {"font": {"size": 11}},
        "hovermode": "closest",
        "plot_bgcolor": "#fbfbfc",
    }
    if log_y:
        layout["yaxis"]["type"] = "log"
        layout["yaxis"]["exponentformat"] = "power"
    layout.update(extra)
    return layout


def _spans_decades(values: np.ndarray, decades: float = 1.0) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return v.size > 1 and math.log10(v.max() / v.min()) >= decades


def _thin(steps: np.ndarray) -> np.ndarray:
    """Indices of at most MAX_COLUMNS evenly spaced columns (always the last)."""
    n = len(steps)
    if n <= MAX_COLUMNS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_COLUMNS).round().astype(int))


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Colour-bar ticks for log₁₀ values: powers of ten, with 2 and 5 between them when
    the range spans few decades."""
    mantissas = (1, 2, 5) if hi - lo < 3 else (1,)
    ticks = []
    for k in range(math.floor(lo), math.ceil(hi) + 1):
        for m in mantissas:
            t = k + math.log10(m)
            if lo - 1e-9 <= t <= hi + 1e-9:
                ticks.append((t, f"{m}e{k}" if m != 1 else f"1e{k}"))
    step = max(1, len(ticks) // 9)
    return ticks[::step] or [(lo, f"{10**lo:.2g}")]


def _list(a: np.ndarray) -> list[Any]:
    return [None if not math.isfinite(float(v)) else float(v) for v in a]


def heatmap(
    run: Run,
    metric: str,
    *,
    title: str,
    unit: str,
    log: bool = True,
    percent: bool = False,
) -> Figure | None:
    """Layers (forward order, first at the top) × steps; log₁₀ colour for norms."""
    layers = [layer for layer in run.layer_order() if layer in run.series(metric)]
    if not layers:
        return None
    steps, m = run.matrix(metric, layers)
    cols = _thin(steps)
    steps, m = steps[cols], m[:, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        if log:
            z = np.where(m > 0, np.log10(np.where(m > 0, m, 1.0)), np.nan)
        elif percent:
            z = 100.0 * m
        else:
            z = m
    names = [label(layer) for layer in layers]
    trace: Figure = {
        "type": "heatmap",
        "x": steps.tolist(),
        "y": names,
        "z": [_list(row) for row in z],
        "customdata": [_list(row) for row in m],
        "colorscale": "Viridis" if log else "YlOrRd",
        "reversescale": not log,  # plotly's YlOrRd runs dark to light: 0% light
        "hoverongaps": False,
        "colorbar": {"title": {"text": unit, "side": "right"}, "thickness": 14},
    }
    if log:
        finite = z[np.isfinite(z)]
        if finite.size:
            ticks = _log_ticks(float(finite.min()), float(finite.max()))
            trace["colorbar"]["tickvals"] = [t for t, _ in ticks]
            trace["colorbar"]["ticktext"] = [text for _, text in ticks]
        trace["hovertemplate"] = "layer %{y}<br>step %{x}<br>%{customdata:.3e}<extra></extra>"
    elif percent:
        trace["zmin"], trace["zmax"] = 0, 100
        trace["hovertemplate"] = "layer %{y}<br>step %{x}<br>%{z:.1f}%<extra></extra>"
    layout = _layout(title, "training step", "layer (input at top)")
    layout["yaxis"].update({"autorange": "reversed", "type": "category"})
    return {"data": [trace], "layout": layout}


def timeline(
    run: Run,
    metric: str,
    *,
    title: str,
    y_title: str,
    log: bool | None = None,
    reference: tuple[float, str] | None = None,
) -> Figure | None:
    """One line per layer over the steps; log y when the values span a decade or more."""
    series = run.series(metric)
    layers = [layer for layer in run.layer_order() if layer in series]
    if not layers:
        return None
    if log is None:
        log = _spans_decades(np.concatenate([series[layer][1] for layer in layers]))
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers" if len(series[layer][0]) < 30 else "lines",
            "name": label(layer),
            "x": series[layer][0].tolist(),
            "y": _list(series[layer][1]),
            "hovertemplate": f"layer {label(layer)}<br>step %{{x}}<br>%{{y:.3e}}<extra></extra>",
        }
        for layer in layers
    ]
    layout = _layout(title, "training step", y_title, log_y=log)
    if reference is not None:
        value, text = reference
        layout["shapes"] = [
            {
                "type": "line",
                "xref": "paper",
                "x0": 0,
                "x1": 1,
                "y0": value,
                "y1": value,
                "line": {"color": "#c00", "dash": "dash", "width": 1.5},
            }
        ]
        layout["annotations"] = [
            {
                "xref": "paper",
                "x": 1,
                "y": math.log10(value) if log else value,
                "text": text,
                "showarrow": False,
                "xanchor": "right",
                "yanchor": "bottom",
                "font": {"color": "#c00", "size": 11},
            }
        ]
    return {"data": data, "layout": layout}


def learning_curves(run: Run) -> list[Figure]:
    """The loss over the steps (log y when it spans a decade) with any logged losses, and
    one figure per other logged scalar (e.g. held-out accuracy)."""
    figs: list[Figure] = []
    model_level = {m: ser[""] for m in run.metric_names if "" in (ser := run.series(m))}
    losses = [m for m in model_level if "loss" in m and m != "loss_scale"]
    losses.sort(key=lambda m: m != "loss")
    if losses:
        data: list[Figure] = []
        for m in losses:
            steps, v = model_level[m]
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines" if len(steps) > 30 else "lines+markers",
                    "name": "loss (batch)" if m == "loss" else label(m),
                    "x": steps.tolist(),
                    "y": _list(v),
                    "line": {"width": 1.2 if m == "loss" else 2},
                }
            )
        every = np.concatenate([model_level[m][1] for m in losses])
        log = _spans_decades(every, 1.0) and bool(np.all(every[np.isfinite(every)] > 0))
        layout = _layout("Training loss", "training step", "loss", log_y=log)
        if "lr" in model_level and len(np.unique(model_level["lr"][1])) > 1:
            lr_steps, lr = model_level["lr"]
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": "learning rate",
                    "x": lr_steps.tolist(),
                    "y": _list(lr),
                    "yaxis": "y2",
                    "line": {"dash": "dot"},
                }
            )
            layout["yaxis2"] = {
                "title": {"text": "learning rate"},
                "overlaying": "y",
                "side": "right",
                "type": "log",
            }
        figs.append({"data": data, "layout": layout})
    for m in model_level:
        if m in losses or m in ("lr", "loss_scale"):
            continue
        steps, v = model_level[m]
        figs.append(
            {
                "data": [
                    {
                        "type": "scatter",
                        "mode": "lines" if len(steps) > 30 else "lines+markers",
                        "name": label(m),
                        "x": steps.tolist(),
                        "y": _list(v),
                    }
                ],
                "layout": _layout(label(m), "training step", label(m)),
            }
        )
    return figs


def _recent(run: Run, metric: str, layers: list[str], window: int = 20) -> dict[str, float]:
    """Median of a metric over each layer's last ``window`` records (robust to noise)."""
    series = run.series(metric)
    out = {}
    for layer in layers:
        if layer in series:
            v = series[layer][1][-window:]
            v = v[np.isfinite(v)]
            if v.size:
                out[layer] = float(np.median(v))
    return out


def chain_factors(run: Run) -> dict[str, Any] | None:
    """Per-layer factors of the backward signal at the end of the run.

    For consecutive layers l−1, l with the activation φ between them, the signal at the
    output of l−1 is δ_{l−1} = φ'(z_{l−1}) ⊙ (W_lᵀ δ_l), so ‖δ_{l−1}‖/‖δ_l‖ is the
    product of the *activation factor* ‖δ_{l−1}‖/‖∂L/∂φ‖ and the *weight factor*
    ‖∂L/∂φ‖/‖δ_l‖ (exact in a chain of layers; with skip connections the weight factor
    includes what flows around).
    """
    layers = [layer for layer in run.layer_order() if layer in run.series("signal_norm")]
    if len(layers) < 2:
        return None
    sig = _recent(run, "signal_norm", layers)
    act = _recent(run, "activation_signal_norm", layers)
    last = layers[-1]
    if last not in sig or not sig[last] > 0:
        return None
    activation, weight, relative = [], [], []
    for i, layer in enumerate(layers):
        relative.append(sig.get(layer, math.nan) / sig[last])
        a = sig.get(layer, math.nan) / act[layer] if act.get(layer) else math.nan
        activation.append(a if i < len(layers) - 1 else math.nan)
        prev = layers[i - 1] if i > 0 else None
        w = act[prev] / sig[layer] if prev in act and sig.get(layer) else math.nan
        weight.append(w)
    product = [math.nan] * len(layers)
    product[-1] = 1.0
    for i in range(len(layers) - 2, -1, -1):
        f = activation[i] * weight[i + 1]
        product[i] = product[i + 1] * f if math.isfinite(f) else math.nan
    return {
        "layers": layers,
        "activation": activation,
        "weight": weight,
        "relative": relative,
        "product": product,
    }


def attenuation_chain(run: Run) -> Figure | None:
    """Backward signal along depth: per-layer factors (bars) and their product (line)."""
    chain = chain_factors(run)
    if chain is None:
        return None
    names = [label(layer) for layer in chain["layers"]]
    # Markers, not bars: on a log axis spanning decades a bar's length means nothing.
    data = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": "activation factor ‖φ'⊙g‖/‖g‖ (after this layer)",
            "x": names,
            "y": _list(np.array(chain["activation"])),
            "marker": {"color": "#e69f00", "symbol": "diamond", "size": 11},
        },
        {
            "type": "scatter",
            "mode": "markers",
            "name": "weight factor ‖Wᵀδ‖/‖δ‖ (this layer)",
            "x": names,
            "y": _list(np.array(chain["weight"])),
            "marker": {"color": "#0072b2", "symbol": "square", "size": 9},
        },
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "product of factors from the output back",
            "x": names,
            "y": _list(np.array(chain["product"])),
            "line": {"color": "#222", "width": 2},
        },
        {
            "type": "scatter",
            "mode": "markers",
            "name": "measured ‖δ_l‖ / ‖δ_last‖",
            "x": names,
            "y": _list(np.array(chain["relative"])),
            "marker": {"symbol": "x", "size": 9, "color": "#c00"},
        },
    ]
    layout = _layout(
        "Attenuation of the backward signal along depth (end of run)",
        "layer (forward order)",
        "factor (log scale; < 1 shrinks)",
        log_y=True,
    )
    layout["xaxis"]["type"] = "category"
    layout["legend"] = {"orientation": "h", "y": -0.22, "font": {"size": 11}}
    layout["margin"]["b"] = 90
    return {"data": data, "layout": layout}


def curvature_figures(run: Run) -> list[Figure]:
    figs = [
        timeline(
            run,
            "lambda_max",
            title="Largest curvature λmax per layer (Gauss-Newton)",
            y_title="λmax (loss / parameter²)",
            log=True,
        ),
        timeline(
            run,
            "lr_lambda_max",
            title="Stability lr·λmax per layer (above 2: the step diverges)",
            y_title="lr·λmax (dimensionless)",
            log=True,
            reference=(2.0, "stability limit 2"),
        ),
        timeline(
            run,
            "step_ratio",
            title="Step ratio α*/lr: step each layer needs over the step it gets",
            y_title="α* / lr (dimensionless)",
            log=True,
            reference=(1.0, "needs = gets"),
        ),
        timeline(
            run,
            "headroom",
            title="Headroom: damped Gauss-Newton decrement / loss",
            y_title="fraction of the loss",
            log=True,
        ),
        timeline(run, "trace", title="Curvature trace per layer", y_title="trace(G)", log=True),
    ]
    return [f for f in figs if f is not None]


def run_figures(run: Run) -> list[tuple[str, list[Figure]]]:
    """The report's figures for one run, grouped under headings."""
    groups: list[tuple[str, list[Figure]]] = []

    def add(heading: str, figs: list[Figure | None]) -> None:
        kept = [f for f in figs if f is not None]
        if kept:
            groups.append((heading, kept))

    add("Learning curves", list(learning_curves(run)))
    add(
        "Gradients and backward signal",
        [
            heatmap(
                run,
                "grad_norm",
                title="Gradient norm ‖∂L/∂θ‖ per layer",
                unit="‖∂L/∂θ‖ (log)",
            ),
            heatmap(
                run,
                "signal_norm",
                title="Backward signal ‖∂L/∂output‖ per layer",
                unit="‖δ‖ (log)",
            ),
        ],
    )
    add("Attenuation along depth", [attenuation_chain(run)])
    add(
        "Saturated and dead units",
        [
            heatmap(
                run,
                "saturation",
                title="Saturated (flat) activation entries, % of batch × units",
                unit="% flat",
                log=False,
                percent=True,
            ),
            heatmap(
                run,
                "dead_fraction",
                title="Dead units (flat on every sample), % of units",
                unit="% dead",
                log=False,
                percent=True,
            ),
        ],
    )
    add(
        "Updates",
        [
            timeline(
                run,
                "update_ratio",
                title="Update-to-weight ratio ‖Δθ‖/‖θ‖ per step",
                y_title="‖Δθ‖ / ‖θ‖ (dimensionless)",
                log=True,
            )
        ],
    )
    add("Curvature", list(curvature_figures(run)))
    return groups


def comparison_figures(runs: list[Run]) -> list[Figure]:
    """Several runs side by side: loss, per-layer gradient profile, signal along depth."""
    figs: list[Figure] = []
    data, all_loss = [], []
    for run in runs:
        s = run.series("loss").get("")
        if s is not None:
            all_loss.append(s[1])
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": label(run.name),
                    "x": s[0].tolist(),
                    "y": _list(s[1]),
                    "line": {"width": 1.2},
                }
            )
    if data:
        loss = np.concatenate(all_loss)
        log = _spans_decades(loss) and bool(np.all(loss[np.isfinite(loss)] > 0))
        figs.append(
            {
                "data": data,
                "layout": _layout("Training loss", "training step", "loss (per batch)", log_y=log),
            }
        )
    data = []
    for run in runs:
        layers = run.layer_order()
        g = _recent(run, "grad_norm", layers)
        if g:
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": label(run.name),
                    "x": list(range(len(layers))),
                    "y": [g.get(layer) for layer in layers],
                    "text": [label(layer) for layer in layers],
                    "hovertemplate": "layer %{text}<br>%{y:.3e}<extra></extra>",
                }
            )
    if data:
        figs.append(
            {
                "data": data,
                "layout": _layout(
                    "Gradient norm by depth (end of run)",
                    "layer index (0 = input side)",
                    "‖∂L/∂θ‖ (log scale)",
                    log_y=True,
                ),
            }
        )
    data = []
    for run in runs:
        chain = chain_factors(run)
        if chain is not None:
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": label(run.name),
                    "x": list(range(len(chain["layers"]))),
                    "y": _list(np.array(chain["relative"])),
                    "text": [label(layer) for layer in chain["layers"]],
                    "hovertemplate": "layer %{text}<br>%{y:.3e}<extra></extra>",
                }
            )
    if data:
        figs.append(
            {
                "data": data,
                "layout": _layout(
                    "Backward signal relative to the last layer, ‖δ_l‖/‖δ_last‖",
                    "layer index (0 = input side)",
                    "ratio (log scale)",
                    log_y=True,
                ),
            }
        )
    for f in figs:  # run names are long: legends go under the plot
        f["layout"]["legend"] = {"orientation": "h", "y": -0.25, "font": {"size": 11}}
        f["layout"]["margin"]["b"] = 90
    return figs
