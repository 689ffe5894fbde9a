"""HTML building blocks shared by the run report and ``Diagnosis.to_html``.

Nothing here needs plotly: figures are plain plotly JSON specs (dicts) placed into the
page with :func:`figure`, and the plotly.js bundle is inlined once per page by
:func:`page` when the page has figures. Every string that comes from a user (layer
and run names, reasons) goes through :func:`esc` in HTML and through :func:`label`
in figure text, so that a layer named ``<script>`` stays text.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsight._errors import GradsightError
from gradsight._format import fmt

__all__ = [
    "CSS",
    "diagnosis_section",
    "esc",
    "figure",
    "label",
    "page",
    "plotly_js",
    "verdict_table",
    "write_diagnosis_html",
]

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #ffffff; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
  max-width: 1500px; padding: 1.5em 2em 4em; color: var(--fg); background: var(--bg); }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.3em; margin-top: 2em;
  border-bottom: 1px solid var(--line); padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
p.meta, p.note { color: var(--muted); margin: 0.3em 0; }
.banner { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6em 1em; margin: 1em 0;
  border-radius: 6px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr));
  gap: 1em 2em; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr));
  gap: 1em 2em; align-items: start; }
.plot { width: 100%; height: 380px; }
.plot.tall { height: 460px; }
table.verdicts { border-collapse: collapse; font-size: 0.92em; }
table.verdicts th, table.verdicts td { padding: 4px 10px; text-align: left; }
table.verdicts th { border-bottom: 2px solid #444; }
table.verdicts tr.reason td { color: var(--muted); font-size: 92%;
  border-bottom: 1px solid var(--line); padding-bottom: 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: bold; }
.status-vanishing { color: #b35c00; } .status-exploding, .status-nonfinite { color: #c00; }
.status-dead { color: #777; } .status-converged { color: #1a7f37; } .status-ok { color: #1a7f37; }
.status-frozen { color: #59636e; font-weight: normal; }
.summary { white-space: pre-wrap; }
.scroll { overflow-x: auto; }
table.compare { border-collapse: collapse; font-size: 0.92em; }
table.compare th, table.compare td { padding: 3px 10px; border-bottom: 1px solid var(--line); }
table.compare th { text-align: left; border-bottom: 2px solid #444; }
"""

_PLOT_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d"]}


def esc(text: Any) -> str:
    """HTML-escape ``text`` (quotes too)."""
    return html.escape(str(text), quote=True)


def label(text: Any) -> str:
    """A user string for plotly figure text: plotly renders some HTML tags and all
    entities, so escaping makes ``<script>`` display as the text ``<script>``."""
    return html.escape(str(text), quote=False)


def _script_json(obj: Any) -> str:
    """JSON safe to place inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def figure(spec: dict[str, Any], div_id: str, *, tall: bool = False) -> str:
    """A ``<div>`` and the script that draws the plotly figure ``spec`` into it.

    ``spec`` has ``data`` (traces) and ``layout``; NaN/Inf in it become ``null``
    (plotly's gap).

    Example:
        >>> out = figure({"data": [{"y": [1, float("nan")], "name": "<b>"}], "layout": {}}, "f1")
        >>> "null" in out and "<b>" not in out
        True
    """
    clean = _finite(spec)
    payload = _script_json(
        {"data": clean.get("data", []), "layout": clean.get("layout", {}), "config": _PLOT_CONFIG}
    )
    cls = "plot tall" if tall else "plot"
    return (
        f'<div class="{cls}" id="{esc(div_id)}"></div>'
        # Drawn once the page is parsed, so that the grid has its final column widths.
        f'<script>document.addEventListener("DOMContentLoaded",function(){{var f={payload};'
        f"Plotly.newPlot({json.dumps(div_id)},f.data,f.layout,f.config);}});</script>"
    )


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def plotly_js() -> str:
    """The plotly.js bundle, to inline (the report then works offline)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise GradsightError(
            "the HTML report needs plotly, which is not installed; run "
            "`pip install 'gradsight[report]'` (or `pip install plotly`)."
        ) from None
    return str(get_plotlyjs())


def page(title: str, body: str, *, with_plots: bool) -> str:
    """A complete, self-contained HTML document."""
    script = ""
    if with_plots:
        # The bundle contains no "</script>"; escape defensively all the same.
        script = "<script>" + plotly_js().replace("</script", "<\\/script") + "</script>"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style>{script}</head>"
        f"<body>{body}</body></html>\n"
    )


def verdict_table(rows: Sequence[dict[str, str]], layers: Sequence[Any]) -> str:
    """The per-layer verdict table: ``rows`` from ``Diagnosis.table()``, and for each row
    the layer (with ``status``, ``reason``, ``advice``) for the line under it."""
    cols = list(rows[0]) if rows else []
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for row, layer in zip(rows, layers, strict=True):
        cells = []
        for c in cols:
            if c == "status":
                cells.append(f'<td class="status status-{esc(row[c])}">{esc(row[c])}</td>')
            elif c in ("layer", "type", "activation"):
                cells.append(f"<td>{esc(row[c])}</td>")
            else:
                cells.append(f'<td class="num">{esc(row[c])}</td>')
        advice = "".join(f"<br>→ {esc(a)}" for a in getattr(layer, "advice", []) or [])
        body.append(
            f'<tr class="{esc(layer.status)}">{"".join(cells)}</tr>'
            f'<tr class="reason"><td colspan="{len(cols)}">{esc(layer.reason)}{advice}</td></tr>'
        )
    return (
        f'<div class="scroll"><table class="verdicts"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def diagnosis_section(d: Any, *, heading: str = "h2") -> str:
    """Status line, summary and verdict table of a :class:`~gradsight.diagnosis.Diagnosis`."""
    status = esc(d.status)
    return (
        f'<{heading}>Verdict: <span class="status status-{status}">{status}</span></{heading}>'
        f'<p class="meta">loss {esc(fmt(d.loss))}; best constant prediction '
        f"{esc(fmt(d.baseline_loss))}"
        + (f"; learning rate {esc(fmt(d.lr))}" if d.lr is not None else "")
        + "</p>"
        + (f'<p class="summary">{esc(d.summary)}</p>' if d.summary else "")
        + verdict_table(d.table(), d.layers)
    )


def write_diagnosis_html(d: Any, path: str | Path) -> Path:
    """Write a self-contained page of one diagnosis (``Diagnosis.to_html``) to ``path``."""
    body = "<h1>gradsight diagnosis</h1>" + diagnosis_section(d)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"gradsight diagnosis: {d.status}"
    out.write_text(page(title, body, with_plots=False), encoding="utf-8")
    return out
