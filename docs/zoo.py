"""The zoo's ground truth, measured without gradsight, and the comparison table.

Part 1 (ground truth, no gradsight): for every case and twin of ``tests/zoo``,
  * the loss and the best constant prediction's loss (cross-entropy: the entropy of the
    label frequencies; MSE: the targets' variance);
  * per layer (module owning parameters): its gradient norm, whether it is exactly zero
    or non-finite, the largest eigenvalue λ of its Hessian block (power iteration on
    Hessian-vector products) times the lr, and the loss after 30 full-batch SGD steps at
    the lr on that layer alone;
  * for the whole model: lr·λmax, the first SGD step's loss ratio (a catapult when > 1),
    the loss after 100 full-batch SGD steps at the lr, and after 100 Adam steps (Adam
    ignores the gradient's scale, so it shows headroom a crushed gradient hides).
Part 2 (comparison): gradsight's verdict, the naive rule's (a layer whose gradient norm
is below 1e-5 is vanishing) and a first/last rule's (a layer whose gradient norm is 100×
below the last layer's is vanishing), at loss × 1, × 1e-6, × 1e6 (lr / c with it: the
same SGD dynamics), against the expected statuses.

Both are appended to ``docs/reference-cases.md`` by ``python docs/reference_cases.py``
(which calls :func:`ground_truth_section` and :func:`comparison_section`); run this
file alone to print them: ``python docs/zoo.py [case-key ...]``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo import CASES, Built, Twin, ZooCase, scaled

SCALES = (1.0, 1e-6, 1e6)
NAIVE_THRESHOLD = 1e-5
RATIO_THRESHOLD = 100.0
SGD_STEPS, ADAM_STEPS, ALONE_STEPS, ADAM_LR = 100, 100, 20, 1e-2


# ------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread (restored after): the zoo's tiny models gain nothing from a
    second thread, which only spin-waits when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def loss_of(built: Built, model: nn.Module | None = None) -> torch.Tensor:
    inputs, targets = built.batch
    return built.loss_fn(forward(model or built.model, inputs), targets)


def owners(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Parameter], bool]]:
    """(name, module, its trainable parameters, frozen) for modules owning parameters.

    A parameter shared by several modules (tied weights) counts for each of them.
    """
    out = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        own = list(module.parameters(recurse=False))
        if own:
            trainable = [p for p in own if p.requires_grad]
            out.append((name, module, trainable, not trainable))
    return out


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def lambda_max(built: Built, params: list[nn.Parameter], iters: int = 20) -> float:
    """Largest Hessian eigenvalue of the block ``params`` (power iteration, float64 sums).

    If the eigenvalue of largest magnitude is negative, the iteration is repeated on the
    shifted operator H + |λ|·I, whose largest eigenvalue minus |λ| is H's largest.
    """
    loss = loss_of(built)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        return 0.0  # the loss does not depend on the block: no curvature
    used = [(g, p) for g, p in zip(grads, params, strict=True) if g is not None]
    grads = tuple(g for g, _ in used)
    params = [p for _, p in used]  # unused parameters: zero rows and columns of H

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.autograd.grad(grads, params, v, retain_graph=True, allow_unused=True)
        return [
            torch.zeros_like(p) if h is None else h.detach()
            for h, p in zip(out, params, strict=True)
        ]

    def power(shift: float) -> float:
        gen = torch.Generator().manual_seed(0)
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        lam = 0.0
        for _ in range(iters):
            norm = math.sqrt(float(_dot(v, v)))
            if norm == 0 or not math.isfinite(norm):
                return float("nan")
            v = [x / norm for x in v]
            hv = [h + shift * x for h, x in zip(hvp(v), v, strict=True)]
            lam = float(_dot(v, hv))
            v = hv
        return lam - shift

    lam = power(0.0)
    if lam < 0 and math.isfinite(lam):
        lam = power(abs(lam))
    return lam


def train(
    built: Built,
    params_of: Callable[[nn.Module], list[nn.Parameter]],
    opt: str,
    lr: float,
    steps: int,
) -> list[float]:
    """Full-batch training of a copy of the model; the loss before each step and at the end."""
    model = copy.deepcopy(built.model)
    params = params_of(model)
    optimizer = torch.optim.SGD(params, lr=lr) if opt == "sgd" else torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(built, model)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            return losses
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(float(loss_of(built, model)))
    return losses


def baseline_loss(built: Built) -> float | None:
    """The best constant prediction's loss, for plain cross-entropy or MSE targets."""
    _, targets = built.batch
    if not isinstance(targets, torch.Tensor):
        return None
    if targets.dtype in (torch.long, torch.int):
        counts = torch.bincount(targets.reshape(-1)).double()
        freq = counts[counts > 0] / counts.sum()
        return float(-(freq * freq.log()).sum())
    return float(targets.double().var(dim=0, unbiased=False).sum() / targets[0].numel())


# --------------------------------------------------------------------- ground truth


@dataclass
class LayerTruth:
    name: str
    frozen: bool
    grad_norm: float | None
    exact_zero: bool
    nonfinite: bool
    lr_lambda: float | None = None
    alone_ratio: float | None = None  # loss after ALONE_STEPS of SGD on it alone / loss


@dataclass
class TwinTruth:
    loss: float
    baseline: float | None
    layers: list[LayerTruth]
    lr_lambda: float | None
    catapult: float | None
    sgd: float
    adam: float
    seconds: float
    notes: list[str] = field(default_factory=list)


def measure(twin: Twin, curvature: bool, seed: int = 0) -> TwinTruth:
    """Every ground-truth number for one twin (no gradsight)."""
    start = time.perf_counter()
    built = twin.build(seed)
    model = built.model
    loss = loss_of(built)
    params = trainable(model)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grad_of = {
        id(p): torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    }
    finite = math.isfinite(float(loss.detach()))
    layers = []
    for name, _module, own, frozen in owners(model):
        gs = [grad_of[id(p)] for p in own]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs)) if gs else None
        layer = LayerTruth(
            name=name,
            frozen=frozen,
            grad_norm=norm,
            exact_zero=bool(gs) and all(bool((g == 0).all()) for g in gs),
            nonfinite=any(not bool(torch.isfinite(g).all()) for g in gs),
        )
        if not frozen and finite:
            if curvature:
                layer.lr_lambda = twin.lr * lambda_max(built, own)
            ids = {id(p) for p in own}
            losses = train(
                built,
                lambda m, ids=ids, built=built: [  # the copy's parameters at the same slots
                    q
                    for p, q in zip(built.model.parameters(), m.parameters(), strict=True)
                    if id(p) in ids
                ],
                "sgd",
                twin.lr,
                ALONE_STEPS,
            )
            layer.alone_ratio = losses[-1] / losses[0]
        layers.append(layer)
    lr_lambda = twin.lr * lambda_max(built, params) if curvature and finite else None
    sgd = train(built, trainable, "sgd", twin.lr, SGD_STEPS) if finite else [float(loss)]
    adam = train(built, trainable, "adam", ADAM_LR, ADAM_STEPS) if finite else [float(loss)]
    return TwinTruth(
        loss=float(loss.detach()),
        baseline=baseline_loss(built) if finite else None,
        layers=layers,
        lr_lambda=lr_lambda,
        catapult=sgd[1] / sgd[0] if len(sgd) > 1 else None,
        sgd=sgd[-1],
        adam=adam[-1],
        seconds=time.perf_counter() - start,
    )


def _g(x: float | None, fmt: str = ".2g") -> str:
    return "–" if x is None else format(x, fmt)


def truth_lines(case: ZooCase, name: str, twin: Twin, t: TwinTruth) -> list[str]:
    lines = [
        f"**{case.key} / {name}** (lr {twin.lr:g}): loss {t.loss:.4g}, best constant "
        f"{_g(t.baseline, '.4g')}; {SGD_STEPS} SGD steps → {t.sgd:.4g}, {ADAM_STEPS} Adam "
        f"steps (lr {ADAM_LR:g}) → {t.adam:.4g}; first SGD step × {_g(t.catapult, '.3g')}; "
        f"lr·λmax {_g(t.lr_lambda)}. ({t.seconds:.1f} s)",
        "",
        "| layer | expected | ‖g‖ | exactly 0 | non-finite | lr·λmax | SGD alone: loss × |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for la in t.layers:
        expected = "/".join(sorted(twin.expected(la.name)))
        lines.append(
            f"| `{la.name}` | {expected} | {_g(la.grad_norm)} | "
            f"{'frozen' if la.frozen else ('yes' if la.exact_zero else 'no')} | "
            f"{'yes' if la.nonfinite else 'no'} | {_g(la.lr_lambda)} | "
            f"{_g(la.alone_ratio, '.4g')} |"
        )
    return [*lines, ""]


def ground_truth_section(cases: Iterable[ZooCase] = CASES, echo: bool = False) -> list[str]:
    """The ground-truth tables; ``echo`` prints each case's as soon as it is measured."""
    lines = ["## Zoo: ground truth, measured without gradsight", ""]
    with one_thread():
        for case in cases:
            lines += _case_truth(case, echo)
    return lines


def _case_truth(case: ZooCase, echo: bool) -> list[str]:
    part = [f"### {case.key}: {case.title}", "", f"Built with {case.source}.", ""]
    for name, twin in case.twins().items():
        t = measure(twin, case.curvature)
        part += [f"*{name}*: {twin.ground_truth}", ""]
        part += truth_lines(case, name, twin, t)
    if echo:
        print("\n".join(part), flush=True)
    return part


# ----------------------------------------------------------------------- comparison


def naive_statuses(grads: dict[str, float | None]) -> dict[str, str]:
    """|g| < 1e-5: vanishing; else ok (frozen layers: frozen; a NaN/Inf norm: nonfinite)."""

    def status(g: float | None) -> str:
        if g is None:
            return "frozen"
        if not math.isfinite(g):
            return "nonfinite"
        return "vanishing" if g < NAIVE_THRESHOLD else "ok"

    return {n: status(g) for n, g in grads.items()}


def ratio_statuses(grads: dict[str, float | None]) -> dict[str, str]:
    """A layer whose gradient norm is ≥100× below the last trainable layer's: vanishing."""
    last = [g for g in grads.values() if g is not None][-1]

    def status(g: float | None) -> str:
        if g is None:
            return "frozen"
        if not (math.isfinite(g) and math.isfinite(last)):
            return "nonfinite"
        return "vanishing" if last > 0 and (g == 0 or last / g >= RATIO_THRESHOLD) else "ok"

    return {n: status(g) for n, g in grads.items()}


_ORDER = ("frozen", "converged", "ok", "vanishing", "dead", "exploding", "nonfinite")


def model_status(statuses: Iterable[str]) -> str:
    judged = [s for s in statuses if s != "frozen"]
    return max(judged, key=_ORDER.index) if judged else "frozen"


def comparison_section(cases: Iterable[ZooCase] = CASES) -> tuple[list[str], dict[str, int]]:
    """The comparison table, and how many twin × scale checks each rule got right."""
    rows: list[str] = []
    right = {"gradsight": 0, "naive": 0, "ratio": 0, "checks": 0}
    with one_thread():
        for case in cases:
            _compare(case, rows, right)
    lines = [
        "## Zoo: gradsight vs the naive and first/last rules",
        "",
        "Each cell: the model's status, ✅ when it and every layer's status are right, and "
        "how many layers are right. At loss × c the lr is lr / c (the same SGD dynamics).",
        "",
        "| case | twin | loss × | expected | gradsight | naive \\|g\\| < 1e-5 "
        "| first/last ≥ 100× |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"All right (model and every layer): gradsight {right['gradsight']}/{right['checks']}, "
        f"naive rule {right['naive']}/{right['checks']}, first/last rule "
        f"{right['ratio']}/{right['checks']}.",
        "",
    ]
    return lines, right


def _compare(case: ZooCase, rows: list[str], right: dict[str, int]) -> None:
    import gradsight

    for name, twin in case.twins().items():
        built = twin.build(0)
        for c in SCALES:
            loss_fn = scaled(built.loss_fn, c)
            d = gradsight.diagnose(
                built.model, built.batch, loss_fn, lr=twin.lr / c, curvature=case.curvature
            )
            grads = {la.name: la.grad_norm for la in d.layers}
            verdicts = {
                "gradsight": {la.name: la.status for la in d.layers},
                "naive": naive_statuses(grads),
                "ratio": ratio_statuses(grads),
            }
            cells = []
            for rule, statuses in verdicts.items():
                good = sum(s in twin.expected(n) for n, s in statuses.items())
                whole = model_status(statuses.values())
                if rule == "gradsight":
                    whole = d.status
                ok = whole in twin.model_status and good == len(statuses)
                right[rule] += ok
                cells.append(f"{whole} {'✅' if ok else '❌'} ({good}/{len(statuses)})")
            right["checks"] += 1
            expected = "/".join(sorted(twin.model_status))
            rows.append(
                f"| {case.key} | {name} | ×{c:g} | {expected} | " + " | ".join(cells) + " |"
            )


def main(argv: list[str]) -> int:
    """``python docs/zoo.py [--truth | --compare] [case-key ...]``: print the sections."""
    torch.set_num_threads(2)
    parts = {a for a in argv if a.startswith("--")} or {"--truth", "--compare"}
    keys = [a for a in argv if not a.startswith("--")]
    cases = [c for c in CASES if not keys or c.key in keys]
    if "--truth" in parts:
        ground_truth_section(cases, echo=True)
    if "--compare" in parts:
        lines, _ = comparison_section(cases)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
