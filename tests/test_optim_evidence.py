"""gradsight.optim.evidence quotes the committed remedy benchmark, numbers and source."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from gradsight import GradsightError
from gradsight.optim import evidence


def test_sentences_quote_the_measured_numbers_and_the_source() -> None:
    lines = evidence.vanishing_remedies()
    assert lines and all(line.endswith(f"({evidence.SOURCE})") for line in lines)
    ten = evidence.mlp_facts(10)
    gn, muon = ten["GaussNewton"], ten["Muon"]
    first = lines[0]
    assert first.startswith("on the 10-layer sigmoid MLP")
    assert f"{gn['final_median']:.1%}" in first and f"{muon['best_final_median']:.1%}" in first
    if math.isfinite(gn["epochs_median"]):
        assert f"after {gn['epochs_median']:.2f} epochs" in first
    assert f"lr {muon['lr']:g}" in first


def test_measured_rows_match_the_committed_table() -> None:
    table = Path(__file__).resolve().parents[1] / evidence.SOURCE
    if not table.exists():  # an installed package without the repository's benchmarks
        pytest.skip("benchmarks/results/remedy.md is not next to the tests")
    text = table.read_text(encoding="utf-8")
    for depth in (6, 10):
        section = text.split(f"### {depth}-layer sigmoid MLP", 1)[1].split("###", 1)[0]
        gn = evidence.mlp_facts(depth)["GaussNewton"]
        row = next(ln for ln in section.splitlines() if ln.startswith("| **GaussNewton**"))
        assert re.search(rf"\| {gn['final_median']:.1%} ", row), (row, gn)


def test_unknown_depth_is_a_clear_error() -> None:
    with pytest.raises(GradsightError, match="6- and 10-layer"):
        evidence.mlp_facts(7)
