"""The constant-prediction baseline against closed forms."""

from __future__ import annotations

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
    assert base == pytest.approx(entropy, rel=1e-5)


def test_mse_baseline_is_target_variance() -> None:
    y = torch.randn(200, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5
    base = constant_baseline_loss(torch.randn(200, 3), y, nn.functional.mse_loss)
    expected = float(y.var(dim=0, unbiased=False).mean())
    assert base == pytest.approx(expected, rel=1e-5)


def test_no_baseline_for_structured_outputs() -> None:
    assert constant_baseline_loss((torch.randn(3, 2),), None, lambda o, t: o[0].sum()) is None
