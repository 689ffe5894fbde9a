"""The contradiction reader (tests/contradictions.py) catches every contradiction the
verdict issue found in the wild, and passes a diagnosis that has none."""

from __future__ import annotations

import pytest

from contradictions import contradictions
from gradsight import Diagnosis, LayerDiagnosis


def _d(*layers: LayerDiagnosis, summary: str = "", loss: float = 1.0, **kw) -> Diagnosis:  # type: ignore[no-untyped-def]
    statuses = [la.status for la in layers]
    from gradsight.diagnosis.verdict import worst_status

    return Diagnosis(worst_status(statuses), list(layers), loss, summary=summary, **kw)


def _layer(status: str = "ok", reason: str = "learning.", **kw) -> LayerDiagnosis:  # type: ignore[no-untyped-def]
    base = dict(name="0", module_type="Linear", grad_norm=0.1, signal_norm=1.0)
    base.update(kw)
    base.setdefault("param_grad_norms", {"weight": base["grad_norm"]})
    return LayerDiagnosis(status=status, reason=reason, **base)  # type: ignore[arg-type]


def test_a_consistent_diagnosis_passes() -> None:
    d = _d(_layer(), summary="Loss 1 (best constant prediction: 2.3).\nNo layer is starved.")
    assert contradictions(d) == []


@pytest.mark.parametrize(
    ("diagnosis", "finding"),
    [
        (
            _d(_layer("dead", "not called in the forward pass.", grad_norm=0.27)),
            "'not called' with gradient",
        ),
        (_d(_layer("dead", "dead units.", relative_grad=0.5)), "dead, yet its gradient"),
        (
            _d(_layer(reason="a Newton step on this layer alone would win 1.1e+00 of the loss")),
            "share of the loss above 1",
        ),
        (
            _d(_layer(), summary="the quadratic model predicts a decrease of 3.7× the loss"),
            "share of the loss above 1",
        ),
        (
            _d(
                _layer("converged", "the loss 2.0e-04 is below 1e-04 of the best constant"),
            ),
            "'is below X of' comparison",
        ),
        (_d(_layer(), summary="Layers : converged."), "blank layer name"),
        (
            _d(
                _layer(
                    "vanishing",
                    "lost.",
                    activation="relu",
                    advice=["Use a non-saturating activation (ReLU, GELU) with He init."],
                )
            ),
            "non-saturating activation to a model using ['relu']",
        ),
        (
            _d(_layer("vanishing", "lost.", advice=["Add normalization … (0% saturated)."])),
            "quotes 0% as a cause",
        ),
        (_d(_layer("vanishing", "gradient 0: the signal is lost; .")), "dangling fragment"),
        (
            _d(
                _layer("converged", "solved."),
                _layer("vanishing", "lost.", name="1"),
                loss=1e-8,
                baseline_loss=1.0,
            ),
            "nothing is left to win",
        ),
        (
            _d(_layer(), summary="The loss 2.07 is no better than predicting a constant (7.66)"),
            "'no better than' reads backwards",
        ),
        (_d(_layer(headroom=1.5)), "headroom 1.5 above 1"),
    ],
)
def test_each_known_contradiction_is_caught(diagnosis: Diagnosis, finding: str) -> None:
    found = contradictions(diagnosis)
    assert any(finding in f for f in found), found
