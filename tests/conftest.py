"""Shared fixtures: small models and data made on the fly (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from gradsight.data import load_digits


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return load_digits()
