"""Per-layer Gauss-Newton curvature of every layer at once, from one hooked pass.

Per-block Lanczos needs dozens of products per layer, each a pass through the whole
model, which is hundreds of passes on a transformer. Here every layer's curvature comes
from one forward pass, the gradient's backward pass and one batched backward pass of
the output-Hessian factor (:mod:`gradsight.curvature._factor`):

* backward vectors ``s_j`` with ``E[s_j s_jᵀ] = H_out`` (exact columns when each sample's
  output is one vector of at most ``max_columns`` entries, else ``draws`` Monte Carlo
  draws) are sent back at once (``is_grads_batched``);
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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsight._batch import split_batch, trainable_parameters
from gradsight._errors import GradsightError
from gradsight.curvature._blocks import forward_loss
from gradsight.curvature._factor import output_factor
from gradsight.curvature._rows import TiedRows, layer_rows, supported
from gradsight.curvature.lanczos import lanczos

__all__ = ["JACKKNIFE_GROUPS", "BlockEstimate", "BlockwiseGGN"]

#: Groups of samples left out in turn for the jackknife error bars.
JACKKNIFE_GROUPS = 10


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
        held_out: also prepare the held-out check of :meth:`held_out_step`: gradient
            and rows of the first half of the samples.
        seed: seed of the draws (a private generator; the global RNG is untouched).

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
        held_out: bool = False,
        seed: int = 0,
    ) -> None:
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
            elif not supported(m):
                self.skipped[name] = f"{type(m).__name__} layers are not supported"
            elif shared and not _tie_supported(named_mods, [name, *shared], trainable):
                self.skipped[name] = "a parameter shared with another module"
            else:
                wanted[name] = m
                partners[name] = list(dict.fromkeys(shared))
        hooked = dict(wanted)
        for name in wanted:
            for q in partners[name]:
                hooked[q] = named_mods[q]
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in hooked}

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                if (
                    args
                    and isinstance(args[0], torch.Tensor)
                    and isinstance(output, torch.Tensor)
                    and output.requires_grad
                ):
                    calls[name].append((args[0].detach(), output))
                else:
                    calls[name].append((torch.empty(0), torch.empty(0)))

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in hooked.items()]
        try:
            params0 = [p for _, p in trainable_parameters(model)]
            device = params0[0].device
            outputs, loss = forward_loss(model, batch, loss_fn, torch.get_rng_state(), device)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(outputs, torch.Tensor) or outputs.ndim == 0:
            raise GradsightError(
                "blockwise curvature needs model(inputs) to return one tensor with a batch "
                f"dim, got {type(outputs).__name__}. Wrap the model so that it returns the "
                "tensor the loss is computed from."
            )
        n = outputs.shape[0]
        self.samples = n
        self.loss = float(loss.detach())
        _, targets = split_batch(batch)

        def carries_batch(mname: str) -> bool:
            return bool(calls[mname]) and all(
                z.ndim > 0 and a.ndim > 0 and z.shape[0] == n and a.shape[0] == n
                for a, z in calls[mname]
            )

        for name in list(wanted):
            if not all(carries_batch(q) for q in [name, *partners[name]]):
                self.skipped[name] = "its calls do not carry the batch in dim 0"
                del wanted[name]
        factor = output_factor(loss_fn, outputs, targets)
        if factor is None:
            raise GradsightError(
                "the loss's output-space Hessian has no known factor (cross-entropy, mean "
                "squared error, or a loss whose Hessian is block-diagonal per output "
                f"position with at most {max_columns} entries). Use the per-block operators "
                "in gradsight.curvature instead."
            )
        gen = torch.Generator(device=outputs.device).manual_seed(seed)
        self.exact = (
            factor.positions_per_sample == 1
            and factor.num_columns <= max_columns
            and factor.num_columns * n <= max_rows
        )
        if self.exact:
            S = factor.exact_columns().to(outputs.dtype)
            weight = 1.0
        else:
            k = min(max(int(draws), 1), max(max_rows // n, 1))
            S = factor.draws(k, gen).to(outputs.dtype)
            weight = 1.0 / S.shape[0]
        m = S.shape[0]
        # Row r = j·n + i: column/draw j, sample i.
        self.row_sample = torch.arange(n).repeat(m)
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
        grad_of = {
            id(p): (g if g is not None else torch.zeros_like(p))
            for p, g in zip(flat, grads, strict=True)
        }
        grads_fit: dict[int, torch.Tensor] = {}
        if held_out and n >= 8 and flat:
            grads_fit = self._fit_gradient(loss, loss_fn, outputs, targets, flat)
        used = list(dict.fromkeys(q for nm in wanted for q in [nm, *partners[nm]]))
        zs = [z for q in used for _, z in calls[q]]
        deltas = _batched_backward(outputs, zs, S) if zs else []
        where: dict[str, slice] = {}
        start = 0
        for q in used:
            where[q] = slice(start, start + len(calls[q]))
            start += len(calls[q])
        del S
        # The graph is no longer needed: free it (and each δ after its last use) before
        # the per-layer algebra.
        inputs = {q: [a for a, _ in calls[q]] for q in used}
        calls.clear()
        del zs, outputs, loss
        last_use: dict[str, int] = {}
        for i, nm in enumerate(wanted):
            for q in [nm, *partners[nm]]:
                last_use[q] = i
        self.blocks: dict[str, _Block] = {}
        sw = math.sqrt(weight)
        done: dict[tuple[int, ...], _Block] = {}
        self._K_sum: torch.Tensor | None = None
        self._whole: _Summary | None = None
        for i, (name, module) in enumerate(wanted.items()):
            ps = params[name]
            key = tuple(id(p) for p in ps)
            if key in done:  # the same tied weight as an earlier layer
                self.blocks[name] = done[key]
                continue
            parts = [
                layer_rows(hooked[q], ps, inputs[q], deltas[where[q]])
                for q in [name, *partners[name]]
            ]
            for q in [name, *partners[name]]:
                if last_use[q] <= i:
                    inputs[q] = []
                    for j in range(where[q].start, where[q].stop):
                        deltas[j] = torch.empty(0)
            rows = parts[0] if len(parts) == 1 else TiedRows(parts)
            g = [grad_of[id(p)] for p in ps]
            block = _Block(
                names=[
                    f"{name}.{pn}" if name else pn
                    for pn, p in module.named_parameters(recurse=False)
                    if id(p) in trainable
                ],
                params=ps,
                summary=self._summarize(K_b := rows.gram() * weight),
                ug=torch.empty(0),
                gg=float(sum(float((t.double() ** 2).sum()) for t in g)),
            )
            gf = [grads_fit[id(p)] for p in ps] if grads_fit else []
            ugs = rows.dots([g, gf] if gf else [g])
            block.ug = ugs[0] * sw
            if gf:
                block.grad_fit = gf
                block.ug_fit = ugs[1] * sw
                block.gg_fit = float(sum(float((t.double() ** 2).sum()) for t in gf))
            self.blocks[name] = done[key] = block
            self._K_sum = K_b if self._K_sum is None else self._K_sum.add_(K_b)
            del rows, parts, K_b
        self.rows = m * n

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
        upper, vec = _top(K)
        tr = float(K.diagonal().sum())
        if self.exact or self.samples < 2:
            empty = torch.empty(0, dtype=torch.float64)
            return _Summary(upper, 0.0, empty, tr, empty)
        groups, gid, scale = self._groups()
        # Leaving out a group's rows lowers λmax by λ·Σ_{rows in it} v_r² to first order
        # (v the top eigenvector of K): the infinitesimal jackknife, without R×R copies.
        share = torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, vec.double() ** 2)
        diag = torch.zeros(groups, dtype=torch.float64).index_add_(0, gid, K.diagonal().double())
        return _Summary(
            upper=upper,
            lower=self._cross_top(K),
            upper_groups=upper * (1 - share) * scale,
            trace=tr,
            trace_groups=(tr - diag) * scale,
        )

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

    def _cross_top(self, K: torch.Tensor) -> float:
        """Curvature along the top direction of half of the rows, measured on the other half.

        Halves are independent draws of the same samples (or, with one draw, two halves
        of the samples); the estimate is unbiased for ``vᵀGv`` with ``v`` independent
        of the half it is measured on, hence at most ``λmax(G)`` in expectation.
        """
        n = self.samples
        m = K.shape[0] // n
        idx = torch.arange(K.shape[0])
        side = (idx // n) % 2 == 0 if m >= 2 else (idx % n) % 2 == 0
        out = []
        for X in (side, ~side):
            Y = ~X
            scale = K.shape[0] / int(Y.sum())
            top, vec = _top(K[X][:, X])
            if not top > 0:
                return 0.0
            proj = K[Y][:, X] @ vec.to(K.dtype)
            out.append(float(proj @ proj) / top * scale)
        return sum(out) / len(out)

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
        if not isinstance(m, (nn.Linear, nn.Embedding)):
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


def _batched_backward(
    outputs: torch.Tensor, zs: list[torch.Tensor], S: torch.Tensor
) -> list[torch.Tensor]:
    """``∂(s_j · outputs)/∂z`` for every captured layer output ``z``: ``(m, *z.shape)`` each."""
    # One backward pass per column: the same work as a vmapped (is_grads_batched) pass,
    # without its first-use import of torch.func's machinery (~2 s per process).
    per = [torch.autograd.grad(outputs, zs, s, retain_graph=True, allow_unused=True) for s in S]
    got: list[torch.Tensor | None] = []
    for i in range(len(zs)):
        parts = [p[i] for p in per]
        got.append(None if any(t is None for t in parts) else torch.stack(parts))
    return [
        g if g is not None else torch.zeros(S.shape[0], *z.shape, dtype=z.dtype, device=z.device)
        for g, z in zip(got, zs, strict=True)
    ]


def _top(K: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue of the PSD ``K`` and its unit eigenvector."""
    R = K.shape[0]
    if R <= 256:
        vals, vecs = torch.linalg.eigh(K)
        return float(vals[-1]), vecs[:, -1]
    res = lanczos(K, 1, tol=1e-5, max_matvecs=min(R, 100))
    return float(res.eigenvalues[0]), res.eigenvectors[:, 0]
