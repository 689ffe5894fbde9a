"""gradsight in the training loops people already use.

Each integration is a submodule, imported only when used, behind an extra:

================================  =====================================  ======================
submodule                         what                                   extra
================================  =====================================  ======================
:mod:`.lightning`                 ``GradsightCallback`` for Lightning    ``gradsight[lightning]``
:mod:`.hf`                        ``GradsightTrainerCallback`` (HF)      ``gradsight[hf]``
:mod:`.tensorboard`               ``TensorBoardSink``: scalars and       ``gradsight[tensorboard]``
                                  histograms in TensorBoard
:mod:`.distributed`               rank helpers; how the Monitor reduces  (torch only)
                                  across ranks (DDP), FSDP status
================================  =====================================  ======================

``import gradsight`` imports none of Lightning, transformers or TensorBoard; the
availability flags below only look the packages up (no import).

Example:
    >>> from gradsight import integrations
    >>> isinstance(integrations.TENSORBOARD_AVAILABLE, bool)
    True
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

__all__ = [
    "HF_AVAILABLE",
    "LIGHTNING_AVAILABLE",
    "TENSORBOARD_AVAILABLE",
    "distributed",
    "hf",
    "lightning",
    "tensorboard",
]


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


#: ``pytorch_lightning`` (or the ``lightning`` meta-package) is installed.
LIGHTNING_AVAILABLE = _available("pytorch_lightning") or _available("lightning")
#: ``transformers`` is installed.
HF_AVAILABLE = _available("transformers")
#: ``tensorboard`` is installed (its event format is written through torch's SummaryWriter).
TENSORBOARD_AVAILABLE = _available("tensorboard")

_SUBMODULES = ("distributed", "hf", "lightning", "tensorboard")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def _missing(extra: str, package: str) -> Any:
    """The error for an integration whose package is not installed."""
    from gradsight._errors import GradsightError

    return GradsightError(
        f"this gradsight integration needs {package}, which is not installed; "
        f"install it with `pip install 'gradsight[{extra}]'`."
    )
