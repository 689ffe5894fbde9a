"""Monitoring a training run: cheap per-step signal flow, periodic curvature, a run store."""

from gradsight.monitor._curvature import CurvatureTier
from gradsight.monitor._monitor import Monitor

__all__ = ["CurvatureTier", "Monitor"]
