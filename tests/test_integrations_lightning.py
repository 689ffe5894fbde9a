"""Lightning callback: a real fit (accumulation, mixed precision) into store, loggers, report."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gradsight.store import load_run

pl = pytest.importorskip("pytorch_lightning")
from gradsight.integrations.lightning import GradsightCallback  # noqa: E402

BATCHES, BATCH, ACCUMULATE = 12, 8, 2


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        )
        self.losses: list[float] = []  # per micro-batch
        self.grad_norms: list[dict[str, float]] = []  # per optimizer step, unscaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).float(), y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning has unscaled the gradients here: the reference for grad_norm.
        self.grad_norms.append(
            {
                name: math.sqrt(sum(float(p.grad.double().square().sum()) for p in m.parameters()))
                for name, m in self.net.named_children()
                if isinstance(m, nn.Linear)
            }
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH, 6, generator=g)
    y = torch.randint(0, 3, (BATCHES * BATCH,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _fit(tmp_path: Path, **trainer_kwargs: object) -> tuple[Net, GradsightCallback]:
    model = Net()
    callback = GradsightCallback(tmp_path / "run", activation_samples=None)
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=ACCUMULATE,
        logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, _loader())
    assert trainer.global_step == BATCHES // ACCUMULATE
    return model, callback


def _check_run(tmp_path: Path, model: Net, callback: GradsightCallback, rtol: float) -> None:
    steps = BATCHES // ACCUMULATE
    run = load_run(tmp_path / "run")
    assert run.complete and run.metadata["steps"] == steps
    # One record per optimizer step, with the step's loss: the mean of its micro-batches.
    loss_steps, loss = run.series("loss")[""]
    assert loss_steps.tolist() == list(range(steps))
    expected = [sum(model.losses[i : i + ACCUMULATE]) / ACCUMULATE for i in range(0, BATCHES, 2)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-3)
    # Gradient norms per layer are the unscaled gradients the optimizer stepped with.
    grad = run.series("grad_norm")
    assert sorted(grad) == ["net.0", "net.2", "net.4"]
    for layer, (s, v) in grad.items():
        ref = [g[layer.split(".")[1]] for g in model.grad_norms]
        assert s.tolist() == list(range(steps))
        assert v.tolist() == pytest.approx(ref, rel=rtol)
    for metric in ("signal_norm", "saturation", "dead_fraction"):
        assert set(run.series(metric)) >= {"net.0", "net.2"}, metric
    # Update ratios, whether the closure runs inside optimizer.step() (32-true,
    # bf16-mixed) or before it (a GradScaler): at step 0, then every update_every-th.
    ratios = run.series("update_ratio")
    assert set(ratios) == {"net.0", "net.2", "net.4"}
    assert ratios["net.0"][0].tolist() == list(range(0, steps, 10))
    # The trainer's logger got the same numbers under gradsight/<layer>/<metric>.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("gradsight/net.0/grad_norm")]
    assert [int(r["step"]) for r in rows] == list(range(steps))
    logged = [float(r["gradsight/net.0/grad_norm"]) for r in rows]
    assert logged == pytest.approx(grad["net.0"][1].tolist(), rel=1e-6)
    # The report was written once, at the end, and shows the layers.
    assert callback.report_path == tmp_path / "run" / "report.html"
    html = callback.report_path.read_text()
    assert "net.0" in html and "net.4" in html


def test_bf16_mixed_with_accumulation(tmp_path: Path) -> None:
    model, callback = _fit(tmp_path, precision="bf16-mixed")
    _check_run(tmp_path, model, callback, rtol=1e-5)


def test_16_mixed_gradscaler_norms_are_unscaled(tmp_path: Path) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model, callback = _fit(tmp_path, plugins=[plugin])
    _check_run(tmp_path, model, callback, rtol=1e-4)
    run = load_run(tmp_path / "run")
    assert set(run.series("loss_scale")[""][1].tolist()) == {2.0**12}
    # Backward signals are unscaled too: they match a float32 run to fp16 accuracy.
    _fit(tmp_path / "fp32", precision="32-true")
    ref = load_run(tmp_path / "fp32" / "run").series("signal_norm")
    for layer, (_, v) in run.series("signal_norm").items():
        assert v[0] == pytest.approx(ref[layer][1][0], rel=2e-2), layer


def test_report_has_verdicts_without_a_batch_or_loss_fn(tmp_path: Path) -> None:
    """The callback finds the (inputs, targets) split and the loss (cross-entropy of
    forward's output, as training_step computes it) from training itself."""
    model, callback = _fit(tmp_path, precision="32-true")
    run = load_run(tmp_path / "run")
    assert run.diagnosis is not None
    assert [layer["name"] for layer in run.diagnosis["layers"]] == ["net.0", "net.2", "net.4"]
    # The diagnosis is of the trained model on the last batch, with its loss.
    x, y = list(_loader())[-1]
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))
    assert run.diagnosis["loss"] == pytest.approx(expected, rel=1e-5)
    html = callback.report_path.read_text(encoding="utf-8")  # type: ignore[union-attr]
    assert 'class="verdicts"' in html and "No run stores a diagnosis" not in html


class _Hinge(Net):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.multi_margin_loss(self(x), y)


def _fit_hinge(tmp_path: Path, **kwargs: object) -> GradsightCallback:
    callback = GradsightCallback(tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(_Hinge(), _loader())
    return callback


def test_unknown_loss_warns_and_loss_fn_fixes_it(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"no verdicts for this run: training_step's loss is none"):
        _fit_hinge(tmp_path / "a")
    assert load_run(tmp_path / "a" / "run").diagnosis is None
    _fit_hinge(tmp_path / "b", loss_fn=nn.functional.multi_margin_loss)
    assert load_run(tmp_path / "b" / "run").diagnosis is not None


def test_diagnosing_every_n_steps_leaves_training_unchanged(tmp_path: Path) -> None:
    plain, _ = _fit(tmp_path / "a", precision="32-true")
    diagnosed, _ = _fit(tmp_path / "b", precision="32-true")
    callback = GradsightCallback(tmp_path / "c" / "run", diagnose_every=2)
    model = Net()
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=ACCUMULATE,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, _loader())
    for p, q, r in zip(plain.parameters(), diagnosed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert load_run(tmp_path / "c" / "run").diagnosis is not None
