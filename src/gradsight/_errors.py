"""The one exception type gradsight raises for bad input."""

from __future__ import annotations


class GradsightError(ValueError):
    """Raised when gradsight is given input it cannot work with.

    Every message says what was expected, what was received and how to fix it.
    Subclasses :class:`ValueError` so that generic input-validation handlers catch it.
    """
