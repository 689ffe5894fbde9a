"""Each false alarm or contradiction reported on real models, as a regression test.

The zoo (tests/test_zoo.py) checks whole architectures against outside ground truth;
these pin the seven findings of the verdict issue one by one, on the smallest model
that shows each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsight
from contradictions import contradictions

ce = nn.functional.cross_entropy


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


def test_multihead_attention_out_proj_is_judged_by_its_gradient() -> None:
    torch.manual_seed(0)
    model = _Encoder()
    batch = (torch.randint(0, 50, (32, 10)), torch.randint(0, 5, (32,)))
    d = gradsight.diagnose(model, batch, ce, curvature=False)
    out_proj = d.layer("enc.layers.0.self_attn.out_proj")
    assert out_proj.grad_norm and out_proj.grad_norm > 0
    assert out_proj.status == "ok" and "not called" not in out_proj.reason
    assert out_proj.used_by == "enc.layers.0.self_attn"
    names = [la.name for la in d.layers]
    assert (
        names.index("enc.layers.0.self_attn.out_proj") == names.index("enc.layers.0.self_attn") + 1
    )
    assert d.status == "ok"
    assert contradictions(d, has_norm=True, has_residual=True) == []


def test_frozen_layers_do_not_enter_the_models_status() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4, dtype=torch.float64)
    w = torch.randn(4, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    model[0].requires_grad_(False)
    feats = model[0](x).detach()
    y = feats @ w
    # Fit the trainable head exactly (least squares): nothing is left to win for it.
    sol = torch.linalg.lstsq(torch.cat([feats, torch.ones(64, 1, dtype=torch.float64)], 1), y)
    with torch.no_grad():
        model[1].weight.copy_(sol.solution[:4].T)
        model[1].bias.copy_(sol.solution[4])
    d = gradsight.diagnose(model, (x, y + 1e-3 * torch.randn_like(y)), nn.functional.mse_loss)
    assert d.layer("0").status == "frozen"
    assert d.layer("1").status == "converged"
    assert d.status == "converged"
    assert contradictions(d) == []


def test_language_model_baseline_reads_the_right_way_round() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab = 256
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=vocab,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, vocab, (8, 32))

    def lm_loss(out, ids):  # type: ignore[no-untyped-def]
        logits = out.logits[:, :-1]
        return ce(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    d = gradsight.diagnose(model, ({"input_ids": ids}, ids), lm_loss, curvature=False)
    assert d.baseline_loss is not None
    # One unigram shared by every position, judged on tokens it was not fitted on: no
    # constant beats ln V on uniform random tokens (a per-position fit reads ~ln 8).
    assert d.baseline_loss >= 0.98 * math.log(vocab)
    assert d.plateau and d.loss >= 0.95 * d.baseline_loss
    assert "no better than predicting a constant" in d.summary
    assert contradictions(d, has_norm=True, has_residual=True) == []


def test_adam_step_ratios_compare_with_the_step_adam_takes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()
    d = gradsight.diagnose(model, (x, y), ce, optimizer=opt)
    for layer in d.layers:
        assert layer.step_taken is not None and layer.step_taken != pytest.approx(3e-3)
        assert "lr 0.003" not in layer.reason
    assert d.lr == pytest.approx(3e-3)
    # The Monitor's diagnosis at close judges with the optimizer and the thresholds given.
    th = gradsight.Thresholds(vanishing=0.5)
    with gradsight.Monitor(
        model, tmp_path / "run", optimizer=opt, batch=(x, y), loss_fn=ce, thresholds=th
    ) as mon:
        opt.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        mon.step(loss)
        opt.step()
    stored = json.loads((tmp_path / "run" / "diagnosis.json").read_text())
    assert all(layer["step_taken"] != pytest.approx(3e-3) for layer in stored["layers"])
    assert gradsight.Diagnosis.from_dict(stored).layers[0].step_taken is not None
