"""GaussNewton as a conventional optimizer: checkpoints, parameter groups, curvature blocks."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from gradsight import GradsightError
from gradsight.curvature import GGNOperator
from gradsight.optim import GaussNewton, block_for, register_block
from gradsight.optim.blocks import Conv2dBlock, DiagonalBlock, LinearBlock

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """Every block kind: a convolution (KFC), LayerNorm (diagonal), linear layers (K-FAC)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.sigmoid(self.fc(self.norm(h))))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 2, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)


def _optimizer(model: _Net, **kw) -> GaussNewton:  # type: ignore[no-untyped-def]
    groups = [
        {"params": list(model.conv.parameters()) + list(model.norm.parameters()), "lr": 0.03},
        {"params": list(model.fc.parameters()) + list(model.head.parameters())},
    ]
    return GaussNewton(groups, model=model, update_every=3, warmup=2, **kw)


def _train(model: _Net, opt: GaussNewton, steps: range) -> None:
    for t in steps:
        x, y = _batch(t)
        opt.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("exact_outputs", [32, 0], ids=["exact", "probed"])
def test_resume_from_state_dict_is_bitwise_identical(exact_outputs: int) -> None:
    n = 7  # crosses refreshes (warm-up 2, then every 3 steps) on both sides of the save
    torch.manual_seed(0)
    straight = _Net()
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    opt = _optimizer(straight, exact_outputs=exact_outputs)
    _train(straight, opt, range(2 * n))

    torch.manual_seed(5)
    first = _Net()
    first.load_state_dict(start)
    opt1 = _optimizer(first, exact_outputs=exact_outputs)
    _train(first, opt1, range(n))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    del first, opt1
    buffer.seek(0)
    saved = torch.load(buffer)
    torch.manual_seed(9)  # a fresh model with other weights, and a fresh optimizer
    resumed = _Net()
    opt2 = _optimizer(resumed, exact_outputs=exact_outputs)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, range(n, 2 * n))
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    anchor = opt2.state[resumed.conv.weight]  # reads the data: no input factor
    assert anchor["step"] == 2 * n
    assert {"S", "S_inv", "momentum_buffer", "factor_steps", "init_rms"} <= set(anchor)
    assert not {"A", "A_inv", "A_chol"} & set(anchor)
    assert {"A", "S", "A_inv", "S_inv"} <= set(opt2.state[resumed.fc.weight])
    assert "rng_state" in anchor and "diagonal" in opt2.state[resumed.norm.weight]


def test_state_dict_is_the_whole_checkpoint() -> None:
    """Without its state the optimizer diverges from the straight run at the next step."""
    torch.manual_seed(0)
    a, b = _Net(), _Net()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = _optimizer(a), _optimizer(b)
    _train(a, opt_a, range(4))
    _train(b, opt_b, range(4))
    fresh = _optimizer(b)  # the state dropped: momentum, factors and counter start over
    _train(a, opt_a, range(4, 5))
    _train(b, fresh, range(4, 5))
    assert not torch.equal(a.fc.weight, b.fc.weight)


def test_blocks_by_layer_type() -> None:
    model = _Net()
    kinds = {b.name: b.kind for b in GaussNewton(model).blocks}
    assert kinds == {"conv": "kfc", "norm": "diagonal", "fc": "kfac", "head": "kfac"}
    grouped = nn.Conv2d(4, 4, 3, groups=2)  # not Kronecker-factored here: the fallback
    assert isinstance(block_for("g", grouped, list(grouped.parameters())), DiagonalBlock)


def test_registry_is_the_extension_point() -> None:
    class Custom(nn.Linear):
        pass

    layer = Custom(3, 2)
    assert isinstance(block_for("c", layer, list(layer.parameters())), LinearBlock)  # via MRO
    register_block(Custom, lambda name, module, params: DiagonalBlock(name, module, params))
    assert isinstance(block_for("c", layer, list(layer.parameters())), DiagonalBlock)
    with pytest.raises(GradsightError, match=r"nn\.Module subclass"):
        register_block(int, lambda *a: None)


def test_kronecker_factors_are_the_ggn_block_linear_and_conv() -> None:
    torch.manual_seed(0)
    cases = [
        (nn.Linear(5, 4, bias=False).double(), torch.randn(1, 5, dtype=torch.float64)),
        (nn.Conv2d(2, 4, 3, bias=False).double(), torch.randn(1, 2, 3, 3, dtype=torch.float64)),
    ]
    y = torch.tensor([1])
    for module, x in cases:
        model = nn.Sequential(module, nn.Flatten())
        dense = GGNOperator(model, (x, y), nn.functional.cross_entropy).to_dense()
        opt = GaussNewton(model, warmup=1, exact_outputs=32, whiten_data=True)
        opt.step(lambda m=model, x=x: nn.functional.cross_entropy(m(x), y))
        st = opt.state[module.weight]
        torch.testing.assert_close(torch.kron(st["S"], st["A"]), dense, rtol=1e-6, atol=1e-10)


def test_kfc_patches_match_explicit_loops() -> None:
    """A is the mean of the zero-padded, strided patches (with a ones column), S sums the
    output signals over every location: checked against slicing by hand."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double()
    block = Conv2dBlock("c", conv, [conv.weight, conv.bias])
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    out = conv(x)
    padded = nn.functional.pad(x, (0, 0, 1, 1))
    rows = []
    for n in range(2):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                r, c = 2 * i, j
                patch = padded[n, :, r : r + 3, c : c + 3 : 2]  # dilation 2 on the width
                rows.append(torch.cat([patch.flatten(), torch.ones(1, dtype=x.dtype)]))
    torch.testing.assert_close(block.input_rows(x), torch.stack(rows))
    # the rows reproduce the convolution: W_mat @ row = output at that location
    w = block.to_matrix([conv.weight, conv.bias])
    torch.testing.assert_close(
        (block.input_rows(x) @ w.T), block.output_rows(out), rtol=1e-12, atol=1e-12
    )
    parts = block.from_matrix(w)
    assert torch.equal(parts[0], conv.weight) and torch.equal(parts[1], conv.bias)
    wide = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    for padding in ("same", "valid"):  # string paddings (asymmetric for an even span)
        same = nn.Conv2d(2, 3, (3, 4), padding=padding, dilation=(1, 2)).double()
        blk = Conv2dBlock("s", same, [same.weight, same.bias])
        rows = blk.input_rows(wide) @ blk.to_matrix([same.weight, same.bias]).T
        torch.testing.assert_close(rows, blk.output_rows(same(wide)), rtol=1e-12, atol=1e-12)


def test_one_by_one_convolution_is_a_linear_layer() -> None:
    """KFC on a 1×1 convolution equals K-FAC on the same map as a Linear per location."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1).double()
    lin = nn.Linear(3, 4).double()
    lin.weight.data.copy_(conv.weight.data[:, :, 0, 0])
    lin.bias.data.copy_(conv.bias.data)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 16, (6,))
    conv_net = nn.Sequential(conv, nn.Flatten())

    class PerLocation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).flatten(1)

    lin_net = PerLocation()
    states = []
    for net, weight in ((conv_net, conv.weight), (lin_net, lin.weight)):
        opt = GaussNewton(net, warmup=1, exact_outputs=32, whiten_data=True)
        opt.step(lambda n=net: nn.functional.cross_entropy(n(x), y))
        states.append(opt.state[weight])
    for key in ("A", "S"):
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(conv.weight[:, :, 0, 0], lin.weight, rtol=1e-10, atol=1e-14)


def test_gpt2_blocks_and_one_step() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    kinds = {b.name: b.kind for b in GaussNewton(model).blocks}
    assert kinds["transformer.h.0.attn.c_attn"] == "kfac"  # transformers' Conv1D
    assert kinds["transformer.wte"] == "diagonal" and "lm_head" not in kinds  # tied weight
    opt = GaussNewton(model)
    tokens = torch.randint(0, 20, (4, 8))

    def closure() -> torch.Tensor:
        logits = model(tokens).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))

    first = float(opt.step(closure))
    for _ in range(20):
        last = float(opt.step(closure))
    assert last < 0.5 * first


def test_add_param_group_joins_the_blocks() -> None:
    torch.manual_seed(0)
    model = _Net()
    opt = GaussNewton(list(model.fc.parameters()), model=model)
    assert [b.name for b in opt.blocks] == ["fc"]
    opt.add_param_group({"params": list(model.head.parameters()), "lr": 0.05})
    assert [b.name for b in opt.blocks] == ["fc", "head"]
    before = model.head.weight.detach().clone()
    conv = model.conv.weight.detach().clone()
    _train(model, opt, range(2))
    assert not torch.equal(before, model.head.weight)
    assert torch.equal(conv, model.conv.weight)  # not in the optimizer: left alone
    assert opt.param_groups[1]["lr"] == 0.05


def test_large_factor_is_solved_with_its_cholesky_factor() -> None:
    """A factor far larger than its partner (300 + 1 inputs against 3 outputs) is kept as
    the Cholesky factor of its damped self and solved with; the direction equals
    S⁻¹ G A⁻¹ with both damped factors inverted densely in float64."""
    torch.manual_seed(0)
    model = nn.Linear(300, 3).double()
    x = torch.randn(64, 300, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    opt = GaussNewton(model, momentum=0.0, weight_decay=0.0, snr_decay=0.0, whiten_data=True)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    st = opt.state[model.weight]
    assert "A_chol" in st and "A_inv" not in st and "S_inv" in st and "S_chol" not in st
    gamma = opt.param_groups[0]["factor_damping"]

    def inv(f: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(f.shape[0], dtype=torch.float64)
        return torch.linalg.inv(f + gamma * f.diagonal().mean() * eye)

    g = [torch.randn_like(model.weight), torch.randn_like(model.bias)]
    block = opt.blocks[0]
    got = torch.cat([t.flatten() for t in opt._direction(block, g)])
    want = inv(st["S"]) @ torch.cat([g[0], g[1][:, None]], dim=1) @ inv(st["A"])
    want_flat = torch.cat([want[:, :-1].flatten(), want[:, -1]])
    torch.testing.assert_close(got, want_flat, rtol=1e-8, atol=1e-12)


def test_a_layer_that_reads_the_data_is_not_whitened() -> None:
    """A Kronecker layer whose input depends on no trained parameter (the data, after a
    fixed reshape, or features from a frozen layer) keeps no input factor: its direction
    is S⁻¹ M alone; the next layer gets S⁻¹ M A⁻¹; ``whiten_data=True`` whitens both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(32, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    opt = GaussNewton(model, momentum=0.0, weight_decay=0.0)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    first, second = opt.state[model[1].weight], opt.state[model[3].weight]
    assert not {"A", "A_inv", "A_chol"} & set(first) and {"S", "S_inv"} <= set(first)
    assert {"A", "A_inv", "S", "S_inv"} <= set(second)
    g = [torch.randn_like(model[1].weight), torch.randn_like(model[1].bias)]
    got = opt._direction(opt.blocks[0], g)
    want = first["S_inv"] @ torch.cat([g[0], g[1][:, None]], dim=1)
    torch.testing.assert_close(got[0], want[:, :-1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[:, -1], rtol=1e-12, atol=1e-14)

    whitening = GaussNewton(model, whiten_data=True)
    whitening.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert {"A", "A_inv"} <= set(whitening.state[model[1].weight])

    model[1].requires_grad_(False)  # frozen: the head now reads fixed features
    frozen = GaussNewton([p for p in model.parameters() if p.requires_grad], model=model)
    frozen.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert "A" not in frozen.state[model[3].weight] and [b.name for b in frozen.blocks] == ["3"]
