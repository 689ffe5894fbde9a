"""The run store: what a :class:`gradsight.Monitor` writes and the report reads.

A run directory (``logdir``) holds

* ``run.json``: run metadata (layers in forward order, settings, status);
* ``metrics-NNNNN.parquet``: measurements in long format, one row per
  ``(step, layer, metric, value)``; ``layer`` is ``""`` for model-level metrics such as
  the loss. Each part file is written whole to a temporary name and renamed into place,
  so a crash or a kill loses at most the batch not yet written and every file present
  is complete;
* ``diagnosis.json`` (optional): a :class:`~gradsight.diagnosis.Diagnosis` as ``to_dict()``.

Parquet needs ``pyarrow``, imported only when a store is opened.
"""

from gradsight.store._reader import Run, load_run
from gradsight.store._writer import RunWriter

__all__ = ["Run", "RunWriter", "load_run"]
