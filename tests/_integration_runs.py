"""Small real trainings through the Lightning and Hugging Face callbacks, for the
integration tests and the browser test (which opens their reports)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"  # configs only: nothing is downloaded

HF_STEPS, HF_BATCH, HF_ACCUMULATE = 4, 8, 2


class TokenData(torch.utils.data.Dataset):
    """Token sequences whose label is whether the first token is in the upper half."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 60, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 32).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": self.labels[i],
        }


def hf_fit(output_dir: Path, **callback_kwargs: Any) -> tuple[Any, Any]:
    """A 2-layer BERT (built from a config) trained HF_STEPS optimizer steps with
    accumulation through ``GradsightTrainerCallback``; returns (trainer, callback)."""
    import transformers

    from gradsight.integrations.hf import GradsightTrainerCallback

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
        output_dir=str(output_dir),
        report_to=[],
        max_steps=HF_STEPS,
        per_device_train_batch_size=HF_BATCH,
        gradient_accumulation_steps=HF_ACCUMULATE,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback_kwargs.setdefault("activation_samples", None)
    callback = GradsightTrainerCallback(**callback_kwargs)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(HF_STEPS * HF_BATCH * HF_ACCUMULATE),
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, callback


def lightning_fit(logdir: Path, **callback_kwargs: Any) -> Any:
    """A small sigmoid/ReLU classifier trained one epoch through ``GradsightCallback``;
    returns the callback."""
    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover - the `lightning` meta-package
        import lightning.pytorch as pl  # type: ignore[no-redef]

    from gradsight.integrations.lightning import GradsightCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(6, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = GradsightCallback(logdir, **callback_kwargs)
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
        trainer.fit(Net(), loader)
    return callback
