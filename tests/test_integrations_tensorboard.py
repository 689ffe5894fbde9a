"""TensorBoard integration: scalars and gradient histograms read back by TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gradsight
from gradsight.store import load_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from gradsight.integrations.tensorboard import TensorBoardSink


def test_scalars_and_histograms_match_the_run_store(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 12), nn.Sigmoid(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    loss_fn = nn.CrossEntropyLoss()
    with gradsight.Monitor(
        model, logdir=tmp_path / "run", optimizer=opt, diagnose_at_close=False
    ) as mon:
        tb = TensorBoardSink.attach(mon, tmp_path / "tb", histogram_every=2)
        for _ in range(4):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
    tb.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    run = load_run(tmp_path / "run")
    # Every (layer, metric) of the store is a scalar series gradsight/<layer>/<metric>.
    for metric in ("grad_norm", "signal_norm", "saturation", "dead_fraction", "update_ratio"):
        for layer, (steps, values) in run.series(metric).items():
            events = acc.Scalars(f"gradsight/{layer}/{metric}")
            assert [e.step for e in events] == steps.tolist()
            assert [e.value for e in events] == pytest.approx(values.tolist(), rel=1e-6)
    loss_events = acc.Scalars("gradsight/model/loss")
    assert [e.step for e in loss_events] == [0, 1, 2, 3]
    assert loss_events[-1].value < loss_events[0].value
    # Histograms of each layer's gradient at steps 0 and 2, with all its entries.
    assert sorted(tags["histograms"]) == [
        "gradsight/0/grad",
        "gradsight/2/grad",
        "gradsight/4/grad",
    ]
    hist = acc.Histograms("gradsight/0/grad")
    assert [h.step for h in hist] == [0, 2]
    assert hist[0].histogram_value.num == 5 * 12 + 12
