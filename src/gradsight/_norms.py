"""Norms of many tensors at once: one ``torch._foreach_norm`` call per dtype and device
(one Python round trip for all of a model's gradients, outputs or parameters), and one
copy to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["norm_tensors", "norms"]


def _one_group(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor has the first one's dtype (the usual case: one foreach call
    for all, without grouping). Devices are not compared (a ``torch.device`` per tensor
    costs more than the check is worth): ``torch._foreach_norm`` takes tensors on several
    devices, one at a time."""
    dtype = tensors[0].dtype
    return all(t.dtype is dtype for t in tensors)


def norm_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor, as 0-d tensors on its device (in its dtype).

    Example:
        >>> [float(n) for n in norm_tensors([torch.ones(4), torch.full((4,), 2.0), torch.ones(9)])]
        [2.0, 4.0, 3.0]
    """
    if not tensors:
        return []
    with torch.no_grad():  # no graph: foreach_norm has no double backward to record
        if _one_group(tensors):
            return list(torch._foreach_norm(list(tensors)))
        out: list[torch.Tensor | None] = [None] * len(tensors)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.dtype, t.device), []).append(i)
        for members in groups.values():
            values = torch._foreach_norm([tensors[i] for i in members])
            for i, n in zip(members, values, strict=True):
                out[i] = n
    return [n for n in out if n is not None]


def norms(tensors: Sequence[torch.Tensor | None]) -> list[float]:
    """The 2-norm of each tensor as a float (0 for None), with one copy to the host where
    the norms share a device.

    Example:
        >>> norms([torch.ones(4), None, torch.full((2, 2), 2.0)])
        [2.0, 0.0, 4.0]
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return [0.0] * len(tensors)
    values = norm_tensors(present)
    try:
        floats = torch.stack(values).tolist()  # one copy to the host
    except RuntimeError:  # norms on several devices
        floats = [float(v) for v in values]
    if len(present) == len(tensors):
        return floats
    taken = iter(floats)
    return [0.0 if t is None else next(taken) for t in tensors]
