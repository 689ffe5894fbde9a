"""Per-layer verdicts: converged, vanishing, exploding, dead or ok — with reasons."""

from gradsight.diagnosis.baseline import constant_baseline_loss
from gradsight.diagnosis.diagnose import diagnose
from gradsight.diagnosis.result import STATUSES, Diagnosis, LayerDiagnosis
from gradsight.diagnosis.verdict import Thresholds

__all__ = [
    "STATUSES",
    "Diagnosis",
    "LayerDiagnosis",
    "Thresholds",
    "constant_baseline_loss",
    "diagnose",
]
