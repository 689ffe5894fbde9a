"""``gradsight.report``: one self-contained HTML page from one or more recorded runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsight._errors import GradsightError
from gradsight.report._figures import comparison_figures, run_figures
from gradsight.report._html import diagnosis_section, esc, figure, page
from gradsight.store import Run, load_run
from gradsight.store._reader import is_run_dir

__all__ = ["report"]

PathLike = str | Path


def _run_dirs(paths: Sequence[PathLike]) -> list[Path]:
    """Run directories named, or held one level down (a demo run holds several)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise GradsightError(
                f"{p} is not a directory; pass the logdir of a gradsight.Monitor run."
            )
        if is_run_dir(p):
            out.append(p)
            continue
        inner = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
        if not inner:
            raise GradsightError(
                f"{p} holds no gradsight run (no run.json or metrics-*.parquet in it or in "
                "its subdirectories); pass the logdir given to gradsight.Monitor."
            )
        out += inner
    return out


def report(
    logdir: PathLike | Sequence[PathLike],
    *more: PathLike,
    out: PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Write a self-contained HTML report of one or more runs and return its path.

    The page (plotly.js inlined: it works offline) shows per run: learning curves, a
    layer × step heat map of gradient and backward-signal norms (log colour), the
    attenuation of the signal along depth split into activation and weight factors,
    saturation and dead-unit maps, update-to-weight ratios and curvature timelines
    when recorded, and the verdict table of the run's ``diagnosis.json``. With several
    runs, a comparison section comes first. A run that did not close (a crash, a kill)
    is shown as far as it was flushed.

    Args:
        logdir: A run directory (a Monitor's ``logdir``), a directory holding run
            directories, or a list of them.
        *more: More run directories.
        out: Where to write. Default: ``report.html`` inside the run directory (one
            run) or inside the directory given (a directory of runs), else
            ``gradsight-report.html`` in the working directory.
        title: Page title.

    Returns:
        The path of the HTML file.

    Raises:
        GradsightError: if a path holds no run, or plotly/pyarrow are missing.
    """
    given = [logdir] if isinstance(logdir, (str, Path)) else list(logdir)
    given += list(more)
    if not given:
        raise GradsightError("report() needs at least one run directory.")
    dirs = _run_dirs(given)
    runs = [load_run(d) for d in dirs]
    _unique_names(runs)
    if out is None:
        if len(given) == 1 and Path(given[0]).is_dir():
            out = Path(given[0]) / "report.html"
        else:
            out = Path("gradsight-report.html")
    out = Path(out)
    title = title or (
        f"gradsight report: {runs[0].name}"
        if len(runs) == 1
        else f"gradsight report: {len(runs)} runs"
    )
    html_text = render(runs, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_text, encoding="utf-8")
    return out


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name} ({run.path})"
        else:
            seen[run.name] = 1


def render(runs: list[Run], title: str) -> str:
    """The report page for ``runs`` as an HTML string."""
    counter = iter(range(1_000_000))
    body = [f"<h1>{esc(title)}</h1>"]
    if len(runs) > 1:
        body.append("<h2>Comparison</h2>")
        body.append(
            '<p class="note">'
            + ", ".join(f"<b>{esc(r.name)}</b> ({_steps(r)} steps)" for r in runs)
            + "</p>"
        )
        figs = comparison_figures(runs)
        body.append(
            '<div class="grid">'
            + "".join(figure(f, f"fig-{next(counter)}") for f in figs)
            + "</div>"
        )
        body.append("<h3>Verdicts side by side</h3>" + compare_table(runs))
    for run in runs:
        body.append(f'<h2 id="run-{esc(run.name)}">Run: {esc(run.name)}</h2>')
        body.append(f'<p class="meta">{_meta_line(run)}</p>')
        if run.metadata.get("stopped"):
            body.append(
                '<div class="banner">The Monitor stopped recording during training '
                f"({esc(run.metadata['stopped'])}); training went on, and the steps recorded "
                "before are shown.</div>"
            )
        if not run.complete:
            body.append(
                '<div class="banner">This run did not close (it crashed, was killed, or is '
                f"still running): showing the {_steps(run)} steps flushed to disk.</div>"
            )
        if run.diagnosis:
            d = diagnosis_from_dict(run.diagnosis)
            body.append(diagnosis_section(d, heading="h3"))
        if run.num_rows == 0:
            body.append('<p class="note">No measurements were flushed for this run.</p>')
        for heading, figs in run_figures(run):
            body.append(f"<h3>{esc(heading)}</h3>")
            body.append(
                '<div class="grid">'
                + "".join(figure(f, f"fig-{next(counter)}") for f in figs)
                + "</div>"
            )
    return page(title, "".join(body), with_plots=True)


def compare_table(runs: list[Run]) -> str:
    """One row per layer position, per run its status and gradient norm."""
    from gradsight._format import fmt as _fmt

    columns = []
    for run in runs:
        d = diagnosis_from_dict(run.diagnosis) if run.diagnosis else None
        columns.append(
            [(layer.name, layer.status, _fmt(layer.grad_norm)) for layer in d.layers] if d else []
        )
    depth = max((len(c) for c in columns), default=0)
    head = "<th>#</th>" + "".join(f'<th colspan="3">{esc(run.name)}</th>' for run in runs)
    sub = "<th></th>" + "<th>layer</th><th>status</th><th>grad norm</th>" * len(runs)
    rows = []
    for i in range(depth):
        cells = [f"<td>{i}</td>"]
        for col in columns:
            if i < len(col):
                name, status, grad = col[i]
                cells.append(
                    f"<td>{esc(name)}</td>"
                    f'<td class="status status-{esc(status)}">{esc(status)}</td>'
                    f'<td class="num">{esc(grad)}</td>'
                )
            else:
                cells.append('<td colspan="3"></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    if not depth:
        return '<p class="note">No run stores a diagnosis.</p>'
    return (
        f'<div class="scroll"><table class="compare"><thead><tr>{head}</tr><tr>{sub}</tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _steps(run: Run) -> int:
    return int(run.steps.max()) + 1 if run.num_rows else 0


def _meta_line(run: Run) -> str:
    m = run.metadata
    parts = [f"directory {esc(run.path)}"]
    if m.get("model"):
        parts.append(f"model {esc(m['model'])} ({len(m.get('layers', []))} layers)")
    if m.get("optimizer"):
        parts.append(f"optimizer {esc(m['optimizer'])}, lr {esc(m.get('lr'))}")
    parts.append(f"{_steps(run)} steps recorded")
    if m.get("every", 1) != 1:
        parts.append(f"every {esc(m['every'])} steps")
    if m.get("curvature_every"):
        parts.append(f"curvature every {esc(m['curvature_every'])} steps")
    if m.get("started"):
        parts.append(f"started {esc(m['started'])}")
    return "; ".join(parts)


def diagnosis_from_dict(data: dict[str, Any]) -> Any:
    """A :class:`~gradsight.diagnosis.Diagnosis` from ``to_dict()`` output."""
    from gradsight.diagnosis import Diagnosis

    return Diagnosis.from_dict(data)
