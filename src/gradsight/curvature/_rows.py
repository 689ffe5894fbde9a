"""Per-sample gradient rows of one layer from its input and its output's backward signal.

For a layer ``z = f(a; θ)`` seen on samples ``n`` and backward vectors ``δ_j`` at its
output (``j`` indexes columns of the output-Hessian factor or Monte Carlo draws), the
row ``u_{jn} = ∂(δ_{jn} · z_n)/∂θ`` is the layer's share of ``Jᵀ s_j`` for sample ``n``.
Two things are needed of the rows ``U`` (``R = m·n`` of them): their Gram matrix
``K = U Uᵀ`` (``R × R``; ``λmax(UᵀU) = λmax(K)``) and products ``U v`` with
parameter-shaped ``v``. Both are computed from ``a`` and ``δ`` without the ``R × D``
matrix when that is cheaper (a linear layer on single vectors: ``K = (AAᵀ + 1) ⊙ ΔΔᵀ``,
Goodfellow 2015's per-example trick), else ``U`` is built in chunks of output features.

Supported: ``nn.Linear``, transformers' ``Conv1D`` (weight ``(in, out)``),
``nn.Conv1d/2d/3d`` with zero padding (grouped and depthwise too), ``nn.Embedding``,
``nn.LayerNorm``, ``nn.RMSNorm`` (and RMSNorm-like modules of other libraries, checked
on their calls), ``nn.GroupNorm`` and the BatchNorm family (affine parameters).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerRows",
    "TiedRows",
    "computes_as_its_kind",
    "is_rms_norm",
    "known_kind",
    "layer_rows",
    "overrides_forward",
    "supported",
    "unsupported_reason",
]

#: Largest number of elements of a built chunk of ``U`` (float64 rows: 256 MiB).
CHUNK = 1 << 25
#: Multiply-adds of a convolution's rows from which :class:`_ConvRows` is used.
GROUPED_WORK = 1 << 27


class LayerRows:
    """``K = U Uᵀ`` and ``U v`` for one layer's rows (subclasses implement them)."""

    def gram(self) -> torch.Tensor:
        raise NotImplementedError

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        """``U v`` for ``v`` given per parameter, in the layer's parameter order."""
        raise NotImplementedError

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``U`` on the weight's rows ``start:stop``: ``(R, stop − start, d)``."""
        raise NotImplementedError

    def dots(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """``U v`` for several ``v`` (one pass over the layer's input where possible)."""
        return [self.dot(v) for v in vs]

    def gram_dots(
        self, vs: Sequence[Sequence[torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``K`` and ``U v`` for each ``v`` (from the same built rows where they are built)."""
        return self.gram(), self.dots(vs)


class TiedRows(LayerRows):
    """One weight used by several layers (a tied embedding and output layer): the rows
    are the sums of each use's rows, built in chunks of the weight's rows."""

    def __init__(self, parts: Sequence[LayerRows]) -> None:
        self.parts = parts

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([p.dot(v) for p in self.parts]).sum(dim=0)

    def gram(self) -> torch.Tensor:
        first = self.parts[0].weight_rows(0, 1)
        total = getattr(self.parts[0], "num_weight_rows", 0)
        R, _, d = first.shape
        step = max(1, CHUNK // max(R * d, 1))
        K = torch.zeros(R, R, dtype=torch.float64, device=first.device)
        for start in range(0, total, step):
            stop = min(start + step, total)
            U = sum(p.weight_rows(start, stop) for p in self.parts)
            assert isinstance(U, torch.Tensor)
            U = U.reshape(R, -1)
            K += (U @ U.T).double()
        return K


#: The layer types :func:`layer_rows` knows. A subclass that overrides ``forward`` may
#: compute another function of its first input (OPT's learned position embedding takes
#: the attention mask and derives the ids; a LoRA linear adds a low-rank branch;
#: ConvNeXt's channels-first LayerNorm permutes its input): its rows would be silently
#: wrong. It is taken only where the type's own forward, on the input of its call,
#: gives the output it gave (:func:`computes_as_its_kind`).
_KNOWN: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
)


#: ``torch.nn.RMSNorm`` (torch ≥ 2.4), or None.
_RMS_NORM: type[nn.Module] | None = getattr(nn, "RMSNorm", None)


def is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMS normalization ``z = w ⊙ x / √(mean x² + ε)`` over the
    last dimension: ``nn.RMSNorm``, or a module of another library that looks like one
    (its class name says RMSNorm, its one parameter is a 1-D ``weight``, it has an ``eps``
    or ``variance_epsilon``; transformers' Llama, Qwen, Mistral ... RMSNorm). Whether such
    a module computes exactly that is checked on its calls (:func:`computes_as_its_kind`:
    Gemma's ``(1 + w)`` does not)."""
    if _RMS_NORM is not None and isinstance(module, _RMS_NORM):
        return True
    if "RMSNorm" not in type(module).__name__:
        return False
    own = dict(module.named_parameters(recurse=False))
    weight = own.get("weight")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return (
        set(own) == {"weight"}
        and weight is not None
        and weight.ndim == 1
        and (isinstance(eps, (int, float)))
    )


def _rms_eps(module: nn.Module) -> float | None:
    """An RMS normalization's ε (None: torch's default, the input dtype's machine ε)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return None if eps is None else float(eps)


def known_kind(module: nn.Module) -> type[nn.Module] | None:
    """The known type ``module`` is an instance of, ``nn.RMSNorm`` for an RMSNorm-like
    module (:func:`is_rms_norm`); None for another layer, or a convolution with
    circular/reflect padding or string padding."""
    if is_rms_norm(module):
        return _RMS_NORM or nn.LayerNorm  # only a label where torch has no RMSNorm
    kind = next((k for k in _KNOWN if isinstance(module, k)), None)
    if kind is None or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and (
        module.padding_mode != "zeros" or isinstance(module.padding, str)
    ):
        return None
    return kind


def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class overrides the forward of its known type (an
    RMSNorm-like module of another library always counts as overriding)."""
    kind = known_kind(module)
    return kind is not None and type(module).forward is not kind.forward


def computes_as_its_kind(module: nn.Module, a: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether the known type's own forward, on ``a``, gives ``output`` (to rounding):
    then the rows of the known type are this module's, whatever its class."""
    kind = known_kind(module)
    if kind is None:
        return False
    # The function itself, not the module: a subclass's hooks must not see this call.
    with torch.no_grad():
        try:
            if is_rms_norm(module):
                w = module.get_parameter("weight")
                plain = F.rms_norm(a, tuple(w.shape), w, _rms_eps(module))
            else:
                plain = kind.forward(module, a)
        except Exception:  # the input is not one the known type takes
            return False
    out = output.detach()
    if not isinstance(plain, torch.Tensor) or plain.shape != out.shape:
        return False
    return bool(torch.allclose(plain, out, rtol=1e-4, atol=1e-6 * float(out.abs().max() + 1)))


def unsupported_reason(module: nn.Module) -> str | None:
    """Why :func:`layer_rows` cannot take ``module`` whatever its calls, or None."""
    extra = sorted(k for k, p in module._parameters.items() if p is not None)
    extra = [k for k in extra if k not in ("weight", "bias")]
    if extra:  # a LoRA linear's A and B: not the rows of a weight and a bias
        return (
            f"{type(module).__name__} has parameters of its own beyond a weight and a bias "
            f"({', '.join(extra)})"
        )
    if type(module).__name__ == "Conv1D" or known_kind(module) is not None:
        return None
    return f"{type(module).__name__} layers are not supported"


def supported(module: nn.Module) -> bool:
    """Whether :func:`layer_rows` knows this module type and its forward is the type's
    own (a subclass overriding it is checked on its calls, :func:`computes_as_its_kind`)."""
    if unsupported_reason(module) is not None:
        return False
    return type(module).__name__ == "Conv1D" or not overrides_forward(module)


def layer_rows(
    module: nn.Module,
    params: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
) -> LayerRows:
    """Rows of ``module``'s own parameters ``params`` over its calls.

    Args:
        inputs: the module's first input at each call, shape ``(n, ...)``.
        deltas: the backward vectors at its output for each call, ``(m, n, ...)``.
    """
    if isinstance(module, nn.Embedding):
        return _EmbeddingRows(module, params, inputs, deltas)
    if is_rms_norm(module) or isinstance(
        module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    ):
        return _NormRows(module, params, inputs, deltas)
    weight = getattr(module, "weight", None)
    if weight is not None and not any(p is weight for p in params):
        return _BiasRows(module, deltas)  # a frozen weight, a trained bias (BitFit)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1:
        return _GroupedRows(module, params, inputs, deltas)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        rows = deltas[0].shape[0] * deltas[0].shape[1]
        work = rows * deltas[0][0, 0].numel() * module.weight.numel()
        # The grouped weight gradient is oneDNN's: its first use for a shape generates a
        # kernel (~18 ms measured), which only pays off on large layers; all rows at
        # once only while they fit, else patches in chunks below.
        if work >= GROUPED_WORK and rows * module.weight.numel() <= CHUNK:
            return _ConvRows(module, params, inputs, deltas)
    a, d = _as_linear(module, inputs, deltas)
    transposed = type(module).__name__ == "Conv1D"
    return _LinearRows(params, a, d, transposed=transposed)


def _as_linear(
    module: Any, inputs: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every call's input as ``(n, T, d_in)`` rows and ``δ`` as ``(m, n, T, d_out)``
    (a convolution's patches and output locations as positions), the calls' positions
    concatenated."""
    a_list, d_list = [], []
    for a, d in zip(inputs, deltas, strict=True):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            a, d = _conv_as_linear(module, a, d)
        else:
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            d = d.reshape(d.shape[0], d.shape[1], -1, d.shape[-1])
        a_list.append(a)
        d_list.append(d)
    a = torch.cat(a_list, dim=1) if len(a_list) > 1 else a_list[0]
    d = torch.cat(d_list, dim=2) if len(d_list) > 1 else d_list[0]
    return a, d


class _GroupedRows(LayerRows):
    """A convolution with G groups (depthwise: G = C_in) is G independent convolutions,
    group g taking input channels and giving output channels of its own: its rows are
    the groups' linear rows side by side, so ``K = Σ_g U_g U_gᵀ`` and ``U v = Σ_g U_g v_g``
    (``v_g``: the weight's and bias's entries of group g's output channels)."""

    def __init__(
        self,
        module: Any,
        params: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
    ) -> None:
        G = module.groups
        self.out_per_group = module.out_channels // G
        a, d = _as_linear(module, inputs, deltas)  # (n, L, C_in·K), (m, n, L, C_out)
        a, d = a.unflatten(-1, (G, -1)), d.unflatten(-1, (G, -1))  # a group's are contiguous
        self.groups = [
            _LinearRows(
                [p[g * self.out_per_group : (g + 1) * self.out_per_group] for p in params],
                a[..., g, :],
                d[..., g, :],
                transposed=False,
            )
            for g in range(G)
        ]

    def _split(self, v: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        k = self.out_per_group
        return [[t[g * k : (g + 1) * k] for t in v] for g in range(len(self.groups))]

    def dots(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        split = [self._split(v) for v in vs]
        per_group = [rows.dots([s[g] for s in split]) for g, rows in enumerate(self.groups)]
        return [torch.stack([out[i] for out in per_group]).sum(dim=0) for i in range(len(vs))]

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.dots([v])[0]

    def gram(self) -> torch.Tensor:
        return torch.stack([rows.gram() for rows in self.groups]).sum(dim=0)


def _conv_as_linear(
    module: Any, a: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's input as ``(n, L, C_in·k)`` patches, ``δ`` as ``(m, n, L, C_out)``."""
    nd = a.ndim - 2
    # Patches by one strided slice per kernel offset (several times faster than
    # F.unfold's im2col on small images): cols[n, c·K + k, l] = x_pad[n, c, l·s + k·dl].
    x = F.pad(a, [p for pad in reversed(module.padding) for p in (pad, pad)])
    out_size = [
        (x.shape[2 + i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1) // module.stride[i]
        + 1
        for i in range(nd)
    ]
    pieces = []
    for offset in itertools.product(*(range(k) for k in module.kernel_size)):
        index = [slice(None), slice(None)]
        for i in range(nd):
            begin = offset[i] * module.dilation[i]
            stop = begin + module.stride[i] * (out_size[i] - 1) + 1
            index.append(slice(begin, stop, module.stride[i]))
        pieces.append(x[tuple(index)])
    n, c = a.shape[:2]
    cols = torch.stack(pieces, dim=2).reshape(n, c * len(pieces), -1)
    a2 = cols.transpose(1, 2)
    d2 = d.reshape(d.shape[0], d.shape[1], d.shape[2], -1).transpose(2, 3)
    return a2, d2


class _BiasRows(LayerRows):
    """The bias alone of a linear or convolution layer whose weight is frozen:
    ``u_{jn} = Σ_t δ_{jnt}``, the backward vectors summed over positions (and calls)."""

    def __init__(self, module: nn.Module, deltas: Sequence[torch.Tensor]) -> None:
        channels_first = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        total = None
        for d in deltas:  # (m, n, C, *spatial) or (m, n, ..., C)
            if channels_first:
                u = d.reshape(d.shape[0], d.shape[1], d.shape[2], -1).sum(dim=3)
            else:
                u = d.reshape(d.shape[0], d.shape[1], -1, d.shape[-1]).sum(dim=2)
            total = u if total is None else total + u
        assert total is not None
        self.u = total.reshape(total.shape[0] * total.shape[1], -1)  # (R, C)

    def gram(self) -> torch.Tensor:
        u = self.u.double()
        return u @ u.T

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        return (self.u.double() @ v[0].double().reshape(-1)).reshape(-1)


class _LinearRows(LayerRows):
    """``z_t = W a_t + b`` at positions ``t``: ``u_{jn} = Σ_t δ_{jnt} a_{nt}ᵀ`` (and ``Σ_t δ``)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        a: torch.Tensor,  # (n, T, din)
        d: torch.Tensor,  # (m, n, T, dout)
        *,
        transposed: bool,
    ) -> None:
        self.params = params
        self.a = a
        self.d = d
        self.transposed = transposed
        self.has_bias = len(params) > 1

    @property
    def num_weight_rows(self) -> int:
        return int(self.params[0].shape[0])

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        R = self.d.shape[0] * self.d.shape[1]
        dchunk = self.d[..., start:stop]
        return torch.einsum("mntc,nti->mnci", dchunk, self.a).reshape(R, stop - start, -1)

    def _weight(self, v: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor in ``(out, in)`` layout."""
        return v.T if self.transposed else v.reshape(v.shape[0], -1)

    def dots(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        if len(vs) == 1:
            return [self.dot(vs[0])]
        w = torch.cat([self._weight(v[0]).to(self.a.dtype) for v in vs])
        av = (self.a @ w.T).unflatten(-1, (len(vs), -1))  # (n, T, k, dout)
        out = torch.einsum("ntko,mnto->kmn", av, self.d)
        res = []
        for i, v in enumerate(vs):
            o = out[i]
            if self.has_bias:
                o = o + (self.d.sum(dim=2) @ v[1].to(self.d.dtype).reshape(-1))
            res.append(o.reshape(-1).double())
        return res

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        w = self._weight(v[0]).to(self.a.dtype)
        av = self.a @ w.T  # (n, T, dout)
        out = (self.d * av).sum(dim=(2, 3))
        if self.has_bias:
            out = out + (self.d.sum(dim=2) @ v[1].to(self.d.dtype).reshape(-1))
        return out.reshape(-1).double()

    def gram(self) -> torch.Tensor:
        return self.gram_dots([])[0]

    def gram_dots(
        self, vs: Sequence[Sequence[torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m, n, T, dout = self.d.shape
        din = self.a.shape[-1]
        R = m * n
        factored = (R * T) ** 2 * (din + dout)
        built = R * T * din * dout + R * R * din * dout
        if T == 1 or factored < built:
            a = self.a.reshape(n * T, din)
            aa = (a @ a.T).reshape(n, T, n, T)
            if self.has_bias:
                aa = aa + 1
            dd = self.d.reshape(R * T, dout)
            if T == 1:  # (AAᵀ + 1) ⊙ ΔΔᵀ, A repeated for each column j
                K = (aa.reshape(n, n).repeat(m, m) * (dd @ dd.T)).double()
            else:
                ddt = (dd @ dd.T).reshape(m, n, T, m, n, T)
                K = torch.einsum("ntlu,jntblu->jnbl", aa, ddt).reshape(R, R).double()
            return K, (self.dots(vs) if vs else [])
        # Built in chunks of output features: U v from the same chunks (a matrix-vector
        # product each, instead of another pass over the layer's input).
        K = torch.zeros(R, R, dtype=torch.float64, device=self.a.device)
        outs = [torch.zeros(R, dtype=torch.float64, device=self.a.device) for _ in vs]
        ws = [self._weight(v[0]).to(self.a.dtype) for v in vs]  # (dout, din) each
        step = max(1, CHUNK // max(R * din, 1))
        for start in range(0, dout, step):
            dchunk = self.d[..., start : start + step]  # (m, n, T, c)
            U = torch.einsum("mntc,nti->mnci", dchunk, self.a).reshape(R, -1)
            K += (U @ U.T).double()
            for out, w in zip(outs, ws, strict=True):
                out += (U @ w[start : start + step].reshape(-1)).double()
        if self.has_bias:
            ub = self.d.sum(dim=2).reshape(R, dout)
            K += (ub @ ub.T).double()
            for out, v in zip(outs, vs, strict=True):
                out += (ub @ v[1].to(ub.dtype).reshape(-1)).double()
        return K, outs


class _ConvRows(LayerRows):
    """A convolution's rows as per-sample weight gradients, by one grouped convolution.

    ``u_{jn} = ∂(δ_{jn} · conv(a_n))/∂W`` for every column ``j`` and sample ``n`` at
    once: the weight gradient of a convolution with ``m·n`` groups, the input of each
    group one sample (repeated for each column) and its output gradient ``δ_{jn}``
    (the per-example trick of Rochette et al. 2019, "Efficient per-example gradient
    computations in convolutional neural networks"); the bias rows are ``Σ_t δ_{jnt}``.
    Faster than patches (im2col) and a product for small images, and the rows are
    ``R × (C_out·C_in·k)``, so only used while that fits :data:`CHUNK`.
    """

    def __init__(
        self,
        module: Any,
        params: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
    ) -> None:
        ids = [id(p) for p in params]
        self.parts = [
            name
            for name in ("weight", "bias")
            if getattr(module, name, None) is not None and id(getattr(module, name)) in ids
        ]
        U: torch.Tensor | None = None
        B: torch.Tensor | None = None
        for a, d in zip(inputs, deltas, strict=True):
            m, n, cout = d.shape[:3]
            nd = a.ndim - 2
            R = m * n
            if "weight" in self.parts:
                x = a.to(d.dtype).unsqueeze(0).expand(m, *a.shape)
                x = x.reshape(1, R * a.shape[1], *a.shape[2:])
                w = d.new_empty((R * cout, a.shape[1], *module.kernel_size))
                _, gw, _ = torch.ops.aten.convolution_backward(
                    d.reshape(1, R * cout, *d.shape[3:]),
                    x,
                    w,
                    None,
                    list(module.stride),
                    list(module.padding),
                    list(module.dilation),
                    False,
                    [0] * nd,
                    R,
                    [False, True, False],
                )
                u = gw.reshape(R, -1)
                U = u if U is None else U + u
            if "bias" in self.parts:
                b = d.reshape(R, cout, -1).sum(-1)
                B = b if B is None else B + b
        self.U = U
        self.B = B

    def _flat(self, v: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.reshape(-1) for name, t in zip(self.parts, v, strict=True)}

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.dots([v])[0]

    def dots(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for v in vs:
            parts = self._flat(v)
            total: torch.Tensor | None = None
            for name, M in (("weight", self.U), ("bias", self.B)):
                if M is not None:
                    o = M @ parts[name].to(M.dtype)
                    total = o if total is None else total + o
            assert total is not None
            out.append(total.double())
        return out

    def gram(self) -> torch.Tensor:
        K: torch.Tensor | None = None
        for M in (self.U, self.B):
            if M is not None:
                k = (M @ M.T).double()
                K = k if K is None else K + k
        assert K is not None
        return K


class _EmbeddingRows(LayerRows):
    """``u_{jn} = Σ_t e_{i_{nt}} δ_{jnt}ᵀ``: rows on the tokens the batch uses."""

    def __init__(
        self,
        module: nn.Embedding,
        params: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
    ) -> None:
        ids = torch.cat([i.reshape(i.shape[0], -1) for i in inputs], dim=1)
        d = torch.cat([x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]) for x in deltas], dim=2)
        if module.padding_idx is not None:
            d = d * (ids != module.padding_idx).unsqueeze(-1).to(d.dtype)
        self.num_embeddings = module.num_embeddings
        self.uniq, inverse = torch.unique(ids, return_inverse=True)
        m, n, T, dim = d.shape
        Z = torch.zeros(m, n, len(self.uniq), dim, dtype=d.dtype, device=d.device)
        Z.scatter_add_(2, inverse.reshape(1, n, T, 1).expand(m, n, T, dim), d)
        self.Z = Z.reshape(m * n, len(self.uniq), dim)

    @property
    def num_weight_rows(self) -> int:
        return self.num_embeddings

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        R, _, dim = self.Z.shape
        out = torch.zeros(R, stop - start, dim, dtype=self.Z.dtype, device=self.Z.device)
        inside = (self.uniq >= start) & (self.uniq < stop)
        out[:, self.uniq[inside] - start] = self.Z[:, inside]
        return out

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        vu = v[0][self.uniq].to(self.Z.dtype)
        return (self.Z * vu).sum(dim=(1, 2)).double()

    def gram(self) -> torch.Tensor:
        Zf = self.Z.reshape(self.Z.shape[0], -1)
        return (Zf @ Zf.T).double()


class _NormRows(LayerRows):
    """Affine normalization ``z = x̂ ⊙ w + b``: ``u = (Σ δ ⊙ x̂, Σ δ)`` per sample."""

    def __init__(
        self,
        module: Any,
        params: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
    ) -> None:
        names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        us = None
        for a, d in zip(inputs, deltas, strict=True):
            xhat = _normalized(module, a.detach()).to(d.dtype)
            m, n = d.shape[:2]
            if isinstance(module, nn.LayerNorm) or is_rms_norm(module):
                wdims = module.weight.ndim
                sum_dims = tuple(range(2, d.ndim - wdims))
                wshape = (m, n, -1)
                dw = (d * xhat).sum(dim=sum_dims) if sum_dims else d * xhat
                db = d.sum(dim=sum_dims) if sum_dims else d
            else:  # channels in dim 1 of the input, dim 2 of d
                sum_dims = tuple(range(3, d.ndim))
                wshape = (m, n, -1)
                dw = (d * xhat).sum(dim=sum_dims) if sum_dims else d * xhat
                db = d.sum(dim=sum_dims) if sum_dims else d
            parts = {"weight": dw.reshape(wshape), "bias": db.reshape(wshape)}
            u = torch.cat([parts[name] for name in names], dim=2).reshape(m * n, -1)
            us = u if us is None else us + u
        assert us is not None
        self.U = us
        self.sizes = [p.numel() for p in params]

    def dot(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).to(self.U.dtype) for t in v])
        return (self.U @ flat).double()

    def gram(self) -> torch.Tensor:
        return (self.U @ self.U.T).double()


def _normalized(module: Any, a: torch.Tensor) -> torch.Tensor:
    """The module's normalized input ``x̂`` (before the affine map), as its forward computes it."""
    if is_rms_norm(module):
        return F.rms_norm(a, tuple(module.get_parameter("weight").shape), None, _rms_eps(module))
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, None, None, module.eps)
    use_batch = module.training or module.running_mean is None
    return F.batch_norm(
        a,
        None if use_batch else module.running_mean,
        None if use_batch else module.running_var,
        None,
        None,
        use_batch,
        0.0,
        module.eps,
    )
