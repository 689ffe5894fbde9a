"""Reading a run directory back: metadata, metrics (also of a run that never closed)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradsight._errors import GradsightError
from gradsight.store._arrow import pyarrow_modules
from gradsight.store._writer import METADATA

__all__ = ["Run", "load_run"]


@dataclass
class Run:
    """A run read from its directory.

    Attributes:
        path: The run directory.
        name: Display name (the metadata's ``name``, else the directory name).
        metadata: ``run.json`` as a dict (empty if missing).
        steps, layers, metrics, values: The long-format columns as numpy arrays.
        diagnosis: ``diagnosis.json`` as a dict, or None.
        complete: False when the run did not close (crashed, killed, or still running):
            what was flushed is all there is.
    """

    path: Path
    name: str
    metadata: dict[str, Any]
    steps: np.ndarray
    layers: np.ndarray
    metrics: np.ndarray
    values: np.ndarray
    diagnosis: dict[str, Any] | None = None
    complete: bool = False
    _index: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return len(self.values)

    @property
    def metric_names(self) -> list[str]:
        return sorted(set(self.metrics.tolist()))

    def layer_order(self) -> list[str]:
        """Layers in forward order (from the metadata), then any others seen, model-level last."""
        known = [str(entry["name"]) for entry in self.metadata.get("layers", [])]
        seen = [name for name in dict.fromkeys(self.layers.tolist()) if name]
        return [n for n in known if n in seen] + [n for n in seen if n not in known]

    def series(self, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (steps, values)}`` of one metric, steps ascending."""
        if metric not in self._index:
            self._index[metric] = np.flatnonzero(self.metrics == metric)
        rows = self._index[metric]
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        layers = self.layers[rows]
        for layer in dict.fromkeys(layers.tolist()):
            sel = rows[layers == layer]
            order = np.argsort(self.steps[sel], kind="stable")
            out[layer] = (self.steps[sel][order], self.values[sel][order])
        return out

    def matrix(self, metric: str, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, M)``: ``M[i, j]`` is the metric of ``layers[i]`` at ``steps[j]`` (or NaN)."""
        series = self.series(metric)
        steps = np.unique(np.concatenate([s for s, _ in series.values()] or [np.zeros(0, int)]))
        m = np.full((len(layers), len(steps)), np.nan)
        for i, layer in enumerate(layers):
            if layer in series:
                s, v = series[layer]
                m[i, np.searchsorted(steps, s)] = v
        return steps, m


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds run metadata or metrics files."""
    return (path / METADATA).exists() or any(path.glob("metrics-*.parquet"))


def load_run(logdir: str | Path) -> Run:
    """Read a run directory written by :class:`~gradsight.store.RunWriter`.

    A run that never closed is read as far as it was flushed; a part file that cannot
    be read (only possible if written by something else) is skipped with a warning.

    Raises:
        GradsightError: if ``logdir`` is not a directory holding a gradsight run.
    """
    path = Path(logdir)
    if not path.is_dir() or not is_run_dir(path):
        raise GradsightError(
            f"{path} is not a gradsight run directory (expected {METADATA} and "
            "metrics-*.parquet files written by gradsight.Monitor); pass the Monitor's logdir."
        )
    pa, pq = pyarrow_modules()
    meta: dict[str, Any] = {}
    if (path / METADATA).exists():
        try:
            meta = json.loads((path / METADATA).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GradsightError(
                f"{path / METADATA} is not valid JSON ({exc}): the run's metadata is damaged. "
                "gradsight writes it atomically, so another program changed it; restore it "
                "or delete it to read the metrics alone."
            ) from None
    tables = []
    for part in sorted(path.glob("metrics-*.parquet")):
        try:
            tables.append(pq.read_table(part))
        except Exception as exc:  # pyarrow raises several types for damaged files
            warnings.warn(f"skipping unreadable {part}: {exc}", stacklevel=2)
    if tables:
        table = pa.concat_tables(tables, promote_options="permissive")
        steps = table.column("step").to_numpy()
        layers = np.asarray(table.column("layer").cast(pa.string()).to_pylist(), dtype=object)
        metrics = np.asarray(table.column("metric").cast(pa.string()).to_pylist(), dtype=object)
        values = table.column("value").to_numpy()
    else:
        steps = np.zeros(0, dtype=np.int64)
        layers = metrics = np.zeros(0, dtype=object)
        values = np.zeros(0)
    diagnosis = None
    if (path / "diagnosis.json").exists():
        try:
            diagnosis = json.loads((path / "diagnosis.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            warnings.warn(f"skipping unreadable {path / 'diagnosis.json'}: {exc}", stacklevel=2)
    return Run(
        path=path,
        name=str(meta.get("name") or path.name),
        metadata=meta,
        steps=steps,
        layers=layers,
        metrics=metrics,
        values=values,
        diagnosis=diagnosis,
        complete=meta.get("status") == "closed",
    )
