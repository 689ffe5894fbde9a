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


class _NoIterativeFit:
    """Fails a test that reaches L-BFGS: the closed form should have been the minimum."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the baseline ran an iterative fit")


def _entropy(labels: torch.Tensor, classes: int) -> float:
    freq = torch.bincount(labels.reshape(-1), minlength=classes).double() / labels.numel()
    freq = freq[freq > 0]
    return float(-(freq * freq.log()).sum())


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_shifted_language_model_loss_is_solved_in_closed_form(
    scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A next-token loss (logits at t scored against the token at t+1, times a scale) is
    cross-entropy in the constant over rows the targets do not show: its minimum is read
    off two gradients, the entropy of the shifted tokens' frequencies, times the scale."""
    vocab, gen = 6, torch.Generator().manual_seed(3)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    tokens = torch.multinomial(probs, 64 * 50, replacement=True, generator=gen).reshape(64, 50)
    tokens[:, 0] = 5  # position 0 is never a target: the unshifted counts would be wrong

    def next_token(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        return scale * loss

    monkeypatch.setattr(torch.optim, "LBFGS", _NoIterativeFit)
    base = constant_baseline_loss(torch.randn(64, 50, vocab, generator=gen), tokens, next_token)
    assert base == pytest.approx(scale * _entropy(tokens[:, 1:], vocab), rel=1e-5)


def test_binary_cross_entropy_baseline_is_the_binary_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(500, 2, generator=gen) < torch.tensor([0.2, 0.7])).float()
    monkeypatch.setattr(torch.optim, "LBFGS", _NoIterativeFit)
    base = constant_baseline_loss(
        torch.randn(500, 2, generator=gen), y, nn.functional.binary_cross_entropy_with_logits
    )
    p = y.double().mean(dim=0)
    expected = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
    assert base == pytest.approx(expected, rel=1e-5)


def test_a_loss_of_no_usual_form_is_still_fitted() -> None:
    """Mean absolute error: the best constant is the median, no closed form the baseline
    knows; the iterative fit still gets within a few percent of it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(400, 1, generator=gen).exp()  # skewed: mean and median differ
    base = constant_baseline_loss(torch.zeros(400, 1), y, nn.functional.l1_loss)
    expected = float((y - y.median()).abs().mean())
    assert base is not None and expected - 1e-6 <= base <= expected * 1.05


def test_dict_heads_get_each_heads_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """A classification head and a regression head in one dict: the baseline is the
    label entropy plus the weighted target variance, without an iterative fit."""
    gen = torch.Generator().manual_seed(1)
    n = 600
    labels = torch.randint(0, 3, (n,), generator=gen)
    reg = 2.0 + 3.0 * torch.randn(n, generator=gen)
    outputs = {"cls": torch.randn(n, 3, generator=gen), "reg": torch.randn(n, 1, generator=gen)}

    def loss_fn(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        cls = nn.functional.cross_entropy(out["cls"], t["cls"])
        return cls + 0.1 * nn.functional.mse_loss(out["reg"].squeeze(-1), t["reg"])

    monkeypatch.setattr(torch.optim, "LBFGS", _NoIterativeFit)
    base = constant_baseline_loss(outputs, {"cls": labels, "reg": reg}, loss_fn)
    expected = _entropy(labels, 3) + 0.1 * float(reg.double().var(unbiased=False))
    assert base == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("shape", "classes", "reduction", "ignore"),
    [
        ((96,), 3, "mean", None),  # cross-fitted: 32 rows per class
        ((600,), 4, "mean", None),  # in-sample: 150 rows per class
        ((40,), 10, "sum", None),
        ((24, 5, 5), 6, "mean", -100),  # a segmentation map, some pixels ignored
        ((24, 5, 5), 16, "mean", -100),  # the same, cross-fitted
        ((12,), 7, "mean", None),  # classes absent from a half
    ],
)
def test_cross_entropy_from_counts_equals_the_general_fit(
    shape: tuple[int, ...], classes: int, reduction: str, ignore: int | None
) -> None:
    """The baseline read off the class counts for a recognized cross-entropy is the one
    the general fit finds for the same loss seen as an unknown function."""
    gen = torch.Generator().manual_seed(len(shape) * 100 + classes)
    n, *rest = shape
    outputs = torch.randn(n, classes, *rest, generator=gen)
    targets = torch.randint(0, classes, shape, generator=gen)
    if ignore is not None:
        targets[torch.rand(shape, generator=gen) < 0.2] = ignore
    loss = nn.CrossEntropyLoss(reduction=reduction)
    known = constant_baseline_loss(outputs, targets, loss)
    general = constant_baseline_loss(outputs, targets, lambda o, t: loss(o, t))
    assert known is not None and general is not None
    # With ignored targets the halves are combined by their counted targets rather than
    # their rows (exact for the loss's own mean): a hair apart.
    assert known == pytest.approx(general, rel=1e-5 if ignore is None else 1e-3)


@pytest.mark.parametrize(
    ("shape", "reduction"),
    [
        ((200, 3), "mean"),  # in-sample: 200 rows per feature
        ((40, 3), "mean"),  # cross-fitted
        ((41, 3), "sum"),  # halves of unequal size
        ((64, 1), "mean"),  # one output, as a regression net's
        ((12, 4, 5, 5), "mean"),  # channels-first: one constant per channel
        ((8, 10, 6), "sum"),  # a sequence: one constant per feature for every position
    ],
)
def test_squared_error_from_sums_equals_the_general_fit(
    shape: tuple[int, ...], reduction: str
) -> None:
    """The baseline read off the target sums for a recognized squared error is the one the
    general fit finds for the same loss seen as an unknown function; no call of the loss."""
    gen = torch.Generator().manual_seed(sum(shape))
    outputs = torch.randn(*shape, generator=gen)
    targets = 3.0 + 2.0 * torch.randn(*shape, generator=gen)
    loss = nn.MSELoss(reduction=reduction)
    calls = []

    def counted(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return loss(o, t)

    counted_loss = nn.MSELoss(reduction=reduction)
    counted_loss.forward = counted  # type: ignore[method-assign]  # an nn.MSELoss all the same
    known = constant_baseline_loss(outputs, targets, counted_loss)
    general = constant_baseline_loss(outputs, targets, lambda o, t: loss(o, t))
    assert known is not None and general is not None
    assert not calls
    assert known == pytest.approx(general, rel=1e-5)
    if reduction == "mean" and shape == (200, 3):
        assert known == pytest.approx(float(targets.var(dim=0, unbiased=False).mean()), rel=1e-6)


@pytest.mark.parametrize("shape", [(300, 4), (40, 4)])  # in-sample; cross-fitted
def test_nll_on_log_probabilities_is_the_label_entropy_not_unbounded(
    shape: tuple[int, ...],
) -> None:
    """A model ending in LogSoftmax trained with NLL: its constant must be a
    log-probability too. As a free constant NLL falls without bound (the general fit
    reached -2.9e8, which made every model "no better than a constant"); read as
    cross-entropy in the constant it equals cross-entropy's baseline on the same counts."""
    gen = torch.Generator().manual_seed(shape[0])
    logits = torch.randn(*shape, generator=gen)
    y = torch.randint(0, shape[1], shape[:1], generator=gen)
    log_probs = torch.log_softmax(logits, dim=1)
    for loss in (nn.functional.nll_loss, nn.NLLLoss(), nn.NLLLoss(reduction="sum")):
        base = constant_baseline_loss(log_probs, y, loss)
        reduction = getattr(loss, "reduction", "mean")
        same = constant_baseline_loss(logits, y, nn.CrossEntropyLoss(reduction=reduction))
        assert base is not None and same is not None
        assert base == pytest.approx(same, rel=1e-6)


def test_a_loss_unbounded_in_the_constant_has_no_baseline() -> None:
    """An unrecognized loss with no best constant (NLL of unnormalized outputs, wrapped so
    that it is not recognized) gets no baseline, rather than a hugely negative one."""
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(64, 4, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    assert constant_baseline_loss(outputs, y, lambda o, t: nn.functional.nll_loss(o, t)) is None
