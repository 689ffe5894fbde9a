"""Per-layer Gauss-Newton curvature of every layer at once, from one hooked pass.

Per-block Lanczos needs dozens of products per layer, each a pass through the whole
model, which is hundreds of passes on a transformer. Here every layer's curvature comes
from one forward pass, the gradient's backward pass (two with the held-out check) and
one backward pass per column of the output-Hessian factor
(:mod:`gradsight.curvature._factor`), to the layers' outputs only:

* backward vectors ``s_j`` with ``E[s_j s_jᵀ] = H_out`` (exact columns when each sample's
  output is one vector of at most ``max_columns`` entries, else ``draws`` Monte Carlo
  draws, a second one only while the rows stay within ``draw_rows``) are sent back, one
  pass each, the last one freeing the graph;
* hooks keep each layer's input and the backward signal ``δ`` at its output; per sample
  ``n`` they give the rows ``u_{jn} = J_{b,n}ᵀ s_{jn}`` of the layer
  (:mod:`gradsight.curvature._rows`), whose sum ``G̃_b = Σ u uᵀ`` (weighted ``1/draws``)
  is the layer's GGN block, exactly or in expectation;
* from the ``R × R`` Gram matrix ``K_b = U_b U_bᵀ`` and ``U_b g_b``: ``λmax(G̃_b) =
  λmax(K_b)``, ``gᵀG̃g = ‖U g‖²``, the trace ``tr K_b``; the whole model's from the sum
  over layers (rows line up across layers).

Error bars are delete-a-group jackknife standard errors over samples (Efron & Stein
1981): they measure how much the estimate would move with other samples and other
draws, which bounds the Monte Carlo error from above (the sample-to-sample spread of
the per-sample GGNs counts too). With exact columns there is no Monte Carlo error and
the error bars are zero. Samples must not interact: under BatchNorm in train mode the
rows are the K-FAC-style approximation that ignores the batch statistics' coupling.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:  # torch >= 2.2: hold an output's autograd edge, not the output
    from torch.autograd.graph import get_gradient_edge
except ImportError:  # pragma: no cover - older torch: hold the output itself
    get_gradient_edge = None  # type: ignore[assignment]

from gradsight._batch import split_batch, trainable_parameters
from gradsight._errors import GradsightError
from gradsight.curvature._blocks import forward_loss
from gradsight.curvature._factor import output_factor
from gradsight.curvature._rows import (
    TiedRows,
    computes_as_its_kind,
    known_kind,
    layer_rows,
    overrides_forward,
    unsupported_reason,
)
from gradsight.curvature.distributed import Ranks

__all__ = ["JACKKNIFE_GROUPS", "BlockEstimate", "BlockwiseGGN"]

#: Groups of samples left out in turn for the jackknife error bars.
JACKKNIFE_GROUPS = 10
#: Gram matrices summarized together at most (bytes; the per-layer ones are ``R × R``).
_PENDING_BYTES = 1 << 24


@dataclass(frozen=True)
class BlockEstimate:
    """Curvature of one block (or of all covered blocks together) along its gradient.

    Attributes:
        lambda_max: largest eigenvalue of the block's GGN.
        lambda_max_err: its standard error (jackknife over samples; 0 when exact).
        alpha_star: ``gᵀg / gᵀGg``, the curvature-optimal step along the gradient.
        alpha_star_err: its standard error.
        decrement: ``½ (gᵀg)² / (gᵀGg + λ gᵀg)``: the loss decrease the damped quadratic
            model predicts for the best step along the gradient, ``λ = damping·λmax``;
            the first conjugate-gradient step of ``½ gᵀ(G + λI)⁻¹g``, a lower bound on it.
        decrement_err: its standard error.
        trace: trace of the block's GGN (unbiased), and ``trace_err`` its standard error.
        grad_sq: ``gᵀg``.
        exact: whether the rows came from exact output-Hessian columns (no sampling).
        rows: number of rows ``R``.
    """

    lambda_max: float
    lambda_max_err: float
    alpha_star: float
    alpha_star_err: float
    decrement: float
    decrement_err: float
    trace: float
    trace_err: float
    grad_sq: float
    exact: bool
    rows: int


@dataclass
class _Summary:
    """The parts of the ``R × R`` Gram matrix the estimates use (K itself is dropped)."""

    upper: float  # λmax(K)
    lower: float  # cross-validated top curvature (0 if unavailable)
    upper_groups: torch.Tensor  # leave-group-out λmax, to first order
    trace: float
    trace_groups: torch.Tensor


#: Placeholder of a block whose Gram matrix waits in the buffer to be summarized.
_PENDING = _Summary(math.nan, 0.0, torch.empty(0), math.nan, torch.empty(0))


@dataclass
class _Block:
    names: list[str]
    params: Sequence[torch.Tensor]
    summary: _Summary  # what the estimates need of K = U Uᵀ (weighted), kept small
    ug: torch.Tensor  # (R,) float64, weighted U g
    gg: float
    ug_fit: torch.Tensor | None = None
    gg_fit: float = 0.0
    grad_fit: list[torch.Tensor] | None = None


class BlockwiseGGN:
    """Rows of every supported layer's GGN block from one batched pass (module docstring).

    Args:
        model, batch, loss_fn: as in :func:`gradsight.diagnose`; ``model(inputs)`` must
            return the tensor the loss is computed from.
        blocks: ``{name: module}`` of the layers to measure (each its own trainable
            parameters); ``None`` for every module owning trainable parameters.
        draws: Monte Carlo draws of the output-Hessian factor when it is not exact.
        max_columns: use the exact factor when it has at most this many columns and
            the rows (columns × samples) are at most ``max_rows``; the Gram matrices
            are ``rows × rows``.
        draw_rows: draws beyond the first are taken only while the rows (draws ×
            samples) stay within this: a layer's work grows with the square of the
            rows, while the error bars, which are dominated by the spread between samples
            once there are more than a few dozen, shrink little with more draws.
        held_out: also prepare the held-out check of :meth:`held_out_step`: gradient
            and rows of the first half of the samples (not under ``distributed``).
        seed: seed of the draws (a private generator; the global RNG is untouched).
        distributed: every rank of ``group`` holds a shard of the batch and builds the
            engine at the same time: the result is that of the concatenated batch (rank
            order) with the loss and gradient averaged over the ranks, as DDP averages
            them (:class:`~gradsight.curvature.distributed.Ranks`), the same on every
            rank. Exact columns give the single process's numbers to rounding; sampled
            ones draw independently on each rank.
        group: the process group (default: the world).

    Attributes:
        skipped: ``{name: reason}`` for the requested layers that are not covered.
        loss: the loss on the batch.
        exact: whether the rows are exact.
        samples: the batch size ``n``.

    Raises:
        GradsightError: when the model's outputs are not one tensor with a batch dim, or
            the loss's output-space Hessian has no known factor.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        blocks: Mapping[str, nn.Module] | None = None,
        *,
        draws: int = 1,
        max_columns: int = 8,
        max_rows: int = 2048,
        draw_rows: int = 128,
        held_out: bool = False,
        seed: int = 0,
        distributed: bool = False,
        group: Any = None,
    ) -> None:
        ranks = Ranks(group) if distributed else None
        _release_free_memory()
        if blocks is None:
            blocks = {
                name: m
                for name, m in model.named_modules()
                if any(p.requires_grad for p in m.parameters(recurse=False))
            }
        self.skipped: dict[str, str] = {}
        trainable = {id(p) for _, p in trainable_parameters(model)}
        users: dict[int, list[str]] = {}
        named_mods = dict(model.named_modules())
        for mname, m in named_mods.items():
            for p in m.parameters(recurse=False):
                users.setdefault(id(p), []).append(mname)
        wanted: dict[str, nn.Module] = {}
        partners: dict[str, list[str]] = {}
        for name, m in blocks.items():
            own = [p for p in m.parameters(recurse=False) if id(p) in trainable]
            shared = [q for p in own for q in users.get(id(p), []) if q != name]
            if not own:
                self.skipped[name] = "no trainable parameters of its own"
            elif (why := unsupported_reason(m)) is not None:
                self.skipped[name] = why
            elif shared and not _tie_supported(named_mods, [name, *shared], trainable):
                self.skipped[name] = "a parameter shared with another module"
            else:
                wanted[name] = m
                partners[name] = list(dict.fromkeys(shared))
        hooked = dict(wanted)
        for name in wanted:
            for q in partners[name]:
                hooked[q] = named_mods[q]
        calls: dict[str, list[_Call]] = {n: [] for n in hooked}
        # Subclasses with a forward of their own, checked on their calls (see _rows).
        check = {n for n, m in hooked.items() if overrides_forward(m)}
        differs: dict[str, str] = {}
        # A module applied once for the whole batch (a position embedding on ids of
        # shape (1, T), its output broadcast onto every sample) has no per-sample
        # backward signal at its output; its output is expanded to the batch in the
        # forward hook (the broadcast that follows gives the same values), so that
        # autograd returns each sample's signal.
        batch_size = _batch_size(batch)
        expand = {"on": batch_size is not None and batch_size > 1, "used": False}

        def hook(name: str) -> Callable[..., Any]:
            def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
                if not (
                    args
                    and isinstance(args[0], torch.Tensor)
                    and isinstance(output, torch.Tensor)
                    and output.requires_grad
                ):
                    calls[name].append(_Call.empty())
                    return None
                a = args[0].detach()
                if (
                    name in check
                    and name not in differs
                    and not computes_as_its_kind(module, a, output)
                ):
                    differs[name] = type(module).__name__
                if (
                    expand["on"]
                    and isinstance(module, nn.Embedding)
                    and a.ndim > 0
                    and a.shape[0] == 1
                    and output.ndim > 1
                ):
                    assert batch_size is not None
                    a = a.expand(batch_size, *a.shape[1:])
                    output = output.expand(batch_size, *output.shape[1:])
                    expand["used"] = True
                    calls[name].append(_Call.of(a, output))
                    return output
                calls[name].append(_Call.of(a, output))
                return None

            return record

        params0 = [p for _, p in trainable_parameters(model)]
        device = params0[0].device
        rng = torch.get_rng_state()
        for attempt in (0, 1):
            handles = [m.register_forward_hook(hook(n)) for n, m in hooked.items()]
            try:
                outputs, loss = forward_loss(model, batch, loss_fn, rng, device)
                break
            except (RuntimeError, GradsightError):  # the model's error, wrapped or not
                # The expanded output met an in-place operation (or a shape check):
                # measure without the expansion (such layers are then not covered).
                if attempt or not expand["used"]:
                    raise
                expand["on"] = False
                for v in calls.values():
                    v.clear()
            finally:
                for h in handles:
                    h.remove()
        if not isinstance(outputs, torch.Tensor) or outputs.ndim == 0:
            raise GradsightError(
                "blockwise curvature needs model(inputs) to return one tensor with a batch "
                f"dim, got {type(outputs).__name__}. Wrap the model so that it returns the "
                "tensor the loss is computed from."
            )
        n = outputs.shape[0]  # this rank's samples
        N = ranks.total(n) if ranks is not None else n  # all ranks' samples
        self.samples = N
        self.loss = float(loss.detach())
        if ranks is not None:
            self.loss = float(ranks.mean([torch.tensor([self.loss], dtype=torch.float64)])[0])
        _, targets = split_batch(batch)

        def carries_batch(mname: str) -> bool:
            return bool(calls[mname]) and all(c.carries(n) for c in calls[mname])

        for name in list(wanted):
            odd = [q for q in [name, *partners[name]] if q in differs]
            if odd:
                kind = known_kind(hooked[odd[0]])
                assert kind is not None
                self.skipped[name] = (
                    f"{differs[odd[0]]} overrides the forward of {kind.__name__} and computes "
                    "something else, so its rows are not a plain one's"
                )
                del wanted[name]
            elif not all(carries_batch(q) for q in [name, *partners[name]]):
                self.skipped[name] = "its calls do not carry the batch in dim 0"
                del wanted[name]
        if ranks is not None:  # the same layers on every rank, or collectives would hang
            common = ranks.common(list(wanted))
            for name in [nm for nm in wanted if nm not in common]:
                self.skipped[name] = "not covered on every rank"
                del wanted[name]
        factor = output_factor(loss_fn, outputs, targets)
        if factor is None:
            raise GradsightError(
                "the loss's output-space Hessian has no known factor (cross-entropy, mean "
                "squared error, or a loss whose Hessian is block-diagonal per output "
                f"position with at most {max_columns} entries). Use the per-block operators "
                "in gradsight.curvature instead."
            )
        # Independent draws on each rank (the same seed would correlate their samples).
        gen = torch.Generator(device=outputs.device).manual_seed(
            seed + (ranks.rank if ranks is not None else 0)
        )
        self.exact = (
            factor.positions_per_sample == 1
            and factor.num_columns <= max_columns
            and factor.num_columns * N <= max_rows
        )
        if self.exact:
            S = factor.exact_columns().to(outputs.dtype)
            weight = 1.0
        else:
            k = min(max(int(draws), 1), max(min(draw_rows, max_rows) // N, 1))
            S = factor.draws(k, gen).to(outputs.dtype)
            weight = 1.0 / S.shape[0]
        if ranks is not None:  # G = (1/W) Σ_r G_r: each rank's rows scaled by 1/√W
            weight /= ranks.size
        m = S.shape[0]
        # Row r = j·N + i: column/draw j, sample i (of the concatenated batch).
        self.row_sample = torch.arange(N).repeat(m)
        self._fit_rows: torch.Tensor | None = None
        self.rho = 1.0
        params = {
            name: [p for p in mod.parameters(recurse=False) if id(p) in trainable]
            for name, mod in wanted.items()
        }
        flat = [p for ps in params.values() for p in ps]
        grads = (
            torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True) if flat else ()
        )
        dense = [
            g if g is not None else torch.zeros_like(p) for p, g in zip(flat, grads, strict=True)
        ]
        if ranks is not None:
            dense = ranks.mean(dense)
        grad_of = {id(p): g for p, g in zip(flat, dense, strict=True)}
        del grads, dense
        grads_fit: dict[int, torch.Tensor] = {}
        if held_out and n >= 8 and flat and ranks is None:
            grads_fit = self._fit_gradient(loss, loss_fn, outputs, targets, flat)
        used = list(dict.fromkeys(q for nm in wanted for q in [nm, *partners[nm]]))
        flat_calls = [c for q in used for c in calls[q]]
        # The graph is freed by the last backward pass; each δ after its last use.
        deltas = _batched_backward(outputs, flat_calls, S) if flat_calls else []
        where: dict[str, slice] = {}
        start = 0
        for q in used:
            where[q] = slice(start, start + len(calls[q]))
            start += len(calls[q])
        del S, flat_calls
        inputs = {q: [c.a for c in calls[q]] for q in used}
        calls.clear()
        del outputs, loss
        last_use: dict[str, int] = {}
        for i, nm in enumerate(wanted):
            for q in [nm, *partners[nm]]:
                last_use[q] = i
        self.blocks: dict[str, _Block] = {}
        sw = math.sqrt(weight)
        done: dict[tuple[int, ...], _Block] = {}
        self._K_sum: torch.Tensor | None = None
        self._whole: _Summary | None = None
        pending: list[_Block] = []
        stack = torch.empty(0)
        for i, (name, module) in enumerate(wanted.items()):
            ps = params[name]
            key = tuple(id(p) for p in ps)
            if key in done:  # the same tied weight as an earlier layer
                self.blocks[name] = done[key]
                continue
            parts = []
            for q in [name, *partners[name]]:
                ins = inputs[q]
                ds = [_stacked(d) for d in deltas[where[q]]]
                if ranks is not None:  # the whole batch's inputs and δ, on every rank
                    ins = [ranks.gather(a, 0) for a in ins]
                    ds = [ranks.gather(d, 1) for d in ds]
                parts.append(layer_rows(hooked[q], ps, ins, ds))
                del ins, ds
            for q in [name, *partners[name]]:
                if last_use[q] <= i:
                    inputs[q] = []
                    for j in range(where[q].start, where[q].stop):
                        deltas[j] = _Deltas([], (), torch.float32, torch.device("cpu"))
            rows = parts[0] if len(parts) == 1 else TiedRows(parts)
            g = [grad_of[id(p)] for p in ps]
            block = _Block(
                names=[
                    f"{name}.{pn}" if name else pn
                    for pn, p in module.named_parameters(recurse=False)
                    if id(p) in trainable
                ],
                params=ps,
                summary=_PENDING,
                ug=torch.empty(0),
                gg=float(sum(float((t.double() ** 2).sum()) for t in g)),
            )
            gf = [grads_fit[id(p)] for p in ps] if grads_fit else []
            K_b, ugs = rows.gram_dots([g, gf] if gf else [g])
            K_b.mul_(weight)
            block.ug = ugs[0] * sw
            if gf:
                block.grad_fit = gf
                block.ug_fit = ugs[1] * sw
                block.gg_fit = float(sum(float((t.double() ** 2).sum()) for t in gf))
            self.blocks[name] = done[key] = block
            del rows, parts
            if self._K_sum is None:
                self._K_sum = torch.zeros_like(K_b)
                # Summaries are computed for several layers at once (one batched
                # eigensolver instead of a Python loop per layer), in a buffer of a
                # bounded number of bytes.
                size = K_b.numel() * K_b.element_size()
                stack = K_b.new_empty((max(1, _PENDING_BYTES // size), *K_b.shape))
            self._K_sum.add_(K_b)
            stack[len(pending)] = K_b
            pending.append(block)
            del K_b
            if len(pending) == stack.shape[0]:
                self._flush(pending, stack)
        if pending:
            self._flush(pending, stack)
        self.rows = m * N

    def _flush(self, pending: list[_Block], stack: torch.Tensor) -> None:
        """Summarize the pending blocks' Gram matrices (``stack[i]``, all ``R × R``)."""
        summaries = self._summarize_many(stack[: len(pending)])
        for block, summary in zip(pending, summaries, strict=True):
            block.summary = summary
        pending.clear()

    def _fit_gradient(
        self,
        loss: torch.Tensor,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        outputs: torch.Tensor,
        targets: Any,
        flat: Sequence[torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """Gradient of the first half's loss, and ``ρ``: its GGN is ``ρ Σ_{fit} u uᵀ``.

        For losses that sum or average over samples the first half's loss has output
        gradient ``ρ·∂L/∂z`` on its samples; ``ρ`` is read off, and checked.
        """
        n = outputs.shape[0]
        half = n // 2
        (dz,) = torch.autograd.grad(loss, outputs, retain_graph=True)
        out_fit = outputs.detach()[:half].requires_grad_(True)
        try:
            with torch.enable_grad():
                lf = loss_fn(out_fit, take_rows(targets, slice(0, half)))
                (dz_fit,) = torch.autograd.grad(lf, out_fit)
        except (RuntimeError, TypeError, ValueError):
            return {}
        ref = dz[:half]
        denom = float((ref * ref).sum())
        if denom == 0:
            return {}
        rho = float((dz_fit * ref).sum()) / denom
        if not torch.allclose(dz_fit, rho * ref, rtol=1e-4, atol=1e-12 * max(denom, 1e-300) ** 0.5):
            return {}
        self.rho = rho
        self.fit_loss = float(lf.detach())
        self._fit_rows = self.row_sample < half
        masked = torch.zeros_like(dz)
        masked[:half] = dz_fit
        gf = torch.autograd.grad(outputs, flat, masked, retain_graph=True, allow_unused=True)
        return {
            id(p): (g if g is not None else torch.zeros_like(p))
            for p, g in zip(flat, gf, strict=True)
        }

    # ----------------------------------------------------------------- estimates

    def estimate(self, name: str, damping: float = 1e-3) -> BlockEstimate:
        """:class:`BlockEstimate` of one covered layer."""
        if name not in self.blocks:
            reason = self.skipped.get(name, "not requested")
            raise GradsightError(f"layer {name!r} is not covered: {reason}.")
        b = self.blocks[name]
        return self._estimate(b.summary, b.ug, b.gg, damping)

    def whole(self, damping: float = 1e-3) -> BlockEstimate:
        """:class:`BlockEstimate` of all covered layers together (one block)."""
        if not self.blocks or self._K_sum is None:
            raise GradsightError("no layer is covered: nothing to estimate.")
        if self._whole is None:
            self._whole = self._summarize(self._K_sum)
        distinct = {id(b): b for b in self.blocks.values()}.values()  # tied: once
        ug = sum(b.ug for b in distinct)
        gg = sum(b.gg for b in distinct)
        assert isinstance(ug, torch.Tensor)
        return self._estimate(self._whole, ug, gg, damping)

    def _groups(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Jackknife groups of samples: count, group of each row, rescaling per group."""
        n = self.samples
        groups = min(n, JACKKNIFE_GROUPS)
        per = torch.bincount(torch.arange(n) % groups, minlength=groups).double()
        return groups, self.row_sample % groups, n / (n - per)

    def _summarize(self, K: torch.Tensor) -> _Summary:
        return self._summarize_many(K.unsqueeze(0))[0]

    def _summarize_many(self, K: torch.Tensor) -> list[_Summary]:
        """:class:`_Summary` of each ``K[b]`` (a stack of ``R × R`` Gram matrices)."""
        # Exact rows: λmax to rounding. Sampled rows: far below their error bars, in
        # single precision (the iterations read the whole stack each step: half the
        # memory traffic; the rows themselves are single precision on float32 models).
        Kw = K if self.exact else K.float()
        upper, vec = _top_batched(Kw, 1e-7 if self.exact else 1e-3)
        upper, vec = upper.double(), vec.double()
        tr = K.diagonal(dim1=-2, dim2=-1).sum(-1)
        if self.exact or self.samples < 2:
            empty = torch.empty(0, dtype=torch.float64)
            return [
                _Summary(float(u), 0.0, empty, float(t), empty)
                for u, t in zip(upper.tolist(), tr.tolist(), strict=True)
            ]
        groups, gid, scale = self._groups()
        B = K.shape[0]
        # Leaving out a group's rows lowers λmax by λ·Σ_{rows in it} v_r² to first order
        # (v the top eigenvector of K): the infinitesimal jackknife, without R×R copies.
        share = torch.zeros(B, groups, dtype=torch.float64).index_add_(1, gid, vec.double() ** 2)
        diag = torch.zeros(B, groups, dtype=torch.float64).index_add_(
            1, gid, K.diagonal(dim1=-2, dim2=-1).double()
        )
        lower = self._cross_top(Kw)
        up = upper.unsqueeze(1)
        upper_groups = up * (1 - share) * scale
        trace_groups = (tr.double().unsqueeze(1) - diag) * scale
        return [
            _Summary(
                upper=float(upper[b]),
                lower=float(lower[b]),
                upper_groups=upper_groups[b],
                trace=float(tr[b]),
                trace_groups=trace_groups[b],
            )
            for b in range(B)
        ]

    def _estimate(
        self, summary: _Summary, ug: torch.Tensor, gg: float, damping: float
    ) -> BlockEstimate:
        lam = summary.upper
        gag = float(ug @ ug)

        def derived(lam_: float, gag_: float) -> tuple[float, float]:
            alpha = gg / gag_ if gag_ > 0 else (math.nan if gg == 0 else math.inf)
            denom = gag_ + damping * max(lam_, 0.0) * gg
            dec = 0.5 * gg * gg / denom if denom > 0 else (0.0 if gg == 0 else math.inf)
            return alpha, dec

        errs = [0.0, 0.0, 0.0, 0.0]
        if len(summary.upper_groups):
            groups, gid, scale = self._groups()
            lower = summary.lower
            # λmax(G̃) overestimates λmax(G) when rows are few next to G's effective rank
            # (it fits the sampling noise); the top direction of one half of the rows,
            # measured with the other half, underestimates it. Report the geometric
            # middle of that bracket, its half-width as the error when it exceeds the
            # jackknife's.
            ratio = 1.0
            if 0 < lower < lam:
                ratio = math.sqrt(lower / lam)
            ug2 = torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, ug.double() ** 2)
            reps = []
            for gi in range(groups):
                lam_g = float(summary.upper_groups[gi]) * ratio
                gag_g = (gag - float(ug2[gi])) * float(scale[gi])
                a_g, d_g = derived(lam_g, gag_g)
                reps.append((lam_g, a_g, d_g, float(summary.trace_groups[gi])))
            t = torch.tensor(reps, dtype=torch.float64)
            finite = torch.isfinite(t).all(dim=0)
            spread = ((groups - 1) / groups * ((t - t.mean(dim=0)) ** 2).sum(dim=0)).sqrt()
            errs = [float(e) if f else math.inf for e, f in zip(spread, finite, strict=True)]
            if 0 < lower < lam:
                errs[0] = max(errs[0], (lam - lower) / 2)
                lam = math.sqrt(lower * lam)
        alpha, dec = derived(lam, gag)
        return BlockEstimate(
            lambda_max=lam,
            lambda_max_err=errs[0],
            alpha_star=alpha,
            alpha_star_err=errs[1],
            decrement=dec,
            decrement_err=errs[2],
            trace=summary.trace,
            trace_err=errs[3],
            grad_sq=gg,
            exact=self.exact,
            rows=self.rows,
        )

    def _cross_top(self, K: torch.Tensor) -> torch.Tensor:
        """Curvature along the top direction of half of the rows, measured on the other half.

        Halves are independent draws of the same samples (or, with one draw, two halves
        of the samples); the estimate is unbiased for ``vᵀGv`` with ``v`` independent
        of the half it is measured on, hence at most ``λmax(G)`` in expectation. ``K``
        is a stack of Gram matrices; 0 where a half has no positive curvature.
        """
        n = self.samples
        R = K.shape[-1]
        m = R // n
        idx = torch.arange(R)
        side = (idx // n) % 2 == 0 if m >= 2 else (idx % n) % 2 == 0
        total = torch.zeros(K.shape[0], dtype=torch.float64)
        valid = torch.ones(K.shape[0], dtype=torch.bool)
        for X in (side, ~side):
            Y = ~X
            scale = R / int(Y.sum())
            top, vec = _top_batched(K[:, X][:, :, X], 1e-3)
            proj = K[:, Y][:, :, X] @ vec.to(K.dtype).unsqueeze(-1)
            valid &= top > 0
            total += (proj.squeeze(-1) ** 2).sum(-1).double() / top.double() * scale
        return torch.where(valid, total / 2, torch.zeros_like(total))

    def held_out_step(self, damping: float) -> dict[str, torch.Tensor] | None:
        """Block-scaled Gauss-Newton step fitted on the first half of the samples.

        The step is ``−c_b g_b`` per layer, ``g_b`` the first half's gradient, with the
        layer-wise step sizes ``c`` minimizing the damped quadratic model
        ``−Σ c_b‖g_b‖² + ½ cᵀMc + ½λ Σ c_b²‖g_b‖²`` (``M_{bb'} = g_bᵀ G g_b'``, from the
        rows). ``None`` if :class:`BlockwiseGGN` was built without ``held_out`` or the
        loss does not split over samples. Keyed by parameter id as a string.
        """
        if self._fit_rows is None:
            return None
        distinct = {id(b): nm for nm, b in self.blocks.items()}  # a tied weight once
        names = [
            nm
            for nm in distinct.values()
            if self.blocks[nm].ug_fit is not None and self.blocks[nm].gg_fit > 0
        ]
        if not names:
            return None
        rows = self._fit_rows
        V = torch.stack([self.blocks[nm].ug_fit[rows] for nm in names], dim=1)  # type: ignore[index]
        M = self.rho * (V.T @ V)
        h = torch.tensor([self.blocks[nm].gg_fit for nm in names], dtype=torch.float64)
        A = M + damping * torch.diag(h)
        try:
            c = torch.linalg.solve(A, h)
        except RuntimeError:
            c = torch.linalg.lstsq(A, h).solution
        step: dict[str, torch.Tensor] = {}
        for cb, nm in zip(c.tolist(), names, strict=True):
            b = self.blocks[nm]
            assert b.grad_fit is not None
            for p, gf in zip(b.params, b.grad_fit, strict=True):
                step[str(id(p))] = -cb * gf
        return step


def _tie_supported(mods: Mapping[str, nn.Module], names: list[str], trainable: set[int]) -> bool:
    """Tied weights are handled between linear and embedding layers holding only them."""
    owned = []
    for q in names:
        m = mods[q]
        if not isinstance(m, (nn.Linear, nn.Embedding)) or unsupported_reason(m) is not None:
            return False
        own = [p for p in m.parameters(recurse=False) if id(p) in trainable]
        if len(own) != 1:
            return False
        owned.append(id(own[0]))
    return len(set(owned)) == 1


def take_rows(obj: Any, rows: slice) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, dicts) sliced to ``rows``."""
    if isinstance(obj, torch.Tensor):
        return obj[rows] if obj.ndim > 0 else obj
    if isinstance(obj, Mapping):
        return {k: take_rows(v, rows) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(take_rows(v, rows) for v in obj)
    return obj


@dataclass
class _Call:
    """One call of a hooked module: its first input, and where its output's gradient is.

    The output is kept as an autograd edge, not as a tensor, so that holding it does not
    hold the output's memory (the graph keeps what its backward needs).
    """

    a: torch.Tensor
    edge: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(a: torch.Tensor, output: torch.Tensor) -> _Call:
        edge = get_gradient_edge(output) if get_gradient_edge is not None else output
        return _Call(a, edge, tuple(output.shape), output.dtype, output.device)

    @staticmethod
    def empty() -> _Call:
        return _Call(torch.empty(0), None, (), torch.float32, torch.device("cpu"))

    def carries(self, n: int) -> bool:
        """Whether input and output carry the batch (of size ``n``) in dim 0."""
        return (
            self.edge is not None
            and len(self.shape) > 0
            and self.a.ndim > 0
            and self.shape[0] == n
            and self.a.shape[0] == n
        )


@dataclass
class _Deltas:
    """The backward vectors at one call's output, one per column (``None``: zero)."""

    columns: list[torch.Tensor | None]
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _stacked(d: _Deltas) -> torch.Tensor:
    """``(m, *shape)``: the columns stacked (built when the layer is processed)."""
    if len(d.columns) == 1 and d.columns[0] is not None:
        return d.columns[0].unsqueeze(0)  # one column: a view, no copy
    return torch.stack(
        [
            c if c is not None else torch.zeros(d.shape, dtype=d.dtype, device=d.device)
            for c in d.columns
        ]
    )


def _batched_backward(outputs: torch.Tensor, calls: list[_Call], S: torch.Tensor) -> list[_Deltas]:
    """``∂(s_j · outputs)/∂z`` for every captured call's output ``z`` and every column.

    One backward pass per column (the same work as a vmapped ``is_grads_batched`` pass,
    without its first-use import of torch.func's machinery, ~2 s per process); the last
    one frees the graph as it goes. The columns are kept apart and stacked per layer
    when it is processed, so that at most one layer's stack exists at a time.
    """
    m = S.shape[0]
    out = [_Deltas([], c.shape, c.dtype, c.device) for c in calls]
    edges = [c.edge for c in calls]
    for j in range(m):
        got = torch.autograd.grad(outputs, edges, S[j], retain_graph=j < m - 1, allow_unused=True)
        for d, g in zip(out, got, strict=True):
            d.columns.append(g)
        del got
    return out


def _release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``) when they are many.

    The caller's passes just before (``gradsight.diagnose``'s own forward and backward)
    leave freed memory in the heap that the engine's differently sized tensors do not
    all reuse, so without this the process's peak resident memory counts both. Measured
    on the 100-layer MLP of ``benchmarks/diagnose.py``: peak RSS of diagnose 657 MB
    without, 604-614 MB with (a training step: 319 MB). Only when at least
    :data:`_TRIM_BYTES` are free (glibc's ``mallinfo2``): the pages given back fault in
    again when reused, which cost a small CNN 10-14 ms a call. A no-op without glibc.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.malloc_trim  # noqa: B018 - raises AttributeError without glibc
                _LIBC = libc
            except (AttributeError, OSError):
                _LIBC = False
    if not _LIBC:
        return
    try:
        info = _LIBC.mallinfo2
        info.restype = _MallInfo2
        free = int(info().fordblks)
    except AttributeError:  # glibc < 2.33: no mallinfo2, trim unconditionally
        free = _TRIM_BYTES
    if free >= _TRIM_BYTES:
        _LIBC.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC: Any = None
#: Free heap bytes from which :func:`_release_free_memory` trims.
_TRIM_BYTES = 64 << 20


def _batch_size(batch: Any) -> int | None:
    """The leading size of the inputs' first tensor, if any."""
    stack = [split_batch(batch)[0]]
    while stack:
        x = stack.pop(0)
        if isinstance(x, torch.Tensor):
            return int(x.shape[0]) if x.ndim > 0 else None
        if isinstance(x, Mapping):
            stack = list(x.values()) + stack
        elif isinstance(x, (tuple, list)):
            stack = list(x) + stack
    return None


def _top(K: torch.Tensor, tol: float = 1e-4) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue of the PSD ``K`` and its unit eigenvector (:func:`_top_batched`)."""
    vals, vecs = _top_batched(K.unsqueeze(0), tol)
    return float(vals[0]), vecs[0]


def _top_batched(K: torch.Tensor, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue and unit eigenvector of each PSD ``K[b]``: ``(B,)``, ``(B, R)``.

    Matrices up to :data:`_EIGH_SIZE` by ``eigh``; larger ones by subspace iteration on a block of
    :data:`_BLOCK` vectors with Rayleigh-Ritz (Golub & Van Loan, *Matrix Computations*,
    §8.2.4), all matrices at once, until every residual ``‖Kv − λv‖`` is at most
    ``tol``·λ, which bounds the eigenvalue's relative error by about ``tol²·λ/gap`` and
    the vector's angle by ``tol·λ/gap``. For the 256 × 256 Gram matrices of a small
    CNN's 14 layers this takes ~10 ms against ~100 ms for ``eigh`` (the estimates' own
    error bars are percents). The start block is seeded, so the result is deterministic
    (and equal on every rank that holds the same ``K``); matrices whose iteration has
    not converged after :data:`_MAX_ITERS` steps (a cluster of top eigenvalues) are
    decided by ``eigh``.
    """
    B, R = K.shape[0], K.shape[-1]
    if R <= _EIGH_SIZE:
        vals, vecs = torch.linalg.eigh(K)
        return vals[:, -1], vecs[..., -1]
    gen = torch.Generator(device=K.device).manual_seed(0)
    Q = torch.randn(R, _BLOCK, generator=gen, dtype=K.dtype, device=K.device).expand(B, R, _BLOCK)
    lam = torch.zeros(B, dtype=K.dtype, device=K.device)
    v = torch.zeros(B, R, dtype=K.dtype, device=K.device)
    todo = torch.arange(B, device=K.device)
    Kt = K
    for _ in range(_MAX_ITERS):
        Q, _r = torch.linalg.qr(Q)
        KQ = Kt @ Q
        vals, vecs = torch.linalg.eigh(Q.transpose(-1, -2) @ KQ)
        top = vals[:, -1]
        w = vecs[..., -1:]
        vt = (Q @ w).squeeze(-1)
        resid = torch.linalg.vector_norm((KQ @ w).squeeze(-1) - top.unsqueeze(-1) * vt, dim=-1)
        done = (resid <= tol * top) | ~(top > 0)
        if bool(done.any()):
            lam[todo[done]] = top[done]
            v[todo[done]] = vt[done]
            keep = ~done
            todo, Kt, KQ = todo[keep], Kt[keep], KQ[keep]
            if len(todo) == 0:
                return lam, v
        Q = KQ
    vals, vecs = torch.linalg.eigh(Kt)
    lam[todo] = vals[:, -1]
    v[todo] = vecs[..., -1]
    return lam, v


#: Block size and iteration cap of :func:`_top_batched`'s subspace iteration, and the
#: size up to which ``eigh`` is faster (measured on a small CNN's Gram matrices).
_BLOCK = 8
_EIGH_SIZE = 64
_MAX_ITERS = 60
