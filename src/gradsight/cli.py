"""Command line: ``gradsight demo``, ``gradsight report RUNDIR`` and ``gradsight diagnose``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsight import __version__
from gradsight._errors import GradsightError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradsight",
        description="Tell, layer by layer, whether a small gradient means converged or vanished.",
    )
    p.add_argument("--version", action="version", version=f"gradsight {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train the built-in cases on digits and diagnose them")
    demo.add_argument("--quick", action="store_true", help="short budget (10 epochs, ~10 s)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per model (default 40)")
    demo.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("gradsight-runs/demo"),
        help="parent directory; each run writes a new run-NNN inside (default %(default)s)",
    )

    rep = sub.add_parser(
        "report",
        help="write an HTML report of recorded runs",
        description="Write one self-contained HTML report of runs recorded by gradsight.Monitor "
        "(several runs: compared side by side) and print its path.",
    )
    rep.add_argument(
        "rundirs",
        nargs="+",
        type=Path,
        metavar="RUNDIR",
        help="a Monitor logdir, or a directory holding several (e.g. a demo run-NNN)",
    )
    rep.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="output file (default: RUNDIR/report.html for one directory, else "
        "./gradsight-report.html)",
    )
    rep.add_argument("--title", default=None, help="page title")

    diag = sub.add_parser(
        "diagnose",
        help="diagnose a model returned by MODULE:FACTORY",
        description="FACTORY() must return (model, batch, loss_fn), batch = (inputs, targets).",
    )
    diag.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="a module name (mypkg.models:make) or a file (./mymod.py:make)",
    )
    diag.add_argument("--lr", type=float, default=None, help="learning rate used in training")
    diag.add_argument(
        "--no-curvature",
        action="store_true",
        help="signal flow only (one forward and backward pass), no curvature",
    )
    diag.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (torch.set_num_threads)"
    )
    diag.add_argument("--json", type=Path, default=None, help="also write the diagnosis as JSON")
    diag.add_argument("--html", type=Path, default=None, help="also write an HTML page")

    lab = sub.add_parser(
        "lab",
        help="step-size lab: GD vs Newton under rescaling, per-layer steps of a deep MLP",
        description="Write an offline HTML page showing why a fixed step size fails when the "
        "loss or the variables are rescaled, and how far apart a deep sigmoid MLP's "
        "per-layer curvature-optimal steps are; print its path.",
    )
    lab.add_argument("--quick", action="store_true", help="fewer scale factors (seconds)")
    lab.add_argument(
        "-o", "--out", type=Path, default=Path("gradsight-lab.html"), help="output file"
    )
    return p


def _load_factory(target: str) -> tuple[Any, Any, Any]:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise GradsightError(
            f"expected MODULE:FACTORY or FILE.py:FACTORY, e.g. mypkg.models:make or "
            f"./mymod.py:make, got {target!r}."
        )
    module = _import(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise GradsightError(f"{module_name!r} has no callable {attr!r}.")
    made = factory()
    if not isinstance(made, tuple) or len(made) != 3:
        raise GradsightError(
            f"{target}() must return (model, batch, loss_fn), got {type(made).__name__}"
            + (f" of length {len(made)}" if isinstance(made, tuple) else "")
            + "."
        )
    _check_order(target, made)
    return made


def _import(name: str) -> Any:
    """Import a module by dotted name, or load a ``.py`` file by path."""
    path = Path(name)
    if name.endswith(".py") or "/" in name or "\\" in name:
        if not path.is_file():
            raise GradsightError(
                f"no file {name!r} (from the directory {Path.cwd()}). Pass the path of a "
                "Python file, e.g. ./mymod.py:make, or a module name, e.g. mymod:make."
            )
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise GradsightError(f"cannot load {name!r} as a Python module.")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # its own imports, as for a script
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
        return module
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise GradsightError(
            f"cannot import module {name!r} ({exc}); run from the directory that "
            "contains it, install it, or pass its file (./mymod.py:FACTORY)."
        ) from None
    finally:
        sys.path.pop(0)


def _check_order(target: str, made: tuple[Any, Any, Any]) -> None:
    """Name the order the factory used when it is not (model, batch, loss_fn)."""
    from torch import nn

    def kind(x: Any) -> str:
        if isinstance(x, nn.Module) and not _is_loss(x):
            return "model"
        if callable(x):
            return "loss_fn"
        return "batch"

    kinds = [kind(x) for x in made]
    if kinds == ["model", "batch", "loss_fn"]:
        return
    if sorted(kinds) == ["batch", "loss_fn", "model"]:
        raise GradsightError(
            f"{target}() returned ({', '.join(kinds)}); it must return (model, batch, "
            f"loss_fn) in that order. Return them as: return model, batch, loss_fn."
        )
    got = ", ".join(type(x).__name__ for x in made)
    raise GradsightError(
        f"{target}() must return (model, batch, loss_fn): an nn.Module, a pair (inputs, "
        f"targets) and a loss function; got ({got})."
    )


def _is_loss(x: Any) -> bool:
    from torch.nn.modules.loss import _Loss

    return isinstance(x, _Loss)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradsight`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from gradsight.demo import run_demo

            if args.epochs is not None and args.epochs < 1:
                raise GradsightError(f"--epochs must be at least 1, got {args.epochs}.")
            run_demo(
                args.out, quick=args.quick, epochs=args.epochs, width=args.width, seed=args.seed
            )
        elif args.command == "report":
            from gradsight.report import report

            print(report(args.rundirs, out=args.out, title=args.title))
        elif args.command == "diagnose":
            from gradsight.diagnosis import diagnose

            if args.threads is not None:
                if args.threads < 1:
                    raise GradsightError(f"--threads must be at least 1, got {args.threads}.")
                import torch

                torch.set_num_threads(args.threads)
            model, batch, loss_fn = _load_factory(args.target)
            d = diagnose(model, batch, loss_fn, lr=args.lr, curvature=not args.no_curvature)
            print(d)
            if args.json:
                args.json.write_text(d.to_json(indent=2), encoding="utf-8")
            if args.html:
                d.to_html(args.html)
        elif args.command == "lab":
            from gradsight.lab import write_lab_html

            print(write_lab_html(args.out, quick=args.quick))
    except GradsightError as exc:
        print(f"gradsight: error: {exc}", file=sys.stderr)
        return 2
    return 0
