"""Hugging Face Trainer callback: a tiny BERT built from a config (nothing downloaded)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from gradsight.store import load_run

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gradsight.integrations.hf import GradsightTrainerCallback  # noqa: E402

STEPS, BATCH, ACCUMULATE = 4, 8, 2


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 60, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 32).long()  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": self.labels[i],
        }


def test_trainer_callback_records_every_block_of_a_transformer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = GradsightTrainerCallback(tensorboard=tmp_path / "tb", activation_samples=None)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Data(STEPS * BATCH * ACCUMULATE),
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

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
