"""Sinks: other destinations (TensorBoard, a Lightning logger) for the rows a Monitor writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["Sink", "TeeWriter"]


class Sink(Protocol):
    """Receives each block of rows as it goes to the run store.

    ``keys[i]`` is the ``(layer, metric)`` of ``values[i]``; ``layer`` is ``""`` for
    model-level metrics. A sink may also have a ``flush()`` method, called when the
    Monitor flushes.
    """

    def __call__(self, step: int, keys: Sequence[tuple[str, str]], values: np.ndarray) -> None: ...


class TeeWriter:
    """A run-store writer that also hands every appended block to sinks."""

    def __init__(self, writer: Any, sinks: Sequence[Sink] = ()) -> None:
        self.writer = writer
        self.sinks = list(sinks)

    @classmethod
    def wrap(cls, writer: Any, sink: Sink) -> TeeWriter:
        """``writer`` with ``sink`` added (a TeeWriter already is extended, not nested)."""
        if isinstance(writer, TeeWriter):
            writer.sinks.append(sink)
            return writer
        return cls(writer, [sink])

    @property
    def metadata(self) -> dict[str, Any]:
        return self.writer.metadata

    @property
    def buffered(self) -> int:
        return int(self.writer.buffered)

    @property
    def rows_written(self) -> int:
        return int(self.writer.rows_written)

    def append(self, step: int, keys: Sequence[tuple[str, str]], values: np.ndarray) -> None:
        self.writer.append(step, keys, values)
        for sink in self.sinks:
            sink(step, keys, np.asarray(values, dtype=np.float64))

    def flush(self) -> Path | None:
        path: Path | None = self.writer.flush()
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()
        return path

    def update_metadata(self, **changes: Any) -> None:
        self.writer.update_metadata(**changes)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.writer.write_json(name, obj)
