"""Shared fixtures: small models and data made on the fly (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gradsight.data import load_digits


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return load_digits()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one torch thread (restored after): tiny matrices gain nothing from
    a second thread, which only spin-waits when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
