"""The Monitor under torch.distributed (DDP, gloo, 2 CPU ranks) against one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsight.store import load_run

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _dist_case import batches, make_model, table, torchrun, train  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(HERE / "_dist_worker.py", str(out))
    return out


def test_ddp_statistics_equal_single_process_on_concatenated_batch(
    ddp_run: Path, tmp_path: Path
) -> None:
    model = make_model()
    train(model, batches(), tmp_path / "single", distributed=False)
    single = table(load_run(tmp_path / "single"))
    ddp = table(load_run(ddp_run / "run"))
    assert set(ddp) == set(single)
    metrics = {m for _, _, m in single}
    # Every kind of reduction is exercised: summed squares, count-weighted fractions,
    # per-unit masks, the mean loss, values equal on all ranks.
    assert {
        "grad_norm",
        "signal_norm",
        "activation_signal_norm",
        "saturation",
        "dead_fraction",
        "mean_derivative",
        "rms_derivative",
        "loss",
        "update_ratio",
        # The curvature tier, from the blockwise engine (lambda_max_err and headroom_err
        # come from it alone): each layer's inputs and backward vectors gathered over the
        # ranks, gradients averaged.
        "lambda_max",
        "lambda_max_err",
        "trace",
        "alpha_star",
        "headroom",
        "headroom_err",
    } <= metrics
    keys = sorted(single)
    a = np.array([ddp[k] for k in keys])
    b = np.array([single[k] for k in keys])
    # Headroom comes out of up to 50 CG iterations on a damped system of condition ~1e3,
    # which amplifies the rounding of shard sums (1e-16) to ~1e-5; the products
    # themselves (lambda_max, trace, alpha_star) agree to 1e-6 like everything else.
    rtol = np.array([1e-4 if k[2] == "headroom" else 1e-6 for k in keys])
    bad = [k for k, x, y, r in zip(keys, a, b, rtol, strict=True) if not np.isclose(x, y, r, 1e-12)]
    assert not bad, [(k, ddp[k], single[k]) for k in bad]
    # The case is not degenerate: a shard alone would give other numbers.
    dead = [single[k] for k in keys if k[2] == "dead_fraction" and k[1] == "2"]
    assert 0 < min(dead) < 1, dead


def test_ddp_run_and_report_written_once_by_rank_zero(ddp_run: Path) -> None:
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["writer"] for r in ranks] == ["RunWriter", "NullWriter"]
    assert ranks[0]["report"] == str(ddp_run / "run" / "report.html")
    assert ranks[1]["report"] is None
    files = sorted(p.name for p in (ddp_run / "run").iterdir())
    assert files.count("run.json") == 1 and files.count("report.html") == 1
    run = load_run(ddp_run / "run")
    assert run.complete and run.metadata["steps"] == 3
    html = (ddp_run / "run" / "report.html").read_text()
    assert "grad_norm" in html or "gradient" in html


def test_blockwise_engine_across_ranks_equals_one_process_on_the_whole_batch(
    tmp_path: Path,
) -> None:
    """Inputs and backward vectors gathered per layer, gradients averaged: with exact
    columns and equal shards every rank gets the single process's numbers (the position
    embedding, whose ids have no batch dim, included); with sampled draws and unequal
    shards (20 + 12) both ranks get the same numbers, of the whole batch's size."""
    from _dist_blockwise_worker import blockwise_cases
    from gradsight.curvature.blockwise import BlockwiseGGN

    torchrun(HERE / "_dist_blockwise_worker.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"blockwise{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # bit for bit: every rank computes from the same tensors
    got = ranks[0]
    model, batch, loss_fn, _ = blockwise_cases()["positions"]
    ref = BlockwiseGGN(model, batch, loss_fn, draws=2)
    assert got["positions"]["exact"] and ref.exact and got["positions"]["skipped"] == []
    assert set(ref.blocks) == {"tok", "pos", "head"}
    for name in ref.blocks:
        want = list(vars(ref.estimate(name, 1e-3)).values())
        assert np.allclose(got["positions"][name], want, rtol=1e-9, atol=1e-15), name
    assert np.allclose(got["positions"]["whole"], list(vars(ref.whole(1e-3)).values()), 1e-9)
    sampled = got["sampled"]
    assert not sampled["exact"] and sampled["samples"] == 32 and sampled["skipped"] == []
    assert sampled["whole"][1] > 0  # sampled: a nonzero error bar on λmax
