"""Per-layer verdicts: converged, vanishing, exploding, dead, frozen or ok — with reasons."""

from gradsight.diagnosis.baseline import constant_baseline_loss
from gradsight.diagnosis.diagnose import diagnose
from gradsight.diagnosis.result import STATUSES, Diagnosis, LayerDiagnosis, Status
from gradsight.diagnosis.rules import RULES, Thresholds, Verdict

__all__ = [
    "RULES",
    "STATUSES",
    "Diagnosis",
    "LayerDiagnosis",
    "Status",
    "Thresholds",
    "Verdict",
    "constant_baseline_loss",
    "diagnose",
]
