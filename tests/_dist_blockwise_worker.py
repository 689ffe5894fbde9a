"""Run by ``torchrun`` from tests/test_distributed.py: the blockwise engine across ranks.

Usage: torchrun --nproc_per_node 2 tests/_dist_blockwise_worker.py OUTDIR
Each rank builds :class:`BlockwiseGGN` on its shard (equal shards of an exact case, then
unequal shards of a sampled one) and writes its estimates to ``OUTDIR/blockwise{rank}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _Positions(nn.Module):
    """Token and position embeddings, the positions' ids without a batch dim (GPT-2's)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.tok(x) + self.pos(torch.arange(x.shape[1]).unsqueeze(0)))
        return self.head(h.mean(1))


def blockwise_cases() -> dict[str, tuple[nn.Module, Any, Any, list[int]]]:
    """Models, global batches and the shard boundaries of 2 ranks for the engine's test.

    ``positions``: 3 classes, 32 samples: exact columns, equal shards (the single
    process's numbers). ``sampled``: 11 classes (more columns than the exact limit):
    Monte Carlo draws, unequal shards 20 + 12.
    """
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    positions = _Positions().double()
    ids = torch.randint(0, 11, (32, 5), generator=g)
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 11)).double()
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    ce = nn.CrossEntropyLoss()
    return {
        "positions": (positions, (ids, torch.randint(0, 3, (32,), generator=g)), ce, [0, 16, 32]),
        "sampled": (mlp, (x, torch.randint(0, 11, (32,), generator=g)), ce, [0, 20, 32]),
    }


def main() -> None:
    import torch.distributed as dist

    from gradsight.curvature.blockwise import BlockwiseGGN

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for key, (model, (x, y), loss_fn, cuts) in blockwise_cases().items():
        lo, hi = cuts[rank], cuts[rank + 1]
        eng = BlockwiseGGN(model, (x[lo:hi], y[lo:hi]), loss_fn, draws=2, distributed=True)
        out[key] = {
            "exact": eng.exact,
            "samples": eng.samples,
            "skipped": sorted(eng.skipped),
            **{name: list(vars(eng.estimate(name, 1e-3)).values()) for name in eng.blocks},
            "whole": list(vars(eng.whole(1e-3)).values()),
        }
    (Path(sys.argv[1]) / f"blockwise{rank}.json").write_text(json.dumps(out))
    assert world == 2
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
