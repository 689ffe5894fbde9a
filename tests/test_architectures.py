"""No false alarm on the architectures people train, built from configs nobody here
wrote (transformers; nothing downloaded), beyond the reference zoo (tests/zoo).

Ground truth: each is a standard architecture at its library's own initialization, the
point every training run of it starts from; none is stuck there (they are trained from
exactly these inits). So no layer may be called vanishing, exploding, dead or stuck,
every reason must agree with its numbers, and curvature must be measured, also on the
layers the engine does not cover (an embedding subclass called on the attention mask,
depthwise convolutions: exact block products instead).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import gradsight
from contradictions import contradictions

transformers = pytest.importorskip("transformers")

V = 64
ALARMS = {"vanishing", "exploding", "dead", "unstable", "nonfinite"}


def _tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (8, 16), generator=gen)
    ids[:, 1:] = (3 * ids[:, :-1] + 1) % V  # a chain a model can learn
    return ids


def _next_token(out: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _classes(out: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, labels)


_SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=V,
    max_position_embeddings=32,
)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# name: (model class, config class, config, task)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_SMALL, num_key_value_heads=1), "lm"),
    "gemma": (
        "GemmaForCausalLM",
        "GemmaConfig",
        dict(_SMALL, num_key_value_heads=1, head_dim=16),
        "lm",
    ),
    "falcon": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=V),
        "lm",
    ),
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=V,
            max_position_embeddings=32,
            word_embed_proj_dim=32,
            dropout=0.0,
        ),
        "lm",
    ),
    "bart-decoder": (
        "BartForCausalLM",
        "BartConfig",
        dict(
            d_model=32,
            decoder_layers=2,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            vocab_size=V,
            max_position_embeddings=32,
            dropout=0.0,
        ),
        "lm",
    ),
    "albert": (
        "AlbertForSequenceClassification",
        "AlbertConfig",
        dict(_SMALL, embedding_size=16, num_labels=2, **_NO_DROPOUT),
        "classify",
    ),
    "deberta-v2": (
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        dict(_SMALL, num_labels=2, **_NO_DROPOUT),
        "classify",
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=3),
        "image",
    ),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=3,
        ),
        "image",
    ),
    "mobilenet-v2": (
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        dict(image_size=32, depth_multiplier=0.25, num_labels=3),
        "image",
    ),
}


def _build(name: str) -> tuple[torch.nn.Module, Any, Callable[[Any, Any], torch.Tensor]]:
    model_cls, config_cls, config, task = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    model.train()
    ids = _tokens()
    if task == "lm":
        return model, ({"input_ids": ids}, ids), _next_token
    if task == "classify":
        return model, ({"input_ids": ids}, ids[:, 0] % 2), _classes
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    return model, ({"pixel_values": images}, torch.randint(0, 3, (8,), generator=gen)), _classes


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_standard_architecture_at_init_raises_no_alarm(name: str) -> None:
    model, batch, loss_fn = _build(name)
    # Every layer's curvature, whatever the machine's load: the layers the engine does
    # not cover are refined exactly without a time budget.
    d = gradsight.diagnose(model, batch, loss_fn, budget=math.inf)
    alarms = {layer.name: layer.status for layer in d.layers if layer.status in ALARMS}
    assert not alarms, alarms
    assert d.status in ("ok", "converged")
    assert "Curvature was not measured" not in d.summary
    called = [layer for layer in d.layers if layer.grad_norm]  # BART's unused cross-attention aside
    assert all(layer.lambda_max is not None for layer in called)
    names = {layer.module_type for layer in d.layers}
    assert (
        contradictions(
            d,
            has_norm=any("Norm" in t for t in names),
            has_residual=True,  # every one of them is residual
        )
        == []
    )


@pytest.mark.parametrize("name", ["convnext", "llama", "mobilenet-v2"])
def test_verdicts_do_not_change_when_the_loss_is_rescaled(name: str) -> None:
    """The same statuses at loss × 1e-6 and × 1e6 as at × 1, with the default time budget
    (ConvNeXt's LayerScale layers, left to the budget, used to flip with the machine's
    load and the scale)."""
    model, batch, loss_fn = _build(name)
    statuses = []
    for scale in (1.0, 1e-6, 1e6):
        d = gradsight.diagnose(model, batch, lambda o, t, s=scale: s * loss_fn(o, t))
        statuses.append([layer.status for layer in d.layers])
    assert statuses[0] == statuses[1] == statuses[2]


def test_a_steep_language_model_on_its_plateau_is_not_converged() -> None:
    """GPT-NeoX with every weight matrix ×100: the loss is 6 times the unigram's, and
    the Gauss-Newton decrement of the embedding and the first layer is 1e-4 of it because
    the curvature is steep, while a relative change of their weights moves the loss by
    50× its value. AdamW on the model lowers the loss (the ground truth below), so
    nothing there sits at an optimum: no layer whose gradient is not small reads
    "converged" (three did)."""
    config = transformers.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(100.0)
    gen = torch.Generator().manual_seed(1000)
    chain = [torch.randint(0, V, (16, 1), generator=gen)]
    for _ in range(16):
        chain.append((3 * chain[-1] + 1) % V)
    tokens = torch.cat(chain, dim=1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))

    d = gradsight.diagnose(model, ({"input_ids": inputs}, targets), loss_fn)
    assert d.baseline_loss is not None and d.loss > 3 * d.baseline_loss
    steep = [layer for layer in d.layers if layer.headroom is not None and layer.headroom < 1e-4]
    assert steep  # the case this is about
    wrong = [
        layer.name
        for layer in d.layers
        if layer.status == "converged" and (layer.relative_grad or 0.0) > 1e-5 * d.loss
    ]
    assert not wrong, wrong
    assert all(layer.status == "ok" and "not at its optimum" in layer.reason for layer in steep), [
        (layer.name, layer.status) for layer in steep
    ]
    # The ground truth: AdamW lowers the loss.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(input_ids=inputs), targets)
        losses.append(float(loss))
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0], losses


def _sgd(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Any,
    lr: float,
    steps: int,
    frozen: str | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Ground truth outside gradsight: a copy of ``model`` after ``steps`` full-batch SGD
    steps (``frozen``: a module left out), and the loss before each step, up to the first
    non-finite one."""
    trained = copy.deepcopy(model)
    if frozen is not None:
        trained.get_submodule(frozen).requires_grad_(False)
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(trained(**batch[0]), batch[1])
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
    return trained, losses


def _moved(model: torch.nn.Module, trained: torch.nn.Module) -> set[str]:
    """The parameters ``trained`` changed, by name."""
    return {
        n
        for (n, p), q in zip(trained.named_parameters(), model.parameters(), strict=True)
        if not torch.equal(p, q)
    }


def _llama_with_zero_norms(
    which: str,
) -> tuple[torch.nn.Module, Any, Callable[[Any, Any], torch.Tensor]]:
    model, batch, loss_fn = _build("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if "RMSNorm" in type(module).__name__ and (
                which == "every" or "post_attention" in name
            ):
                module.weight.zero_()
    return model, batch, loss_fn


@pytest.mark.parametrize("curvature", [False, True])
@pytest.mark.parametrize("which", ["mlp", "every"])
def test_a_gated_mlp_behind_a_zero_norm_weight_is_dead(which: str, curvature: bool) -> None:
    """Llama with its MLPs' RMSNorm weights zeroed, or every RMSNorm weight (a loop that
    zeroes every 1-D parameter, meant for biases: Llama has none). A SwiGLU MLP fed
    zero is zero in both factors of SiLU(gate)·up, so no signal passes back to gate, up,
    down or the norm: ground truth, 50 SGD steps leave them exactly as they were while the
    model learns around them. They are dead, held there by their norm; the attention
    layers, whose zero norms get a gradient through the value path, are not (with every
    norm zeroed they wait for the final norm's first update)."""
    model, batch, loss_fn = _llama_with_zero_norms(which)
    d = gradsight.diagnose(model, batch, loss_fn, lr=0.3, curvature=curvature)
    trained, losses = _sgd(model, batch, loss_fn, 0.3, 50)
    assert (
        losses[-1] < losses[0] - 1e-3
    )  # the model learns around them (slowly, with every norm zero)
    moved = _moved(model, trained)
    for i in range(2):
        norm = f"model.layers.{i}.post_attention_layernorm"
        mlp = [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        assert not any(n.startswith((norm, *mlp)) for n in moved)  # never moved
        assert (
            d.layer(norm).status == "dead" and "its weight is exactly zero" in d.layer(norm).reason
        )
        for name in mlp:
            layer = d.layer(name)
            assert layer.status == "dead", (name, layer.status, layer.reason)
            assert norm in layer.reason and "no optimizer step moves it" in layer.reason
            assert "Initialize the normalization weight" in layer.advice[0]
        v_proj = f"model.layers.{i}.self_attn.v_proj"
        assert f"{v_proj}.weight" in moved and d.layer(v_proj).status == "ok"
    assert d.status == "dead"
    assert "can still learn around the dead ones" in d.summary  # the model's loss falls
    assert contradictions(d, has_norm=True, has_residual=True) == []


def test_a_norm_that_scales_by_one_plus_its_weight_is_not_zero_at_zero() -> None:
    """Gemma's RMSNorm multiplies by 1 + weight and starts at weight 0, scale 1: its norms
    pass the signal (ground truth: output over input norm 0.88), so no reason may call
    their weight a zero that blocks it, at initialization as after a loop that zeroes
    every 1-D parameter (which leaves them as they are)."""
    model, batch, loss_fn = _build("gemma")
    norm = model.model.layers[0].input_layernorm
    assert bool((norm.weight == 0).all())
    x = torch.randn(4, 32)
    assert float(norm(x).norm() / x.norm()) > 0.5
    d = gradsight.diagnose(model, batch, loss_fn, lr=0.3, curvature=False)
    claims = ("carries nothing", "weight is exactly zero", "is exactly zero; that layer")
    zero_claims = [layer.name for layer in d.layers if any(c in layer.reason for c in claims)]
    assert not zero_claims, zero_claims
    assert d.status in ("ok", "converged")


def _blows_up(losses: list[float]) -> bool:
    """gradsight's own criterion, on a run's losses: non-finite, or above 1.1× the start
    at each of the last three steps."""
    if not all(math.isfinite(v) for v in losses):
        return True
    return all(v > 1.1 * losses[0] for v in losses[-3:])


def _sgd_frozen(
    model: torch.nn.Module, batch: Any, loss_fn: Any, frozen: str, lr: float
) -> list[float]:
    return _sgd(model, batch, loss_fn, lr, 50, frozen=frozen)[1]


def test_the_layer_named_for_a_blow_up_is_the_one_whose_freezing_stops_it() -> None:
    """Qwen2 at SGD lr 5 blows up. Its embedding holds 41% of the Hessian's top
    eigenvector, yet freezing it does not stop the blow-up (ground truth: 50 SGD steps of
    the rest); freezing the output layer does, though its own block is stable. The
    layers called exploding are the ones whose freezing lets the rest train, and the
    reason says so with the frozen run's numbers."""
    config = transformers.Qwen2Config(**dict(_SMALL, num_key_value_heads=1))
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    model.train()
    ids = _tokens()
    batch = ({"input_ids": ids}, ids)
    d = gradsight.diagnose(model, batch, _next_token, lr=5.0)
    named = [layer.name for layer in d.layers if layer.status == "exploding"]
    assert d.status == "exploding" and named, d.summary
    for name in named:
        assert not _blows_up(_sgd_frozen(model, batch, _next_token, name, 5.0)), name
        assert "with it frozen the same 20 steps train the rest" in d.layer(name).reason
    assert "model.embed_tokens" not in named
    assert _blows_up(_sgd_frozen(model, batch, _next_token, "model.embed_tokens", 5.0))
    assert contradictions(d, has_norm=True, has_residual=True) == []


@pytest.mark.parametrize("frozen_gates", [False, True])
def test_zero_gates_held_as_parameters_open_at_the_first_update(frozen_gates: bool) -> None:
    """Mllama's cross-attention layers (Llama 3.2 Vision) gate their attention and MLP
    with tanh of parameters that start at exactly zero: at initialization no signal
    reaches those branches, yet the gates get a gradient and their first update opens
    them (ground truth: 5 SGD steps move every parameter). No layer reads converged or
    vanishing for it; the branches' layers are ok, naming the gate that holds them.

    Sick twin: the gates frozen at zero (``requires_grad=False``, as a fine-tuning
    script that freezes every parameter it did not add could leave them). Ground truth:
    20 SGD steps leave every layer of the gated branches exactly as it was. They are
    dead, each naming the frozen gate of its branch, and the advice unfreezes it."""
    config = transformers.MllamaTextConfig(
        **dict(_SMALL, num_hidden_layers=4, num_key_value_heads=1, rope_scaling=None),
        cross_attention_layers=[1, 3],
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.MllamaForCausalLM(config)
    model.train()
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate")]
    assert len(gates) == 4 and all(not p.any() for p in gates)
    for p in gates:
        p.requires_grad_(not frozen_gates)
    ids = _tokens()
    gen = torch.Generator().manual_seed(2)
    media = torch.randn(8, 5, 32, generator=gen)
    targets = (ids + (media[:, 0, :1] > 0).long() * 5) % V  # the targets depend on the media
    batch = ({"input_ids": ids, "cross_attention_states": media}, targets)

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))

    d = gradsight.diagnose(model, batch, loss_fn, lr=0.5, curvature=False)
    branch = d.layer("model.layers.1.cross_attn.q_proj")
    # The cross-attention layers: every module inside them is behind their gates.
    gated = {n.rpartition(".")[0] for n, _ in model.named_parameters() if "layers.1." in n}
    gated |= {n.rpartition(".")[0] for n, _ in model.named_parameters() if "layers.3." in n}
    if frozen_gates:
        trained, _ = _sgd(model, batch, loss_fn, 0.5, 20)
        moved = {n.rpartition(".")[0] for n in _moved(model, trained)}
        assert not moved & gated and moved  # the rest of the model learns
        wrong = {
            layer.name: layer.status
            for layer in d.layers
            if (layer.status == "dead") != (layer.name in gated) and layer.status != "frozen"
        }
        assert d.status == "dead" and not wrong, wrong
        # Each layer names the gate of its own branch (each gate moved alone on a copy).
        for name, gate in (("cross_attn.q_proj", "attn"), ("mlp.down_proj", "mlp")):
            layer = d.layer(f"model.layers.1.{name}")
            held = f"model.layers.1.cross_attn_{gate}_gate"
            assert f"held there by {held}, frozen (requires_grad=False)" in layer.reason
            assert layer.advice[0].startswith(f"Unfreeze {held} ")
    else:
        wrong = {layer.name: layer.status for layer in d.layers if layer.status != "ok"}
        assert not wrong, wrong
        assert (
            branch.grad_norm == 0.0
            and "the gate of model.layers.1, which gates it, is exactly zero" in branch.reason
        )
        # Ground truth: every parameter moves within 5 SGD steps.
        trained, _ = _sgd(model, batch, loss_fn, 0.5, 5)
        assert _moved(model, trained) >= {
            n for n, _ in model.named_parameters() if "layers.1." in n
        }
    assert contradictions(d, has_norm=True, has_residual=True) == []


def test_a_mixture_of_experts_is_judged_with_its_router_loss() -> None:
    """Mixtral trained the Hugging Face way: ``output_router_logits=True`` and the
    model's own loss (``lambda out, y: out.loss``), which adds 0.02 × the router's
    load-balancing loss to the cross-entropy of the logits. The baseline and curvature
    replace the logits; the router's term, which does not depend on them, is carried as
    a constant (it used to make both fail: no baseline, "Curvature was not measured", and
    "ok" at an lr that blows up). Ground truth: 20 SGD steps at lr 10 blow up; the same
    model without the router loss reads exploding too, with the same baseline up to that
    constant."""
    config = dict(_SMALL, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    ids = _tokens()
    found = {}
    for aux in (False, True):
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                **config, output_router_logits=aux, router_aux_loss_coef=0.02
            )
        )
        model.train()
        batch = ({"input_ids": ids, "labels": ids}, ids)

        def own(out: Any, y: torch.Tensor) -> torch.Tensor:
            return out.loss

        d = gradsight.diagnose(model, batch, own, lr=10.0)
        assert "not measured" not in d.summary, d.summary
        assert d.status == "exploding" and d.trial_blew_up, d.summary
        assert contradictions(d, has_norm=True, has_residual=True) == []
        out = model(**batch[0])
        found[aux] = (d.baseline_loss, 0.02 * float(out.aux_loss) if aux else 0.0)
    losses = _sgd(model, batch, own, 10.0, 20)[1]
    assert _blows_up(losses), losses
    (base, _), (base_aux, added) = found[False], found[True]
    assert base is not None and base_aux is not None and added > 0
    assert base_aux == pytest.approx(base + added, rel=1e-5)


@pytest.mark.parametrize("collapsed", [False, True, "top-1"])
def test_a_collapsed_router_is_dead(collapsed: bool | str) -> None:
    """Mixtral (4 experts, top-2) whose routers are certain of their choice: every token
    embedding has a constant coordinate that each router weighs 20 and 10 for experts 0
    and 1, a logit gap of ~56, so the renormalized top-2 weights are exactly 1 and 0 and
    the saturated softmax passes nothing back. Ground truth: 20 SGD steps leave both
    routers bit-identical while the rest of the model trains. They are dead (the signal
    dies inside them; the old reason blamed an exactly zero input, which is not: its
    norm is ~64). Healthy twin: the routers at their initialization learn (ok). Top-1
    routing, renormalized: the one weight is p/p = 1, so the router's true gradient is
    zero and its computed one round-off (~1e-10): ground truth, 20 SGD steps move it by
    1e-10 of its norm. It read "ok: ... a Newton step on this layer alone would win 0.6 of
    the loss"; dead, at round-off."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **dict(_SMALL, num_key_value_heads=1),
        num_local_experts=4,
        num_experts_per_tok=1 if collapsed == "top-1" else 2,
    )
    model = transformers.MixtralForCausalLM(config)
    model.train()
    routers = [n for n, _ in model.named_modules() if n.endswith("mlp.gate")]
    assert len(routers) == 2
    if collapsed is True:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] = 1.0
            for name in routers:
                weight = model.get_submodule(name).weight
                weight[0, 0], weight[1, 0] = 20.0, 10.0
    ids = _tokens()
    batch = ({"input_ids": ids}, ids)
    d = gradsight.diagnose(model, batch, _next_token, lr=0.3, curvature=collapsed == "top-1")
    trained, losses = _sgd(model, batch, _next_token, 0.3, 20)
    assert losses[-1] < losses[0]
    for name in routers:
        layer = d.layer(name)
        before, after = model.get_submodule(name).weight, trained.get_submodule(name).weight
        moved = float((after - before).norm() / before.norm())
        if collapsed:
            assert moved < 1e-8  # bit-identical, or a few ulps of round-off (top-1)
            assert layer.status == "dead" and "the signal dies inside it" in layer.reason
            assert ("at round-off" in layer.reason) == (collapsed == "top-1")
        else:
            assert moved > 1e-4 and layer.status == "ok", layer.reason
    # The experts the collapsed routers never pick get exactly zero gradient, and the
    # experts' reason says which; ground truth: SGD leaves each of them bit-identical
    # (and expert 1, routed with weight 5e-25, too).
    for layer_index in range(2):
        experts = f"model.layers.{layer_index}.mlp.experts"
        before = dict(model.get_submodule(experts).named_parameters())
        after = dict(trained.get_submodule(experts).named_parameters())
        unmoved = {
            i for i in range(4) if all(torch.equal(before[n][i], after[n][i]) for n in before)
        }
        named = re.search(
            r"of its 4 experts \(([0-9, ]+)\) get exactly zero", d.layer(experts).reason
        )
        if collapsed is True:
            assert unmoved == {1, 2, 3} and named is not None
            assert {2, 3} <= {int(i) for i in named.group(1).split(", ")} <= unmoved
        else:
            assert not unmoved and named is None
    assert contradictions(d, has_norm=True, has_residual=True) == []


def _quadrants(n: int = 32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Images whose class is the bright quadrant."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=gen)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 1.0
    return {"pixel_values": x}, y


def test_deit_s_zero_tokens_are_not_gates_and_its_collapse_is_not_a_catapult() -> None:
    """DeiT (transformers, from a config) starts its cls, distillation and position
    tokens at zero; with LayerNorm's eps 1e-12, SGD collapses it to a constant output.
    Ground truth: 20 SGD steps at lr 0.1 end at the constant prediction's loss (log 4).
    The tokens are added, not multiplied: no layer inside their module is held at zero
    (the patch projection learns), so they are not called a gate that "passes no signal
    back"; and a trial that ends at the constant's loss is not "training steadies itself
    (the catapult phase)"."""
    torch.manual_seed(0)
    config = transformers.DeiTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.DeiTForImageClassification(config)
    model.train()
    batch = _quadrants()
    d = gradsight.diagnose(model, batch, _classes, lr=0.1)
    losses = _sgd(model, batch, _classes, 0.1, 20)[1]
    assert abs(losses[-1] - math.log(4)) < 1e-3
    embeddings = d.layer("deit.embeddings")
    assert embeddings.grad_norm is not None and embeddings.grad_norm > 1.0
    assert not any("Its gate (" in layer.reason for layer in d.layers)
    assert "the catapult phase" not in str(d)
    assert "no better than predicting a constant" in embeddings.reason
    assert contradictions(d, has_norm=True, has_residual=True) == []


def test_a_vision_transformer_s_blow_up_is_carried_by_its_classifier() -> None:
    """Swin (transformers, from a config) at SGD lr 1 blows up. Ground truth: 30 SGD
    steps end in NaN or far above the start, and of the layers gradsight names only
    those whose freezing trains the rest; the classifier, which holds little of the
    sharpest direction and is not among the largest gradients, is the one (the patch
    projection and the downsampling used to be named: freezing them still blows up).
    The output layer and the last normalization are always among the frozen trials."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=2,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=4,
    )
    model = transformers.SwinForImageClassification(config)
    model.train()
    batch = _quadrants()
    d = gradsight.diagnose(model, batch, _classes, lr=1.0)
    named = [layer.name for layer in d.layers if layer.status == "exploding"]
    assert d.status == "exploding" and "classifier" in named, d.summary
    assert _blows_up(_sgd(model, batch, _classes, 1.0, 30)[1])
    for name in named:
        losses = _sgd(model, batch, _classes, 1.0, 30, frozen=name)[1]
        assert not _blows_up(losses) and losses[-1] < losses[0], (name, losses)
    assert contradictions(d, has_norm=True, has_residual=True) == []


def _bart_seq2seq() -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    model = transformers.BartForConditionalGeneration(config)
    model.train()
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(3, V, (16, 8), generator=gen)
    y = (3 * src + 1) % V
    start = torch.full((16, 1), 2)
    return model, ({"input_ids": src, "decoder_input_ids": torch.cat([start, y[:, :-1]], 1)}, y)


def _seq_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))


@pytest.mark.parametrize("zeroed", ["out_proj", "all"])
def test_bart_with_its_cross_attention_zeroed(zeroed: str) -> None:
    """BART (transformers, from a config) with its cross-attention zero-initialized.

    Only the output projections zeroed (a healthy zero-init design): ground truth, 20
    SGD steps move every parameter. The model is ok, and the token embedding, one tensor
    listed as model.shared, encoder.embed_tokens, decoder.embed_tokens and lm_head, gets
    one verdict: the encoder's copy, whose output gets no signal yet, used to read
    "vanishing" beside the same tensor learning through the decoder.

    Everything zeroed (q, k, v and the output projection): the zero value and output
    weights lock each other (only the output bias learns), so the encoder never gets a
    gradient: ground truth, 20 SGD steps leave every encoder parameter as it was. The
    encoder's layers and the cross-attention's are dead (they read vanishing and
    converged), held by the cross-attention's zero weights."""
    model, batch = _bart_seq2seq()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("encoder_attn"):
                for p in (module.out_proj if zeroed == "out_proj" else module).parameters():
                    p.zero_()
    d = gradsight.diagnose(model, batch, _seq_loss, lr=0.3)
    trained, losses = _sgd(model, batch, _seq_loss, 0.3, 20)
    moved = _moved(model, trained)
    assert losses[-1] < 0.8 * losses[0]
    tied = ("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head")
    assert len({d.layer(name).status for name in tied}) == 1
    encoder = [layer for layer in d.layers if layer.name.startswith("model.encoder.layers.")]
    if zeroed == "out_proj":
        assert moved == {n for n, _ in model.named_parameters()}
        assert d.status == "ok", [(la.name, la.status) for la in d.layers if la.status != "ok"]
    else:
        assert not any(n.startswith("model.encoder.") for n in moved)
        assert d.status == "dead" and all(layer.status == "dead" for layer in encoder)
        cross = [la for la in d.layers if "encoder_attn." in la.name and "out_proj" not in la.name]
        assert cross and all(layer.status == "dead" for layer in cross)
    assert contradictions(d, has_norm=True, has_residual=True) == []


@pytest.mark.parametrize("gated_off", [False, True])
def test_a_shared_expert_behind_a_dead_gate_is_dead(gated_off: bool) -> None:
    """Qwen2-MoE (transformers, from a config) with its shared expert's sigmoid gate flat
    at zero on every token (a constant feature the gate weighs −20). Ground truth: 20 SGD
    steps leave the shared experts and their gates bit-identical while the model trains.
    The gate is dead, and so is the expert it shuts, naming it: the expert read
    "converged: the loss does not depend on it, nothing to win". Healthy twin: ok."""
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        **dict(_SMALL, num_key_value_heads=1),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )
    model = transformers.Qwen2MoeForCausalLM(config)
    model.train()
    if gated_off:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] = 1.0
            for name, module in model.named_modules():
                if name.endswith("shared_expert_gate"):
                    module.weight[0, 0] = -20.0
    ids = _tokens()
    batch = ({"input_ids": ids}, ids)
    d = gradsight.diagnose(model, batch, _next_token, lr=0.3, curvature=False)
    trained, losses = _sgd(model, batch, _next_token, 0.3, 20)
    assert losses[-1] < losses[0]
    shared = [layer for layer in d.layers if ".shared_expert" in layer.name]
    moved = {n.rpartition(".")[0] for n in _moved(model, trained)}
    assert len(shared) == 8
    for layer in shared:
        if gated_off:
            assert layer.name not in moved and layer.status == "dead", layer.reason
            if ".shared_expert." in layer.name:
                gate = layer.name.split(".shared_expert.")[0] + ".shared_expert_gate"
                assert f"{gate} beside it, which is dead, shuts its branch" in layer.reason
        else:
            assert layer.name in moved and layer.status == "ok", layer.reason
    assert contradictions(d, has_norm=True, has_residual=True) == []
