"""Built-in data: scikit-learn's 8×8 handwritten digits, shipped with the package.

The 1,797 images (64 pixels, values 0–16, 10 balanced classes) are the UCI
"Optical Recognition of Handwritten Digits" test set as distributed by
scikit-learn (BSD-3-Clause). They ship inside the package so that the demo and the
benchmarks never download anything.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

__all__ = ["load_digits"]


def load_digits(
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Load digits as standardized float features and integer labels, split in two.

    Pixels are scaled to [0, 1] and then standardized per pixel with the training
    split's mean and standard deviation (constant pixels keep a unit scale), the usual
    preprocessing for an MLP.

    Args:
        test_fraction: Fraction of the 1,797 samples held out for testing.
        seed: Seed of the permutation that makes the split (independent of torch's RNG).
        dtype: Floating dtype of the features.

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` with ``x`` of shape ``(n, 64)`` and
        ``y`` of dtype ``torch.long``.

    Example:
        >>> (x, y), (xt, yt) = load_digits()
        >>> x.shape, xt.shape, int(y.max()) + 1
        (torch.Size([1438, 64]), torch.Size([359, 64]), 10)
        >>> abs(float(x.mean())) < 1e-6
        True
    """
    if not 0.0 < test_fraction < 1.0:
        from gradsight._errors import GradsightError

        raise GradsightError(
            f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}; "
            "pass e.g. test_fraction=0.2."
        )
    with resources.files(__package__).joinpath("digits.npz").open("rb") as fh:
        arrays = np.load(fh)
        images = arrays["images"].astype(np.float64) / 16.0
        target = arrays["target"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(target))
    n_test = round(test_fraction * len(target))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean = images[train_idx].mean(axis=0)
    std = images[train_idx].std(axis=0)
    std[std < 1e-8] = 1.0
    feats = (images - mean) / std

    def _pair(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(feats[idx], dtype=dtype), torch.as_tensor(target[idx])

    return _pair(train_idx), _pair(test_idx)
