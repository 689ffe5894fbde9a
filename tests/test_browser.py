"""Reports in headless Chromium: every plot drawn, no console errors; the demo's, and
those the Lightning and Hugging Face callbacks write, each with its verdict table.

Needs the system Chromium at /usr/bin/chromium (``apt-get install chromium``; CI installs
it in ``.ci/run``) and the ``playwright`` Python package; never a downloaded browser.
The screenshot is saved under ``$GRADSIGHT_ARTIFACTS`` (default
``/tmp/gradsight-artifacts``) and its path printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradsight.demo import run_demo

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no system Chromium at /usr/bin/chromium (apt-get install chromium)",
)


def test_demo_report_renders_every_plot(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from rich.console import Console

    with open(os.devnull, "w") as devnull:
        run = run_demo(tmp_path, epochs=1, console=Console(file=devnull, width=120))
    report = run / "report.html"
    expected = report.read_text(encoding="utf-8").count('class="plot')
    assert expected >= 15
    artifacts = Path(os.environ.get("GRADSIGHT_ARTIFACTS", "/tmp/gradsight-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "demo-report.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri())
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}",
                timeout=30_000,
            )
            drawn = page.evaluate(
                """() => Array.from(document.querySelectorAll('div.plot')).map(d => {
                    const r = d.getBoundingClientRect();
                    return [d.classList.contains('js-plotly-plot'), r.width, r.height,
                            d.querySelectorAll('.main-svg').length];
                })"""
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshot of the demo report: {shot}")
    assert errors == []
    assert all(url.startswith("file:") for url in requests), requests  # works offline
    assert len(drawn) == expected
    for is_plot, width, height, svgs in drawn:
        assert is_plot and width > 300 and height > 300 and svgs >= 1


def _open(report: Path, shot: Path) -> dict[str, object]:
    """Load ``report`` in Chromium; what it drew, its verdict rows and its errors."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    expected = report.read_text(encoding="utf-8").count('class="plot')
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}",
                timeout=30_000,
            )
            verdicts = page.evaluate(
                """() => Array.from(document.querySelectorAll('table.verdicts tbody tr'))
                    .filter(r => !r.classList.contains('reason') && r.offsetHeight > 0)
                    .map(r => [r.cells[0].innerText, r.querySelector('.status').innerText])"""
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshot: {shot}")
    return {"plots": expected, "verdicts": verdicts, "errors": errors}


@pytest.mark.parametrize("integration", ["lightning", "hf"])
def test_callback_report_shows_a_verdict_table(tmp_path: Path, integration: str) -> None:
    """A report written by a training callback, with no batch or loss_fn passed to it,
    shows a verdict row per layer of the trained model."""
    if integration == "lightning":
        pytest.importorskip("pytorch_lightning")
        from _integration_runs import lightning_fit

        report = lightning_fit(tmp_path / "run").report_path
        layers = ["net.0", "net.2", "net.4"]
    else:
        pytest.importorskip("transformers")
        pytest.importorskip("accelerate")
        from _integration_runs import hf_fit

        report = hf_fit(tmp_path / "out")[1].report_path
        layers = ["bert.embeddings.word_embeddings", "classifier"]
    artifacts = Path(os.environ.get("GRADSIGHT_ARTIFACTS", "/tmp/gradsight-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    seen = _open(report, artifacts / f"{integration}-report.png")
    assert seen["errors"] == []
    assert isinstance(seen["plots"], int) and seen["plots"] >= 4
    rows = dict(seen["verdicts"])  # type: ignore[call-overload]
    assert set(layers) <= set(rows), rows
    assert set(rows.values()) <= {"ok", "vanishing", "converged", "exploding", "dead", "frozen"}
