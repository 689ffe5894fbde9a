"""diagnose() on the models people actually have: containers, attention, recurrence, ..."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsight
from gradsight import GradsightError

ce = nn.functional.cross_entropy


def _unchanged(model: nn.Module, run) -> gradsight.Diagnosis:  # type: ignore[no-untyped-def]
    """Run ``run()`` and check the model and RNG come back bitwise unchanged."""
    state = copy.deepcopy(model.state_dict())
    slots = list(model.named_parameters(remove_duplicate=False))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    mode = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    d = run()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # The same Parameter objects in every slot (shared modules, tied weights included).
    after = list(model.named_parameters(remove_duplicate=False))
    assert [n for n, _ in after] == [n for n, _ in slots]
    assert all(a is b for (_, a), (_, b) in zip(after, slots, strict=True))
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == mode
    assert torch.equal(torch.get_rng_state(), rng)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0
    for layer in d.layers:
        assert layer.status in gradsight.STATUSES
    return d


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU())
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x) * mask
        return self.head(h), self.aux(h).squeeze(-1)


def test_dict_inputs_and_tuple_outputs() -> None:
    model = _DictModel()
    inputs = {"x": torch.randn(32, 6), "mask": torch.ones(32, 1)}
    targets = (torch.randint(0, 3, (32,)), torch.randn(32))

    def loss_fn(
        out: tuple[torch.Tensor, torch.Tensor], t: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        return ce(out[0], t[0]) + nn.functional.mse_loss(out[1], t[1])

    d = _unchanged(model, lambda: gradsight.diagnose(model, (inputs, targets), loss_fn))
    assert [la.name for la in d.layers] == ["body.0", "body.2", "head", "aux"]
    assert d.layer("body.0").activation == "gelu" and d.layer("body.2").activation == "silu"
    # A tuple of heads gets one constant per head: the labels' entropy plus the variance.
    y, r = targets
    freq = torch.bincount(y, minlength=3).double() / len(y)
    in_sample = float(-(freq[freq > 0] * freq[freq > 0].log()).sum()) + float(r.var(False))
    assert d.baseline_loss is not None and in_sample - 1e-4 <= d.baseline_loss < 1.3 * in_sample
    # Curvature sees the tuple as one tensor: every layer gets its Gauss-Newton numbers.
    assert all(la.lambda_max is not None for la in d.layers)


class _SeqModel(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.rnn = cell(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_embedding_and_recurrent_layers(cell: type[nn.RNNBase]) -> None:
    model = _SeqModel(cell)
    batch = (torch.randint(0, 50, (16, 12)), torch.randint(0, 4, (16,)))
    d = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
    assert [la.name for la in d.layers] == ["emb", "rnn", "head"]
    assert d.layer("emb").signal_norm is not None and d.layer("emb").signal_norm > 0
    assert d.layer("rnn").grad_norm is not None and d.layer("rnn").grad_norm > 0


@pytest.mark.parametrize("train", [True, False])
def test_transformer_block_with_attention_layernorm_dropout(train: bool) -> None:
    model = nn.Sequential(
        nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True),
        nn.Flatten(),
        nn.Linear(16 * 5, 3),
    )
    model.train(train)
    batch = (torch.randn(8, 5, 16), torch.randint(0, 3, (8,)))
    d1 = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
    d2 = gradsight.diagnose(model, batch, ce)
    assert d1.to_dict() == d2.to_dict()  # reproducible despite dropout
    names = [la.name for la in d1.layers]
    for name in ("0.self_attn", "0.self_attn.out_proj", "0.linear1", "0.norm1", "2"):
        assert name in names
    assert d1.layer("0.self_attn").signal_norm is not None


def test_batchnorm_in_eval_and_train_mode_keeps_running_statistics() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )
    batch = (torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))
    for train in (True, False):
        model.train(train)
        d = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
        assert d.layer("1").activation == "relu"  # the ReLU follows the BatchNorm


def test_torch_compiled_model_is_diagnosed_through_its_eager_module() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="eager")
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    eager = gradsight.diagnose(model, batch, ce)
    d = gradsight.diagnose(compiled, batch, ce)
    assert [la.name for la in d.layers] == ["0", "2"]
    assert d.layer("_orig_mod.0").name == "0"
    assert d.to_dict() == eager.to_dict()


def test_frozen_and_shared_layers() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(8, 2))
    model[0].requires_grad_(False)
    batch = (torch.randn(32, 4), torch.randint(0, 2, (32,)))
    d = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
    assert [la.name for la in d.layers] == ["0", "2", "5"]
    assert d.layer("0").grad_norm is None and "frozen" in d.layer("0").reason


def test_inputs_of_the_wrong_dtype_get_a_fix() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(
        GradsightError, match=r"inputs are torch\.float64.*inputs\.to\(torch\.float32\)"
    ):
        gradsight.diagnose(
            model,
            (torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 2)),
            nn.functional.mse_loss,
        )
    with pytest.raises(GradsightError, match=r"torch\.int64 \(integers\).*embedding"):
        gradsight.diagnose(
            model, (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, 2)), nn.functional.mse_loss
        )


def test_integer_loss_is_rejected() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(GradsightError, match=r"scalar|floating-point"):
        gradsight.diagnose(model, (torch.randn(4, 3), None), lambda o, t: o.sum().long())


class _Fault(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "log":
            return torch.log(x - 10.0)  # log of a negative
        if self.kind == "div":
            return x / (x - x)  # division by zero
        return torch.exp(x * 1e3)  # overflow


@pytest.mark.parametrize("kind", ["log", "div", "exp"])
@pytest.mark.parametrize("where", [1, 3])
def test_nonfinite_origin_names_the_planted_fault(kind: str, where: int) -> None:
    layers: list[nn.Module] = [
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 2),
    ]
    layers.insert(where, _Fault(kind))
    model = nn.Sequential(*layers)
    if kind == "exp":
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.bias.fill_(5.0)
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    d = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
    assert d.status == "nonfinite"
    assert d.nonfinite_origin == str(where)
    assert str(where) in d.summary


class _ScanBlock(nn.Module):
    """Submodules around code of its own that makes the NaN (as Mamba's mixer computes
    its selective scan between in_proj and out_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)
        return self.out_proj(torch.log(h - 10.0))  # NaN, made here: not in a submodule


def test_nonfinite_origin_is_the_module_whose_own_code_makes_it() -> None:
    """The first module with a NaN output (out_proj) got it in its input, made by the
    code of the block around it: the origin is the block, and the summary says so (it
    used to send the user to out_proj's weights). NaN in the batch itself is said as
    such."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _ScanBlock(), nn.Linear(4, 2))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    d = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
    assert d.status == "nonfinite" and d.nonfinite_origin == "1"
    assert "it starts at module '1', in its own code between its submodules" in d.summary
    assert "the input it passes to '1.out_proj' already holds NaN/Inf" in d.summary
    x = batch[0].clone()
    x[0, 0] = float("nan")
    d = _unchanged(model, lambda: gradsight.diagnose(model, (x, batch[1]), ce))
    assert d.status == "nonfinite" and d.nonfinite_origin == "0"
    assert "it is in the model's inputs already (the first module to get it is '0')" in d.summary


def test_recurrent_layer_records_the_signal_through_time() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        rnn = nn.RNN(3, 8, batch_first=True)
        with torch.no_grad():
            rnn.weight_hh_l0.mul_(0.2)  # a contracting recurrence
        head = nn.Linear(8, 2)

        class LastStep(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn, self.head = rnn, head

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.rnn(x)[0][:, -1])

        model = LastStep()
        x, y = torch.randn(4, 10, 3), torch.randint(0, 2, (4,))
        d = _unchanged(model, lambda: gradsight.diagnose(model, (x, y), ce))
        # Reference: the gradient of the loss with respect to each input step.
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(ce(model(xr), y), xr)
    finally:
        torch.set_default_dtype(torch.float32)
    expected = gx.pow(2).sum(dim=(0, 2)).sqrt()
    steps = d.layer("rnn").time_signal_norms
    assert steps is not None and len(steps) == 10
    assert torch.allclose(torch.tensor(steps, dtype=torch.float64), expected, rtol=1e-10)
    assert steps[0] < 1e-2 * steps[-1]
    assert "Through time the signal fades" in d.layer("rnn").reason


def test_opt_position_embedding_called_on_the_mask_gets_exact_curvature() -> None:
    """transformers' OPT (from a config, nothing downloaded): its learned position
    embedding, an nn.Embedding subclass called on the attention mask, crashed the
    diagnosis (the mask read as ids). It is now measured by exact block products, next to
    every other layer, and the model is left as it was."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=32,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        word_embed_proj_dim=16,
        dropout=0.0,
    )
    model = OPTForCausalLM(config)
    ids = torch.randint(0, 32, (4, 8))

    def loss_fn(out, t):  # type: ignore[no-untyped-def]
        return ce(out.logits[:, :-1].reshape(-1, 32), t[:, 1:].reshape(-1))

    d = _unchanged(model, lambda: gradsight.diagnose(model, ({"input_ids": ids}, ids), loss_fn))
    assert "Curvature was not measured" not in d.summary
    positions = d.layer("model.decoder.embed_positions")
    assert positions.lambda_max is not None and positions.lambda_max > 0
    assert all(layer.lambda_max is not None for layer in d.layers if layer.status != "frozen")


def test_a_curvature_failure_of_any_kind_leaves_the_signal_verdicts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Curvature is a refinement: whatever it raises on an unforeseen model, the diagnosis
    stands on signal flow and says why curvature is missing."""
    import sys

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise IndexError("tensors used as indices must be long")

    monkeypatch.setattr(sys.modules["gradsight.diagnosis.diagnose"], "layer_curvature", broken)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    d = gradsight.diagnose(model, (torch.randn(32, 4), torch.randint(0, 3, (32,))), ce)
    assert [layer.name for layer in d.layers] == ["0", "2"]
    assert "Curvature was not measured (IndexError: tensors used as indices" in d.summary
    assert all(layer.lambda_max is None for layer in d.layers)


@pytest.mark.parametrize("targets_given", [True, False])
def test_a_transformers_model_s_own_loss_gets_its_baseline_and_curvature(
    targets_given: bool,
) -> None:
    """``loss_fn = lambda out, y: out.loss`` (the model computes its loss from ``labels``
    among its inputs, as transformers' users write it): the returned loss does not
    depend on the outputs the baseline and curvature replace, so they came out empty.
    The model's own loss function of its logits now stands in: the same baseline and
    statuses as the explicit cross-entropy, and curvature for every layer."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = BertForMaskedLM(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (8, 10), generator=gen)
    labels = ids.clone()
    labels[:, ::3] = -100  # positions the loss ignores

    def explicit(out, t):  # type: ignore[no-untyped-def]
        return ce(out.logits.reshape(-1, 32), t.reshape(-1))

    ref = gradsight.diagnose(model, ({"input_ids": ids}, labels), explicit)
    inputs = {"input_ids": ids, "labels": labels}
    batch = (inputs, labels if targets_given else None)
    d = _unchanged(model, lambda: gradsight.diagnose(model, batch, lambda out, t: out.loss))
    assert d.loss == pytest.approx(ref.loss, rel=1e-6)
    assert d.baseline_loss is not None and ref.baseline_loss is not None
    assert d.baseline_loss == pytest.approx(ref.baseline_loss, rel=1e-4)
    assert [layer.status for layer in d.layers] == [layer.status for layer in ref.layers]
    assert "Curvature was not measured" not in d.summary
    assert d.headroom is not None


def test_an_embedding_with_max_norm_is_left_as_it_was() -> None:
    """``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up, in place, at
    every forward: the diagnosis's passes (signal and curvature) put them back."""

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6, max_norm=0.5)
            self.head = nn.Linear(6, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids).mean(1))

    torch.manual_seed(0)
    model = Bag()
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, 10, (32, 4), generator=gen),
        torch.randint(0, 3, (32,), generator=gen),
    )
    rows = model.emb.weight.detach().norm(dim=1)
    assert bool((rows > 0.5).any())  # the forward would renormalize some
    d = _unchanged(model, lambda: gradsight.diagnose(model, batch, ce))
    assert d.layer("emb").lambda_max is not None


def _tiny_vit(zero: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=4,
    )
    model = ViTForImageClassification(config)
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def _tiny_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=24,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=16,
    )
    return BartForConditionalGeneration(config)


@pytest.mark.parametrize(
    ("kind", "scale"), [("vit-zero", 1.0), ("vit-zero", 1e-6), ("vit", 1e6), ("bart", 1.0)]
)
def test_a_scaled_model_loss_of_any_head_is_recomputed_from_the_logits(
    kind: str, scale: float
) -> None:
    """``loss_fn = lambda out, y: c * out.loss`` on heads whose loss type has no logits-
    and-labels loss function registered (image classification) or that compute their
    loss in their forward (BART's aligned cross-entropy): the baseline and curvature were
    lost (one more call of the loss said "not used in the graph"), and a zero-initialized
    ViT, which AdamW cannot move off ln 4, read "converged" on every layer. The loss is
    now recomputed from the logits by the model's own loss (checked to reproduce it), so
    the statuses are those of the explicit cross-entropy, and the baseline c times its."""
    gen = torch.Generator().manual_seed(0)
    if kind == "bart":
        model = _tiny_bart()
        labels = torch.randint(3, 24, (8, 6), generator=gen)
        labels[:, -1] = -100
        inputs = {
            "input_ids": torch.randint(3, 24, (8, 7), generator=gen),
            "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
        }
    else:
        model = _tiny_vit(zero=kind == "vit-zero")
        labels = torch.randint(0, 4, (16,), generator=gen)
        inputs = {"pixel_values": torch.randn(16, 3, 8, 8, generator=gen)}

    def explicit(out, t):  # type: ignore[no-untyped-def]
        return ce(out.logits.reshape(-1, out.logits.shape[-1]), t.reshape(-1), ignore_index=-100)

    ref = gradsight.diagnose(model, (inputs, labels), explicit)
    d = _unchanged(
        model,
        lambda: gradsight.diagnose(
            model, ({**inputs, "labels": labels}, labels), lambda out, t: scale * out.loss
        ),
    )
    assert ref.baseline_loss is not None and d.baseline_loss is not None
    assert d.baseline_loss == pytest.approx(scale * ref.baseline_loss, rel=1e-4)
    assert [layer.status for layer in d.layers] == [layer.status for layer in ref.layers]
    assert "Curvature was not measured" not in d.summary
    if kind == "vit-zero":
        assert ref.status in ("vanishing", "dead")  # AdamW: 1.3863 -> 1.3774 in 40 steps
        assert "converged" not in {layer.status for layer in d.layers[:-1]}


def test_a_zero_initialized_parameter_is_not_called_converged_without_curvature() -> None:
    """A layer whose parameters are all exactly zero (DeiT's class token and position
    embeddings, Swin's relative position bias) has no scale-free gradient: ‖g‖·‖p‖ is 0
    whatever the gradient. It read "converged … sits at its optimum" while its gradient
    was the model's largest; training it alone lowers the loss."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.position = nn.Parameter(torch.zeros(6, 8))  # zero-initialized

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.position

    torch.manual_seed(0)
    model = nn.Sequential(Tokens(), nn.Flatten(), nn.Linear(48, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, 8, generator=gen)
    y = (x[:, 0, 0] > 0).long() + (x[:, 1, 1] > 0).long()
    d = gradsight.diagnose(model, (x, y), ce, curvature=False)
    tokens = d.layer("0")
    assert tokens.status == "ok", tokens.reason
    assert "exactly zero (zero-initialized)" in tokens.reason
    # Ground truth: SGD on the position embedding alone lowers the loss.
    train = copy.deepcopy(model)
    opt = torch.optim.SGD(train[0].parameters(), lr=1.0)
    first = float(ce(train(x), y))
    for _ in range(20):
        opt.zero_grad()
        ce(train(x), y).backward()
        opt.step()
    assert float(ce(train(x), y)) < 0.98 * first


def test_a_tied_module_that_is_never_called_is_judged_through_the_one_that_is() -> None:
    """T5 ties ``shared`` to ``encoder.embed_tokens``, a module of its own that is the one
    called. With an exactly zero gradient (a zeroed model), ``shared`` read "not called in
    the forward pass: … Call it in forward() … or remove it": its weight is in the loss's
    graph (a zero gradient, not none), so it is judged through the module holding it."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 4)
            self.embed = nn.Embedding(10, 4)
            self.embed.weight = self.shared.weight
            self.head = nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(dim=1))

    model = Tied()
    with torch.no_grad():
        model.head.weight.zero_()  # nothing flows back to the embedding: exactly zero
    ids = torch.randint(0, 10, (16, 5))
    d = gradsight.diagnose(model, (ids, torch.randint(0, 3, (16,))), ce, curvature=False)
    shared = d.layer("shared")
    assert shared.grad_norm == 0.0
    assert shared.used_by == "embed"
    assert "not called" not in shared.reason


def test_an_activation_after_a_weight_used_directly_is_not_the_pending_layer_s() -> None:
    """Mamba computes ``softplus(F.linear(x, dt_proj.weight))`` right after calling
    ``x_proj``: the softplus belongs to the weight used directly, not to ``x_proj``."""

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x_proj = nn.Linear(4, 4)
            self.dt_proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.x_proj(x)
            return nn.functional.softplus(nn.functional.linear(h, self.dt_proj.weight) - 5.0)

    from gradsight.probes import SignalProbe

    model = Mixer()
    with SignalProbe(model) as probe:
        model(torch.randn(8, 4)).sum().backward()
    assert probe.result()["x_proj"].activation is None
