"""Blockwise GGN estimates against the exact per-block GGN (dense, float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradsight import GradsightError
from gradsight.curvature import GGNOperator
from gradsight.curvature._factor import output_factor
from gradsight.curvature.blockwise import BlockwiseGGN
from gradsight.diagnosis.headroom import layer_curvature

ce = nn.functional.cross_entropy
DAMPING = 1e-3


def _exact(model, batch, loss_fn, name):  # type: ignore[no-untyped-def]
    op = GGNOperator(model, batch, loss_fn, params=name)
    G, g = op.to_dense(), op.gradient
    lam = float(torch.linalg.eigvalsh(G)[-1])
    gg, gag = float(g @ g), float(g @ G @ g)
    dec = 0.5 * gg * gg / (gag + DAMPING * lam * gg)
    return {"lam": lam, "alpha": gg / gag, "dec": dec, "trace": float(G.trace())}


class _Seq(nn.Module):
    """Embedding, LayerNorm and linear layers over 7 positions that mix (a cumsum)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.ln = nn.LayerNorm(6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(x))
        h = h + torch.tanh(self.mid(h)).cumsum(1) / 5
        return self.head(h).transpose(1, 2)


class _Positions(nn.Module):
    """Token and position embeddings; the positions' ids have no batch dim (as GPT-2's)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(x.shape[1]).unsqueeze(0)  # (1, T)
        h = torch.tanh(self.tok(x) + self.pos(ids))
        return self.head(h.mean(1))


class _Convs(nn.Module):
    """Strided, dilated and padded 1-D and 3-D convolutions (patches by strided slices)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=1)  # (n, 2, 8) -> (n, 3, 3)
        self.c3 = nn.Conv3d(1, 2, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1))
        self.head = nn.Linear(9 + 18, 4)  # c3: (n, 1, 2, 4, 2) -> (n, 2, 3, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.c1(x)).flatten(1)
        b = torch.tanh(self.c3(x.reshape(-1, 1, 2, 4, 2))).flatten(1)
        return self.head(torch.cat([a, b], dim=1))


class _Grouped(nn.Module):
    """A depthwise convolution (groups = channels) and a grouped, strided one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.grouped(torch.tanh(self.depthwise(x))))
        return self.head(h.mean(dim=(2, 3)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _cases():  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    yr = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.GroupNorm(1, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 16, 4),
    ).double()
    xc = torch.randn(32, 2, 4, 4, generator=gen, dtype=torch.float64)
    yc = torch.randint(0, 4, (32,), generator=gen)
    torch.manual_seed(2)
    xs = torch.randint(0, 11, (24, 7), generator=gen)
    ys = torch.randint(0, 3, (24,), generator=gen)
    xv = torch.randn(24, 2, 8, generator=gen, dtype=torch.float64)
    yv = torch.randint(0, 4, (24,), generator=gen)
    # BitFit: frozen weights, trained biases (the convolution's and the head's).
    bitfit = copy.deepcopy(cnn)
    bitfit[0].weight.requires_grad_(False)
    bitfit[4].weight.requires_grad_(False)
    torch.manual_seed(3)
    bitfit_convs = _Convs().double()
    for m in (bitfit_convs.c1, bitfit_convs.c3, bitfit_convs.head):
        m.weight.requires_grad_(False)
    torch.manual_seed(4)
    xg = torch.randn(16, 4, 5, 5, generator=gen, dtype=torch.float64)
    return {
        "grouped-convs": (_Grouped().double(), (xg, yc[:16] % 3), ce),
        "bitfit-cnn": (bitfit, (xc, yc), ce),
        "bitfit-convs": (bitfit_convs, (xv, yv), ce),
        "positions": (_Positions().double(), (xs, ys), ce),
        "convs": (_Convs().double(), (xv, yv), ce),
        "mlp-ce": (_mlp(), (x, y), ce),
        "mlp-scaled-ce": (_mlp(), (x, y), lambda o, t: 2.5 * ce(o, t)),
        "mlp-scaled-mse": (_mlp(), (x, yr), lambda o, t: 3 * nn.functional.mse_loss(o, t)),
        "cnn-groupnorm": (cnn, (xc, yc), ce),
    }


@pytest.mark.parametrize(
    "key",
    [
        "mlp-ce",
        "mlp-scaled-ce",
        "mlp-scaled-mse",
        "cnn-groupnorm",
        "positions",
        "convs",
        "bitfit-cnn",
        "bitfit-convs",
        "grouped-convs",
    ],
)
def test_exact_columns_match_the_exact_block_ggn(key: str) -> None:
    model, batch, loss_fn = _cases()[key]
    eng = BlockwiseGGN(model, batch, loss_fn)
    assert eng.exact and not eng.skipped
    for name in eng.blocks:
        est, ref = eng.estimate(name, DAMPING), _exact(model, batch, loss_fn, name)
        assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9)
        assert est.alpha_star == pytest.approx(ref["alpha"], rel=1e-9)
        assert est.decrement == pytest.approx(ref["dec"], rel=1e-9)
        assert est.trace == pytest.approx(ref["trace"], rel=1e-9)
        assert est.lambda_max_err == est.alpha_star_err == est.decrement_err == 0.0


def test_whole_model_values_include_cross_layer_terms() -> None:
    model, batch, loss_fn = _cases()["mlp-ce"]
    est = BlockwiseGGN(model, batch, loss_fn).whole(DAMPING)
    ref = _exact(model, batch, loss_fn, None)
    assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9)
    assert est.alpha_star == pytest.approx(ref["alpha"], rel=1e-9)


def test_sampled_estimates_lie_within_their_error_bars() -> None:
    """Monte Carlo rows (sequence outputs: positions of a sample interact) over seeds:
    the exact value lies within 3 standard errors in nearly every case, and the error
    bars are not vacuous (below the value itself)."""
    torch.manual_seed(0)
    model = _Seq().double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (32, 7), generator=gen)
    batch = (ids, torch.randint(0, 11, (32, 7), generator=gen))
    refs = {n: _exact(model, batch, ce, n) for n in ("emb", "ln", "mid", "head")}
    inside = total = 0
    for seed in range(4):
        eng = BlockwiseGGN(model, batch, ce, draws=4, seed=seed)
        assert not eng.exact
        for name, ref in refs.items():
            est = eng.estimate(name, DAMPING)
            for value, err, exact in (
                (est.lambda_max, est.lambda_max_err, ref["lam"]),
                (est.alpha_star, est.alpha_star_err, ref["alpha"]),
                (est.decrement, est.decrement_err, ref["dec"]),
                (est.trace, est.trace_err, ref["trace"]),
            ):
                assert 0 < err < abs(value)
                inside += abs(value - exact) <= 3 * err
                total += 1
    assert inside >= 0.9 * total


def test_sampled_factor_has_the_output_hessian_as_covariance() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    targets = torch.tensor([0, 2, 1])
    factor = output_factor(ce, logits, targets)
    assert factor is not None
    draws = factor.draws(40000, gen).reshape(40000, -1)
    cov = draws.T @ draws / draws.shape[0]
    H = torch.autograd.functional.hessian(lambda z: ce(z, targets), logits).reshape(12, 12)
    assert torch.allclose(cov, H, atol=4e-3)
    cols = factor.exact_columns().reshape(3, -1)  # rank C − 1 = 3: three columns
    # exact columns: Σ_c of each sample's part, outer with itself, is H
    assert torch.allclose(_blockdiag(cols, 3, 4), H, atol=1e-12)


def _blockdiag(cols: torch.Tensor, n: int, c: int) -> torch.Tensor:
    out = torch.zeros(n * c, n * c, dtype=cols.dtype)
    for col in cols:
        for i in range(n):
            v = torch.zeros(n * c, dtype=cols.dtype)
            v[i * c : (i + 1) * c] = col[i * c : (i + 1) * c]
            out += torch.outer(v, v)
    return out


def test_unsupported_layers_are_reported_and_refined_exactly() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, nn.GRU(4, 4, batch_first=True), _First(), head).double()
    x = torch.randint(0, 5, (16, 2))
    batch = (x, torch.randint(0, 5, (16, 2)))
    loss = lambda o, t: ce(o.transpose(1, 2), t)  # noqa: E731
    eng = BlockwiseGGN(model, batch, loss)
    assert set(eng.skipped) == {"1"} and "GRU" in eng.skipped["1"]
    blocks, _ = layer_curvature(model, batch, loss, ["1"], budget=math.inf)
    ref = _exact(model, batch, loss, "1")
    assert blocks["1"].lambda_max == pytest.approx(ref["lam"], rel=2e-2)
    assert blocks["1"].exact


class _First(nn.Module):
    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return x[0]


def test_unknown_output_hessian_is_a_clear_error() -> None:
    model, (x, _), _ = _cases()["mlp-ce"]
    with pytest.raises(GradsightError, match="no known factor"):
        BlockwiseGGN(model, (x, None), lambda o, t: o.sum() ** 2)  # couples all samples


def test_monitor_tier_blockwise_rows_match_its_exact_rows() -> None:
    from gradsight.monitor._curvature import CurvatureTier

    model, batch, loss_fn = _cases()["mlp-ce"]
    fast = dict_rows(CurvatureTier(model, ["0", "2"]), batch, loss_fn)  # the engine: default
    slow = dict_rows(CurvatureTier(model, ["0", "2"], probes=400, blockwise=False), batch, loss_fn)
    assert fast[("0", "lambda_max_err")] == 0.0  # exact columns: 3 classes
    assert ("0", "lambda_max_err") not in slow  # the per-block fallback has no error bars
    for key in ("lambda_max", "alpha_star", "headroom", "trace", "step_ratio"):
        for layer in ("0", "2"):
            assert fast[(layer, key)] == pytest.approx(slow[(layer, key)], rel=2e-2), key


def dict_rows(tier, batch, loss_fn):  # type: ignore[no-untyped-def]
    return {(layer, m): v for layer, m, v in tier.measure(batch, loss_fn, lr=0.1)}


def test_tied_embedding_and_output_weights_are_one_exact_block() -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), head).double()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 5, (40,), generator=gen), torch.randint(0, 5, (40,), generator=gen))
    eng = BlockwiseGGN(model, batch, ce)
    assert eng.exact and not eng.skipped
    ref = _exact(model, batch, ce, "0")  # the block: the one tied weight, both uses
    for name in ("0", "4"):
        est = eng.estimate(name, DAMPING)
        assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9)
        assert est.alpha_star == pytest.approx(ref["alpha"], rel=1e-9)
        assert est.trace == pytest.approx(ref["trace"], rel=1e-9)


@pytest.mark.parametrize("samples,draws", [(4, 2), (4, 1), (32, 4)])
def test_lambda_max_error_bar_covers_the_exact_value_with_few_rows(samples, draws) -> None:  # type: ignore[no-untyped-def]
    """With few rows next to the GGN's rank, λmax of the sampled GGN fits the noise
    (an upper estimate) and the cross-validated direction undershoots (a lower one):
    the exact value lies in the bracket, within two error bars of the reported middle
    (three where the jackknife's error is the larger, as at 32 samples)."""
    torch.manual_seed(0)
    model = _Seq().double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (samples, 7), generator=gen)
    batch = (ids, torch.randint(0, 11, (samples, 7), generator=gen))
    for seed in range(3):
        eng = BlockwiseGGN(model, batch, ce, draws=draws, seed=seed)
        for name in ("emb", "ln", "mid", "head"):
            est, ref = eng.estimate(name, DAMPING), _exact(model, batch, ce, name)
            assert abs(est.lambda_max - ref["lam"]) <= 3 * est.lambda_max_err, (name, seed)
            if samples >= 32:  # enough rows: the bracket is informative
                assert est.lambda_max_err < est.lambda_max


def test_batched_top_eigenpairs_match_eigh_including_clustered_spectra() -> None:
    """Subspace iteration on a stack of Gram matrices: each λmax to the residual bound
    (tol²·λ/gap), each vector up to sign; a top eigenvalue repeated 12 times (more than
    the block of 8 vectors) does not converge in the vector and is decided by eigh."""
    from gradsight.curvature.blockwise import _top_batched

    gen = torch.Generator().manual_seed(0)
    R = 96
    Q, _ = torch.linalg.qr(torch.randn(R, R, generator=gen, dtype=torch.float64))
    spectra = [
        torch.logspace(0, -6, R, dtype=torch.float64),  # a clear top
        torch.cat([torch.tensor([1.0, 0.97]), torch.logspace(-1, -6, R - 2)]).double(),
        torch.cat([torch.ones(12), torch.logspace(-1, -6, R - 12)]).double(),  # cluster
        torch.zeros(R, dtype=torch.float64),  # no curvature at all
    ]
    K = torch.stack([(Q * s) @ Q.T for s in spectra])
    lam, vec = _top_batched(K, 1e-7)
    vals, vecs = torch.linalg.eigh(K)
    assert torch.allclose(lam, vals[:, -1], rtol=1e-10, atol=1e-12)
    for b in range(2):  # distinct tops: the eigenvector itself
        assert abs(float(vec[b] @ vecs[b, :, -1])) == pytest.approx(1.0, abs=1e-8)
    # Cluster: any unit vector of the top eigenspace is an answer.
    assert float(vec[2] @ K[2] @ vec[2]) == pytest.approx(1.0, rel=1e-10)
    assert float(vec[2] @ vec[2]) == pytest.approx(1.0, rel=1e-10)


def test_public_functions_share_the_engine() -> None:
    """gradsight.curvature's per-block functions with method="blockwise" and
    layer_estimates give the engine's numbers: here exact, so those of the dense GGN."""
    import gradsight.curvature as gc

    model, batch, loss_fn = _cases()["cnn-groupnorm"]
    ests = gc.layer_estimates(model, batch, loss_fn)
    assert list(ests) == ["0", "1", "4", ""]
    whole = _exact(model, batch, loss_fn, None)
    assert ests[""].lambda_max == pytest.approx(whole["lam"], rel=1e-9)
    for name in ("0", "4"):
        ref = _exact(model, batch, loss_fn, name)
        assert ests[name].lambda_max == pytest.approx(ref["lam"], rel=1e-9)
        lam = gc.top_eigenvalues(model, batch, loss_fn, params=name, kind="ggn", method="blockwise")
        assert float(lam[0]) == pytest.approx(ref["lam"], rel=1e-9)
        tr = gc.trace(
            model, batch, loss_fn, params=model[int(name)], kind="ggn", method="blockwise"
        )
        assert tr.estimate == pytest.approx(ref["trace"], rel=1e-9) and tr.stderr == 0.0
        step = gc.optimal_step(model, batch, loss_fn, params=name, kind="ggn", method="blockwise")
        assert step.alpha == pytest.approx(ref["alpha"], rel=1e-9)
        lanczos_step = gc.optimal_step(model, batch, loss_fn, params=name, kind="ggn")
        assert step.decrease == pytest.approx(lanczos_step.decrease, rel=1e-9)
    with pytest.raises(GradsightError, match="kind='ggn'"):
        gc.top_eigenvalues(model, batch, loss_fn, params="0", method="blockwise")
    with pytest.raises(GradsightError, match="submodules with parameters"):
        gc.trace(model, batch, loss_fn, params="", kind="ggn", method="blockwise")
    with pytest.raises(GradsightError, match="k=2"):
        gc.top_eigenvalues(model, batch, loss_fn, k=2, params="0", kind="ggn", method="blockwise")


@pytest.mark.parametrize("path", ["grouped", "patches"])
@pytest.mark.parametrize("key", ["convs", "cnn-groupnorm"])
def test_convolution_rows_both_ways_match_the_dense_ggn(
    key: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A convolution's rows as per-sample weight gradients of one grouped convolution
    (large layers), or from patches (strided slices) in chunks of output channels
    (small layers, and rows beyond CHUNK): the exact values of the dense GGN both ways."""
    from gradsight.curvature import _rows

    if path == "grouped":
        monkeypatch.setattr(_rows, "GROUPED_WORK", 0)
    else:
        monkeypatch.setattr(_rows, "CHUNK", 64)  # chunks of one output channel
    grouped = _rows._ConvRows
    built: list[object] = []

    def spy(*args: object) -> object:
        built.append(args)
        return grouped(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_rows, "_ConvRows", spy)
    model, batch, loss_fn = _cases()[key]
    eng = BlockwiseGGN(model, batch, loss_fn)
    assert bool(built) == (path == "grouped") and eng.exact and not eng.skipped
    for name in eng.blocks:
        est, ref = eng.estimate(name, DAMPING), _exact(model, batch, loss_fn, name)
        assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9)
        assert est.alpha_star == pytest.approx(ref["alpha"], rel=1e-9)
        assert est.trace == pytest.approx(ref["trace"], rel=1e-9)


def test_position_embedding_written_in_place_is_measured_without_the_expansion() -> None:
    """A model that writes to the position embedding's output in place cannot take the
    expanded output (one memory location for every sample): the engine measures again
    without the expansion; the position embedding is then reported as not covered, the
    other layers keep their exact values."""

    class InPlace(_Positions):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.pos(torch.arange(x.shape[1]).unsqueeze(0))
            p.mul_(2.0)
            return self.head(torch.tanh(self.tok(x) + p).mean(1))

    torch.manual_seed(0)
    model = InPlace().double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (24, 7), generator=gen)
    batch = (ids, torch.randint(0, 3, (24,), generator=gen))
    eng = BlockwiseGGN(model, batch, ce)
    assert eng.exact and set(eng.blocks) == {"tok", "head"}
    assert "batch" in eng.skipped["pos"]
    for name in ("tok", "head"):
        est, ref = eng.estimate(name, DAMPING), _exact(model, batch, ce, name)
        assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9)
        assert est.alpha_star == pytest.approx(ref["alpha"], rel=1e-9)


def test_monitor_tier_falls_back_to_per_block_products_for_uncovered_layers() -> None:
    """A recurrent layer has no rows in the engine: the Monitor's tier measures it by its
    own GGN-vector products, the covered layer from the engine, in one call."""
    from gradsight.monitor._curvature import CurvatureTier

    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Rnn().double()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,)))
    rows = dict_rows(CurvatureTier(model, ["rnn", "head"]), batch, ce)
    assert ("head", "lambda_max_err") in rows and ("rnn", "lambda_max_err") not in rows
    for layer in ("rnn", "head"):
        ref = _exact(model, batch, ce, layer)
        assert rows[(layer, "lambda_max")] == pytest.approx(ref["lam"], rel=2e-2)
        assert rows[(layer, "alpha_star")] == pytest.approx(ref["alpha"], rel=1e-6)


class _MaskPositions(nn.Embedding):
    """OPT's learned position embedding: called on the attention mask, it derives the
    position ids itself (here the mask is all ones, as long integers: a plain embedding
    read off the module's input would look up row 1 at every position)."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward((torch.cumsum(mask, dim=1) - 1).long() + 2)


class _Doubled(nn.Linear):
    """A linear layer whose forward is not the plain one (as a LoRA or scaled layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class _Overridden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = _MaskPositions(9, 6)
        self.mid = _Doubled(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.ones_like(x))
        return self.head(torch.tanh(self.mid(torch.tanh(h))).mean(1))


def test_subclasses_that_override_forward_are_refined_exactly_not_misread() -> None:
    """A subclass of a known layer type with a forward of its own is not given the plain
    type's rows (which would be silently wrong: OPT's position embedding's input is the
    mask, not the ids); it is reported as such and its block is measured exactly."""
    torch.manual_seed(0)
    model = _Overridden().double()
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, 11, (24, 7), generator=gen),
        torch.randint(0, 3, (24,), generator=gen),
    )
    eng = BlockwiseGGN(model, batch, ce)
    assert set(eng.skipped) == {"pos", "mid"}
    assert "overrides the forward of Embedding" in eng.skipped["pos"]
    assert "overrides the forward of Linear" in eng.skipped["mid"]
    names = ["tok", "pos", "mid", "head"]
    blocks, _ = layer_curvature(model, batch, ce, names, budget=math.inf)
    for name in names:
        ref = _exact(model, batch, ce, name)
        assert blocks[name].lambda_max == pytest.approx(ref["lam"], rel=2e-2), name


class _SameLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass whose forward is its own but computes the same function
    (as transformers' channels-last ConvNeXt LayerNorm): it keeps its rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


class _ChannelsFirst(nn.LayerNorm):
    """transformers' channels-first ConvNeXt LayerNorm: normalizes dim 1 of (N, C, L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.first = _ChannelsFirst(4)
        self.same = _SameLayerNorm(5)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(self.conv(x)))  # (n, 4, 5)
        return self.head(torch.tanh(self.same(h)).flatten(1))


def test_subclasses_that_compute_the_plain_function_keep_their_rows() -> None:
    """An overriding forward is checked on its call: where the plain type's forward gives
    the same output the rows are the plain type's (exact, against the dense GGN); where
    it does not (a channels-first LayerNorm) the layer is measured exactly instead."""
    torch.manual_seed(0)
    model = _Norms().double()
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(16, 3, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=gen),
    )
    eng = BlockwiseGGN(model, batch, ce)
    assert set(eng.skipped) == {"first"} and "computes something else" in eng.skipped["first"]
    assert "same" in eng.blocks
    for name in ("same", "conv", "head"):
        est, ref = eng.estimate(name, DAMPING), _exact(model, batch, ce, name)
        assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9), name
    blocks, _ = layer_curvature(model, batch, ce, ["first"], budget=math.inf)
    assert blocks["first"].lambda_max == pytest.approx(
        _exact(model, batch, ce, "first")["lam"], rel=2e-2
    )


class LlamaLikeRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, as written there (float32 inside, w ⊙ x̂)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class GemmaLikeRMSNorm(LlamaLikeRMSNorm):
    """Gemma's: (1 + w) ⊙ x̂, another function of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return (1.0 + self.weight) * (x * torch.rsqrt(variance + self.variance_epsilon))


class _RMSNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.torch_rms = nn.RMSNorm(6)
        self.llama = LlamaLikeRMSNorm(6)
        self.gemma = GemmaLikeRMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.torch_rms(self.emb(x)))
        h = torch.tanh(self.llama(h + 0.3))
        return self.head(self.gemma(h).mean(1))


def test_rms_norms_get_exact_rows_unless_they_compute_something_else() -> None:
    """nn.RMSNorm and a Llama-style RMSNorm (another library's module, checked on its
    call) get RMS normalization rows, equal to the dense GGN; Gemma's (1 + w) variant
    does not compute w ⊙ x̂ and is measured exactly instead."""
    torch.manual_seed(0)
    model = _RMSNorms().double()
    with torch.no_grad():
        for norm in (model.torch_rms, model.llama, model.gemma):
            norm.weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, 11, (24, 7), generator=gen),
        torch.randint(0, 3, (24,), generator=gen),
    )
    eng = BlockwiseGGN(model, batch, ce)
    assert set(eng.skipped) == {"gemma"} and "computes something else" in eng.skipped["gemma"]
    for name in ("torch_rms", "llama", "emb", "head"):
        est, ref = eng.estimate(name, DAMPING), _exact(model, batch, ce, name)
        assert est.lambda_max == pytest.approx(ref["lam"], rel=1e-9), name
        assert est.trace == pytest.approx(ref["trace"], rel=1e-9), name


def test_layers_the_budget_leaves_out_still_get_their_curvature_along_the_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layer the engine does not cover and the time budget leaves unrefined gets α* and
    the decrement along its gradient from one GGN product (no λmax), so its verdict never
    rests on the size of its gradient nor on the machine's load; equal to the full
    refinement's to the damping's difference."""
    import gradsight.diagnosis.headroom as headroom

    model, batch, loss = _gru_case()
    monkeypatch.setattr(headroom, "MIN_SECONDS", 0.0)
    blocks, _ = layer_curvature(model, batch, loss, ["1", "3"], budget=1e-9)
    full, _ = layer_curvature(model, batch, loss, ["1"], budget=math.inf)
    assert blocks["1"].lambda_max is None and full["1"].lambda_max is not None
    assert blocks["1"].alpha_star == pytest.approx(full["1"].alpha_star, rel=1e-9)
    assert blocks["1"].headroom == pytest.approx(full["1"].headroom, rel=1e-3)
    assert blocks["3"].lambda_max is not None  # covered by the engine: as before
    none, _ = layer_curvature(model, batch, loss, ["1", "3"], budget=0)
    assert "1" not in none  # budget 0: no products beyond the one pass


def _gru_case():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 4), nn.GRU(4, 4, batch_first=True), _First(), nn.Linear(4, 5)
    ).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (16, 3), generator=gen)
    batch = (x, torch.randint(0, 5, (16, 3), generator=gen))
    return model, batch, lambda o, t: ce(o.transpose(1, 2), t)


class _LoRALinear(nn.Linear):
    """A LoRA adapter as written for fine-tuning: frozen weight, trained A and B, B zero
    at the start, so that its output equals the plain linear's (its forward check
    passes), while its trained parameters are not a weight and a bias."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__(n_in, n_out)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


def test_a_lora_layer_is_measured_exactly_not_read_as_a_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _LoRALinear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(32, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (32,), generator=gen),
    )
    eng = BlockwiseGGN(model, batch, ce)
    assert "lora_a, lora_b" in eng.skipped["2"]
    blocks, _ = layer_curvature(model, batch, ce, ["2"], budget=math.inf)
    ref = _exact(model, batch, ce, "2")
    assert blocks["2"].lambda_max == pytest.approx(ref["lam"], rel=2e-2)


def test_a_slow_first_engine_pass_does_not_starve_the_refinements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first blockwise pass in a process pays one-time setup (~0.3 s measured), which
    made the budget's unit look large and left the first diagnosis without exact
    refinements that later ones get; the caller's timed forward and backward pass is the
    unit instead. That pass, a process's first, is itself cold (a T5's: 27 ms, then 9 ms
    warm): where the cold unit leaves a refinement out that a unit up to 5 times smaller
    would fit, one pass is timed again, warm, and the refinement runs. Where even that
    could not fit one (a large model), nothing is timed again, and the budget binds."""
    import time

    import gradsight.diagnosis.headroom as headroom

    class SlowFirst(BlockwiseGGN):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            time.sleep(0.5)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(headroom, "BlockwiseGGN", SlowFirst)
    model, batch, loss = _gru_case()
    timed = []
    real = headroom._warm_pass_seconds

    def warm(*args):  # type: ignore[no-untyped-def]
        timed.append(real(*args))
        return timed[-1]

    monkeypatch.setattr(headroom, "_warm_pass_seconds", warm)
    starved, _ = layer_curvature(model, batch, loss, ["1"])
    assert starved["1"].lambda_max is None and timed == []  # 90 × ≥ 0.125 s: past 5 × 2 s
    quick, _ = layer_curvature(model, batch, loss, ["1"], pass_seconds=0.002)
    assert quick["1"].lambda_max is not None and timed == []
    cold, _ = layer_curvature(model, batch, loss, ["1"], pass_seconds=0.04)
    assert cold["1"].lambda_max is not None and len(timed) == 1 and timed[0] < 0.04
    monkeypatch.setattr(headroom, "_warm_pass_seconds", lambda *args: 0.05)
    slow, _ = layer_curvature(model, batch, loss, ["1"], pass_seconds=0.04)
    assert slow["1"].lambda_max is None  # warm too, 90 passes of 40 ms: past the 2 s floor


def test_output_hessian_blocks_are_factored_even_where_eigh_fails(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A saturated softmax (weights ×100) gives nearly singular output-Hessian blocks on
    which float32 ``eigh`` fails to converge, and the whole curvature was dropped. The
    blocks are factored in float64, with a tiny shift where even that fails: L Lᵀ is the
    block's positive part either way."""
    from gradsight.curvature import _factor

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, 4, generator=gen, dtype=torch.float64)
    H = (a @ a.transpose(-1, -2)).float()
    H[0] = 0.0  # a fully saturated position
    L = _factor._psd_root(H)
    assert L.dtype == torch.float32
    torch.testing.assert_close(L @ L.transpose(-1, -2), H, atol=1e-4, rtol=1e-4)
    real_eigh = torch.linalg.eigh
    calls = []

    def failing_once(m: torch.Tensor):  # type: ignore[no-untyped-def]
        calls.append(m.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", failing_once)
    L2 = _factor._psd_root(H)
    assert calls == [torch.float64, torch.float64]
    torch.testing.assert_close(L2 @ L2.transpose(-1, -2), H, atol=1e-4, rtol=1e-4)
