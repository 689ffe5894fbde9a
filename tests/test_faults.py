"""Fault injection: whatever fails inside the Monitor, the training loop goes on unchanged.

Each test breaks one thing (the disk fills up, the file system turns read-only, one file
cannot be written, measuring raises, an optimizer hook raises, a sink raises, the loss
is NaN) part-way through a run, and checks that

* the loop never sees an exception, and the parameters are bitwise those of the same
  loop without a Monitor;
* exactly one warning says from which step nothing more is recorded;
* everything written before the fault still reads back, and the report still renders.

Faults are injected (monkeypatched writers, raising methods) rather than made with
``chmod``: tests may run as root, whom permissions do not stop.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradsight
from gradsight import Monitor
from gradsight.store import _writer, load_run

STEPS = 12
FAULT_AT = 5  # the step whose mon.step() (or its flush) meets the fault


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))] * STEPS


def _train(
    mon_factory: Callable[[nn.Module, torch.optim.Optimizer], Monitor] | None,
    before_step: Callable[[int, Monitor], None] | None = None,
    nan_at: int | None = None,
) -> tuple[nn.Module, Monitor | None, list[warnings.WarningMessage]]:
    """Train STEPS steps (Adam, so that a skipped or doubled update would show); a
    monitored run flushes after every step so that faults meet the writer."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = None if mon_factory is None else mon_factory(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(_data()):
            if before_step is not None and mon is not None:
                before_step(i, mon)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if i == nan_at:
                loss = loss * float("nan")
            loss.backward()
            if mon is not None:
                mon.step(loss, batch=(x, y), loss_fn=nn.functional.cross_entropy)
            opt.step()
        if mon is not None:
            mon.close()
    return model, mon, list(caught)


def _bits(model: nn.Module) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in model.parameters()]


@pytest.fixture(scope="module")
def plain() -> list[bytes]:
    model, _, _ = _train(None)
    return _bits(model)


def _monitor(
    logdir: Path, **kwargs: object
) -> Callable[[nn.Module, torch.optim.Optimizer], Monitor]:
    def make(model: nn.Module, opt: torch.optim.Optimizer) -> Monitor:
        kwargs.setdefault("flush_secs", 0.0)  # a part file per step: faults meet the writer
        return Monitor(model, logdir=logdir, optimizer=opt, **kwargs)  # type: ignore[arg-type]

    return make


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "gradsight.Monitor" in str(w.message)]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _fail_writes(
    monkeypatch: pytest.MonkeyPatch, error: int, *, only: str = "", after: int = FAULT_AT
) -> list[str]:
    """From the ``after``-th call on, writes of files whose name contains ``only`` raise
    ``OSError(error)``; returns the names written before."""
    real = _writer.atomic_write_bytes
    written: list[str] = []
    calls = {"n": 0}

    def write(path: Path, data: bytes) -> None:
        if only in path.name:
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(error, os.strerror(error), str(path))
        real(path, data)
        written.append(path.name)

    monkeypatch.setattr(_writer, "atomic_write_bytes", write)
    return written


def _check_stopped(
    logdir: Path, caught: list[warnings.WarningMessage], cause: str, *, min_steps: int
) -> None:
    ours = _ours(caught)
    assert len(ours) == 1, ours  # warned once, however many steps followed
    assert cause in ours[0] and "nothing more is recorded" in ours[0], ours[0]
    assert "Training goes on unaffected" in ours[0]
    run = load_run(logdir)  # what was written before the fault reads back
    steps, values = run.series("loss")[""]
    assert steps.tolist() == list(range(len(steps))) and len(steps) >= min_steps
    assert np.isfinite(values).all()
    assert not list(logdir.glob(".*.tmp"))  # no temporary file left behind
    assert Path(gradsight.report(logdir)).exists()


@pytest.mark.parametrize(
    ("error", "cause"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_full_disk_or_read_only_file_system_mid_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain: list[bytes], error: int, cause: str
) -> None:
    written = _fail_writes(monkeypatch, error)  # every file, from the 6th write on
    model, mon, caught = _train(_monitor(tmp_path / "r"))
    assert _bits(model) == plain
    assert mon is not None and mon.stopped is not None and cause in mon.stopped
    assert _hooks(model) == 0
    monkeypatch.undo()
    assert sum(n.startswith("metrics-") for n in written) >= 2
    _check_stopped(tmp_path / "r", caught, cause, min_steps=2)


def test_metadata_file_that_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain: list[bytes]
) -> None:
    # run.json alone fails (e.g. replaced by a file the user may not write).
    _fail_writes(monkeypatch, errno.EACCES, only="run.json", after=3)
    model, _, caught = _train(_monitor(tmp_path / "r"))
    assert _bits(model) == plain
    monkeypatch.undo()
    _check_stopped(tmp_path / "r", caught, "Permission denied", min_steps=2)


def test_measuring_raises(tmp_path: Path, plain: list[bytes]) -> None:
    def break_probe(i: int, mon: Monitor) -> None:
        if i == FAULT_AT:

            def fail(*args: object, **kwargs: object) -> None:
                raise TypeError("unsupported dtype torch.float8_e4m3fn")

            mon._probe.collect_columns = fail  # type: ignore[method-assign]

    model, mon, caught = _train(_monitor(tmp_path / "r"), before_step=break_probe)
    assert _bits(model) == plain
    assert mon is not None and mon.steps == STEPS and _hooks(model) == 0
    _check_stopped(tmp_path / "r", caught, "unsupported dtype", min_steps=FAULT_AT)
    run = load_run(tmp_path / "r")
    # Everything measured before the fault was flushed, and the run closed cleanly.
    assert run.series("loss")[""][0].tolist() == list(range(FAULT_AT))
    assert run.complete and "unsupported dtype" in run.metadata["stopped"]
    assert "stopped recording" in (tmp_path / "r" / "report.html").read_text()


def test_optimizer_hook_raises(tmp_path: Path, plain: list[bytes]) -> None:
    # The update-ratio hook runs inside optimizer.step(): it must not raise there.
    def break_update(i: int, mon: Monitor) -> None:
        if i == FAULT_AT:

            def fail(*args: object) -> None:
                raise RuntimeError("out of memory for the parameter snapshot")

            mon._emit = fail  # type: ignore[method-assign]

    model, _, caught = _train(_monitor(tmp_path / "r", update_every=1), before_step=break_update)
    assert _bits(model) == plain
    _check_stopped(tmp_path / "r", caught, "optimizer post-step hook", min_steps=FAULT_AT)


def test_sink_raises(tmp_path: Path, plain: list[bytes]) -> None:
    calls = {"n": 0}

    def sink(step: int, keys: object, values: object) -> None:
        calls["n"] += 1
        if step >= FAULT_AT:
            raise ConnectionError("logger backend unreachable")

    def make(model: nn.Module, opt: torch.optim.Optimizer) -> Monitor:
        mon = _monitor(tmp_path / "r")(model, opt)
        mon.add_sink(sink)
        return mon

    model, _, caught = _train(make)
    assert _bits(model) == plain and calls["n"] > 0
    _check_stopped(tmp_path / "r", caught, "logger backend unreachable", min_steps=2)


def test_fault_at_close_is_a_warning_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain: list[bytes]
) -> None:
    def fill_disk_before_close(i: int, mon: Monitor) -> None:
        if i == STEPS - 1:
            mon.flush_secs = 1e9  # the last step stays buffered until close()
            _fail_writes(monkeypatch, errno.ENOSPC, after=0)

    model, mon, caught = _train(_monitor(tmp_path / "r"), before_step=fill_disk_before_close)
    assert _bits(model) == plain and mon is not None and mon.closed
    assert _hooks(model) == 0
    monkeypatch.undo()
    _check_stopped(tmp_path / "r", caught, "No space left on device", min_steps=STEPS - 2)
    assert "close() failed" in _ours(caught)[0]


def test_nan_loss_with_curvature_and_diagnosis(tmp_path: Path) -> None:
    """A NaN loss at one step, the curvature tier at every step, a diagnosis at close:
    the NaN is recorded, nothing raises, the loop trains as without the Monitor."""
    reference, _, _ = _train(None, nan_at=FAULT_AT)
    model, mon, caught = _train(_monitor(tmp_path / "r", curvature_every=4), nan_at=FAULT_AT)
    assert _bits(model) == _bits(reference)
    assert mon is not None and mon.stopped is None
    assert not [m for m in _ours(caught) if "failed at step" in m]
    run = load_run(tmp_path / "r")
    steps, loss = run.series("loss")[""]
    assert steps.tolist() == list(range(STEPS)) and np.isnan(loss[FAULT_AT])
    assert run.complete and run.diagnosis is not None
    assert Path(gradsight.report(tmp_path / "r")).exists()


def test_every_call_after_a_stop_is_a_cheap_no_op(tmp_path: Path, monkeypatch) -> None:
    model = _model()
    mon = Monitor(model, logdir=tmp_path / "r", flush_secs=1e9)
    monkeypatch.setattr(
        mon._probe, "collect_columns", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom"))
    )
    x, y = _data()[0]
    with pytest.warns(RuntimeWarning, match=r"mon\.step\(\) failed at step 0 \(ValueError: boom\)"):
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step()
    assert _hooks(model) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        for _ in range(3):
            mon.step(torch.tensor(1.0))
            mon.log({"acc": 0.5})
            mon.flush()
        mon.close()
    assert mon.steps == 4
    assert load_run(tmp_path / "r").metadata["steps"] == 4
