"""The core imports none of the optional integrations' packages."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("pytorch_lightning", "lightning", "transformers", "tensorboard", "accelerate")


def test_import_gradsight_imports_no_integration_package() -> None:
    code = (
        "import json, sys, gradsight, gradsight.integrations, gradsight.integrations.distributed;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_integrations_are_reached_lazily() -> None:
    import gradsight.integrations as integrations

    assert set(integrations.__all__) >= {"lightning", "hf", "tensorboard", "distributed"}
    assert integrations.distributed.is_writer()
