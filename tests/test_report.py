"""The HTML report: contents, escaping, several runs, Diagnosis.to_html, missing plotly."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsight
from gradsight import GradsightError, Monitor
from gradsight.cli import main


def _record(logdir: Path, act: type[nn.Module], steps: int = 6, name: str | None = None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("<script>", nn.Linear(4, 8))
    model.add_module("act", act())
    model.add_module("out", nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.functional.cross_entropy
    with Monitor(
        model, logdir=logdir, optimizer=opt, batch=(x, y), loss_fn=loss_fn, name=name
    ) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()


def _script_tags(text: str) -> list[str]:
    return re.findall(r"<script[^>]*>", text, flags=re.IGNORECASE)


def test_single_run_report(tmp_path: Path) -> None:
    _record(tmp_path / "a", nn.Sigmoid, name="<b>run & co</b>")
    out = gradsight.report(tmp_path / "a")
    assert out == tmp_path / "a" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>")
    n_plots = text.count('class="plot')
    assert n_plots >= 6
    # Only our own script elements: the plotly bundle and one per figure.
    assert len(_script_tags(text)) == 1 + n_plots
    assert "<b>run & co</b>" not in text and "&lt;b&gt;run &amp; co&lt;/b&gt;" in text
    assert "&lt;script&gt;" in text  # the layer name, as text in the verdict table
    for heading in (
        "Learning curves",
        "Gradients and backward signal",
        "Attenuation along depth",
        "Saturated and dead units",
        "Updates",
        "Verdict",
    ):
        assert heading in text
    assert "cdn.plot.ly" not in text.split("</script>", 1)[1]  # nothing fetched from outside


def test_several_runs_are_compared(tmp_path: Path) -> None:
    _record(tmp_path / "runs" / "sig", nn.Sigmoid)
    _record(tmp_path / "runs" / "relu", nn.ReLU)
    out = gradsight.report(tmp_path / "runs")  # a directory of runs
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "runs" / "report.html"
    assert "Comparison" in text and "Verdicts side by side" in text
    assert "Run: sig" in text and "Run: relu" in text
    out2 = gradsight.report(
        [tmp_path / "runs" / "sig"], tmp_path / "runs" / "relu", out=tmp_path / "x.html"
    )
    assert out2 == tmp_path / "x.html" and "Comparison" in out2.read_text(encoding="utf-8")


def test_cli_report(tmp_path: Path, capsys) -> None:
    _record(tmp_path / "a", nn.Tanh)
    assert main(["report", str(tmp_path / "a"), "-o", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_diagnosis_to_html_uses_the_report_blocks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("<script>alert(1)</script>", nn.Linear(4, 3))
    d = gradsight.diagnose(
        model, (torch.randn(16, 4), torch.randint(0, 3, (16,))), nn.functional.cross_entropy
    )
    text = d.to_html(tmp_path / "d.html").read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and 'class="verdicts"' in text
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert _script_tags(text) == []  # a table alone needs no plotly


def test_missing_plotly_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    _record(tmp_path / "a", nn.Tanh, steps=2)
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    with pytest.raises(GradsightError, match=r"pip install 'gradsight\[report\]'"):
        gradsight.report(tmp_path / "a")


def test_demo_prints_a_report_path_that_exists(tmp_path: Path) -> None:
    """As `make demo` runs it (a fresh process, output to a pipe): the path printed
    after "Report:" is the report, whole, however the console wraps lines."""
    out = subprocess.run(
        [sys.executable, "-m", "gradsight", "demo", "--epochs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "60"},  # a narrow console must not break the path
    ).stdout
    printed = re.findall(r"^Report: (.+)$", out, flags=re.MULTILINE)
    assert len(printed) == 1, out
    report = Path(printed[0])
    assert report.is_file() and report == tmp_path / "run-001" / "report.html"
    assert report.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_demo_without_plotly_keeps_the_install_hint(tmp_path: Path, monkeypatch) -> None:
    """rich reads "[report]" as markup and drops it unless escaped."""
    from rich.console import Console

    from gradsight.demo import run_demo

    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    buffer = io.StringIO()
    run_demo(tmp_path, epochs=1, console=Console(file=buffer, width=300))
    text = buffer.getvalue()
    assert "No HTML report" in text and "pip install 'gradsight[report]'" in text
    assert not (tmp_path / "run-001" / "report.html").exists()
