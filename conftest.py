"""Doctest collection: skip integration modules whose optional package is not installed.

``make test`` installs every extra (``.[dev]``); a user running ``pytest`` with only some
of them still gets a clean run of the rest.
"""

from __future__ import annotations

import importlib.util


def _missing(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is None for m in modules)


collect_ignore = [
    path
    for path, needs in (
        ("src/gradsight/integrations/lightning.py", ("pytorch_lightning", "lightning")),
        ("src/gradsight/integrations/hf.py", ("transformers",)),
        ("src/gradsight/integrations/tensorboard.py", ("tensorboard",)),
    )
    if _missing(*needs)
]
