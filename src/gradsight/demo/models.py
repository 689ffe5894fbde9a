"""The reference models of the demo: deep MLPs on the 64-pixel digits."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
}


def mlp(
    depth: int = 10,
    width: int = 64,
    *,
    activation: str = "sigmoid",
    init: str = "xavier",
    in_features: int = 64,
    classes: int = 10,
) -> nn.Sequential:
    """A ``depth``-layer MLP: ``depth - 1`` hidden Linear+activation blocks and a head.

    Args:
        depth: Number of Linear layers (hidden layers + the output layer).
        width: Hidden width.
        activation: ``"sigmoid"``, ``"tanh"``, ``"relu"`` or ``"gelu"``.
        init: ``"xavier"`` (Glorot normal, for sigmoid/tanh) or ``"he"`` (Kaiming normal,
            fan-in, for ReLU); biases start at zero.

    Example:
        >>> model = mlp(3, 16, activation="relu", init="he")
        >>> [type(m).__name__ for m in model]
        ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear']
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if init not in ("xavier", "he"):
        raise ValueError(f"init must be 'xavier' or 'he', got {init!r}")
    layers: list[nn.Module] = []
    fan_in = in_features
    for i in range(depth):
        last = i == depth - 1
        linear = nn.Linear(fan_in, classes if last else width)
        if init == "xavier":
            nn.init.xavier_normal_(linear.weight)
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(_ACTIVATIONS[activation]())
        fan_in = width
    return nn.Sequential(*layers)
