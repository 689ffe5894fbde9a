"""The result of a diagnosis: one object, several exporters (text, dict/JSON, HTML)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from gradsight._errors import GradsightError
from gradsight._format import display_name, fmt, jsonable, number, pct

__all__ = ["STATUSES", "Diagnosis", "LayerDiagnosis", "Status"]

#: A layer's status. ``frozen`` layers (``requires_grad=False``) are measured but never
#: judged as learners; ``nonfinite`` marks a gradient that holds NaN/Inf.
Status = Literal["frozen", "converged", "ok", "vanishing", "dead", "exploding", "nonfinite"]

#: Statuses from least to most alarming; a model's status is its worst judged layer's
#: (``frozen`` layers do not enter it).
STATUSES: tuple[Status, ...] = get_args(Status)


@dataclass
class LayerDiagnosis:
    """Verdict and measurements for one parameter-owning module.

    Attributes:
        name: Qualified module name, as in ``model.named_modules()``.
        module_type: The module's class name, e.g. ``"Linear"``.
        status: One of ``ok``, ``vanishing``, ``converged``, ``exploding``, ``dead``,
            ``frozen`` (``requires_grad=False``: measured, not judged) or ``nonfinite``
            (its gradient holds NaN/Inf).
        reason: One sentence that quotes the numbers behind the status.
        grad_norm: ‖∂L/∂θ‖ over the module's own trainable parameters (None if frozen).
        signal_norm: ‖∂L/∂output‖, the backward signal reaching the module.
        saturation: Fraction of flat entries of the activation after the module.
        dead_fraction: Fraction of units after the module flat on the whole batch. A
            layer with dead units that still learns and passes a signal keeps its
            status; its reason says "partly dead".
        activation: Name of the activation after the module, if one was recognised.
        attenuation: ‖δ_this‖ / ‖δ_next‖: how the signal changes on its way back from
            the next layer's output to this one's (< 1 shrinks).
        activation_factor: The part of ``attenuation`` due to what lies between the two
            layers (the activation derivative): ‖δ_this‖ / ‖∂L/∂input of next‖.
        weight_factor: The part due to the module itself: ‖∂L/∂input‖ / ‖∂L/∂output‖.
        relative_grad: Σ‖g_p‖·‖p‖ in quadrature over the module's parameters: the
            first-order loss change per *relative* change of its weights. Unchanged when
            a ReLU layer is rescaled (×k, next ÷k); relative to the loss it is unchanged
            when the loss is scaled.
        headroom: Loss a damped Newton step on this layer alone would win, as a fraction
            of the loss: ½gᵀ(G + λI)⁻¹g / L, λ relative to the layer's own curvature,
            at most 1 (None when curvature was not computed).
        step_ratio: The curvature-optimal step α* = gᵀg/gᵀGg for this layer over the step
            it gets: ``lr`` for SGD; for an adaptive optimizer (Adam, AdamW, RMSprop,
            Adagrad) the step it actually takes along the gradient, gᵀΔ/gᵀg; 2/λmax of
            the whole model when no lr is given. None when the step is unknown (an
            optimizer whose step along the gradient cannot be read from its state).
        step_taken: The step the layer gets, the denominator of ``step_ratio``.
        lambda_max: Largest Gauss-Newton eigenvalue of the layer's block.
        hessian_lambda_max: Largest Hessian eigenvalue of the block, measured where the
            ``lr·λmax > 2`` verdict depends on it (see
            :mod:`gradsight.diagnosis.stability`); that verdict then uses it.
        optimal_step: α*, the curvature-optimal step size along the layer's gradient.
        time_signal_norms: Recurrent layers: ‖∂L/∂x_t‖ of the input at each time step t,
            the backward signal through time.
        used_by: For a module whose parameters its parent uses directly instead of
            calling it (``nn.MultiheadAttention``'s ``out_proj``, ``F.linear(x,
            self.proj.weight)``): the module where they are used, whose signal stands in.
        param_grad_norms: ‖∂L/∂p‖ for each of the module's own parameters.
        advice: Remedies for the cause named in ``reason``, most supported first.
    """

    name: str
    module_type: str
    status: Status
    reason: str
    grad_norm: float | None
    signal_norm: float | None
    saturation: float | None = None
    dead_fraction: float | None = None
    activation: str | None = None
    attenuation: float | None = None
    activation_factor: float | None = None
    weight_factor: float | None = None
    relative_grad: float | None = None
    headroom: float | None = None
    step_ratio: float | None = None
    step_taken: float | None = None
    lambda_max: float | None = None
    hessian_lambda_max: float | None = None
    optimal_step: float | None = None
    time_signal_norms: list[float] | None = None
    used_by: str | None = None
    param_grad_norms: dict[str, float] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable; NaN/Inf become strings)."""
        return {k: jsonable(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerDiagnosis:
        """Inverse of :meth:`to_dict` (fields this version does not know are ignored)."""
        return cls(**_known(cls, data))


@dataclass
class Diagnosis:
    """What :func:`gradsight.diagnose` found: per-layer verdicts and the model's.

    Attributes:
        status: The worst layer status, or ``"nonfinite"`` when the loss or a gradient
            is NaN/Inf.
        layers: One :class:`LayerDiagnosis` per parameter-owning module, forward order.
        loss: The loss on the batch.
        baseline_loss: The loss of the best constant prediction (None if unknown).
        plateau: True when the loss is no better than ``baseline_loss``.
        lr: The learning rate the verdicts assume (None: not given).
        nonfinite_origin: The first module whose own computation makes the output (or,
            if the forward pass is finite, the backward signal) NaN/Inf: where the first
            non-finite output's input is non-finite already, the module around it whose
            code between its submodules made it; else None.
        summary: Plain-language summary: which layers vanish, where and why.
        headroom: Loss a damped Newton step on the whole model would win, as a fraction
            of the loss, at most 1 (a quadratic model predicting more than the whole loss
            overshoots; the summary says so; where a single layer's own step predicts more,
            the summary says which and why); None when curvature was not computed.
        realized_decrease: Fraction of the held-out half of the batch's loss that a
            Levenberg-Marquardt Gauss-Newton step fitted on the other half removed.
        lambda_max: Largest Gauss-Newton eigenvalue of the whole model; 2/λmax is the
            largest stable gradient step.
        trial_losses: Where the SGD trial ran (:mod:`gradsight.diagnosis.trial`): the
            loss at the start and after each full-batch SGD step at ``lr``.
        trial_blew_up: Whether the trial's loss went non-finite, or ended above its
            start (``Thresholds.trial_rise`` × it at each of its last steps), or rose
            above that and then froze (a collapsed network): the step is unstable; None
            where it did not run.
    """

    status: Status
    layers: list[LayerDiagnosis]
    loss: float
    baseline_loss: float | None = None
    plateau: bool = False
    lr: float | None = None
    nonfinite_origin: str | None = None
    summary: str = ""
    headroom: float | None = None
    realized_decrease: float | None = None
    lambda_max: float | None = None
    trial_losses: list[float] | None = None
    trial_blew_up: bool | None = None

    def layer(self, name: str) -> LayerDiagnosis:
        """The layer with qualified module name ``name`` (as in ``named_modules()``).

        Names of a ``torch.compile``'d model may keep their ``_orig_mod.`` prefix.
        """
        name = name.removeprefix("_orig_mod.")
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(repr(layer.name) for layer in self.layers)
        raise GradsightError(
            f"no parameter-owning module named {name!r}; the diagnosed layers are: {known}. "
            "Use a name from model.named_modules()."
        )

    @property
    def first_last_grad_ratio(self) -> float | None:
        """Gradient norm of the first trainable layer over that of the last one."""
        norms = [layer.grad_norm for layer in self.layers if layer.grad_norm is not None]
        if len(norms) < 2 or not norms[-1]:
            return None
        return norms[0] / norms[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of everything measured, JSON-serialisable."""
        return {
            "status": self.status,
            "loss": jsonable(self.loss),
            "baseline_loss": jsonable(self.baseline_loss),
            "plateau": self.plateau,
            "lr": jsonable(self.lr),
            "nonfinite_origin": self.nonfinite_origin,
            "first_last_grad_ratio": jsonable(self.first_last_grad_ratio),
            "headroom": jsonable(self.headroom),
            "realized_decrease": jsonable(self.realized_decrease),
            "lambda_max": jsonable(self.lambda_max),
            "trial_losses": jsonable(self.trial_losses),
            "trial_blew_up": self.trial_blew_up,
            "summary": self.summary,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        """A diagnosis from :meth:`to_dict` output, e.g. one stored in a run directory.

        Fields this version does not know are ignored; NaN/Inf strings become floats.

        Example:
            >>> layer = LayerDiagnosis("0", "Linear", "ok", "learning", 1.0, 2.0)
            >>> d = Diagnosis("ok", [layer], loss=0.5)
            >>> Diagnosis.from_dict(d.to_dict()) == d
            True
        """
        layers = [LayerDiagnosis.from_dict(layer) for layer in data.get("layers", [])]
        top = _known(cls, {k: v for k, v in data.items() if k != "layers"})
        top.setdefault("status", "ok")
        top.setdefault("loss", float("nan"))
        return cls(layers=layers, **top)

    def to_json(self, **kwargs: Any) -> str:
        """``to_dict()`` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> list[dict[str, str]]:
        """Rows of the per-layer table, formatted for display (shared by all exporters)."""
        return [
            {
                "layer": display_name(layer.name),
                "type": layer.module_type,
                "status": layer.status,
                "grad norm": fmt(layer.grad_norm),
                "signal norm": fmt(layer.signal_norm),
                "attenuation": fmt(layer.attenuation, digits=2),
                "activation": layer.activation or "-",
                "saturation": pct(layer.saturation),
                "dead": pct(layer.dead_fraction),
                "step ratio": fmt(layer.step_ratio, digits=2),
                "headroom": fmt(layer.headroom, digits=2),
            }
            for layer in self.layers
        ]

    def __str__(self) -> str:
        rows = self.table()
        cols = list(rows[0]) if rows else []
        widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
        lines = [
            f"gradsight diagnosis: {self.status}  (loss {fmt(self.loss)}, constant-prediction "
            f"baseline {fmt(self.baseline_loss)})",
            "  ".join(c.ljust(widths[c]) for c in cols),
            "  ".join("-" * widths[c] for c in cols),
        ]
        lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
        if self.summary:
            lines += ["", self.summary]
        return "\n".join(lines)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page of the diagnosis and return its path.

        The page is rendered by :mod:`gradsight.report` from the same blocks as the run
        report of :func:`gradsight.report` (verdict table with reasons and advice).
        """
        from gradsight.report import write_diagnosis_html

        return write_diagnosis_html(self, path)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {
        k: [number(x) for x in v] if isinstance(v, list) else number(v)
        for k, v in data.items()
        if k in names
    }
