"""Run by ``torchrun`` from tests/test_distributed.py: DDP training under a Monitor (gloo).

Usage: torchrun --nproc_per_node 2 tests/_dist_worker.py LOGDIR
Every rank passes the same logdir; rank 0 alone must write it, and the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist

    import gradsight
    from gradsight.integrations.distributed import is_writer

    sys.path.insert(0, str(Path(__file__).parent))
    from _dist_case import batches, make_model, shard, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logdir = Path(sys.argv[1])
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mon = train(model, [shard(b, rank, world) for b in batches()], logdir / "run", forward=ddp)
    out = {"rank": rank, "writer": type(mon._writer).__name__, "report": None}
    if is_writer():
        out["report"] = str(gradsight.report(logdir / "run"))
    dist.barrier()
    (logdir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
