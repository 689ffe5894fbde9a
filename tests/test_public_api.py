"""Every public name is importable and the DESIGN.md contract names exist."""

from __future__ import annotations

import importlib

import pytest

import gradsight


@pytest.mark.parametrize(
    "module",
    ["gradsight", "gradsight.probes", "gradsight.diagnosis", "gradsight.curvature"],
)
def test_all_names_importable(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"


def test_contract_names() -> None:
    assert callable(gradsight.diagnose)
    fields = gradsight.LayerDiagnosis.__dataclass_fields__
    for attr in (
        "name",
        "status",
        "reason",
        "grad_norm",
        "signal_norm",
        "saturation",
        "headroom",
        "step_ratio",
    ):
        assert attr in fields
    for attr in ("status", "layers", "nonfinite_origin"):
        assert attr in gradsight.Diagnosis.__dataclass_fields__
    assert callable(gradsight.curvature.top_eigenvalues)
    assert callable(gradsight.curvature.trace)
