"""Monitor, run store and report when things go wrong: NaN steps, long runs, bad paths."""

from __future__ import annotations

import gc
import math
import os
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsight
from gradsight import GradsightError, Monitor
from gradsight.store import load_run


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _step(model: nn.Module, mon: Monitor, opt: torch.optim.Optimizer, poison: bool = False) -> None:
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("nan")
    loss.backward()
    mon.step(loss)
    if not poison:  # skip the update on a non-finite step, as GradScaler does
        opt.step()


def test_a_nonfinite_step_is_recorded_and_the_store_stays_readable(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, logdir=tmp_path / "r", optimizer=opt) as mon:
        for i in range(6):
            _step(model, mon, opt, poison=(i == 3))
    run = load_run(tmp_path / "r")
    assert run.complete
    steps, values = run.series("loss")[""]
    assert list(steps) == list(range(6))
    assert math.isnan(values[3]) and all(math.isfinite(v) for v in values[[0, 1, 2, 4, 5]])
    grad_steps, grad_values = run.series("grad_norm")["0"]
    assert 3 in list(grad_steps) and math.isnan(grad_values[list(grad_steps).index(3)])
    assert Path(gradsight.report(tmp_path / "r")).exists()


def test_hooks_and_memory_stay_flat_over_10000_monitored_steps(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 2), torch.randn(8, 1)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with Monitor(model, logdir=tmp_path / "r", optimizer=opt, flush_secs=0.5) as mon:
        counts, sizes = [], []
        tracemalloc.start()
        for i in range(10_000):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            if i in (1_000, 9_999):
                mon.flush()
                gc.collect()
                counts.append(hooks())
                sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
    assert counts[0] == counts[1] > 0
    assert sizes[1] - sizes[0] < 1_000_000, sizes  # bytes: flat, not growing per step
    assert hooks() == 0
    assert len(load_run(tmp_path / "r").series("loss")[""][0]) == 10_000


def test_logdir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("hello")
    with pytest.raises(GradsightError, match=r"logdir .*not-a-dir is a file; expected a directory"):
        Monitor(_model(), logdir=path)
    assert path.read_text() == "hello"  # nothing lost


def test_logdir_nobody_can_write() -> None:
    with pytest.raises(GradsightError, match=r"cannot write the run store in logdir /proc/"):
        Monitor(_model(), logdir="/proc/self/gradsight-run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_logdir_that_is_read_only(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(GradsightError, match=r"cannot write the run store in logdir"):
            Monitor(_model(), logdir=ro / "run")
    finally:
        ro.chmod(0o700)


def _small_run(logdir: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, logdir=logdir, optimizer=opt, flush_secs=0.0) as mon:
        for _ in range(4):
            _step(model, mon, opt)


def test_truncated_part_is_skipped_with_a_warning_and_the_rest_still_reports(
    tmp_path: Path,
) -> None:
    _small_run(tmp_path / "r")
    parts = sorted((tmp_path / "r").glob("metrics-*.parquet"))
    assert len(parts) >= 2
    data = parts[-1].read_bytes()
    parts[-1].write_bytes(data[: len(data) // 2])  # a torn write from another tool
    with pytest.warns(UserWarning, match=r"skipping unreadable .*metrics-\d+\.parquet"):
        run = load_run(tmp_path / "r")
    assert len(run.series("loss")[""][0]) >= 1
    with pytest.warns(UserWarning):
        assert Path(gradsight.report(tmp_path / "r")).exists()


def test_corrupt_run_metadata_is_a_clear_error(tmp_path: Path) -> None:
    _small_run(tmp_path / "r")
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(GradsightError, match=r"run\.json is not valid JSON.*restore it"):
        load_run(tmp_path / "r")


def test_corrupt_diagnosis_is_skipped_and_the_metrics_still_read(tmp_path: Path) -> None:
    _small_run(tmp_path / "r")
    (tmp_path / "r" / "diagnosis.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"skipping unreadable .*diagnosis\.json"):
        run = load_run(tmp_path / "r")
    assert run.diagnosis is None and len(run.series("loss")[""][0]) == 4


def test_report_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(GradsightError, match=r"no-such-dir"):
        gradsight.report(tmp_path / "no-such-dir")


def test_inputs_on_another_device_get_a_fix() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3, device="meta")  # stands in for a GPU tensor on a CPU machine
    with pytest.raises(
        GradsightError, match=r"inputs are on meta but the model's parameters on cpu"
    ):
        gradsight.diagnose(model, (x, torch.zeros(4, 2)), nn.functional.mse_loss)


def test_no_reference_cycles_from_double_backward() -> None:
    """Curvature products build graphs of graphs (create_graph=True); none may outlive
    diagnose() through a reference cycle that only the garbage collector could break."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    gradsight.diagnose(model, batch, nn.functional.cross_entropy)  # warm-up imports
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        gradsight.diagnose(model, batch, nn.functional.cross_entropy)
        gc.collect()
        cyclic_tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic_tensors == []
