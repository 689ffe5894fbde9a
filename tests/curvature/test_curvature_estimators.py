"""Eigenvalue, trace and solve estimators against dense float64 references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from _curvature_cases import CASE_NAMES, Case, make_case, rel_err

import gradsight.curvature as curv
from gradsight import GradsightError
from gradsight.curvature import (
    GGNOperator,
    HessianOperator,
    damped_cg,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    xtrace,
)

SEEDS = range(5)


def _power_law_psd(dim: int = 500, exponent: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eig = torch.arange(1, dim + 1, dtype=torch.float64) ** -exponent
    return Q @ torch.diag(eig) @ Q.T


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_lanczos_top_eigenvalues_match_dense(case: Case, kind: str) -> None:
    dense = case.dense_hessian() if kind == "hessian" else case.dense_ggn()
    expected = torch.linalg.eigvalsh(dense).flip(0)[:3]
    op = curv.curvature_operator(case.model, case.batch, case.loss_fn, kind=kind)
    res = lanczos(op, k=3, tol=1e-10)
    assert res.converged
    assert rel_err(res.eigenvalues, expected) < 1e-6
    # Ritz vectors are eigenvectors: ‖A y − θ y‖ small relative to θ.
    resid = dense @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    assert float(resid.norm(dim=0).max()) < 1e-4 * float(expected.abs().max())


def test_top_eigenvalues_of_a_layer_block_and_by_magnitude() -> None:
    case = make_case("cnn-ce")
    H = case.dense_hessian(["conv.weight", "conv.bias"])
    eig = torch.linalg.eigvalsh(H)
    top = curv.top_eigenvalues(case.model, case.batch, case.loss_fn, k=2, params="conv", tol=1e-10)
    assert rel_err(top, eig.flip(0)[:2]) < 1e-6
    by_mag = curv.top_eigenvalues(
        case.model, case.batch, case.loss_fn, params="conv", which="magnitude", tol=1e-10
    )
    assert abs(float(by_mag[0]) - float(eig[eig.abs().argmax()])) < 1e-6 * float(eig.abs().max())


def test_lanczos_stops_early_at_loose_tolerance() -> None:
    A = _power_law_psd(300, exponent=1.0)
    res = lanczos(A, k=1, tol=1e-3)
    assert res.converged and res.num_matvecs < 30
    assert abs(float(res.eigenvalues[0]) - 1.0) < 1e-3


@pytest.mark.parametrize("case_name", ["sigmoid-ce", "tanh-mse", "cnn-ce"])
def test_hutchinson_converges_within_budget(case_name: str) -> None:
    # Budget 100,000 products: Hutchinson's error falls only as 1/√m, and these tiny
    # Hessians have ‖A‖_F comparable to tr(A) (per-probe relative std ≈ 1).
    case = make_case(case_name)
    for A in (case.dense_hessian(),):
        exact = float(torch.trace(A))
        for seed in SEEDS:
            est = hutchinson_trace(A, 100_000, seed=seed)
            assert abs(est.estimate - exact) <= 1e-2 * abs(exact)


@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("estimator", [hutchpp_trace, xtrace])
def test_variance_reduced_traces_converge_within_budget_on_ggn(
    case_name: str, estimator: object
) -> None:
    # Budget 60 products, below the dimension (69–79): the GGN's rank is at most the
    # number of outputs, which the sketch captures.
    case = make_case(case_name)
    G = case.dense_ggn()
    exact = float(torch.trace(G))
    assert G.shape[0] > 60
    for seed in SEEDS:
        est = estimator(G, 60, seed=seed)  # type: ignore[operator]
        assert abs(est.estimate - exact) <= 1e-2 * abs(exact)


@pytest.mark.parametrize("estimator", [hutchpp_trace, xtrace])
def test_variance_reduction_beats_hutchinson_on_decaying_spectrum(estimator: object) -> None:
    A = _power_law_psd()
    exact = float(torch.trace(A))
    errs = {}
    for name, fn, budget in [("plain", hutchinson_trace, 60), ("vr", estimator, 60)]:
        errs[name] = [
            abs(fn(A, budget, seed=s).estimate - exact) / exact  # type: ignore[operator]
            for s in SEEDS
        ]
    assert max(errs["vr"]) <= 1e-2  # within a budget of 60 products on D = 500
    assert statistics.median(errs["vr"]) < 0.25 * statistics.median(errs["plain"])


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace, xtrace])
def test_standard_error_is_honest(estimator: object) -> None:
    A = _power_law_psd(200, exponent=1.0)
    exact = float(torch.trace(A))
    covered = 0
    for seed in range(20):
        est = estimator(A, 30, seed=seed)  # type: ignore[operator]
        assert est.stderr > 0 and est.num_matvecs == 30
        covered += abs(est.estimate - exact) <= 3 * est.stderr
    assert covered >= 16


def test_operator_and_dense_estimates_agree(case: Case) -> None:
    H = case.dense_hessian()
    op = HessianOperator(case.model, case.batch, case.loss_fn)
    for fn in (hutchinson_trace, hutchpp_trace, xtrace):
        a, b = fn(op, 24, seed=3), fn(H, 24, seed=3)
        assert math.isclose(a.estimate, b.estimate, rel_tol=1e-9, abs_tol=1e-12)
    budget = 2 * H.shape[0] + 2
    est = curv.trace(case.model, case.batch, case.loss_fn, probes=budget, method="xtrace")
    assert math.isclose(est.estimate, float(torch.trace(H)), rel_tol=1e-8)  # exact at 2D+2
    default = curv.trace(case.model, case.batch, case.loss_fn, probes=budget)  # Hutch++
    assert default.method == "hutch++"
    assert math.isclose(default.estimate, float(torch.trace(H)), rel_tol=5e-2)


def test_damped_cg_matches_dense_solve() -> None:
    case = make_case("sigmoid-ce")
    G = case.dense_ggn()
    op = GGNOperator(case.model, case.batch, case.loss_fn)
    lam = 1e-2 * float(torch.linalg.eigvalsh(G).max())
    res = damped_cg(op, op.gradient, lam, tol=1e-10, max_iter=500)
    expected = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), op.gradient)
    assert res.converged and not res.negative_curvature
    assert rel_err(res.x, expected) < 1e-8


def test_damped_cg_reports_negative_curvature() -> None:
    A = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))
    res = damped_cg(A, torch.tensor([1.0, 1.0], dtype=torch.float64), damping=0.5)
    assert res.negative_curvature and not res.converged
    with pytest.raises(GradsightError, match=r"shape \(2,\)"):
        damped_cg(A, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("relative_to", ["lambda_max", "trace"])
def test_newton_decrement_per_block_matches_dense(relative_to: str) -> None:
    case = make_case("tanh-mse")
    names = ["2.weight", "2.bias"]
    res = curv.newton_decrement(
        case.model,
        case.batch,
        case.loss_fn,
        params="2",
        relative_to=relative_to,
        damping=1e-2,
        tol=1e-12,
        probes=40,
    )
    op = GGNOperator(case.model, case.batch, case.loss_fn, params="2")
    G = op.to_dense()
    eig = torch.linalg.eigvalsh(G)
    scale = float(eig.max()) if relative_to == "lambda_max" else float(eig.sum()) / len(eig)
    assert math.isclose(res.damping, 1e-2 * scale, rel_tol=1e-2)
    g = op.gradient
    expected = 0.5 * float(g @ torch.linalg.solve(G + res.damping * torch.eye(len(g)), g))
    assert math.isclose(res.decrement, expected, rel_tol=1e-8)
    assert op.names == names


def test_newton_decrement_and_step_scale_with_the_loss() -> None:
    case = make_case("relu-ce")
    kwargs = {"tol": 1e-12, "max_iter": 500}
    base = curv.newton_decrement(case.model, case.batch, case.loss_fn, params="4", **kwargs)
    scaled = curv.newton_decrement(
        case.model, case.batch, lambda o, t: 10.0 * case.loss_fn(o, t), params="4", **kwargs
    )
    # λ follows the curvature, so the decrement scales like the loss itself.
    assert math.isclose(scaled.decrement, 10.0 * base.decrement, rel_tol=1e-6)
    step = curv.optimal_step(case.model, case.batch, case.loss_fn, params="4")
    step10 = curv.optimal_step(
        case.model, case.batch, lambda o, t: 10.0 * case.loss_fn(o, t), params="4"
    )
    assert math.isclose(step10.alpha, step.alpha / 10.0, rel_tol=1e-10)


def test_optimal_step_matches_dense(case: Case) -> None:
    H = case.dense_hessian()
    g = torch.func.grad(case.flat_loss())(case.flat_params())
    step = curv.optimal_step(case.model, case.batch, case.loss_fn)
    gHg = float(g @ H @ g)
    if gHg > 0:
        assert math.isclose(step.alpha, float(g @ g) / gHg, rel_tol=1e-10)
    else:
        assert step.alpha == math.inf
    assert math.isclose(step.curvature, gHg / float(g @ g), rel_tol=1e-10, abs_tol=1e-14)


def test_estimators_reject_non_square_input() -> None:
    with pytest.raises(GradsightError, match="square matrix"):
        hutchinson_trace(torch.zeros(3, 4), 10)
    with pytest.raises(GradsightError, match="num_matvecs >= 4"):
        xtrace(torch.eye(3), 2)
    with pytest.raises(GradsightError, match="k must be"):
        lanczos(torch.eye(3), k=5)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_xtrace_is_exact_on_an_operator_of_lower_rank_than_its_sketch(rank: int) -> None:
    """A zero block (a layer the loss does not reach) or one of rank below the number of
    test vectors makes the sketch exactly rank-deficient, which crashed the QR algebra
    (the Monitor's curvature tier on BART's unused cross-attention). The test vectors'
    images then span the whole range: the trace is exact, with no standard error."""
    gen = torch.Generator().manual_seed(rank)
    A = torch.zeros(40, 40, dtype=torch.float64)
    for i in range(rank):  # exactly rank-deficient: coordinate directions
        A[i, i] = float(i + 2)
    est = xtrace(A, num_matvecs=12)
    assert est.estimate == pytest.approx(float(A.trace()), abs=1e-12)
    assert est.stderr == 0.0
    B = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    full = B @ B.T  # full rank: the estimator as before, with a standard error
    est = xtrace(full, num_matvecs=12)
    assert est.stderr > 0 and abs(est.estimate - float(full.trace())) < 5 * est.stderr + 1e-9
