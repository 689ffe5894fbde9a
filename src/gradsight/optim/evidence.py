"""What the committed remedy benchmark measured, as data and as sentences to quote.

``benchmarks/remedy.py --write`` stores its numbers in :mod:`gradsight.optim._measured`
(tables in ``benchmarks/results/remedy.md``). Advice that names a remedy quotes these
sentences instead of restating numbers by hand, so it cannot drift from the benchmark.

Example:
    >>> lines = vanishing_remedies()
    >>> any("GaussNewton" in line and "Muon" in line for line in lines)
    True
    >>> all(line.endswith(f"({SOURCE})") for line in lines)
    True
"""

from __future__ import annotations

import math
from typing import Any

from gradsight.optim._measured import MEASURED

__all__ = ["MEASURED", "SOURCE", "mlp_facts", "vanishing_remedies"]

SOURCE = "benchmarks/results/remedy.md"

_RELU = "Adam, ReLU + He init"


def mlp_facts(depth: int) -> dict[str, dict[str, Any]]:
    """The measured rows of the ``depth``-layer sigmoid MLP (6 or 10), by optimizer family.

    Each row: ``lr`` (``None`` = GaussNewton's defaults), ``epochs_median``/``_worst``
    and ``seconds_median``/``_worst`` to 90 % held-out (``inf``: not reached),
    ``final_median``/``_worst`` (held-out accuracy at the end of the budget) and
    ``best_final_*`` (the family's best final accuracy over its learning-rate grid).

    Example:
        >>> sorted(mlp_facts(10))[:3]
        ['Adam', 'Adam, ReLU + He init', 'AdamW']
    """
    key = f"mlp{depth}"
    if key not in MEASURED:
        from gradsight._errors import GradsightError

        raise GradsightError(
            f"the remedy benchmark measured the 6- and 10-layer MLPs, got depth={depth!r}; "
            "pass depth=6 or depth=10."
        )
    return dict(MEASURED[key])


def _reach(row: dict[str, Any]) -> str:
    """ "after 2.26 epochs (median; worst 2.78) and 0.45 s of training", or "never"."""
    med, worst = row["epochs_median"], row["epochs_worst"]
    if not math.isfinite(med):
        return "never"
    worst_text = f"{worst:.2f}" if math.isfinite(worst) else "never"
    return (
        f"after {med:.2f} epochs (median; worst {worst_text}) and "
        f"{row['seconds_median']:.2f} s of training"
    )


def _lr(row: dict[str, Any]) -> str:
    return "defaults" if row["lr"] is None else f"lr {row['lr']:g}"


def vanishing_remedies() -> list[str]:
    """Sentences quoting what trained the deep sigmoid MLPs, for a vanishing layer's advice.

    One sentence per remedy and depth: GaussNewton against Muon (the best built-in
    optimizer there), and the init/activation change, each ending with the source.
    """
    out: list[str] = []
    for depth in (10, 6):
        rows = mlp_facts(depth)
        gn, mu = rows["GaussNewton"], rows["Muon"]
        sgd = rows.get("SGD")
        tail = ""
        if sgd is not None and not math.isfinite(sgd["epochs_median"]):
            tail = "; SGD never did at any learning rate"
        best_lr = "" if mu["best_final_lr"] is None else f" (lr {mu['best_final_lr']:g})"
        out.append(
            f"on the {depth}-layer sigmoid MLP (digits, 3 seeds × 2 splits) "
            f"gradsight.optim.GaussNewton with its defaults reached 90% held-out accuracy "
            f"{_reach(gn)}, torch.optim.Muon at its fastest {_lr(mu)} {_reach(mu)}; final "
            f"accuracy {gn['final_median']:.1%} against Muon's best "
            f"{mu['best_final_median']:.1%}{best_lr}{tail} ({SOURCE})"
        )
        relu = rows.get(_RELU)
        if relu is not None:
            out.append(
                f"on the same {depth}-layer net, switching to ReLU with He init (trained "
                f"with Adam, {_lr(relu)}) reached 90% {_reach(relu)}; final accuracy "
                f"{relu['final_median']:.1%} ({SOURCE})"
            )
    return out
