"""The constant-prediction baseline against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradsight.diagnosis import constant_baseline_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_baseline_is_label_entropy(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (300,), generator=gen)
    freq = torch.bincount(y, minlength=5).double() / len(y)
    entropy = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    base = constant_baseline_loss(
        torch.randn(300, 5, generator=gen), y, nn.functional.cross_entropy
    )
    # Scored on samples it was not fitted on: at least the in-sample optimum (the label
    # entropy), above it by the held-out correction O(C/n) only.
    assert entropy - 1e-6 <= base <= entropy * 1.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_baseline_is_target_variance(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(200, 3, generator=gen) * torch.tensor([1.0, 2.0, 3.0]) + 5
    base = constant_baseline_loss(torch.randn(200, 3), y, nn.functional.mse_loss)
    expected = float(y.var(dim=0, unbiased=False).mean())
    assert expected - 1e-6 <= base <= expected * 1.05


def test_sum_reduction_baseline_is_whole_batch_sized() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(200, 3, generator=gen) * torch.tensor([1.0, 2.0, 3.0]) + 5

    def sse(o, t):  # type: ignore[no-untyped-def]
        return nn.functional.mse_loss(o, t, reduction="sum")

    base = constant_baseline_loss(torch.randn(200, 3), y, sse)
    expected = float(y.var(dim=0, unbiased=False).sum()) * 200
    assert expected - 1e-3 <= base <= expected * 1.05


def _lm_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def test_language_model_baseline_is_one_unigram_for_every_position() -> None:
    """Uniform random tokens: no constant does better than ln V. Fitting a constant per
    position on the batch (8 tokens each) would memorize them and read about ln 8."""
    vocab = 512
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (8, 64), generator=gen)
    base = constant_baseline_loss(torch.randn(8, 64, vocab, generator=gen) * 0.02, tokens, _lm_ce)
    assert base is not None
    assert base >= 0.99 * math.log(vocab)


def test_language_model_baseline_does_not_memorize_the_batch() -> None:
    """Zipf-distributed tokens: the held-out unigram loss lies above the batch's own
    unigram entropy (what a constant fitted on the batch would read) and approaches the
    true entropy."""
    vocab = 512
    gen = torch.Generator().manual_seed(1)
    w = 1 / torch.arange(1, vocab + 1, dtype=torch.float64)
    w /= w.sum()
    true_entropy = float(-(w * w.log()).sum())
    tokens = torch.multinomial(w, 16 * 64, replacement=True, generator=gen).reshape(16, 64)
    freq = torch.bincount(tokens.reshape(-1), minlength=vocab).double() / tokens.numel()
    in_sample = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    base = constant_baseline_loss(torch.zeros(16, 64, vocab), tokens, _lm_ce)
    assert base is not None
    assert in_sample < base < true_entropy + 0.5


def test_structured_outputs_get_one_constant_per_head() -> None:
    """A dict of heads (CE on one, MSE on the other): the baseline is the label entropy
    plus the target variance, each head's own constant."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=gen)
    r = torch.randn(400, 1, generator=gen) * 2 + 3
    out = {"cls": torch.randn(400, 4, generator=gen), "reg": torch.randn(400, 1, generator=gen)}

    def loss_fn(o, t):  # type: ignore[no-untyped-def]
        return nn.functional.cross_entropy(o["cls"], t[0]) + nn.functional.mse_loss(o["reg"], t[1])

    freq = torch.bincount(y, minlength=4).double() / len(y)
    expected = float(-(freq * freq.log()).sum()) + float(r.var(unbiased=False))
    base = constant_baseline_loss(out, (y, r), loss_fn)
    assert base is not None and expected - 1e-5 <= base <= expected * 1.03


def test_no_baseline_without_a_floating_output() -> None:
    assert constant_baseline_loss({"ids": torch.arange(3)}, None, lambda o, t: o) is None
