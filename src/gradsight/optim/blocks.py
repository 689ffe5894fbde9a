"""Which curvature block each layer type gets: the optimizer's extension point.

:class:`~gradsight.optim.GaussNewton` approximates the generalized Gauss-Newton matrix
block-diagonally, one block per layer. How a layer's block is measured and inverted
depends on the layer's type, looked up in a registry keyed by module type (the most
derived registered base class wins):

* :class:`torch.nn.Linear` → :class:`LinearBlock`, Kronecker-factored (K-FAC, Martens &
  Grosse 2015): ``G ≈ A ⊗ S`` with ``A`` the second moment of the layer's inputs
  (with a ones column for the bias) and ``S`` that of its backward signals. Inputs with
  extra leading dimensions (sequences) count every position as a row ("K-FAC expand",
  Eschenhagen et al. 2023).
* :class:`torch.nn.Conv2d` → :class:`Conv2dBlock`, Kronecker factors for convolutions
  (KFC, Grosse & Martens 2016): ``A`` from the unfolded input patches, ``S`` from the
  output signals at every spatial location. Grouped convolutions and non-zero padding
  modes fall back to the diagonal.
* ``transformers``' ``Conv1D`` (GPT-2's linear layers, weight stored transposed) →
  :class:`Conv1DBlock`, registered when ``transformers`` is imported.
* anything else (LayerNorm, embeddings, …) → :class:`DiagonalBlock`: the diagonal of
  the Gauss-Newton matrix, estimated from one random probe per refresh.

A new layer type registers a factory with :func:`register_block`::

    register_block(MyLayer, lambda name, module, params: MyBlock(name, module, params))

A factory may return ``None`` for a configuration it does not handle; the layer then gets
the diagonal block.

References:
    J. Martens, R. Grosse (2015). Optimizing neural networks with Kronecker-factored
    approximate curvature. ICML.
    R. Grosse, J. Martens (2016). A Kronecker-factored approximate Fisher matrix for
    convolution layers. ICML.
    R. Eschenhagen et al. (2023). Kronecker-factored approximate curvature for modern
    neural network architectures. NeurIPS.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Conv1DBlock",
    "Conv2dBlock",
    "CurvatureBlock",
    "DiagonalBlock",
    "KroneckerBlock",
    "LinearBlock",
    "block_for",
    "register_block",
]

BlockFactory = Callable[[str, nn.Module, list[torch.Tensor]], "CurvatureBlock | None"]


class CurvatureBlock:
    """One layer's parameters and how their Gauss-Newton block is approximated.

    A block holds no state: the optimizer keeps every running average and inverse in
    its own ``state`` (so that ``state_dict()`` is the whole checkpoint).

    Attributes:
        kind: short label of the treatment (``"kfac"``, ``"kfc"``, ``"diagonal"``).
        name: the module's qualified name.
        module: the module.
        params: the module's parameters that the optimizer updates, in a fixed order.
    """

    kind: ClassVar[str] = "diagonal"
    kronecker: ClassVar[bool] = False

    def __init__(self, name: str, module: nn.Module, params: list[torch.Tensor]) -> None:
        self.name = name
        self.module = module
        self.params = params


class DiagonalBlock(CurvatureBlock):
    """The diagonal of the Gauss-Newton block (the fallback for any layer type).

    Each refresh averages in ``(Jᵀ R ε)²`` for one probe ``R ε`` whose covariance is the
    output Hessian, an unbiased estimate of ``diag(Jᵀ H J)``.
    """

    kind = "diagonal"


class KroneckerBlock(CurvatureBlock):
    """A weight matrix (plus optional bias) with a Kronecker-factored block ``A ⊗ S``.

    Subclasses say how the module's input becomes rows of ``A``'s samples, how a signal
    at its output becomes rows of ``S``'s, and how the gradient is laid out as the
    ``(d_out, d_in [+ 1])`` matrix the factors act on.
    """

    kind = "kfac"
    kronecker = True

    def __init__(self, name: str, module: nn.Module, params: list[torch.Tensor]) -> None:
        super().__init__(name, module, params)
        self.has_bias = len(params) == 2

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(rows, d_in [+ 1])``: one row per sample (and position) of the layer's input."""
        raise NotImplementedError

    def output_rows(self, signal: torch.Tensor) -> torch.Tensor:
        """``(rows, d_out)``: one row per sample and position of an output-shaped signal.

        ``signal`` may carry extra leading dimensions (a batch of cotangents); their rows
        are stacked, so that ``rowsᵀ rows`` sums over them.
        """
        raise NotImplementedError

    def to_matrix(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped tensors as one ``(d_out, d_in [+ 1])`` matrix."""
        raise NotImplementedError

    def from_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`to_matrix`."""
        raise NotImplementedError

    def _with_ones(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)


class LinearBlock(KroneckerBlock):
    """K-FAC for :class:`torch.nn.Linear` (``s = W a + b``)."""

    kind = "kfac"

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._with_ones(inputs.reshape(-1, inputs.shape[-1]))

    def output_rows(self, signal: torch.Tensor) -> torch.Tensor:
        return signal.reshape(-1, signal.shape[-1])

    def to_matrix(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not self.has_bias:
            return tensors[0]
        return torch.cat([tensors[0], tensors[1][:, None]], dim=1)

    def from_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        if not self.has_bias:
            return [matrix]
        return [matrix[:, :-1].contiguous(), matrix[:, -1].contiguous()]


class Conv1DBlock(LinearBlock):
    """K-FAC for ``transformers``' ``Conv1D``: ``s = a W + b``, ``W`` stored ``(d_in, d_out)``."""

    def to_matrix(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return super().to_matrix([tensors[0].T, *tensors[1:]])

    def from_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        parts = super().from_matrix(matrix)
        return [parts[0].T.contiguous(), *parts[1:]]


class Conv2dBlock(KroneckerBlock):
    """KFC (Grosse & Martens 2016) for :class:`torch.nn.Conv2d` with ``groups=1``.

    ``A`` is the second moment of the unfolded input patches ``(C_in·kh·kw [+ 1])`` over
    samples and output locations, ``S`` that of the output signals ``(C_out)`` over the
    same rows; the weight is the ``(C_out, C_in·kh·kw)`` matrix those act on (the
    layout of ``F.unfold``). Locations are treated as independent (the IAD/SUD
    approximations of the paper).
    """

    kind = "kfc"

    def __init__(self, name: str, module: nn.Module, params: list[torch.Tensor]) -> None:
        super().__init__(name, module, params)
        assert isinstance(module, nn.Conv2d)
        self.conv = module

    def input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        m = self.conv
        x = inputs if inputs.ndim == 4 else inputs.unsqueeze(0)
        padding = m.padding
        if isinstance(padding, str):  # "valid" or "same" (stride 1): pad explicitly
            pads: list[int] = []
            for k, d in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
                total = 0 if padding == "valid" else d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0, 0)
        patches = F.unfold(x, m.kernel_size, m.dilation, padding, m.stride)  # (N, D, L)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._with_ones(rows)

    def output_rows(self, signal: torch.Tensor) -> torch.Tensor:
        c = self.conv.out_channels
        return (
            signal.reshape(-1, c, signal.shape[-2] * signal.shape[-1])
            .transpose(1, 2)
            .reshape(-1, c)
        )

    def to_matrix(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        w = tensors[0].reshape(tensors[0].shape[0], -1)
        return w if not self.has_bias else torch.cat([w, tensors[1][:, None]], dim=1)

    def from_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        shape = self.params[0].shape
        if not self.has_bias:
            return [matrix.reshape(shape)]
        return [matrix[:, :-1].reshape(shape), matrix[:, -1].contiguous()]


_REGISTRY: dict[type, BlockFactory] = {}


def register_block(module_type: type, factory: BlockFactory) -> None:
    """Give modules of ``module_type`` (and its subclasses) the blocks ``factory`` makes.

    Args:
        module_type: an :class:`torch.nn.Module` subclass.
        factory: ``(name, module, params) -> CurvatureBlock | None``; ``params`` are the
            module's own parameters that the optimizer updates, the weight first.
            ``None`` means "not this configuration": the diagonal block is used.

    Example:
        >>> from torch import nn
        >>> class Scaled(nn.Linear):
        ...     pass
        >>> register_block(Scaled, lambda n, m, p: DiagonalBlock(n, m, p))
        >>> block_for("s", Scaled(2, 2), list(Scaled(2, 2).parameters())).kind
        'diagonal'
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        from gradsight._errors import GradsightError

        raise GradsightError(
            f"register_block takes an nn.Module subclass, got {module_type!r}; pass the "
            "layer class, e.g. register_block(nn.Linear, factory)."
        )
    _REGISTRY[module_type] = factory


def _linear(name: str, module: nn.Module, params: list[torch.Tensor]) -> CurvatureBlock | None:
    assert isinstance(module, nn.Linear)
    if not params or params[0] is not module.weight:
        return None  # the weight is not trained (or tied elsewhere): no Kronecker block
    return LinearBlock(name, module, params)


def _conv2d(name: str, module: nn.Module, params: list[torch.Tensor]) -> CurvatureBlock | None:
    assert isinstance(module, nn.Conv2d)
    if not params or params[0] is not module.weight:
        return None
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    if isinstance(module.padding, str) and module.padding == "same" and module.stride != (1, 1):
        return None
    return Conv2dBlock(name, module, params)


def _conv1d_transformers(
    name: str, module: nn.Module, params: list[torch.Tensor]
) -> CurvatureBlock | None:
    weight = getattr(module, "weight", None)
    if not params or params[0] is not weight or weight is None or weight.ndim != 2:
        return None
    return Conv1DBlock(name, module, params)


register_block(nn.Linear, _linear)
register_block(nn.Conv2d, _conv2d)


def _register_optional() -> None:
    """Register layer types of libraries that are already imported (never import them)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if isinstance(conv1d, type) and conv1d not in _REGISTRY:
        register_block(conv1d, _conv1d_transformers)


def block_for(name: str, module: nn.Module, params: list[torch.Tensor]) -> CurvatureBlock:
    """The block ``module``'s type is registered for, or the diagonal fallback.

    Example:
        >>> from torch import nn
        >>> conv = nn.Conv2d(3, 4, 3)
        >>> block_for("c", conv, [conv.weight, conv.bias]).kind
        'kfc'
        >>> norm = nn.LayerNorm(4)
        >>> block_for("n", norm, list(norm.parameters())).kind
        'diagonal'
    """
    _register_optional()
    for cls in type(module).__mro__:
        factory = _REGISTRY.get(cls)
        if factory is not None:
            block = factory(name, module, params)
            if block is not None:
                return block
            break
    return DiagonalBlock(name, module, params)
