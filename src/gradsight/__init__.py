"""gradsight: is a small gradient *converged*, or did the signal vanish on its way back?

Public API (stable names)::

    d = gradsight.diagnose(model, (inputs, targets), loss_fn, lr=None)
    d.status, d.layers, d.layer("3"), d.nonfinite_origin, d.to_dict(), d.to_html(path)

    with gradsight.Monitor(model, logdir="runs/a", every=1) as mon:  # mon.step(loss)
        ...                                                          # after backward()
    gradsight.report("runs/a")  # -> path of a self-contained HTML report

    gradsight.curvature.top_eigenvalues(model, batch, loss_fn, k=1, params=None)
    gradsight.curvature.trace(model, batch, loss_fn, probes=100, params=None)
"""

from __future__ import annotations

from gradsight import curvature, lab, optim, theory
from gradsight._errors import GradsightError
from gradsight.diagnosis import STATUSES, Diagnosis, LayerDiagnosis, Status, Thresholds, diagnose
from gradsight.monitor import Monitor
from gradsight.probes import SignalFlow, SignalProbe
from gradsight.report import report

__version__ = "0.1.0"

__all__ = [
    "STATUSES",
    "Diagnosis",
    "GradsightError",
    "LayerDiagnosis",
    "Monitor",
    "SignalFlow",
    "SignalProbe",
    "Status",
    "Thresholds",
    "__version__",
    "curvature",
    "diagnose",
    "lab",
    "optim",
    "report",
    "theory",
]
