"""Lightning with FSDP2 (``ModelParallelStrategy``, gloo, 2 CPU processes) and the callback.

Usage: python tests/_fsdp_lightning_worker.py LOGDIR   (Lightning starts the second rank)
Each rank trains on its half of every global batch of tests/_dist_case.py; the callback
records the run (rank 0 writes) and diagnoses at the end (every rank takes part).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main() -> None:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import ModelParallelStrategy
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from gradsight.integrations.lightning import GradsightCallback

    sys.path.insert(0, str(Path(__file__).parent))
    from _dist_case import LR, batches, make_model, shard

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def configure_model(self) -> None:
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(self.net)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Shards(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        """This rank's shard of every global batch (no sampler for Lightning to replace)."""

        def __iter__(self):  # type: ignore[no-untyped-def]
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            return iter([shard(b, rank, world) for b in batches()])

    loader = torch.utils.data.DataLoader(Shards(), batch_size=None)
    torch.set_num_threads(1)
    callback = GradsightCallback(logdir=Path(sys.argv[1]) / "run", overwrite=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        # Two data-parallel ranks (Lightning's default would make them tensor-parallel).
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"
        ),
        max_steps=len(batches()),
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), loader)
    out = {
        "rank": trainer.global_rank,
        "sharded": all(
            type(p).__name__ == "DTensor" for p in trainer.lightning_module.parameters()
        ),
        "notes": [str(w.message) for w in caught if "radsight" in str(w.message)],
        "report": None if callback.report_path is None else str(callback.report_path),
    }
    (Path(sys.argv[1]) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
