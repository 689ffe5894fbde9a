"""The Monitor and diagnose under FSDP2 (``fully_shard``, gloo, 2 CPU ranks) against one process.

Parameters and gradients are DTensors sharded across the ranks; every rank trains on its
shard of each global batch. The stored measurements must equal one process on the whole
batch, rank 0 alone writes, and diagnose on the sharded model must say what it says on
the unsharded one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradsight
from gradsight.store import load_run

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _dist_case import LR, batches, make_model, table, torchrun, train  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(HERE / "_fsdp_worker.py", str(out))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    out = tmp_path_factory.mktemp("single")
    model = make_model()
    train(model, batches(), out / "run", distributed=False)
    return model, out / "run"


def test_fsdp_statistics_equal_single_process_on_whole_batch(
    fsdp_run: Path, single: tuple[nn.Module, Path]
) -> None:
    ref = table(load_run(single[1]))
    got = table(load_run(fsdp_run / "run"))
    assert set(got) == set(ref)
    metrics = {m for _, _, m in ref}
    assert {
        "grad_norm",  # from the shards' norms: summed squares across ranks
        "update_ratio",  # both norms from the shards
        "signal_norm",
        "activation_signal_norm",
        "saturation",
        "dead_fraction",
        "mean_derivative",
        "rms_derivative",
        "loss",
        # The curvature tier, on a gathered copy: every product all-reduced (as DDP).
        "lambda_max",
        "trace",
        "alpha_star",
        "headroom",
    } <= metrics
    keys = sorted(ref)
    a, b = np.array([got[k] for k in keys]), np.array([ref[k] for k in keys])
    # Headroom: up to 50 CG iterations amplify the rounding of shard sums (see
    # tests/test_distributed.py); everything else to 1e-5.
    rtol = np.array([1e-4 if k[2] == "headroom" else 1e-5 for k in keys])
    bad = [k for k, x, y, r in zip(keys, a, b, rtol, strict=True) if not np.isclose(x, y, r, 1e-12)]
    assert not bad, [(k, got[k], ref[k]) for k in bad]
    # Not degenerate: layer "4" has 3 rows, sharded 2 + 1, and some ReLU units are dead
    # on part of the batch only.
    dead = [ref[k] for k in keys if k[2] == "dead_fraction" and k[1] == "2"]
    assert 0 < min(dead) < 1, dead


def test_fsdp_rank_zero_writes_and_nothing_is_skipped(fsdp_run: Path) -> None:
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] for r in ranks)  # the parameters were DTensors
    assert [r["writer"] for r in ranks] == ["RunWriter", "NullWriter"]
    assert (
        ranks[0]["report"] == str(fsdp_run / "run" / "report.html") and ranks[1]["report"] is None
    )
    assert [r["notes"] for r in ranks] == [[], []]  # no gradsight warning: nothing skipped
    run = load_run(fsdp_run / "run")
    assert run.complete and run.metadata["steps"] == 3


def test_diagnose_on_fsdp_model_equals_unsharded(
    fsdp_run: Path, single: tuple[nn.Module, Path]
) -> None:
    model = single[0]  # trained on the same batches, unsharded
    d = gradsight.diagnose(model, batches()[0], nn.CrossEntropyLoss(), lr=LR)
    for r in (0, 1):
        got = json.loads((fsdp_run / f"rank{r}.json").read_text())
        assert got["status"] == d.status
        assert {name: s for name, (s, _) in got["layers"].items()} == {
            layer.name: layer.status for layer in d.layers
        }
        for layer in d.layers:  # whole gradients, not a shard's
            assert got["layers"][layer.name][1] == pytest.approx(layer.grad_norm, rel=1e-6)


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pytorch_lightning")
    import os
    import subprocess

    out = tmp_path_factory.mktemp("fsdp_lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_fsdp_lightning_worker.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_lightning_callback_under_fsdp_equals_single_process(
    lightning_run: Path, single: tuple[nn.Module, Path]
) -> None:
    ranks = [json.loads((lightning_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] for r in ranks) and [r["notes"] for r in ranks] == [[], []]
    assert ranks[0]["report"] and ranks[1]["report"] is None
    ref = table(load_run(single[1]))
    got = {
        (s, layer.removeprefix("net."), m): v
        for (s, layer, m), v in table(load_run(lightning_run / "run")).items()
    }
    assert set(got) <= set(ref)
    assert {m for _, _, m in got} >= {
        "grad_norm",
        "signal_norm",
        "dead_fraction",
        "saturation",
        "loss",
        "update_ratio",
    }
    bad = [k for k in got if not np.isclose(got[k], ref[k], 1e-5, 1e-12)]
    assert not bad, [(k, got[k], ref[k]) for k in bad]


def test_lightning_callback_diagnoses_fsdp_model_as_unsharded(
    lightning_run: Path, single: tuple[nn.Module, Path]
) -> None:
    # Every rank took part in gathering the parameters; rank 0 diagnosed its last shard
    # and wrote it once.
    stored = json.loads((lightning_run / "run" / "diagnosis.json").read_text())
    model = single[0]
    x, y = batches()[-1]
    d = gradsight.diagnose(
        model,
        (x[: len(x) // 2], y[: len(y) // 2]),
        nn.functional.cross_entropy,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
    )
    assert stored["status"] == d.status
    assert {layer["name"].removeprefix("net."): layer["status"] for layer in stored["layers"]} == {
        layer.name: layer.status for layer in d.layers
    }
