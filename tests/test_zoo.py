"""The reference zoo (tests/zoo): every case, both twins, at loss × 1, × 1e-6 and × 1e6.

The expected statuses come from ground truths established without gradsight (see each
twin's ``ground_truth`` and ``docs/zoo.py``). At loss × c the lr is lr / c: the same
SGD dynamics, so the same truth.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import gradsight
from contradictions import contradictions
from gradsight.diagnosis.advice import traits_of
from zoo import CASES, STATUSES, Built, Twin, ZooCase, scaled

SCALES = (1.0, 1e-6, 1e6)

# The zoo's models are tiny: a second thread gains nothing and only spin-waits when
# other jobs share the cores.
pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = [
    pytest.param(case, twin, c, id=f"{case.key}-{twin}-x{c:g}")
    for case in CASES
    for twin in ("healthy", "sick")
    for c in SCALES
]

_BUILT: dict[tuple[str, str], Built] = {}


def _built(case: ZooCase, twin: str) -> Built:
    """Each twin is built once per session (L-BFGS fits take a moment)."""
    key = (case.key, twin)
    if key not in _BUILT:
        _BUILT[key] = case.twins()[twin].build(0)
    return _BUILT[key]


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "params": list(model.named_parameters(remove_duplicate=False)),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "mode": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before["state"][key]), key
    after = list(model.named_parameters(remove_duplicate=False))
    assert all(a is b for (_, a), (_, b) in zip(after, before["params"], strict=True))
    for p, g in zip(model.parameters(), before["grads"], strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == before["mode"]
    assert torch.equal(torch.get_rng_state(), before["rng"])


def _wrong(twin: Twin, d: gradsight.Diagnosis) -> list[str]:
    """One line per status that disagrees with the truth (the model's, then layers')."""
    wrong = []
    if d.status not in twin.model_status:
        wrong.append(f"model: {d.status}, expected {'/'.join(sorted(twin.model_status))}")
    for layer in d.layers:
        allowed = twin.expected(layer.name)
        if layer.status not in allowed:
            wrong.append(
                f"{layer.name}: {layer.status}, expected {'/'.join(sorted(allowed))} "
                f"(reason: {layer.reason})"
            )
    return wrong


@pytest.mark.parametrize(("case", "twin", "c"), PARAMS)
def test_zoo(case: ZooCase, twin: str, c: float) -> None:
    truth = case.twins()[twin]
    built = _built(case, twin)
    before = _snapshot(built.model)
    d = gradsight.diagnose(
        built.model,
        built.batch,
        scaled(built.loss_fn, c),
        lr=truth.lr / c,
        curvature=case.curvature,
    )
    _assert_unchanged(built.model, before)
    wrong = _wrong(truth, d)
    assert not wrong, f"{case.key}/{twin} at loss × {c:g}:\n" + "\n".join(wrong)
    # Every reason, piece of advice and the summary agree with the numbers beside them.
    traits = traits_of(built.model, [])
    found = contradictions(d, has_norm=traits.has_norm, has_residual=traits.has_residual)
    assert not found, f"{case.key}/{twin} at loss × {c:g}:\n" + "\n".join(found)


def test_every_twin_states_a_truth_for_every_layer() -> None:
    """The yardstick itself: statuses are known, every layer is covered, sick is sick."""
    assert len({c.key for c in CASES}) == len(CASES)
    for case in CASES:
        for name, twin in case.twins().items():
            assert twin.model_status <= STATUSES and twin.lr > 0 and twin.ground_truth
            for _, allowed in twin.layers:
                assert allowed and allowed <= STATUSES
            built = _built(case, name)
            for owner, module in built.model.named_modules():
                if next(module.parameters(recurse=False), None) is not None:
                    twin.expected(owner)  # raises if no pattern covers the layer
            fix = {"vanishing", "dead", "exploding", "nonfinite"}
            if name == "sick":
                assert twin.model_status <= fix, case.key
            else:
                assert not twin.model_status & fix, case.key
