"""Append-only writer of a run directory: metadata JSON and Parquet part files."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradsight._errors import GradsightError
from gradsight.store._arrow import pyarrow_modules

__all__ = ["METADATA", "RunWriter", "atomic_write_bytes", "atomic_write_text"]

METADATA = "run.json"
_PART = "metrics-{:05d}.parquet"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: all or nothing.

    On failure (a full disk, a read-only file system) ``path`` is as it was, the
    temporary file is removed, and the ``OSError`` is raised.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


class RunWriter:
    """Buffers ``(step, layer, metric, value)`` rows and writes them as Parquet parts.

    Rows arrive as one block per step: a step number, a sequence of ``(layer, metric)``
    keys and a float array of values. :meth:`flush` writes everything buffered as the
    next part file, atomically; when that fails (``OSError``: a full disk, a read-only
    file system) the rows stay buffered for the next flush and every part file written
    before is untouched.

    Args:
        logdir: The run directory (created if missing).
        metadata: Written as ``run.json`` at once (and again by :meth:`update_metadata`).
        overwrite: Delete an earlier run's files in ``logdir`` first; without it a
            ``logdir`` that already holds a run is an error.

    Example:
        >>> import tempfile
        >>> from gradsight.store import load_run
        >>> d = tempfile.mkdtemp()
        >>> w = RunWriter(d, {"layers": ["0"]})
        >>> w.append(0, [("", "loss"), ("0", "grad_norm")], np.array([2.3, 0.5]))
        >>> w.flush().name
        'metrics-00000.parquet'
        >>> run = load_run(d)
        >>> run.series("loss"), run.num_rows
        ({'': (array([0]), array([2.3]))}, 2)
    """

    def __init__(
        self, logdir: str | Path, metadata: dict[str, Any], *, overwrite: bool = False
    ) -> None:
        self._pa, self._pq = pyarrow_modules()
        self.logdir = Path(logdir)
        if self.logdir.exists() and not self.logdir.is_dir():
            raise GradsightError(
                f"logdir {self.logdir} is a file; expected a directory for the run store "
                "(created if missing). Pass another path, e.g. logdir='runs/a'."
            )
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            probe = self.logdir / ".gradsight-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise GradsightError(
                f"cannot write the run store in logdir {self.logdir} ({exc.strerror or exc}); "
                "pass a directory you can write to."
            ) from None
        earlier = sorted(self.logdir.glob("metrics-*.parquet"))
        if (self.logdir / METADATA).exists() or earlier:
            if not overwrite:
                raise GradsightError(
                    f"{self.logdir} already holds a gradsight run ({METADATA}, "
                    f"{len(earlier)} metrics file(s)); pass a new logdir, or overwrite=True "
                    "to replace it."
                )
            for p in earlier:
                p.unlink()
            for name in (METADATA, "diagnosis.json"):
                (self.logdir / name).unlink(missing_ok=True)
        self.metadata = dict(metadata)
        self._blocks: list[tuple[int, Sequence[tuple[str, str]], np.ndarray]] = []
        self._parts = 0
        self.rows_written = 0
        self.update_metadata()

    @property
    def buffered(self) -> int:
        """Number of step blocks waiting for the next :meth:`flush`."""
        return len(self._blocks)

    def append(self, step: int, keys: Sequence[tuple[str, str]], values: np.ndarray) -> None:
        """Buffer one step's values; ``keys[i]`` is the ``(layer, metric)`` of ``values[i]``."""
        if len(keys) != len(values):
            raise GradsightError(
                f"got {len(keys)} (layer, metric) keys but {len(values)} values for step "
                f"{step}; pass one key per value."
            )
        if len(keys):
            self._blocks.append((int(step), keys, np.asarray(values, dtype=np.float64)))

    def flush(self) -> Path | None:
        """Write the buffered rows as the next part file; return its path (None if empty)."""
        if not self._blocks:
            return None
        pa, pq = self._pa, self._pq
        blocks = self._blocks
        steps = np.concatenate([np.full(len(k), s, dtype=np.int64) for s, k, _ in blocks])
        values = np.concatenate([v for _, _, v in blocks])
        # Dictionary-encoded names, each distinct key list encoded once (a monitor passes
        # the same list object for every step of the same layout): no per-row Python.
        layer_names: dict[str, int] = {}
        metric_names: dict[str, int] = {}
        encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        layer_codes, metric_codes = [], []
        for _, keys, _ in blocks:
            codes = encoded.get(id(keys))
            if codes is None:
                codes = encoded[id(keys)] = (
                    _codes(layer_names, (layer for layer, _ in keys)),
                    _codes(metric_names, (metric for _, metric in keys)),
                )
            layer_codes.append(codes[0])
            metric_codes.append(codes[1])
        table = pa.table(
            {
                "step": pa.array(steps, type=pa.int64()),
                "layer": _dictionary_column(pa, layer_codes, layer_names),
                "metric": _dictionary_column(pa, metric_codes, metric_names),
                "value": pa.array(values, type=pa.float64()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        path = self.logdir / _PART.format(self._parts)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())  # on failure, rows stay buffered
        self._blocks = []
        self._parts += 1
        self.rows_written += table.num_rows
        return path

    def update_metadata(self, **changes: Any) -> None:
        """Merge ``changes`` into the metadata and rewrite ``run.json`` atomically."""
        self.metadata.update(changes)
        atomic_write_text(
            self.logdir / METADATA, json.dumps(self.metadata, indent=2, default=_json_default)
        )

    def write_json(self, name: str, obj: Any) -> Path:
        """Write a JSON side file (e.g. ``diagnosis.json``) into the run, atomically."""
        path = self.logdir / name
        atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))
        return path


def _codes(names: dict[str, int], strings: Iterable[str]) -> np.ndarray:
    """Each string's index in ``names``, adding the new ones."""
    return np.fromiter((names.setdefault(x, len(names)) for x in strings), np.int32)


def _dictionary_column(pa: Any, codes: list[np.ndarray], names: dict[str, int]) -> Any:
    """A dictionary-encoded string column: ``codes`` index ``names`` in insertion order."""
    return pa.DictionaryArray.from_arrays(
        pa.array(np.concatenate(codes)), pa.array(list(names), type=pa.string())
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)
