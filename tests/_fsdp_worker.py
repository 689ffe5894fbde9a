"""Run by ``torchrun`` from tests/test_fsdp.py: FSDP2 training under a Monitor (gloo, CPU).

Usage: torchrun --nproc_per_node 2 tests/_fsdp_worker.py LOGDIR
Every Linear and the root are sharded with ``fully_shard``; every rank passes the same
logdir, rank 0 alone must write it. Then every rank diagnoses the sharded model on the
whole first batch (a collective) and writes what it found.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import gradsight
    from gradsight.integrations.distributed import is_writer

    sys.path.insert(0, str(Path(__file__).parent))
    from _dist_case import LR, batches, make_model, shard, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logdir = Path(sys.argv[1])
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = train(model, [shard(b, rank, world) for b in batches()], logdir / "run")
    notes = [str(w.message) for w in caught if "gradsight" in str(w.message)]
    x, y = batches()[0]
    d = gradsight.diagnose(model, (x, y), nn.CrossEntropyLoss(), lr=LR)
    out = {
        "rank": rank,
        "writer": type(mon._writer).__name__,
        "notes": notes,
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "status": d.status,
        "layers": {layer.name: [layer.status, layer.grad_norm] for layer in d.layers},
        "report": str(gradsight.report(logdir / "run")) if is_writer() else None,
    }
    dist.barrier()
    (logdir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
