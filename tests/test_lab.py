"""The lab's runners: Newton's iterates are scale-covariant, gradient descent's are not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsight.lab import (
    best_fixed_step,
    gradient_descent,
    newton,
    quadratic,
    rosenbrock,
    run_lab,
    scaled,
    softplus_bowl,
    write_lab_html,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FUNCTIONS = {
    "quadratic": lambda: quadratic(50.0, 3),
    "rosenbrock": rosenbrock,
    "bowl": softplus_bowl,
}
scales = st.floats(min_value=1e-3, max_value=1e3).filter(lambda v: abs(np.log10(v)) > 0.05)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@settings(max_examples=15, deadline=None)
@given(c=scales)
def test_newton_iterates_invariant_to_loss_scale(name: str, c: float) -> None:
    f = FUNCTIONS[name]()
    a, b = newton(f, iterations=30), newton(scaled(f, c=c), iterations=30)
    assert a.xs.shape == b.xs.shape
    np.testing.assert_allclose(b.xs, a.xs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@settings(max_examples=15, deadline=None)
@given(k=scales)
def test_newton_iterates_map_under_variable_scale(name: str, k: float) -> None:
    f = FUNCTIONS[name]()
    a, b = newton(f, iterations=30), newton(scaled(f, k=k), iterations=30)
    assert a.xs.shape == b.xs.shape
    # h(x) = f(x* + k(x − x*)): h's iterate x maps to f's iterate x* + k(x − x*)
    mapped = f.x_opt + k * (b.xs - f.x_opt)
    np.testing.assert_allclose(mapped, a.xs, rtol=0, atol=1e-10 * max(1.0, k))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(("c", "k"), [(10.0, 1.0), (1.0, 3.0), (0.1, 1.0)])
def test_gradient_descent_iterates_change_with_scale(name: str, c: float, k: float) -> None:
    f = FUNCTIONS[name]()
    a = gradient_descent(f, 1e-3, iterations=20)
    b = gradient_descent(scaled(f, c=c, k=k), 1e-3, iterations=20)
    n = min(len(a.xs), len(b.xs))
    mapped = f.x_opt + k * (b.xs[:n] - f.x_opt)
    assert np.max(np.abs(mapped - a.xs[:n])) > 1e-6


def test_best_step_scales_as_one_over_c_and_k_squared() -> None:
    q = quadratic(1.0, 2)
    assert best_fixed_step(q)[0] == pytest.approx(1.0)
    assert best_fixed_step(scaled(q, c=100.0))[0] == pytest.approx(1e-2)
    assert best_fixed_step(scaled(q, k=10.0))[0] == pytest.approx(1e-2)


def test_newton_one_step_on_any_quadratic() -> None:
    for kappa in (1.0, 1e3, 1e8):
        assert newton(quadratic(kappa, 6)).iterations_to_tol == 1


def test_lab_page_is_self_contained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lab = run_lab(quick=True, with_network=False)
    assert {"scale_c", "scale_k", "convergence"} <= set(lab.figures)
    out = write_lab_html(tmp_path / "lab.html", lab)
    text = out.read_text(encoding="utf-8")
    assert "Plotly.newPlot" in text and "<script src=" not in text


def test_cli_lab_writes_page(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from gradsight.cli import main

    out = tmp_path / "lab.html"
    assert main(["lab", "--quick", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "curvature-optimal" in out.read_text(encoding="utf-8")
