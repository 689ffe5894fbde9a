"""gradsight: is a small gradient *converged*, or did the signal vanish on its way back?"""

from __future__ import annotations

from gradsight._errors import GradsightError

__version__ = "0.1.0"

__all__ = ["GradsightError", "__version__"]
