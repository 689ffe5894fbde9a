"""The Monitor under ``torch.distributed``: reduce each step's measurements across ranks.

Under data parallelism (``DistributedDataParallel``) every rank runs the same model on
its own shard of the global batch, and DDP averages the parameter gradients across
ranks, so that each rank ends the backward pass with the gradient of the *global*
objective L = (1/W) Σ_r L_r (W ranks, L_r the loss on rank r's shard). The Monitor's
measurements are reduced so that they describe that objective on the global batch,
exactly as a single process that ran the concatenated batch would measure them:

* ``grad_norm``: parameter gradients are already averaged by DDP, equal on every rank:
  not reduced. Under FSDP2 each rank holds a shard of each gradient (a ``DTensor``): the
  norms of the shards combine by summed squares.
* Backward-signal norms (``signal_norm``, ``activation_signal_norm``,
  ``input_signal_norm``): the signal on rank r is ∂L_r/∂z = W·∂L/∂z on its shard, so
  ‖∂L/∂z‖ over the global batch is √(Σ_r ‖δ_r‖²) / W (summed squares).
* ``output_norm`` (a forward quantity): √(Σ_r ‖z_r‖²).
* ``saturation`` and ``mean_derivative``: averages over entries, weighted by each
  rank's number of entries; ``rms_derivative``: √(Σ_r rms_r²·n_r / Σ_r n_r).
* ``dead_fraction``: a unit is dead on the global batch when it is flat on every rank:
  the per-unit "ever active" masks are summed across ranks (a logical or).
* ``loss``: the mean over ranks (the objective DDP optimizes).
* Everything else (``lr``, ``loss_scale``, ``update_ratio``: the same on every rank
  since parameters are): rank 0's value.

Each metric declares its reduction where it is created
(:func:`gradsight.probes._kernel.declare`); the reducer only applies the declarations.
All of this is one ``all_reduce`` (sum) of one float64 vector per measured step, on
the device (no host synchronisation with NCCL). Each rank adds a fingerprint of its
keys to the vector; if ranks measured different layers or metrics, the reduced values
become NaN (a GradsightError where values are on the CPU, where checking costs nothing).

Only rank 0 writes the run store; other ranks get a :class:`NullWriter`.

Activation statistics of a rank come from its first ``activation_samples`` samples
(the Monitor's default is 32), so under DDP they cover W times as many samples as a
single process would read; pass ``activation_samples=None`` to read whole shards.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradsight._errors import GradsightError
from gradsight.diagnosis._sharded import is_sharded
from gradsight.probes._kernel import ActivationStates, Reduce, declare, reduction

__all__ = ["DistributedReducer", "NullWriter", "is_sharded", "local", "unwrap_parallel"]

# The metrics the Monitor itself creates (its probe and the kernel declare their own).
declare("grad_norm", Reduce.PARAMETER_NORM)
declare("loss", Reduce.RANK_MEAN)
declare("loss_scale", Reduce.REPLICATED)
declare("lr", Reduce.REPLICATED)
declare("update_ratio", Reduce.REPLICATED)  # under FSDP its parts are reduced at the source

_PER_ENTRY = (Reduce.ENTRY_MEAN, Reduce.ENTRY_RMS, Reduce.UNITS_FLAT)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper.

    Monitoring the inner module keeps layer names free of the ``module.`` prefix, and
    lets rank 0 run its diagnosis without entering DDP's collective forward.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (the tensor itself otherwise): norms of the shards
    combine into the whole's by summed squares (:attr:`Reduce.PARAMETER_NORM`)."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NullWriter:
    """Stands in for :class:`~gradsight.store.RunWriter` on ranks other than 0: keeps
    the metadata, writes nothing."""

    def __init__(
        self, logdir: str | Path, metadata: dict[str, Any], *, overwrite: bool = False
    ) -> None:
        del overwrite  # nothing is written
        self.logdir = Path(logdir)
        self.metadata = dict(metadata)
        self.rows_written = 0

    @property
    def buffered(self) -> int:
        return 0

    def append(self, step: int, keys: Sequence[tuple[str, str]], values: np.ndarray) -> None:
        del step, keys, values  # rank 0 writes the reduced values

    def flush(self) -> Path | None:
        return None

    def update_metadata(self, **changes: Any) -> None:
        self.metadata.update(changes)

    def write_json(self, name: str, obj: Any) -> Path:
        del obj  # rank 0 writes it
        return self.logdir / name


class _Plan:
    """How to reduce one list of keys: index tensors per declared reduction, built once
    per key list (and per set of layers with activation statistics)."""

    def __init__(
        self,
        keys: Sequence[tuple[str, str]],
        units: dict[str, int],
        device: torch.device,
        sharded: bool,
    ) -> None:
        slot = {layer: i for i, layer in enumerate(units)}
        kinds = [reduction(m) for _, m in keys]
        if not sharded:  # each rank holds the parameters whole: equal everywhere already
            kinds = [Reduce.REPLICATED if k is Reduce.PARAMETER_NORM else k for k in kinds]
        for (layer, m), kind in zip(keys, kinds, strict=True):
            if kind in _PER_ENTRY and layer not in slot:
                raise GradsightError(
                    f"gradsight: {m!r} of layer {layer!r} has no activation statistics to "
                    "weight it by; this is a bug in gradsight, please report it."
                )

        def idx(*wanted: Reduce) -> torch.Tensor:
            return torch.tensor(
                [i for i, k in enumerate(kinds) if k in wanted], dtype=torch.long, device=device
            )

        def slots(kind: Reduce) -> torch.Tensor:
            return torch.tensor(
                [slot[layer] for (layer, _), k in zip(keys, kinds, strict=True) if k is kind],
                dtype=torch.long,
                device=device,
            )

        self.n = len(keys)
        self.layers = len(units)
        self.masks = sum(units.values())
        self.backward = idx(Reduce.BACKWARD_NORM)
        self.norms = idx(Reduce.FORWARD_NORM, Reduce.PARAMETER_NORM)
        self.mean = idx(Reduce.RANK_MEAN)
        self.weighted, self.weighted_slot = idx(Reduce.ENTRY_MEAN), slots(Reduce.ENTRY_MEAN)
        self.weighted_sq, self.weighted_sq_slot = idx(Reduce.ENTRY_RMS), slots(Reduce.ENTRY_RMS)
        dead = [(i, keys[i][0]) for i, k in enumerate(kinds) if k is Reduce.UNITS_FLAT]
        self.dead = torch.tensor([i for i, _ in dead], dtype=torch.long, device=device)
        # Masks are concatenated in the order of `units`; each unit of a layer's mask
        # belongs to that layer's UNITS_FLAT entry (or to none).
        entry = {layer: j for j, (_, layer) in enumerate(dead)}
        seg = [entry.get(layer, len(dead)) for layer, size in units.items() for _ in range(size)]
        self.mask_segment = torch.tensor(seg, dtype=torch.long, device=device)
        self.mask_sizes = torch.tensor(
            [float(units[layer]) for _, layer in dead] + [1.0], dtype=torch.float64, device=device
        )
        # A fingerprint of what this rank measured; small enough that its square and
        # sums of W squares are exact in float64.
        text = repr((list(keys), sorted(units.items())))
        self.fingerprint = float((zlib.crc32(text.encode()) & 0xFFFFF) + 1)


class DistributedReducer:
    """Reduce a Monitor's per-step measurements across the ranks of a process group.

    Built by :meth:`detect`; the Monitor calls :meth:`capture` with its probe just
    before ``collect()`` (for the per-layer entry counts and unit masks that the
    collected fractions do not carry), then :meth:`reduce` on the step's values.
    """

    def __init__(
        self, rank: int, world_size: int, group: Any = None, *, sharded: bool = False
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        #: Parameters (and their gradients) are sharded across ranks (FSDP): norms of
        #: parameters combine from the shards'.
        self.sharded = sharded
        self._states: dict[str, ActivationStates] = {}
        self._plan: tuple[tuple[Any, ...], _Plan] | None = None

    @classmethod
    def detect(
        cls, distributed: bool | None = None, model: nn.Module | None = None
    ) -> DistributedReducer | None:
        """A reducer when ``torch.distributed`` runs with more than one rank, else None.

        Args:
            distributed: None: detect; False: never (each rank records on its own);
                True: require an initialized process group.
            model: The monitored model, to detect FSDP's sharded parameters.

        Raises:
            GradsightError: ``distributed=True`` without an initialized process group.
        """
        if distributed is False:
            return None
        rank, world = _world()
        if distributed is True and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise GradsightError(
                "Monitor(distributed=True) needs an initialized torch.distributed process "
                "group; call torch.distributed.init_process_group() before creating the "
                "Monitor, or pass distributed=None to detect it."
            )
        if world <= 1:
            return None
        return cls(rank, world, sharded=model is not None and is_sharded(model))

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum ``tensors`` across ranks, in place (one collective)."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=self.group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the run store (rank 0)."""
        return self.rank == 0

    def capture(self, probe: Any) -> None:
        """Keep the summable states (entry counts, per-unit masks) of the step's
        activation statistics from ``probe`` (a lean-mode SignalProbe), before it is
        collected: the collected fractions alone cannot be reduced."""
        self._states = probe.activation_states()

    def reduce(self, keys: Sequence[tuple[str, str]], values: torch.Tensor) -> torch.Tensor:
        """The step's ``values`` (float64, one per key) reduced across ranks (see the
        module docstring); a collective: every rank must call it at the same step."""
        device = values.device
        states = self._states
        layers = {name: int(st.alive.numel()) for name, st in states.items()}
        sig = (tuple(keys), tuple(layers.items()), device)
        if self._plan is None or self._plan[0] != sig:
            self._plan = (sig, _Plan(keys, layers, device, self.sharded))
        plan = self._plan[1]
        w = float(self.world_size)
        v = values.to(torch.float64)
        counts = torch.tensor(
            [float(states[n].count) for n in layers], dtype=torch.float64, device=device
        )
        payload = torch.zeros(plan.n, dtype=torch.float64, device=device)
        payload[plan.backward] = v[plan.backward].square()
        payload[plan.norms] = v[plan.norms].square()
        payload[plan.mean] = v[plan.mean]
        if plan.layers:
            payload[plan.weighted] = v[plan.weighted] * counts[plan.weighted_slot]
            payload[plan.weighted_sq] = v[plan.weighted_sq].square() * counts[plan.weighted_sq_slot]
        masks = (
            torch.cat(
                [states[n].alive.reshape(-1).to(device=device, dtype=torch.float64) for n in layers]
            )
            if layers
            else torch.zeros(0, dtype=torch.float64, device=device)
        )
        f = torch.tensor([plan.fingerprint, plan.fingerprint**2], dtype=torch.float64)
        vec = torch.cat([payload, counts, masks, f.to(device)])
        torch.distributed.all_reduce(vec, group=self.group)

        total = vec[: plan.n]
        counts_all = vec[plan.n : plan.n + plan.layers]
        mask_sum = vec[plan.n + plan.layers : plan.n + plan.layers + plan.masks]
        fsum, fsq = vec[-2], vec[-1]
        out = v.clone()
        out[plan.backward] = total[plan.backward].sqrt() / w
        out[plan.norms] = total[plan.norms].sqrt()
        out[plan.mean] = total[plan.mean] / w
        if plan.layers:
            out[plan.weighted] = total[plan.weighted] / counts_all[plan.weighted_slot]
            out[plan.weighted_sq] = (
                total[plan.weighted_sq] / counts_all[plan.weighted_sq_slot]
            ).sqrt()
        if plan.dead.numel():
            active = torch.zeros(len(plan.mask_sizes), dtype=torch.float64, device=device)
            active.index_add_(0, plan.mask_segment, (mask_sum > 0).to(torch.float64))
            out[plan.dead] = (1.0 - active / plan.mask_sizes)[:-1]
        # Every rank measured the same keys iff (Σf)² = W·Σf² (equality in Cauchy-Schwarz).
        same = fsum * fsum == w * fsq
        if device.type == "cpu":
            if not bool(same):
                raise GradsightError(
                    "gradsight.Monitor under torch.distributed: ranks measured different "
                    "layers or metrics at the same step, so they cannot be reduced; run "
                    "the same model on every rank, or pass Monitor(..., distributed=False) "
                    "to record each rank on its own (one logdir per rank)."
                )
            return out
        return torch.where(same, out, torch.full_like(out, float("nan")))
