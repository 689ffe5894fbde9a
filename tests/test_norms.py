"""Norms of many tensors at once (``gradsight._norms``), against one norm at a time."""

from __future__ import annotations

import pytest
import torch

from gradsight._norms import norm_tensors, norms

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _tensors(dtypes: tuple[torch.dtype, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3 + i, 5, generator=gen).to(d) for i, d in enumerate(dtypes)]


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,) * 4, DTYPES, (torch.float64, torch.float32, torch.float64)],
    ids=["one dtype", "four dtypes", "interleaved"],
)
def test_norms_equal_one_at_a_time(dtypes: tuple[torch.dtype, ...]) -> None:
    tensors = _tensors(dtypes)
    expected = [float(torch.linalg.vector_norm(t)) for t in tensors]
    assert norms(tensors) == expected
    # Each norm stays on its tensor's dtype, in the tensors' order.
    got = norm_tensors(tensors)
    assert [n.dtype for n in got] == list(dtypes)
    assert [float(n) for n in got] == expected


def test_missing_tensors_read_zero() -> None:
    a, b = _tensors((torch.float32, torch.float64))
    assert norms([None, a, None, b]) == [0.0, float(a.norm()), 0.0, float(b.norm())]
    assert norms([None, None]) == [0.0, 0.0]
    assert norms([]) == [] and norm_tensors([]) == []


def test_no_graph_is_recorded() -> None:
    w = torch.randn(4, requires_grad=True)
    (n,) = norm_tensors([w * 2])
    assert not n.requires_grad
