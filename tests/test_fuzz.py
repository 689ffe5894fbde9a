"""Fuzzing: random architectures and batches; diagnose() never raises and changes nothing.

CI runs a bounded profile; run a longer one with
``GRADSIGHT_FUZZ_EXAMPLES=1000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradsight

EXAMPLES = int(os.environ.get("GRADSIGHT_FUZZ_EXAMPLES", "25"))
# The bounded CI profile is the same on every run; a longer one explores new cases.
FIXED = "GRADSIGHT_FUZZ_EXAMPLES" not in os.environ

_ACTS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "none": nn.Identity,
}


@dataclass(frozen=True)
class Arch:
    depth: int
    width: int
    d_in: int
    d_out: int
    activation: str
    norm: str
    residual: bool
    log_init: float
    dropout: float
    batch: int
    task: str
    train: bool
    seed: int


architectures = st.builds(
    Arch,
    depth=st.integers(1, 5),
    width=st.integers(1, 12),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 4),
    activation=st.sampled_from(sorted(_ACTS)),
    norm=st.sampled_from(["none", "batch", "layer"]),
    residual=st.booleans(),
    log_init=st.floats(-2.0, 1.0),
    dropout=st.sampled_from([0.0, 0.3]),
    batch=st.integers(2, 24),
    task=st.sampled_from(["ce", "mse"]),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)


class _Block(nn.Module):
    def __init__(self, d_in: int, arch: Arch) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, arch.width)
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
        self.norm = norms[arch.norm](arch.width) if arch.norm in norms else nn.Identity()
        self.act = _ACTS[arch.activation]()
        self.drop = nn.Dropout(arch.dropout)
        self.residual = arch.residual and d_in == arch.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.norm(self.linear(x))))
        return x + h if self.residual else h


class _Net(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        dims = [arch.d_in] + [arch.width] * arch.depth
        self.blocks = nn.Sequential(*(_Block(dims[i], arch) for i in range(arch.depth)))
        self.head = nn.Linear(arch.width, arch.d_out if arch.task == "mse" else max(arch.d_out, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _build(arch: Arch) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], object]:
    gen = torch.Generator().manual_seed(arch.seed)
    with torch.random.fork_rng():
        torch.manual_seed(arch.seed)
        model = _Net(arch).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10.0**arch.log_init)
    model.train(arch.train)
    x = torch.randn(arch.batch, arch.d_in, generator=gen, dtype=torch.float64)
    if arch.task == "ce":
        y = torch.randint(0, max(arch.d_out, 2), (arch.batch,), generator=gen)
        return model, (x, y), nn.functional.cross_entropy
    y = torch.randn(arch.batch, arch.d_out, generator=gen, dtype=torch.float64)
    return model, (x, y), nn.functional.mse_loss


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=FIXED,
)
@given(arch=architectures)
def test_diagnose_on_random_architectures(arch: Arch) -> None:
    model, batch, loss_fn = _build(arch)
    slots = list(model.named_parameters(remove_duplicate=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    d = gradsight.diagnose(model, batch, loss_fn)  # type: ignore[arg-type]

    assert d.status in (*gradsight.STATUSES, "nonfinite")
    assert [la.name for la in d.layers] == [
        n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None
    ]
    for layer in d.layers:
        assert layer.status in gradsight.STATUSES and layer.reason
        assert layer.grad_norm is None or layer.grad_norm >= 0 or math.isnan(layer.grad_norm)
    after = list(model.named_parameters(remove_duplicate=False))
    assert all(a is b for (_, a), (_, b) in zip(after, slots, strict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert not torch._C._is_torch_function_mode_enabled()

    if d.status != "nonfinite":
        scaled = gradsight.diagnose(model, batch, lambda o, t: 1e4 * loss_fn(o, t))  # type: ignore[operator]
        assert [la.status for la in scaled.layers] == [la.status for la in d.layers]


@settings(
    max_examples=max(EXAMPLES // 2, 5),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=FIXED,
)
@given(arch=architectures)
def test_monitor_on_random_architectures(arch: Arch, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    model, (x, y), loss_fn = _build(arch)
    logdir = tmp_path_factory.mktemp("run")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with gradsight.Monitor(model, logdir=logdir, optimizer=opt, diagnose_at_close=False) as mon:
        for _ in range(3):
            opt.zero_grad()
            loss = loss_fn(model(x), y)  # type: ignore[operator]
            loss.backward()
            mon.step(loss)
            opt.step()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    run = gradsight.store.load_run(logdir)
    assert run.complete and len(run.series("loss")[""][0]) == 3
