"""Hessian and GGN operators against dense float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from _curvature_cases import Case, make_case, rel_err
from torch import nn

import gradsight.curvature as curv
from gradsight import GradsightError
from gradsight.curvature import GGNOperator, HessianOperator


def test_public_names_import() -> None:
    for name in curv.__all__:
        assert getattr(curv, name) is not None, name


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_matches_dense_hessian(case: Case, method: str) -> None:
    H = case.dense_hessian()
    op = HessianOperator(case.model, case.batch, case.loss_fn, method=method)
    assert op.shape == H.shape
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel_err(op @ V, H @ V) < 1e-10
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) < 1e-10
    grad = torch.func.grad(case.flat_loss())(case.flat_params())
    assert rel_err(op.gradient, grad) < 1e-12


def test_batched_products_equal_single_products(case: Case) -> None:
    op = HessianOperator(case.model, case.batch, case.loss_fn, max_batch=2)
    V = torch.randn(op.shape[0], 5, dtype=torch.float64)
    single = torch.stack([op @ V[:, i] for i in range(5)], dim=1)
    assert rel_err(op @ V, single) < 1e-12
    assert op.num_matvecs == 10


def _block_names(case: Case, module_name: str) -> list[str]:
    return [n for n, _ in case.model.named_parameters() if n.rsplit(".", 1)[0] == module_name]


@pytest.mark.parametrize("case_name", ["sigmoid-ce", "cnn-mse"])
def test_layer_block_is_diagonal_block_of_full_hessian(case_name: str) -> None:
    case = make_case(case_name)
    H = case.dense_hessian()
    names = [n for n, _ in case.model.named_parameters()]
    sizes = [p.numel() for _, p in case.model.named_parameters()]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    module_names = sorted({n.rsplit(".", 1)[0] for n in names})
    for mod in module_names:
        block = _block_names(case, mod)
        size = dict(zip(names, sizes, strict=True))
        idx = torch.cat([torch.arange(offsets[n], offsets[n] + size[n]) for n in block])
        expected = H[idx][:, idx]
        module = case.model.get_submodule(mod)
        specs = (
            (mod, module, [mod], list(module.parameters())) if mod == module_names[0] else (mod,)
        )
        for spec in specs:
            op = HessianOperator(case.model, case.batch, case.loss_fn, params=spec)
            assert op.names == block
            assert rel_err(op.to_dense(), expected) < 1e-10


def test_list_of_layers_gives_their_joint_block() -> None:
    case = make_case("tanh-mse")
    names = ["0.weight", "0.bias", "4.weight", "4.bias"]
    H = case.dense_hessian(names)
    op = HessianOperator(case.model, case.batch, case.loss_fn, params=["4", case.model[0]])
    assert op.names == names  # model order, whatever order they were given in
    assert rel_err(op.to_dense(), H) < 1e-10


def test_ggn_matches_dense_jt_h_j(case: Case) -> None:
    G = case.dense_ggn()
    op = GGNOperator(case.model, case.batch, case.loss_fn)
    V = torch.randn(G.shape[0], 4, dtype=torch.float64)
    assert rel_err(op @ V, G @ V) < 1e-10


def test_ggn_analytic_output_hessian_matches_autograd(case: Case) -> None:
    fast = GGNOperator(case.model, case.batch, case.loss_fn)
    slow = GGNOperator(case.model, case.batch, case.loss_fn, loss_hessian="autograd")
    V = torch.randn(fast.shape[0], 3, dtype=torch.float64)
    assert rel_err(fast @ V, slow @ V) < 1e-12


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(label_smoothing=0.2),
        nn.CrossEntropyLoss(ignore_index=1),
        nn.functional.cross_entropy,
    ],
)
def test_ggn_cross_entropy_variants(loss_fn: nn.Module) -> None:
    case = make_case("relu-ce")
    fast = GGNOperator(case.model, case.batch, loss_fn)
    slow = GGNOperator(case.model, case.batch, loss_fn, loss_hessian="autograd")
    assert rel_err(fast.to_dense(), slow.to_dense()) < 1e-12


def test_ggn_is_hessian_for_linear_model_with_mse() -> None:
    torch.manual_seed(3)
    n, d_in, d_out = 20, 4, 3
    model = nn.Linear(d_in, d_out).double()
    x = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randn(n, d_out, dtype=torch.float64)
    # Closed form: parameters [W (row-major), b]; with X̃ = [x, 1], the MSE Hessian is
    # 2/(n·d_out) · (I_{d_out} ⊗ X̃ᵀX̃), rearranged into the [W, b] layout.
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    block = 2.0 / (n * d_out) * xt.T @ xt
    full = torch.kron(torch.eye(d_out, dtype=torch.float64), block)
    perm = [o * (d_in + 1) + i for o in range(d_out) for i in range(d_in)]
    perm += [o * (d_in + 1) + d_in for o in range(d_out)]
    closed = full[perm][:, perm]
    G = GGNOperator(model, (x, y), nn.MSELoss()).to_dense()
    H = HessianOperator(model, (x, y), nn.MSELoss()).to_dense()
    assert rel_err(G, closed) < 1e-12
    assert rel_err(H, closed) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_ggn_is_positive_semidefinite_on_random_networks(seed: int) -> None:
    case = make_case(["sigmoid-ce", "tanh-mse", "relu-ce", "cnn-ce"][seed], seed=seed + 10)
    G = GGNOperator(case.model, case.batch, case.loss_fn).to_dense()
    assert rel_err(G, G.T) < 1e-12
    eig = torch.linalg.eigvalsh(G)
    assert eig.min() >= -1e-10 * eig.max()


class _BNDropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "forward_over_reverse"])
@pytest.mark.parametrize("training", [True, False])
def test_model_left_exactly_as_found(kind: str, training: bool) -> None:
    torch.manual_seed(0)
    model = _BNDropoutNet().double().train(training)
    model.eval().train(training)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    if kind == "ggn":
        op: curv.CurvatureOperator = GGNOperator(model, (x, y), nn.CrossEntropyLoss())
    elif kind == "hessian":
        op = HessianOperator(model, (x, y), nn.CrossEntropyLoss())
    else:
        op = HessianOperator(model, (x, y), nn.CrossEntropyLoss(), method="forward_over_reverse")
    M = op.to_dense()
    assert rel_err(M, M.T) < 1e-10  # one dropout mask for every product
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_both_hvp_methods_agree_under_dropout() -> None:
    torch.manual_seed(0)
    model = _BNDropoutNet().double().train()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    a = HessianOperator(model, (x, y), nn.CrossEntropyLoss()).to_dense()
    b = HessianOperator(
        model, (x, y), nn.CrossEntropyLoss(), method="forward_over_reverse"
    ).to_dense()
    assert rel_err(a, b) < 1e-10


def test_errors_say_what_and_how() -> None:
    case = make_case("tanh-mse")
    m, b, lf = case.model, case.batch, case.loss_fn
    with pytest.raises(GradsightError, match=r"module 'nope'.*named_modules"):
        HessianOperator(m, b, lf, params="nope")
    with pytest.raises(GradsightError, match="not a submodule"):
        HessianOperator(m, b, lf, params=nn.Linear(2, 2))
    with pytest.raises(GradsightError, match="without trainable parameters"):
        HessianOperator(m, b, lf, params="1")
    with pytest.raises(GradsightError, match="not a trainable parameter"):
        HessianOperator(m, b, lf, params=[torch.zeros(3, requires_grad=True)])
    op = HessianOperator(m, b, lf)
    with pytest.raises(GradsightError, match=rf"parameter count {op.shape[0]}"):
        op @ torch.zeros(op.shape[0] + 1, dtype=torch.float64)
    with pytest.raises(GradsightError, match="batch must be a pair"):
        HessianOperator(m, b[0], lf)
    with pytest.raises(GradsightError, match="kind must be"):
        curv.trace(m, b, lf, kind="fisher")  # type: ignore[arg-type]

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3).double()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), self.fc(x)

    with pytest.raises(GradsightError, match="one tensor"):
        GGNOperator(TwoHeads(), b, lambda o, t: lf(o[0], t))


def test_unused_parameter_has_zero_curvature() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Partial().double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, batch, nn.MSELoss(), params="unused")
        assert torch.equal(op.to_dense(), torch.zeros(8, 8, dtype=torch.float64))
        full = cls(model, batch, nn.MSELoss()).to_dense()
        assert torch.equal(full[8:, 8:], torch.zeros(8, 8, dtype=torch.float64))
