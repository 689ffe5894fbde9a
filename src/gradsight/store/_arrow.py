"""Lazy import of pyarrow, with an actionable error when it is missing."""

from __future__ import annotations

from types import ModuleType

from gradsight._errors import GradsightError

__all__ = ["pyarrow_modules"]


def pyarrow_modules() -> tuple[ModuleType, ModuleType]:
    """``(pyarrow, pyarrow.parquet)``, or a :class:`GradsightError` saying how to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GradsightError(
            "the run store needs pyarrow (Parquet files), which is not installed; "
            "run `pip install pyarrow` (or reinstall gradsight, which depends on it)."
        ) from None
    return pa, pq
