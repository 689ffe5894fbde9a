"""Whether an exactly zero gradient stays zero (``gradsight.diagnosis.stuck``), against
the dynamics themselves: the same steps taken by hand."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradsight.diagnosis.stuck import _is_zero, still_zero

LOSS = nn.functional.mse_loss


def _chain() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Three layers whose weights start at exactly zero, biases not: the last one's
    weight gets a gradient at once, the middle one's after one step, the first one's
    after two (a chain of k zero layers opens in k steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for i in (0, 2, 4):
            model[i].weight.zero_()
            model[i].bias.uniform_(0.5, 1.0)
    gen = torch.Generator().manual_seed(0)
    return model, (torch.randn(16, 3, generator=gen), torch.randn(16, 2, generator=gen))


def _zero_now(model: nn.Module, grads: tuple[torch.Tensor, ...]) -> dict[str, list[int]]:
    names = [n for n, _ in model.named_parameters()]
    return {n: [i] for i, n in enumerate(names) if not grads[i].any()}


def test_a_chain_of_zero_layers_opens_one_layer_per_step() -> None:
    model, (x, y) = _chain()
    params = list(model.parameters())
    grads = torch.autograd.grad(LOSS(model(x), y), params)
    watched = _zero_now(model, grads)
    assert sorted(watched) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert still_zero(model, (x, y), LOSS, params, grads, watched, steps=1).layers == {
        "0.bias",
        "0.weight",
    }
    assert still_zero(model, (x, y), LOSS, params, grads, watched, steps=2).layers == set()
    # The ground truth, by hand: plain SGD on a copy; the first weight's gradient is
    # exactly zero before each of the first two steps, and not after them.
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    first = []
    for _ in range(3):
        opt.zero_grad()
        LOSS(trained(x), y).backward()
        first.append(float(trained[0].weight.grad.abs().max()))
        opt.step()
    assert first[0] == 0.0 and first[1] == 0.0 and first[2] > 0.0


def test_a_gated_block_fed_zero_stays_zero_while_the_rest_trains() -> None:
    """SiLU(gate(h))·up(h) with h exactly zero: zero in both factors, so nothing passes
    back to gate, up or what makes h; ground truth, 20 SGD steps move none of them."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_w = nn.Parameter(torch.zeros(4))  # a zero normalization weight
            self.gate, self.up = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False)
            self.down = nn.Linear(8, 4, bias=False)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * self.norm_w
            return self.head(x + self.down(nn.functional.silu(self.gate(h)) * self.up(h)))

    torch.manual_seed(0)
    model = Gated()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    params = list(model.parameters())
    grads = torch.autograd.grad(LOSS(model(x), y), params)
    watched = _zero_now(model, grads)
    assert sorted(watched) == ["down.weight", "gate.weight", "norm_w", "up.weight"]
    found = still_zero(model, (x, y), LOSS, params, grads, watched, zero_weights={"norm_w"})
    assert found.layers == set(watched) and found.saddles == {"norm_w"}
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        LOSS(trained(x), y).backward()
        opt.step()
    moved = {
        n
        for (n, p), q in zip(trained.named_parameters(), params, strict=True)
        if not torch.equal(p, q)
    }
    assert moved == {"head.weight", "head.bias"}


def test_the_model_and_the_rng_are_left_as_they_were() -> None:
    model, (x, y) = _chain()
    model.append(nn.Dropout(0.5))  # draws from the RNG in training mode
    params = list(model.parameters())
    grads = torch.autograd.grad(LOSS(model(x), y), params)
    before = [p.detach().clone() for p in params]
    rng = torch.get_rng_state()
    still_zero(model, (x, y), LOSS, params, grads, _zero_now(model, grads))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)
    assert torch.equal(torch.get_rng_state(), rng)


def test_only_an_exact_zero_is_zero() -> None:
    assert _is_zero(None) and _is_zero(torch.zeros(3)) and _is_zero(-torch.zeros(3))
    assert not _is_zero(torch.tensor([0.0, 1e-30]))
    assert not _is_zero(torch.tensor([0.0, float("nan")]))  # NaN moved: not a zero that holds


def test_a_saddle_is_a_zero_weight_that_moved_off_zero_gets_a_gradient() -> None:
    """The zero norm in front of a gated block holds a saddle: moved off zero, it gets a
    gradient. A zero-weight projection of an input that is zero on this batch (a
    condition absent from it) does not: its input holds it, whatever its weight, and no
    initialization changes that; nor does a head the loss weighs 0."""

    class Conditioned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_w = nn.Parameter(torch.zeros(4))
            self.gate, self.up = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False)
            self.down = nn.Linear(8, 4, bias=False)
            self.cond = nn.Linear(3, 4, bias=False)
            self.aux = nn.Linear(4, 2, bias=False)
            for lin in (self.cond, self.aux):
                nn.init.zeros_(lin.weight)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = x * self.norm_w
            x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h)) + self.cond(c)
            return self.head(x), self.aux(x)

    def loss_fn(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return LOSS(out[0], y) + 0.0 * out[1].square().mean()

    torch.manual_seed(0)
    model = Conditioned()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    batch = ((x, torch.zeros(16, 3)), y)  # the condition is absent from this batch
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(*batch[0]), y), params)
    names = [n for n, _ in model.named_parameters()]
    watched = {n.removesuffix(".weight"): [i] for i, n in enumerate(names) if not grads[i].any()}
    assert sorted(watched) == ["aux", "cond", "down", "gate", "norm_w", "up"]
    zero_weights = {"norm_w", "cond", "aux"}
    found = still_zero(model, batch, loss_fn, params, grads, watched, zero_weights=zero_weights)
    assert found.layers == set(watched) and found.saddles == {"norm_w"}
    # The model is left as it was.
    assert not model.norm_w.any() and not model.cond.weight.any() and not model.aux.weight.any()


class _Gated(nn.Module):
    """x + α·f(x), with α a parameter of its own (ReZero), and a head; a second input
    path ``side`` (a condition) that the batch may leave at exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.side = nn.Linear(2, 4)
        self.side_scale = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = x + self.alpha * self.f(x) + self.side(c)
        return self.head(h + self.side_scale * h)


def test_a_frozen_zero_gate_holds_its_branch_for_good() -> None:
    """α frozen at zero (ReZero with its gate left out of training): the branch's layers
    get no gradient at any step (ground truth: 20 SGD steps leave them as they were),
    while the head learns. Moved off zero on the copy, α gives them one: ``frozen_by``
    names α as what holds them. A frozen zero that holds nothing (``side_scale``, a
    frozen zero that scales a path the head already gets) is not named, and a layer
    whose input is zero on the batch (``side``, its condition absent) stays stuck but is
    not held by any frozen zero."""
    torch.manual_seed(0)
    model = _Gated()
    model.alpha.requires_grad_(False)
    model.side_scale.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(16, 4, generator=gen), torch.zeros(16, 2)
    with torch.no_grad():
        model.side.bias.zero_()
    batch = ((x, c), torch.randn(16, 2, generator=gen))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = torch.autograd.grad(LOSS(model(x, c), batch[1]), params)
    index = {n: i for i, (n, _) in enumerate(named)}
    watched = {
        "f.0": [index["f.0.weight"], index["f.0.bias"]],
        "f.2": [index["f.2.weight"], index["f.2.bias"]],
        "side": [index["side.weight"]],
    }
    assert all(not grads[i].any() for ids in watched.values() for i in ids)
    frozen = {"alpha": [model.alpha], "side_scale": [model.side_scale]}
    found = still_zero(model, batch, LOSS, params, grads, watched, frozen_zeros=frozen)
    assert found.layers == {"f.0", "f.2", "side"}
    assert found.frozen_by == {"f.0": ("alpha",), "f.2": ("alpha",)}
    assert not model.alpha.any() and not model.side_scale.any()  # the model is untouched
    # Ground truth: SGD on a copy leaves the branch exactly as it was; the head moves.
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        LOSS(trained(x, c), batch[1]).backward()
        opt.step()
    assert torch.equal(trained.f[0].weight, model.f[0].weight)
    assert torch.equal(trained.f[2].weight, model.f[2].weight)
    assert not torch.equal(trained.head.weight, model.head.weight)
