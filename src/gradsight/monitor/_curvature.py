"""The Monitor's curvature tier: per-layer curvature through :mod:`gradsight.curvature`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradsight._precision import full_precision

__all__ = ["CurvatureTier"]

#: Damping of the Newton decrement relative to the block's λmax, as in the verdicts.
DAMPING = 1e-3


class CurvatureTier:
    """Per-layer curvature of the loss on one batch, as ``(layer, metric, value)`` rows.

    For each parameter-owning layer (its own parameters as the block), on the
    generalized Gauss-Newton matrix G (the positive semi-definite part of the Hessian,
    which the verdicts use too), from the same engine as :func:`gradsight.diagnose`
    (:class:`~gradsight.curvature.blockwise.BlockwiseGGN`: one forward pass and a few
    backward passes serve every layer):

    * ``lambda_max`` (and its standard error ``lambda_max_err``): the top eigenvalue of
      G, and with a learning rate ``lr_lambda_max`` = lr·λmax (above 2 gradient descent
      oscillates along the block's sharpest direction; whether it blows up, a
      diagnosis's SGD trial decides);
    * ``trace`` and ``trace_stderr``: the trace of G and its standard error;
    * ``alpha_star``: the curvature-optimal step α* = gᵀg / gᵀGg along the gradient,
      and ``step_ratio`` = α*/lr, the step the layer needs over the step it gets;
    * ``headroom`` (and ``headroom_err``): the damped Gauss-Newton decrease along the
      gradient, ½(gᵀg)²/(gᵀGg + λgᵀg) (λ = 10⁻³·λmax(G)), over the loss.

    Layers the engine does not cover (recurrent layers, modules it has no rows for,
    calls without the batch in dim 0), and every layer when the loss's output Hessian has
    no known factor or with ``blockwise=False``, get the same quantities from their own
    GGN-vector products instead (Lanczos, XTrace with ``probes`` products, one product
    for α*; without ``lambda_max_err`` and ``headroom_err``). Under torch.distributed the
    engine gathers each layer's inputs and backward vectors over the ranks
    (:class:`~gradsight.curvature.distributed.Ranks`) and the fallback averages every
    product over them (:class:`~gradsight.curvature.distributed.DistributedOperator`):
    either way every rank gets the curvature of the whole batch. The model is left as
    found.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        *,
        probes: int = 20,
        distributed: bool = False,
        group: Any = None,
        blockwise: bool = True,
    ) -> None:
        self.blockwise = blockwise
        #: Layers whose curvature could not be measured at the last step, and why.
        self.failed: dict[str, str] = {}
        self.model = model
        self.layers = layers
        self.probes = probes
        self.distributed = distributed
        self.group = group

    def measure(
        self,
        batch: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        lr: float | None,
    ) -> list[tuple[str, str, float]]:
        # The math attention kernel has the double backward that curvature products
        # need (the fused CPU/flash kernels do not); results agree to rounding.
        from gradsight._state import renormed_weights_kept

        self.failed = {}
        with sdpa_kernel(SDPBackend.MATH), full_precision(), renormed_weights_kept(self.model):
            return self._measure(batch, loss_fn, lr)

    def _measure(
        self, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor], lr: float | None
    ) -> list[tuple[str, str, float]]:
        from gradsight._errors import GradsightError
        from gradsight.curvature.blockwise import BlockwiseGGN

        model, loss_fn, prefix, batch = self._tensor_model(batch, loss_fn)
        engine = None
        if self.blockwise:
            modules = {prefix + name: model.get_submodule(prefix + name) for name in self.layers}
            try:
                engine = BlockwiseGGN(
                    model,
                    batch,
                    loss_fn,
                    modules,
                    draws=2,
                    distributed=self.distributed,
                    group=self.group,
                )
            except GradsightError:  # no factor for this loss (the same on every rank)
                engine = None
        rows: list[tuple[str, str, float]] = []
        for layer in self.layers:
            if engine is not None and prefix + layer in engine.blocks:
                est = engine.estimate(prefix + layer, DAMPING)
                lam, alpha, loss = est.lambda_max, est.alpha_star, engine.loss
                rows += [(layer, "lambda_max", lam), (layer, "lambda_max_err", est.lambda_max_err)]
                if lr is not None:
                    rows.append((layer, "lr_lambda_max", lr * lam))
                rows += [(layer, "trace", est.trace), (layer, "trace_stderr", est.trace_err)]
                if not math.isnan(alpha):  # 0/0: a layer without gradient has no α*
                    rows.append((layer, "alpha_star", alpha))
                if lr is not None and math.isfinite(alpha):
                    rows.append((layer, "step_ratio", alpha / lr))
                if loss > 0:
                    rows.append((layer, "headroom", est.decrement / loss))
                    rows.append((layer, "headroom_err", est.decrement_err / loss))
            else:
                try:
                    rows += self._exact(model, prefix, layer, batch, loss_fn, lr)
                except Exception as exc:  # this layer only: the others' rows stand
                    self.failed[layer] = f"{type(exc).__name__}: {exc}"
        return rows

    def _tensor_model(
        self, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor]
    ) -> tuple[nn.Module, Callable[[Any, Any], torch.Tensor], str, Any]:
        """The model, loss and batch as the curvature engine needs them: returning one
        tensor, the loss a function of it. A Hugging Face ``ModelOutput``, a dict of heads
        or a tuple is flattened, and a model's own returned loss (``out.loss``) replaced by
        its loss function of its logits, as :func:`gradsight.diagnose` does, after one
        forward pass without gradients that leaves the model as it was."""
        from gradsight._batch import call_model, split_batch
        from gradsight._model_loss import loss_of_outputs
        from gradsight._outputs import tensor_output
        from gradsight._state import preserved

        inputs, targets = split_batch(batch)
        with torch.no_grad(), preserved(self.model):
            outputs = call_model(self.model, inputs)
            loss = loss_fn(outputs, targets)
        loss_fn, labels = loss_of_outputs(self.model, inputs, targets, outputs, loss, loss_fn)
        if labels is not targets:
            batch = (inputs, labels)
        adapted = tensor_output(self.model, outputs, loss_fn)
        model, flat_loss, prefix = (self.model, loss_fn, "") if adapted is None else adapted
        return model, flat_loss, prefix, batch

    def _exact(
        self,
        model: nn.Module,
        prefix: str,
        layer: str,
        batch: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        lr: float | None,
    ) -> list[tuple[str, str, float]]:
        """The same rows from per-layer GGN-vector products (``model``: the one returning
        a tensor, in which ``layer`` is ``prefix + layer``)."""
        from gradsight.curvature import curvature_operator, curvature_step, lanczos, xtrace

        op: Any = curvature_operator(model, batch, loss_fn, params=prefix + layer, kind="ggn")
        if self.distributed:
            from gradsight.curvature.distributed import DistributedOperator

            op = DistributedOperator(op, self.group)
        rows: list[tuple[str, str, float]] = []
        lam = float(lanczos(op, 1, tol=1e-2, max_matvecs=40).eigenvalues[0])
        rows.append((layer, "lambda_max", lam))
        if lr is not None:
            rows.append((layer, "lr_lambda_max", lr * lam))
        tr = xtrace(op, max(self.probes, 4), seed=0)
        rows += [(layer, "trace", tr.estimate), (layer, "trace_stderr", tr.stderr)]
        step = curvature_step(op, op.gradient)
        if not math.isnan(float(step.alpha)):  # 0/0: a layer without gradient has no α*
            rows.append((layer, "alpha_star", float(step.alpha)))
        if lr is not None and math.isfinite(step.alpha):
            rows.append((layer, "step_ratio", step.alpha / lr))
        loss = float(op.loss)
        if loss > 0:
            gg = step.grad_sq
            denom = step.curvature * gg + DAMPING * max(lam, 0.0) * gg
            dec = 0.0 if gg == 0 else (0.5 * gg * gg / denom if denom > 0 else math.inf)
            rows.append((layer, "headroom", dec / loss))
        return rows
