"""Read a diagnosis the way a sceptical user does, and list every contradiction.

A status, a reason or a piece of advice that disagrees with the numbers beside it makes
a user stop trusting the tool. Each check here is one such disagreement found in the
wild (issue 12): a "dead" or "not called" layer with a gradient, a share of the loss
above 1, a blank layer name, advice to adopt what the model already does, a sentence
whose comparison reads backwards, a dangling fragment.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import gradsight

_NUM = r"([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)"
_SATURATING = ("sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid")
_LEAKY = ("leaky", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "prelu")


def contradictions(
    d: gradsight.Diagnosis, *, has_norm: bool = False, has_residual: bool = False
) -> list[str]:
    """Every contradiction in ``d``'s statuses, reasons, advice and summary."""
    out: list[str] = []
    scale = abs(d.loss) if d.loss and math.isfinite(d.loss) else 0.0
    acts = {layer.activation for layer in d.layers if layer.activation}
    types = {layer.module_type for layer in d.layers}
    solved = d.baseline_loss is not None and d.baseline_loss > 0 and scale <= 1e-4 * d.baseline_loss
    no_headroom = (
        not d.plateau
        and d.headroom is not None
        and d.headroom < 1e-4
        and (d.realized_decrease or 0.0) < 1e-4
    )
    for layer in d.layers:
        where = f"layer {layer.name!r} ({layer.status})"
        grad = layer.grad_norm or 0.0
        text = layer.reason
        if not text:
            out.append(f"{where}: empty reason")
        if grad > 0 and "not called" in text:
            out.append(f"{where}: 'not called' with gradient {grad:.2e}")
        if layer.status == "dead" and scale > 0 and (layer.relative_grad or 0.0) > 1e-5 * scale:
            out.append(f"{where}: dead, yet its gradient moves the loss by {layer.relative_grad}")
        if (solved or no_headroom) and layer.status in ("dead", "vanishing"):
            out.append(f"{where}: nothing is left to win, yet the layer is {layer.status}")
        if layer.grad_norm is None and layer.status not in ("frozen",) and layer.param_grad_norms:
            out.append(f"{where}: no gradient norm but trainable parameters")
        if layer.grad_norm is None and not layer.param_grad_norms and layer.status != "frozen":
            out.append(f"{where}: frozen (no trainable parameters) but status {layer.status}")
        for value, what in ((layer.headroom, "headroom"), (layer.saturation, "saturation")):
            if value is not None and value > 1 + 1e-9:
                out.append(f"{where}: {what} {value} above 1")
        out += [f"{where}: {m}" for m in _sentence_checks(text)]
        for advice in layer.advice:
            out += [f"{where} advice: {m}" for m in _sentence_checks(advice)]
            out += [
                f"{where} advice: {m}"
                for m in _advice_checks(advice, acts, types, has_norm, has_residual)
            ]
    if d.headroom is not None and d.headroom > 1 + 1e-9:
        out.append(f"model headroom {d.headroom} above 1")
    out += [f"summary: {m}" for m in _sentence_checks(d.summary)]
    out += [f"summary: {m}" for m in _summary_checks(d)]
    judged = [layer.status for layer in d.layers if layer.status != "frozen"]
    if judged and d.status != "nonfinite":
        worst = max(judged, key=gradsight.STATUSES.index)
        if d.status != worst:
            out.append(f"model status {d.status} but worst judged layer is {worst}")
    return out


def _sentence_checks(text: str) -> Iterable[str]:
    # An empty parenthetical "( )" is a dropped value; "forward()" is a call.
    if re.search(r"[;:,]\s*[.;]|(?<![\w.])\(\s*\)|\s\.$|\s,", text):
        yield f"dangling fragment in {text!r}"
    if re.search(r"(?:^|[\s(])[Ll]ayers?(?:\s*[:;,]|\s+[.'])", text):
        yield f"blank layer name in {text!r}"
    for m in re.finditer(_NUM + r"× the loss", text):
        if float(m.group(1)) > 1:
            yield f"share of the loss above 1: {m.group(0)!r}"
    for m in re.finditer(r"win " + _NUM + r" of the loss", text):
        if float(m.group(1)) > 1:
            yield f"share of the loss above 1: {m.group(0)!r}"
    for m in re.finditer(r"realized " + _NUM + r"% of", text):
        if float(m.group(1)) > 100:
            yield f"realized share above 100%: {m.group(0)!r}"
    for m in re.finditer(r"attenuated ×" + _NUM, text):
        if float(m.group(1)) > 1:
            yield f"'attenuated' by a factor above 1: {m.group(0)!r}"
    for m in re.finditer(r"amplified ×" + _NUM, text):
        if float(m.group(1)) < 1:
            yield f"'amplified' by a factor below 1: {m.group(0)!r}"
    for m in re.finditer(r"is " + _NUM + r"× more sensitive", text):
        if float(m.group(1)) < 1:
            yield f"'more sensitive' by a factor below 1: {m.group(0)!r}"
    for m in re.finditer(r"= " + _NUM + r" > 2", text):
        if float(m.group(1)) <= 2:
            yield f"'> 2' with {m.group(1)}"
    for m in re.finditer(
        r"loss " + _NUM + r" is no better than predicting a constant \(" + _NUM, text
    ):
        if float(m.group(1)) < float(m.group(2)):
            yield f"'no better than' reads backwards: {m.group(0)!r}"
    for m in re.finditer(r"loss " + _NUM + r" is below " + _NUM + r" of", text):
        yield f"'is below X of' comparison: {m.group(0)!r}"
    if re.search(r"\(0% saturated", text) or re.search(r"\b0% of units", text):
        yield f"quotes 0% as a cause: {text!r}"


def _advice_checks(
    advice: str, acts: set[str], types: set[str], has_norm: bool, has_residual: bool
) -> Iterable[str]:
    saturating = any(a.startswith(_SATURATING) for a in acts)
    if "non-saturating activation" in advice and acts and not saturating:
        yield f"advises a non-saturating activation to a model using {sorted(acts)}"
    if "LeakyReLU/GELU" in advice and acts and all(a.startswith(_LEAKY) for a in acts):
        yield f"advises LeakyReLU/GELU to a model using {sorted(acts)}"
    norm_in_use = has_norm or any("Norm" in t for t in types)
    if "Add normalization" in advice and norm_in_use:
        yield "advises normalization to a model that has it"
    if "residual connections" in advice and has_residual:
        yield "advises residual connections to a residual model"
    if "gated recurrent layer" in advice and types & {"LSTM", "GRU"}:
        yield "advises LSTM/GRU to a model that uses one"


def _summary_checks(d: gradsight.Diagnosis) -> Iterable[str]:
    for status in ("vanishing", "exploding", "dead", "converged", "frozen"):
        names = {layer.name or "(model)" for layer in d.layers if layer.status == status}
        m = re.search(r"Layers? ([^\n]*?): " + status, d.summary)
        text = m.group(1) if m else ""
        more = re.fullmatch(r"(.*) and ([0-9]+) more", text)  # a long list: some, and a count
        listed = set((more.group(1) if more else text).split(", ")) if text else set()
        count = len(listed) + (int(more.group(2)) if more else 0)
        if not listed <= names or count != len(names) or (not more and listed != names):
            yield f"summary lists {text!r} as {status}, the table {sorted(names)}"
