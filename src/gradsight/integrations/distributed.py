"""gradsight under ``torch.distributed``: data parallelism (DDP) and sharded parameters (FSDP2).

**DDP.** Create the :class:`~gradsight.Monitor` on every rank after
``init_process_group`` (the model or its ``DistributedDataParallel`` wrapper), with the
same logdir everywhere, and call ``mon.step(loss)`` on every rank at every step. The
Monitor detects the process group and

* reduces each measured step across ranks with one ``all_reduce``, so that the values
  equal those of one process on the concatenated batch: backward-signal norms from
  summed squares (÷W, since DDP averages gradients), saturation and derivative
  averages weighted by each rank's entry counts, dead units as units flat on every
  rank, the loss averaged; parameter gradient norms are DDP's averaged gradients
  already (:mod:`gradsight.monitor._distributed` has the details);
* writes the run store, the diagnosis at close (rank 0's shard) and any sinks
  (TensorBoard, Lightning loggers) on rank 0 only.

Equality with the single process needs the same activation sample on both: the
Monitor reads activation statistics from the first ``activation_samples`` samples of
each rank (default 32), so pass ``activation_samples=None`` to compare. BatchNorm
without ``SyncBatchNorm`` normalizes per shard: the run then differs from the single
process in training itself, not in measuring.

The curvature tier (``curvature_every``) under DDP: each rank builds its operator on
its shard and :class:`gradsight.curvature.distributed.DistributedOperator` averages every
curvature-vector product, the gradient and the loss over the ranks, so Lanczos, Hutch++
and CG run in lockstep on all ranks (fixed seeds, identical all-reduced values) and give
the curvature of the whole batch: λmax, trace and α* equal one process on the
concatenated batch to 1e-6 (tests/test_distributed.py); the CG-based headroom to 1e-4.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and their gradients are
``DTensor``s, each rank holding a shard. Create the Monitor on every rank after
``fully_shard`` (it detects the sharding), call ``mon.step(loss)`` on every rank. The
cheap tier reduces as under DDP, except that parameter norms (``grad_norm``, both norms
of ``update_ratio``) come from each rank's shards and combine by summed squares, so that
every stored value equals one process on the whole batch (tests/test_fsdp.py, to 1e-5).
:func:`gradsight.diagnose` on a sharded model gathers the full parameters into a plain
copy on every rank (a collective: call it on every rank; it costs one full copy of the
parameters while it runs) and gives what it gives on the unsharded model; the Monitor's
diagnosis at close does the same, rank 0 writing it. The curvature tier runs on such
a gathered copy too, each rank on its shard of the batch with every product averaged
over the ranks as under DDP (the copy lives for the time of the measurement). The
Lightning callback works under ``ModelParallelStrategy`` with ``fully_shard`` in
``configure_model`` (tests/test_fsdp.py). The first-generation
``FullyShardedDataParallel`` wrapper (flat parameters) is not supported: use
``distributed=False`` with a logdir per rank there.
"""

from __future__ import annotations

import torch

from gradsight.monitor._distributed import DistributedReducer, NullWriter, unwrap_parallel

__all__ = ["DistributedReducer", "NullWriter", "is_writer", "rank", "unwrap_parallel", "world_size"]


def rank() -> int:
    """This process's rank in the default process group (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks of the default process group (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes runs and reports (rank 0, or a single process).

    Example:
        >>> is_writer()  # no process group here
        True
    """
    return rank() == 0
