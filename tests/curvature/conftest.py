"""The ``case`` fixture: every small model × loss of :mod:`_curvature_cases`."""

from __future__ import annotations

import pytest
from _curvature_cases import CASE_NAMES, Case, make_case


@pytest.fixture(params=CASE_NAMES)
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(request.param)
