"""The reference zoo: models people train, each as a healthy and a sick twin.

Every twin states the statuses a correct diagnosis gives it and how that truth was
established without gradsight (``docs/zoo.py`` re-measures the numbers).
"""

from zoo.cases import CASES, STATUSES, Built, Twin, ZooCase, scaled

__all__ = ["CASES", "STATUSES", "Built", "Twin", "ZooCase", "scaled"]
