"""Square-root factors of the loss's output-space Hessian, exact or sampled.

The generalized Gauss-Newton matrix of a block is ``G = Jᵀ H_out J``. With ``H_out =
E[s sᵀ]`` for a random output-space vector ``s``, one backward pass of ``s`` gives
``Jᵀ s`` for every block at once, and per sample ``n`` the rows ``u_n = J_nᵀ s_n``
satisfy ``E[Σ_n u_n u_nᵀ] = G`` when samples do not interact (no BatchNorm in train
mode). When the output of a sample is one vector of ``C`` entries and ``C`` is small,
``H_out = L Lᵀ`` with ``C`` exact columns replaces the sampling and ``G = Σ_{n,c}
u_{nc} u_{nc}ᵀ`` holds exactly.

``H_out`` is analytic for cross-entropy (``diag(p) − ppᵀ`` per position, of rank
``C − 1`` so ``C − 1`` exact columns, sampled as ``p − e_y`` with ``y ~ p``) and for the
mean squared error (``c·I``); for any other loss it comes from autograd, accepted when
it is diagonal or block-diagonal over positions with at most :data:`MAX_BLOCK` entries
per position (verified on random probes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gradsight.curvature.ggn import cross_entropy_settings, mse_scale

__all__ = ["MAX_BLOCK", "OutputFactor", "output_factor"]

#: Largest per-position block of a generic loss's output Hessian that is factored.
MAX_BLOCK = 64


class OutputFactor:
    """Draws ``s`` with ``E[s sᵀ] = H_out``, or its exact columns.

    Args:
        shape: the outputs' shape.
        block: ``() -> L`` of shape ``(*positions, C, C)`` with ``H = L Lᵀ`` per
            position, positions being the outputs' shape without the channel dim.
        channel_dim: the dim of the outputs holding the ``C`` entries of a position
            (``len(shape)`` for outputs with one entry per position, as ``(n,)``).
        sample: optional faster sampler ``(k, generator) -> (k, *shape)``.

    Attributes:
        positions_per_sample: output positions per sample; exact columns are only
            used when this is 1 (otherwise positions of one sample would interact).
        num_columns: ``C``.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        block: Callable[[], torch.Tensor],
        channel_dim: int,
        sample: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.shape = shape
        self._block = block
        self._cdim = channel_dim
        self._sample = sample
        self._squeeze = channel_dim == len(shape)
        self.num_columns = 1 if self._squeeze else shape[channel_dim]
        n = shape[0] if shape else 1
        total = math.prod(shape) if shape else 1
        self.positions_per_sample = max(total // max(n * self.num_columns, 1), 1)

    def _to_outputs(self, t: torch.Tensor) -> torch.Tensor:
        """``(k, *positions, C)`` to ``(k, *shape)``."""
        if self._squeeze:
            return t.squeeze(-1).contiguous()
        return t.movedim(-1, self._cdim + 1).contiguous()

    def exact_columns(self) -> torch.Tensor:
        """``(num_columns, *shape)``: column ``c`` of ``L`` at every position."""
        L = self._block()  # (*pos, C, C)
        return self._to_outputs(L.movedim(-1, 0))

    def draws(self, k: int, gen: torch.Generator) -> torch.Tensor:
        """``(k, *shape)`` independent draws, each with ``E[s sᵀ] = H_out``."""
        if self._sample is not None:
            return self._sample(k, gen)
        L = self._block()
        xi = _rademacher((k, *L.shape[:-1]), L.dtype, L.device, gen)
        return self._to_outputs(torch.einsum("...ij,k...j->k...i", L, xi))


def _rademacher(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8, device=device)
    return bits.to(dtype).mul_(2).sub_(1)


def output_factor(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> OutputFactor | None:
    """The factor of ``H_out`` for this loss at these outputs, or ``None`` if unknown."""
    outputs = outputs.detach()
    if not outputs.is_floating_point():
        return None
    return (
        _cross_entropy(loss_fn, outputs, targets)
        or _mse(loss_fn, outputs, targets)
        or _autograd(loss_fn, outputs, targets)
    )


def _cross_entropy(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> OutputFactor | None:
    settings = cross_entropy_settings(loss_fn, targets, label_smoothing=False)
    if settings is None:
        return None
    reduction, ignore_index = settings
    if outputs.ndim < 2:
        return None
    cdim = 1
    probs = torch.softmax(outputs, dim=cdim)
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            return None
        weight = torch.ones_like(probs.select(cdim, 0))
        count = outputs.numel() // outputs.shape[cdim]
    else:
        weight = (targets != ignore_index).to(outputs.dtype)
        count = int(weight.sum())
    scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    root = math.sqrt(scale)

    def block() -> torch.Tensor:
        p = probs.movedim(cdim, -1)  # (*pos, C)
        w2 = (weight * weight * scale).unsqueeze(-1).unsqueeze(-1)
        # diag(p) − ppᵀ has rank C − 1 (its rows sum to zero): C − 1 columns suffice,
        # from its eigendecomposition (the dropped eigenvalue is the zero one along 1).
        H = w2 * (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))
        return _psd_root(H, skip=1)

    def sample(k: int, gen: torch.Generator) -> torch.Tensor:
        # s = p − e_y with y ~ p, built in the outputs' own layout and in place: the
        # draws of a language model's logits are its largest tensors.
        p = probs.movedim(cdim, -1).reshape(-1, probs.shape[cdim])
        y = torch.multinomial(p, k, replacement=True, generator=gen)  # (P, k)
        del p
        s = probs.unsqueeze(0).repeat(k, *([1] * probs.ndim))  # (k, *shape)
        # y holds positions in (*pos) order; put it in the outputs' layout, channel dim 1.
        pos = probs.movedim(cdim, -1).shape[:-1]
        idx = y.T.reshape(k, *pos).unsqueeze(cdim + 1)
        s.scatter_add_(cdim + 1, idx, torch.full_like(idx, -1, dtype=s.dtype))
        return s.mul_((weight * root).unsqueeze(cdim).unsqueeze(0))

    factor = OutputFactor(tuple(outputs.shape), block, cdim, sample)
    factor.num_columns = max(outputs.shape[cdim] - 1, 1)
    return factor


def _mse(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> OutputFactor | None:
    scale = mse_scale(loss_fn, outputs, targets)
    if scale is None:
        return None
    return _diagonal(outputs, torch.full_like(outputs, scale))


def _diagonal(outputs: torch.Tensor, diag: torch.Tensor) -> OutputFactor:
    """Diagonal ``H_out``: the last dim holds a position's entries (none for ``ndim <= 1``)."""
    cdim = outputs.ndim - 1 if outputs.ndim > 1 else outputs.ndim
    root = diag.clamp_min(0).sqrt()

    def block() -> torch.Tensor:
        r = root.unsqueeze(-1) if cdim == outputs.ndim else root
        return torch.diag_embed(r)

    def sample(k: int, gen: torch.Generator) -> torch.Tensor:
        xi = _rademacher((k, *outputs.shape), outputs.dtype, outputs.device, gen)
        return xi * root

    return OutputFactor(tuple(outputs.shape), block, cdim, sample)


def _autograd(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> OutputFactor | None:
    """``H_out`` by double backward, accepted if (block-)diagonal over positions."""
    out = outputs.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = loss_fn(out, targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                return None
            (g,) = torch.autograd.grad(loss.reshape(()), out, create_graph=True)
    except RuntimeError:
        return None
    if not g.requires_grad:  # linear in the outputs: H_out = 0
        return _diagonal(outputs, torch.zeros_like(outputs))

    def hvp(w: torch.Tensor) -> torch.Tensor:
        (hw,) = torch.autograd.grad(g, out, w, retain_graph=True)
        return hw.detach()

    gen = torch.Generator(device=outputs.device).manual_seed(1234)
    probes = [_rademacher(tuple(out.shape), out.dtype, out.device, gen) for _ in range(2)]
    tol = 1e-6 if out.dtype == torch.float64 else 1e-3
    diag = hvp(torch.ones_like(out))
    if all(_close(hvp(p), diag * p, tol) for p in probes):
        return _diagonal(outputs, diag)
    if out.ndim < 2:
        return None
    for cdim in dict.fromkeys((out.ndim - 1, 1)):
        C = out.shape[cdim]
        if C > MAX_BLOCK:
            continue
        cols = []
        for c in range(C):
            e = torch.zeros_like(out)
            e.select(cdim, c).fill_(1.0)
            cols.append(hvp(e).movedim(cdim, -1))
        H = torch.stack(cols, dim=-1)  # (*pos, C, C): H[..., i, c]
        H = 0.5 * (H + H.transpose(-1, -2))

        def apply(w: torch.Tensor, H: torch.Tensor = H, cdim: int = cdim) -> torch.Tensor:
            return (H @ w.movedim(cdim, -1).unsqueeze(-1)).squeeze(-1).movedim(-1, cdim)

        if not all(_close(hvp(p), apply(p), tol) for p in probes):
            continue
        L = _psd_root(H)

        def block(L: torch.Tensor = L) -> torch.Tensor:
            return L

        return OutputFactor(tuple(outputs.shape), block, cdim, None)
    return None


def _psd_root(H: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """``L`` with ``L Lᵀ`` the positive part of each symmetric matrix in ``H``
    (``(..., C, C)``), without the columns of its ``skip`` smallest eigenvalues, in
    ``H``'s dtype. The eigendecomposition runs in float64, where it converges on the
    nearly singular blocks of a saturated softmax that fail in float32 (weights ×100),
    with a shift of 1e-12 of the largest entry where even that fails."""
    H64 = H.double()
    try:
        vals, vecs = torch.linalg.eigh(H64)
    except RuntimeError:  # torch.linalg.LinAlgError: it did not converge
        shift = 1e-12 * float(H64.abs().max()) + 1e-300
        eye = torch.eye(H.shape[-1], dtype=H64.dtype, device=H.device)
        vals, vecs = torch.linalg.eigh(H64 + shift * eye)
        vals = vals - shift
    vals, vecs = vals[..., skip:], vecs[..., skip:]
    return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)).to(H.dtype)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= tol * scale
