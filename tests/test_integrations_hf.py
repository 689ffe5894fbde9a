"""Hugging Face Trainer callback: a tiny BERT built from a config (nothing downloaded)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gradsight.store import load_run

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from _integration_runs import HF_STEPS as STEPS  # noqa: E402
from _integration_runs import hf_fit  # noqa: E402


def test_trainer_callback_records_every_block_of_a_transformer(tmp_path: Path) -> None:
    trainer, callback = hf_fit(tmp_path / "out", tensorboard=tmp_path / "tb")

    run = load_run(tmp_path / "out" / "gradsight")
    assert run.complete and run.metadata["steps"] == STEPS
    grad = run.series("grad_norm")
    for layer in (
        "bert.embeddings.word_embeddings",
        "bert.embeddings.LayerNorm",
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.LayerNorm",
        "classifier",
    ):
        steps, values = grad[layer]
        assert steps.tolist() == list(range(STEPS)), layer
        assert (values > 0).all() and torch.isfinite(torch.as_tensor(values)).all(), layer
    # The pooler's nn.Tanh is read as an activation; BERT's GELUActivation (a
    # transformers class, not nn.GELU) is not recognised by the Monitor's lean probe.
    assert "bert.pooler.dense" in run.series("saturation")
    assert "bert.encoder.layer.1.attention.self.value" in run.series("signal_norm")
    # The loss of each optimizer step is the one the Trainer logged (4 decimals).
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _, loss = run.series("loss")[""]
    assert loss.tolist() == pytest.approx(logged, abs=2e-4)
    assert callback.report_path == tmp_path / "out" / "gradsight" / "report.html"
    assert "bert.encoder.layer.1.output.LayerNorm" in callback.report_path.read_text()
    assert any((tmp_path / "tb").glob("events.out.tfevents.*"))
    # Verdicts without a batch or loss_fn from the user: the model's own loss function,
    # checked against the loss it returned, on the last micro-batch; the run is named
    # after the output directory.
    assert run.name == "out"
    assert run.diagnosis is not None
    names = [layer["name"] for layer in run.diagnosis["layers"]]
    assert "bert.encoder.layer.1.output.dense" in names and "classifier" in names
    assert run.diagnosis["baseline_loss"] == pytest.approx(math.log(2), rel=0.05)
    # The model diagnosed as returning its logits: the curvature is measured too.
    assert run.diagnosis["layers"][-1]["step_ratio"] is not None
    html = callback.report_path.read_text(encoding="utf-8")
    assert 'class="verdicts"' in html and "Run: out" in html


def test_diagnosing_every_n_steps_leaves_training_unchanged(tmp_path: Path) -> None:
    plain, _ = hf_fit(tmp_path / "a", diagnose=False)
    diagnosed, _ = hf_fit(tmp_path / "b", diagnose_every=2)
    for p, q in zip(plain.model.parameters(), diagnosed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert load_run(tmp_path / "a" / "gradsight").diagnosis is None
    assert load_run(tmp_path / "b" / "gradsight").diagnosis is not None
