"""The step-size lab: the seed's argument about scale, measured.

Gradient descent's good step changes when the loss is multiplied by ``c`` or the variable
by ``k``; Newton's method does not care. :func:`run_lab` measures this on test functions
(quadratics of chosen condition number, Rosenbrock, a 1-D non-quadratic bowl) and the
per-layer curvature-optimal steps of a deep sigmoid MLP; :func:`write_lab_html` writes
the figures as one offline HTML page (``gradsight lab``).
"""

from __future__ import annotations

from gradsight.lab.experiments import (
    LabResult,
    layer_steps,
    run_lab,
    step_size_sweep,
    write_lab_html,
)
from gradsight.lab.functions import TestFunction, quadratic, rosenbrock, scaled, softplus_bowl
from gradsight.lab.runners import Run, best_fixed_step, gradient_descent, newton

__all__ = [
    "LabResult",
    "Run",
    "TestFunction",
    "best_fixed_step",
    "gradient_descent",
    "layer_steps",
    "newton",
    "quadratic",
    "rosenbrock",
    "run_lab",
    "scaled",
    "softplus_bowl",
    "step_size_sweep",
    "write_lab_html",
]
