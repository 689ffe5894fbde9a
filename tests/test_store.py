"""The run store: atomic part files, partial runs, a SIGKILLed run still reports."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gradsight
from gradsight import GradsightError
from gradsight.store import RunWriter, load_run


def test_round_trip_and_parts(tmp_path: Path) -> None:
    w = RunWriter(tmp_path, {"name": "a", "layers": [{"name": "0"}, {"name": "1"}]})
    assert w.flush() is None  # nothing buffered: no empty file
    w.append(0, [("", "loss"), ("1", "grad_norm"), ("0", "grad_norm")], np.array([2.0, 1.0, 0.5]))
    w.flush()
    w.append(1, [("", "loss"), ("0", "grad_norm")], np.array([1.5, 0.25]))
    w.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics-00000.parquet",
        "metrics-00001.parquet",
        "run.json",
    ]
    run = load_run(tmp_path)
    assert not run.complete  # never marked closed
    assert run.layer_order() == ["0", "1"]
    steps, values = run.series("grad_norm")["0"]
    assert steps.tolist() == [0, 1] and values.tolist() == [0.5, 0.25]
    steps, m = run.matrix("grad_norm", ["0", "1"])
    assert np.isnan(m[1, 1]) and m[1, 0] == 1.0
    with pytest.raises(GradsightError, match="one key per value"):
        w.append(2, [("", "loss")], np.array([1.0, 2.0]))


def test_temporary_files_are_ignored(tmp_path: Path) -> None:
    w = RunWriter(tmp_path, {})
    w.append(0, [("", "loss")], np.array([1.0]))
    w.flush()
    (tmp_path / ".metrics-00001.parquet.tmp").write_bytes(b"half a file")
    assert load_run(tmp_path).num_rows == 1


def test_failed_write_keeps_rows_and_earlier_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk mid-write: no temporary file left, earlier parts intact, the rows
    stay buffered and the next flush (space freed) writes them."""
    w = RunWriter(tmp_path, {})
    w.append(0, [("", "loss")], np.array([1.0]))
    w.flush()
    w.append(1, [("", "loss")], np.array([0.5]))
    real_replace = os.replace

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        w.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-00000.parquet", "run.json"]
    assert w.buffered == 1 and load_run(tmp_path).num_rows == 1
    monkeypatch.setattr(os, "replace", real_replace)
    assert w.flush() == tmp_path / "metrics-00001.parquet"
    assert load_run(tmp_path).series("loss")[""][1].tolist() == [1.0, 0.5]


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(GradsightError, match="not a gradsight run directory"):
        load_run(tmp_path)
    with pytest.raises(GradsightError, match="holds no gradsight run"):
        gradsight.report(tmp_path)


_TRAINER = """
import sys, torch
from torch import nn
import gradsight

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
mon = gradsight.Monitor(model, logdir=sys.argv[1], optimizer=opt, flush_secs=0.0)
step = 0
while True:  # until killed; every step is flushed (flush_secs=0) before the next starts
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    mon.step(loss)
    opt.step()
    print(step, float(loss).hex(), flush=True)  # after mon.step() returned: flushed
    step += 1
"""


def test_sigkilled_run_still_reports(tmp_path: Path) -> None:
    """SIGKILL mid-training (mid-write of a part file, most likely): every step that was
    flushed before the kill is in the store, with its exact value, and the report says
    the run did not close."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(_TRAINER))
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(logdir)], stdout=subprocess.PIPE, text=True
    )
    flushed: dict[int, float] = {}
    try:
        assert proc.stdout is not None
        while len(flushed) < 8:
            step, loss = proc.stdout.readline().split()
            flushed[int(step)] = float.fromhex(loss)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run = load_run(logdir)
    assert not run.complete
    steps, values = run.series("loss")[""]
    recorded = dict(zip(steps.tolist(), values.tolist(), strict=True))
    assert {s: recorded.get(s) for s in flushed} == flushed  # nothing flushed is lost
    assert sorted(recorded) == list(range(len(recorded)))  # and nothing half-written
    out = gradsight.report(logdir)
    text = out.read_text(encoding="utf-8")
    assert "did not close" in text and out == logdir / "report.html"
