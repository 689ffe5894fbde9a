"""The zoo's cases: architectures built from code nobody here wrote, each as two twins.

Each :class:`ZooCase` holds a *healthy* twin (nothing for the user to fix: ``ok``,
``converged`` or ``frozen``) and a *sick* twin (something to fix: ``vanishing``,
``dead``, ``exploding`` or ``nonfinite``), built by ``build(seed) -> Built``.

A twin states the learning rate its verdict is judged at (plain SGD's step; at loss × c
the same SGD dynamics need lr / c, so the tests pass ``lr / c``), the model's expected
status and every layer's expected status, by ``fnmatch`` pattern on the layer's
qualified name (the first matching pattern applies; every layer must match one). A set
of several statuses is allowed only where the truth genuinely admits both, and the twin's
``ground_truth`` says why.

The truth was established without gradsight: full-batch SGD runs at the twin's lr,
Adam runs (which ignore the gradient's scale, so they show the headroom a crushed
gradient hides), L-BFGS optima, the largest Hessian eigenvalue of each layer's block
(power iteration on Hessian-vector products: the step lr is unstable when
lr·λmax > 2), the first SGD step's loss ratio (a catapult), and exact zero gradients.
``python docs/zoo.py`` re-measures every number quoted in ``ground_truth``.

Statuses (DESIGN.md): ``ok`` learning; ``vanishing`` far from its optimum but the signal
that reaches it was lost on the way back (through depth or through time); ``converged``
nothing left to win for it; ``exploding`` lr·λmax > 2 for its block; ``dead`` it neither
learns nor passes a signal (its units are flat on the whole batch); ``frozen``
``requires_grad=False`` (never judged, left out of the model's status); ``nonfinite``
its gradient holds NaN/Inf.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CASES", "STATUSES", "Built", "Twin", "ZooCase", "scaled"]

STATUSES = frozenset({"ok", "vanishing", "converged", "exploding", "dead", "frozen", "nonfinite"})

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class Built:
    """A twin made concrete: the model (in the mode it trains in), its batch and loss."""

    model: nn.Module
    batch: tuple[Any, Any]
    loss_fn: LossFn


@dataclass(frozen=True)
class Twin:
    """One twin of a case.

    Attributes:
        build: ``build(seed)`` makes the model, batch and loss (the global RNG untouched).
        lr: The plain-SGD learning rate the verdict is judged at.
        model_status: The statuses the model may get (one, unless justified).
        layers: ``(pattern, allowed statuses)`` pairs; the first pattern that matches a
            layer's qualified name gives its allowed statuses.
        ground_truth: How the truth was established without gradsight, with the numbers.
    """

    build: Callable[[int], Built]
    lr: float
    model_status: frozenset[str]
    layers: tuple[tuple[str, frozenset[str]], ...]
    ground_truth: str

    def expected(self, layer: str) -> frozenset[str]:
        """The statuses layer ``layer`` may get.

        Raises:
            KeyError: if no pattern matches (every layer must have a stated truth).
        """
        for pattern, allowed in self.layers:
            if fnmatchcase(layer, pattern):
                return allowed
        raise KeyError(f"no expected status for layer {layer!r}")


@dataclass(frozen=True)
class ZooCase:
    """An architecture with a healthy and a sick twin.

    Attributes:
        key: Short identifier.
        title: What the model is.
        source: Whose code builds it.
        healthy: The twin with nothing to fix.
        sick: The twin with something to fix.
        curvature: Whether its verdicts need curvature (an lr-dependent ``exploding``
            or ``converged`` truth); otherwise it is diagnosed with ``curvature=False``.
    """

    key: str
    title: str
    source: str
    healthy: Twin
    sick: Twin
    curvature: bool = False

    def twins(self) -> dict[str, Twin]:
        return {"healthy": self.healthy, "sick": self.sick}


def scaled(loss_fn: LossFn, c: float) -> LossFn:
    """``c × loss_fn``: the same problem, gradients and curvature scaled by c."""

    def loss(outputs: Any, targets: Any) -> torch.Tensor:
        return c * loss_fn(outputs, targets)

    return loss


def _s(*statuses: str) -> frozenset[str]:
    assert set(statuses) <= STATUSES, statuses
    return frozenset(statuses)


OK, VANISHING, CONVERGED = _s("ok"), _s("vanishing"), _s("converged")
EXPLODING, DEAD, FROZEN, NONFINITE = _s("exploding"), _s("dead"), _s("frozen"), _s("nonfinite")


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)``, the global RNG restored after."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


def _balanced_labels(n: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """Exactly n / classes samples per class, in a seeded order."""
    return torch.arange(n)[torch.randperm(n, generator=gen)] % classes


def _ce_logits(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on a Hugging Face output's ``.logits``."""
    return F.cross_entropy(outputs.logits, targets)


# --------------------------------------------------------------------------- GPT-2 (HF)

VOCAB = 32


def _lm_tokens(gen: torch.Generator, batch: int = 16, seq: int = 16) -> torch.Tensor:
    """Sequences of a noisy deterministic chain: next = 3·t + 1 mod V, 10% random."""
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for t in range(1, seq):
        nxt = (3 * ids[:, t - 1] + 1) % VOCAB
        noise = torch.rand(batch, generator=gen) < 0.1
        ids[:, t] = torch.where(noise, torch.randint(0, VOCAB, (batch,), generator=gen), nxt)
    return ids


def _next_token_loss(outputs: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _gpt2(seed: int) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = _seeded(seed, lambda: GPT2LMHeadModel(config))  # lm_head tied to wte
    ids = _lm_tokens(_gen(seed))
    return Built(model, ({"input_ids": ids}, ids), _next_token_loss)


# ---------------------------------------------------------------------------- BERT (HF)


def _bert(saturated_pooler: bool) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
            attn_implementation="eager",
        )
        model = _seeded(seed, lambda: BertForSequenceClassification(config))
        if saturated_pooler:
            # tanh(20 + small) is 1.0 in float32 on every sample: the pooler is flat.
            with torch.no_grad():
                model.bert.pooler.dense.bias.fill_(20.0)
        gen = _gen(seed)
        ids = torch.randint(0, VOCAB, (32, 12), generator=gen)
        y = _balanced_labels(32, 2, gen)
        # The label is whether the second token is in the lower half of the vocabulary.
        ids[:, 1] = torch.randint(0, VOCAB // 2, (32,), generator=gen) + (1 - y) * (VOCAB // 2)
        return Built(model, ({"input_ids": ids}, y), _ce_logits)

    return build


# -------------------------------------------------------------------------- ResNet (HF)


def _hf_resnet(seed: int) -> Built:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=4,
    )
    model = _seeded(seed, lambda: ResNetForImageClassification(config))
    gen = _gen(seed)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    y = _balanced_labels(16, 4, gen)
    # The label is the brightest quadrant of channel 0.
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 1.0
    return Built(model, (x, y), _ce_logits)


# --------------------------------------------------------------- torch nn.Transformer*


class TokenClassifier(nn.Module):
    """Embedding → nn.TransformerEncoder (post-LN, ReLU FFN) → mean pool → linear head."""

    def __init__(self, vocab: int = VOCAB, d: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def _tf_encoder(dead_ffn: bool) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        model = _seeded(seed, TokenClassifier)
        if dead_ffn:
            # The FFN input is LayerNorm'd (|W x| < 10): every ReLU unit is off.
            with torch.no_grad():
                for layer in model.encoder.layers:
                    layer.linear1.bias.fill_(-100.0)
        gen = _gen(seed)
        y = _balanced_labels(64, 2, gen)
        ids = torch.randint(1, VOCAB, (64, 12), generator=gen)
        # The label is whether token 0 occurs anywhere in the sequence.
        where = torch.randint(0, 12, (64,), generator=gen)
        ids[y == 1, where[y == 1]] = 0
        return Built(model, (ids, y), F.cross_entropy)

    return build


class CopyDecoder(nn.Module):
    """nn.TransformerDecoder over a padded source; output layer tied to the embedding.

    The output projection is ``F.linear(h, embed.weight)``: the embedding's weight is
    used functionally, twice.
    """

    def __init__(self, vocab: int = 16, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        # Tied input/output embedding at the usual scale d^-1/2 (N(0, 1) logits would be
        # ~√d: a loss of 17 at init).
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.pos = nn.Embedding(16, d)
        self.source = nn.Linear(vocab, d)
        layer = nn.TransformerDecoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)

    def forward(self, tgt: torch.Tensor, src: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        t = tgt.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        memory = self.source(src)
        # A global context: the mean of the source's unpadded positions.
        keep = (~src_pad).unsqueeze(-1).to(memory.dtype)
        context = (memory * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
        h = self.embed(tgt) + self.pos(torch.arange(t)) + context
        h = self.decoder(
            h, memory, tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=src_pad
        )
        return F.linear(h, self.embed.weight)


def _copy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _tf_decoder(empty_source: bool) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        vocab, n, s = 16, 32, 8
        model = _seeded(seed, lambda: CopyDecoder(vocab))
        gen = _gen(seed)
        y = torch.randint(1, vocab, (n, s), generator=gen)  # copy the source
        src = F.one_hot(y, vocab).float()
        tgt = torch.cat([torch.zeros(n, 1, dtype=torch.long), y[:, :-1]], dim=1)
        pad = torch.zeros(n, s, dtype=torch.bool)
        pad[::2, -2:] = True  # half the sources are padded at the end
        if empty_source:
            pad[0] = True  # one source is all padding: its context is 0 / 0
        return Built(model, ((tgt, src, pad), y), _copy_loss)

    return build


# ----------------------------------------------------------------- nn.RNN / LSTM / GRU


class SequenceClassifier(nn.Module):
    """A recurrent layer read at its last step by a linear head."""

    def __init__(self, cell: str, inputs: int = 4, hidden: int = 16) -> None:
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = kind(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _recurrent(cell: str, label_step: int) -> Callable[[int], Built]:
    """100 steps; the only nonzero input is at ``label_step``, and its sign is the label.

    All other inputs are zero, so the batch cannot be memorized from the later steps:
    the loss can only fall if the signal from ``label_step`` reaches the last step.
    """

    def build(seed: int) -> Built:
        model = _seeded(seed, lambda: SequenceClassifier(cell))
        gen = _gen(seed)
        x = torch.zeros(128, 100, 4)
        x[:, label_step] = torch.randn(128, 4, generator=gen)
        y = _balanced_labels(128, 2, gen)
        x[:, label_step, 0] = x[:, label_step, 0].abs() * (2.0 * y - 1.0)
        return Built(model, (x, y), F.cross_entropy)

    return build


# ---------------------------------------------------------- conv net with BatchNorm


def _cnn_bn(dead_channels: bool) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        def make() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(16, 4),
            )

        model = _seeded(seed, make)
        if dead_channels:
            with torch.no_grad():
                # Normalized pre-activations stay within ±6 on the batch: all off.
                model[4].bias.fill_(-20.0)
                # Balanced labels and a zero bias: for its all-zero input the head
                # already predicts the label prior, its own optimum.
                model[8].bias.zero_()
        gen = _gen(seed)
        x = torch.randn(32, 3, 12, 12, generator=gen)
        y = _balanced_labels(32, 4, gen)
        for i, q in enumerate(y.tolist()):
            r, c = divmod(q, 2)
            x[i, 0, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6] += 1.0
        return Built(model, (x, y), F.cross_entropy)

    return build


# ------------------------------------------------------------------------ residual net


class ResidualMLP(nn.Module):
    """x ← x + α·W₂ relu(W₁ x), He-initialized, without normalization."""

    def __init__(self, depth: int, alpha: float, width: int = 32) -> None:
        super().__init__()
        self.alpha = alpha
        self.stem = nn.Linear(16, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(width, width), "fc2": nn.Linear(width, width)})
            for _ in range(depth)
        )
        for block in self.blocks:
            for lin in block.values():
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + self.alpha * block["fc2"](F.relu(block["fc1"](h)))
        return self.head(h)


def _residual(alpha: float) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        model = _seeded(seed, lambda: ResidualMLP(16, alpha))
        gen = _gen(seed)
        x = torch.randn(128, 16, generator=gen)
        y = (x @ torch.randn(16, 4, generator=gen)).argmax(1)
        return Built(model, (x, y), F.cross_entropy)

    return build


# --------------------------------------------------------- frozen backbone, linear probe


class LinearProbe(nn.Module):
    """A frozen random conv backbone (``requires_grad=False``) and a trainable probe."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.backbone.requires_grad_(False)
        self.probe = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(self.backbone(x))


def _probe_data(seed: int) -> tuple[LinearProbe, torch.Tensor, torch.Tensor]:
    model = _seeded(seed, LinearProbe).double()
    gen = _gen(seed)
    x = torch.randn(256, 3, 10, 10, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        feats = model.backbone(x)
    feats = (feats - feats.mean(0)) / feats.std(0)
    score = feats @ torch.randn(16, 4, generator=gen, dtype=torch.float64)
    score = score + 1.5 * torch.randn(256, 4, generator=gen, dtype=torch.float64)
    return model, x, score.argmax(1)  # noisy labels: the optimum is finite


def _lbfgs(params: list[nn.Parameter], loss: Callable[[], torch.Tensor], iters: int) -> None:
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=iters,
        max_eval=2 * iters,
        tolerance_grad=1e-14,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    opt.zero_grad(set_to_none=True)


def _frozen(solved: bool) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        model, x, y = _probe_data(seed)
        if solved:
            with torch.no_grad():
                feats = model.backbone(x)  # frozen: fit the probe on its features once
            probe = model.probe
            _lbfgs(list(probe.parameters()), lambda: F.cross_entropy(probe(feats), y), 500)
        return Built(model, (x, y), F.cross_entropy)

    return build


# ----------------------------------------------------- dict outputs, several heads


class MultiHead(nn.Module):
    """A shared trunk and three heads returned as a dict; the loss ignores ``aux``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.heads = nn.ModuleDict(
            {"cls": nn.Linear(32, 3), "reg": nn.Linear(32, 1), "aux": nn.Linear(32, 2)}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


def _multi_head(reg_weight: float) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        model = _seeded(seed, MultiHead)
        gen = _gen(seed)
        x = torch.randn(128, 8, generator=gen)
        targets = {
            "cls": (x[:, :3] + 0.3 * torch.randn(128, 3, generator=gen)).argmax(1),
            "reg": torch.sin(x[:, 3]) + x[:, 4] * x[:, 5],
        }

        def loss_fn(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
            cls = F.cross_entropy(out["cls"], t["cls"])
            return cls + reg_weight * F.mse_loss(out["reg"].squeeze(-1), t["reg"])

        return Built(model, (x, targets), loss_fn)

    return build


# ---------------------------------------------- tanh MLP solved with saturated units

TANH_LBFGS_ITERS = 200


def _tanh_solved(seed: int) -> Built:
    """A 3-8-1 tanh net fitted by L-BFGS to a teacher of its own shape (float64).

    Four of the teacher's hidden units have a bias of ±10 and small weights: tanh is at
    ±1 on every sample (derivative < 1e-8). The student starts near the teacher. The fit
    is made once per seed; each call returns a fresh model with the fitted weights.
    """
    model, batch, loss_fn = _tanh_fit(seed)
    return Built(copy.deepcopy(model), batch, loss_fn)


@functools.cache
def _tanh_fit(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], LossFn]:
    gen = _gen(seed)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    teacher = _seeded(seed, make)
    with torch.no_grad():
        teacher[0].weight[4:].mul_(0.1)
        teacher[0].bias[4:] = torch.tensor([10.0, -10.0, 10.0, -10.0], dtype=torch.float64)
        y = teacher(x)
    model = _seeded(seed + 1, make)
    with torch.no_grad():
        for p, q in zip(model.parameters(), teacher.parameters(), strict=True):
            p.copy_(q + 0.05 * torch.randn(q.shape, generator=gen, dtype=torch.float64))
    _lbfgs(list(model.parameters()), lambda: F.mse_loss(model(x), y), TANH_LBFGS_ITERS)
    return model, (x, y), F.mse_loss


# ------------------------------------------------------ ReLU net, partly or fully dead


def _relu_dead(dead_units: int) -> Callable[[int], Built]:
    def build(seed: int) -> Built:
        def make() -> nn.Module:
            return nn.Sequential(
                nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
            )

        model = _seeded(seed, make)
        with torch.no_grad():
            model[2].bias[:dead_units] = -100.0
            if dead_units == 64:
                model[4].bias.zero_()  # the head's own optimum for an all-zero input
        gen = _gen(seed)
        x = torch.randn(96, 10, generator=gen)
        y = _balanced_labels(96, 3, gen)
        x[torch.arange(96), y] += 1.5
        return Built(model, (x, y), F.cross_entropy)

    return build


# ----------------------------------------------------------------------------- the zoo

# A layer of a healthy twin that 20 SGD steps on it alone move by less than 0.1% of the
# loss (LayerNorms, and attention at BERT's 0.02-std init) has nothing to win by itself
# yet: "converged" is as true as "ok" (learning slowly), while the model as a whole learns
# at the same lr, so neither is stuck. The numbers are in docs/reference-cases.md.
OK_OR_DONE = _s("ok", "converged")

CASES: tuple[ZooCase, ...] = (
    ZooCase(
        "gpt2",
        "GPT-2 language model (2 layers, width 32, LM head tied to the token embedding)",
        "transformers GPT2LMHeadModel from a GPT2Config",
        healthy=Twin(
            _gpt2,
            lr=0.1,
            model_status=OK,
            layers=(("*.ln_*", OK_OR_DONE), ("*", OK)),
            ground_truth="At init, every block's lr·λmax(Hessian) ≤ 0.38 (stable); 100 "
            "full-batch SGD steps at lr 0.1 take the loss from 3.52 (unigram entropy 3.41) "
            "to 0.85; each layer alone, 20 SGD steps, lowers it by 0.2-37%, except the "
            "LayerNorms (≤ 0.02%).",
        ),
        sick=Twin(
            _gpt2,
            lr=2.0,
            model_status=EXPLODING,
            layers=(
                ("transformer.wte", EXPLODING),
                ("lm_head", EXPLODING),
                ("*.ln_[12]", OK_OR_DONE),
                ("*", OK),
            ),
            ground_truth="The same model at lr 2: lr·λmax(Hessian) = 11 for the whole model "
            "and 7.5 for the tied embedding / LM head block (unstable: > 2), ≤ 0.93 for "
            "every other block; full-batch SGD at lr 2 reaches NaN within 100 steps (its "
            "first step still lowers the loss, × 0.96), while SGD on any other layer alone "
            "lowers it.",
        ),
        curvature=True,
    ),
    ZooCase(
        "bert",
        "BERT sequence classifier (2 layers, width 32, tanh pooler on [CLS])",
        "transformers BertForSequenceClassification from a BertConfig",
        healthy=Twin(
            _bert(saturated_pooler=False),
            lr=0.1,
            model_status=OK,
            layers=(
                ("bert.embeddings.word_embeddings", OK),
                ("bert.pooler.dense", OK),
                ("classifier", OK),
                ("*", OK_OR_DONE),
            ),
            ground_truth="At init, 100 SGD steps at lr 0.1 take the loss from 0.693 (prior "
            "0.693) to 0.35, Adam to 7e-5; the word embedding, pooler and classifier each "
            "lower it alone; the encoder's layers (0.02-std init) move it by < 0.1% alone.",
        ),
        sick=Twin(
            _bert(saturated_pooler=True),
            lr=0.1,
            model_status=DEAD,
            layers=(
                ("bert.pooler.dense", DEAD),
                # Its input is the constant pooler output: all it can win is the gap
                # between its bias and the label prior, 0.02% of the loss.
                ("classifier", OK_OR_DONE),
                ("*", VANISHING),
            ),
            ground_truth="The pooler's bias is 20: tanh is exactly 1.0 (float32) on every "
            "sample, so the pooler neither passes a signal nor learns (gradient exactly 0), "
            "and every encoder and embedding layer gets an exactly zero gradient. SGD and "
            "Adam (100 steps) stay at the prior's loss 0.6931, while the healthy twin's "
            "SGD reaches 0.35: the encoder has headroom its signal cannot reach.",
        ),
    ),
    ZooCase(
        "hf-resnet",
        "ResNet (basic blocks, BatchNorm, 2 stages) on 16×16 images",
        "transformers ResNetForImageClassification from a ResNetConfig",
        healthy=Twin(
            _hf_resnet,
            lr=0.1,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="At init (train mode), every block's lr·λmax ≤ 0.19; 100 SGD steps "
            "at lr 0.1 take the loss from 1.41 (prior 1.386) to 0.012; every layer alone "
            "lowers it by 0.3-44% in 20 steps.",
        ),
        sick=Twin(
            _hf_resnet,
            lr=10.0,
            model_status=EXPLODING,
            layers=(
                ("classifier.1", EXPLODING),
                # Each convolution feeds a BatchNorm, so the loss ignores its scale: its
                # lr·λmax is 3-19 at init, yet SGD on it alone lowers the loss (the step
                # grows its norm, which shrinks its effective step). Both are true.
                ("*.convolution", _s("ok", "exploding")),
                # Frozen, the last shortcut BatchNorm also lets the rest train (1.41 to
                # 0.94 in 20 SGD steps, ~1.0 after 50), less well than the classifier
                # frozen (to 0.01): a carrier too, by the frozen trial.
                ("*.stages.1.layers.0.shortcut.normalization", _s("ok", "exploding")),
                ("*", OK),
            ),
            ground_truth="At lr 10 the first SGD step multiplies the loss by 2.4 and 100 "
            "steps end at 1.74, above the start (1.41) and the prior (1.386). lr·λmax"
            "(Hessian) at init: 19 for the stem convolution, 18 for the classifier, 9.3 and "
            "4.4 for the first convolution of each stage, 3.0-3.4 for the second ones, "
            "≤ 1.1 for the shortcut convolution and every BatchNorm. Alone, 20 SGD steps on "
            "the classifier raise the loss (× 1.11); on any convolution they lower it "
            "(× 0.47-0.78). (At lr 2, where "
            "the stem and classifier are already at lr·λmax ≈ 4, SGD still reaches 3e-4: "
            "BatchNorm absorbs a moderate excess, so lr 2 is not this twin.)",
        ),
        curvature=True,
    ),
    ZooCase(
        "transformer-encoder",
        "nn.TransformerEncoder classifier (2 post-LN layers, ReLU FFN, MultiheadAttention)",
        "torch nn.TransformerEncoderLayer / nn.MultiheadAttention (out_proj used functionally)",
        healthy=Twin(
            _tf_encoder(dead_ffn=False),
            lr=0.1,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="At init, 100 SGD steps at lr 0.1 take the loss from 0.708 (prior "
            "0.693) to 0.003; every layer alone, attention out_proj included (gradient "
            "0.11), lowers it by 0.3-19% in 20 steps.",
        ),
        sick=Twin(
            _tf_encoder(dead_ffn=True),
            lr=0.1,
            model_status=DEAD,
            layers=(("*.linear1", DEAD), ("*", OK)),
            ground_truth="Both FFNs' linear1 have bias −100: every ReLU unit is off on "
            "every token, linear1's gradient is exactly 0 and it passes no signal. The "
            "residual path carries the rest: SGD still reaches 0.004 in 100 steps, and "
            "every other layer (linear2 through its bias) lowers the loss alone.",
        ),
    ),
    ZooCase(
        "transformer-decoder",
        "nn.TransformerDecoder copy model, output layer tied to the embedding "
        "(F.linear(h, embed.weight)), padded source with a masked-mean context",
        "torch nn.TransformerDecoderLayer",
        healthy=Twin(
            _tf_decoder(empty_source=False),
            lr=0.1,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="Every source has at least 6 unpadded positions; the loss and "
            "every gradient are finite; 100 SGD steps at lr 0.1 take the loss from 3.44 to "
            "2.41 (Adam: 0.0013), and every layer alone, both out_proj and the tied "
            "embedding included, lowers it by 1-20% in 20 SGD steps.",
        ),
        sick=Twin(
            _tf_decoder(empty_source=True),
            lr=0.1,
            model_status=NONFINITE,
            layers=(("*", NONFINITE),),
            ground_truth="One source is all padding: its masked mean is 0/0 = NaN, the loss "
            "is NaN and every layer's gradient holds NaN (exact).",
        ),
    ),
    ZooCase(
        "rnn",
        "vanilla tanh nn.RNN over 100 steps, read at the last step",
        "torch nn.RNN",
        healthy=Twin(
            _recurrent("rnn", label_step=99),
            lr=0.5,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="The label's input is at the last step: 100 SGD steps at lr 0.5 "
            "take the loss from 0.73 (prior 0.693) to 0.05; alone, 20 SGD steps on the RNN "
            "lower it by 55%, on the head by 38%.",
        ),
        sick=Twin(
            _recurrent("rnn", label_step=0),
            lr=0.5,
            model_status=VANISHING,
            layers=(
                ("rnn", VANISHING),
                # Its input h_100 is the same for every sample: all it can win is the
                # gap to the label prior, < 0.2% of the loss.
                ("head", OK_OR_DONE),
            ),
            ground_truth="The label's input is at step 1, 99 steps before the readout; "
            "later inputs are zero. SGD (lr 0.5) and Adam (lr 0.01), 100 steps each, stop at "
            "0.6931 = ln 2, the prior's loss, while the twin with the input at the last step "
            "learns: the signal from step 1 fades through time (default init: recurrent "
            "weight variance 1/(3·16), a contraction).",
        ),
    ),
    ZooCase(
        "lstm",
        "nn.LSTM over 100 steps, read at the last step",
        "torch nn.LSTM",
        healthy=Twin(
            _recurrent("lstm", label_step=99),
            lr=0.5,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="The label's input is at the last step: SGD at lr 0.5 leaves the "
            "prior's loss 0.693 within 100 steps; both layers learn alone.",
        ),
        sick=Twin(
            _recurrent("lstm", label_step=0),
            lr=0.5,
            model_status=VANISHING,
            layers=(("rnn", VANISHING), ("head", OK_OR_DONE)),
            ground_truth="The label's input is at step 1 of 100: with the default forget "
            "gate ≈ σ(0) = 0.5 the cell forgets it (0.5^99); SGD (lr 0.5) and Adam (lr "
            "0.01), 100 steps each, stop at ln 2 = 0.6931, the prior's loss.",
        ),
    ),
    ZooCase(
        "gru",
        "nn.GRU over 100 steps, read at the last step",
        "torch nn.GRU",
        healthy=Twin(
            _recurrent("gru", label_step=99),
            lr=0.5,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="The label's input is at the last step: SGD at lr 0.5 leaves the "
            "prior's loss 0.693 within 100 steps; both layers learn alone.",
        ),
        sick=Twin(
            _recurrent("gru", label_step=0),
            lr=0.5,
            model_status=VANISHING,
            layers=(("rnn", VANISHING), ("head", OK_OR_DONE)),
            ground_truth="The label's input is at step 1 of 100: with the default update "
            "gate ≈ 0.5 the state forgets it; SGD (lr 0.5) and Adam (lr 0.01), 100 steps "
            "each, stop at ln 2 = 0.6931, the prior's loss.",
        ),
    ),
    ZooCase(
        "cnn-bn",
        "conv net with BatchNorm (conv-BN-ReLU ×2, global pool, linear)",
        "torch nn.Conv2d / nn.BatchNorm2d",
        healthy=Twin(
            _cnn_bn(dead_channels=False),
            lr=0.1,
            model_status=OK,
            layers=(("1", OK_OR_DONE), ("*", OK)),
            ground_truth="At init (train mode), 100 SGD steps at lr 0.1 take the loss from "
            "1.40 (prior 1.386) to 1.19, Adam to 0.008; each layer alone lowers it, the "
            "first BatchNorm by only 0.02%.",
        ),
        sick=Twin(
            _cnn_bn(dead_channels=True),
            lr=0.1,
            model_status=DEAD,
            layers=(
                ("0", VANISHING),
                ("1", VANISHING),
                ("3", DEAD),
                ("4", DEAD),
                ("8", CONVERGED),
            ),
            ground_truth="The second BatchNorm's shift is −20 while its normalized inputs "
            "stay within ±6: every ReLU after it is off on the whole batch; conv 3 and BN 4 "
            "get exactly zero gradients and pass no signal; conv 0 and BN 1 (their units "
            "alive) get exactly zero gradients: the signal is lost at the dead layer. The "
            "head sees an all-zero input and, with a zero bias and balanced labels, sits at "
            "its own optimum (gradient exactly 0). SGD and Adam stay at ln 4 = 1.386 while "
            "the healthy twin learns.",
        ),
    ),
    ZooCase(
        "residual",
        "residual MLP, 16 blocks x + α·W₂ relu(W₁ x), He init, no normalization",
        "torch nn.Linear (the blocks are ours; the failure is the textbook one)",
        healthy=Twin(
            _residual(alpha=0.25),
            lr=0.05,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="α = 1/√16: the forward variance grows by (1 + α²)^16 ≈ e; "
            "lr·λmax ≤ 0.83 for the whole model, ≤ 0.51 per block; 100 SGD steps at lr "
            "0.05 take the loss from 1.85 to 0.04; every layer alone lowers it by 1-45%.",
        ),
        sick=Twin(
            _residual(alpha=1.0),
            lr=0.05,
            model_status=EXPLODING,
            layers=(("*", EXPLODING),),
            ground_truth="α = 1: the variance doubles per block (2^16), the loss at init is "
            "1475; at lr 0.05 every block's lr·λmax is 1.1e3 to 6e4 and the first SGD step "
            "turns the loss into NaN.",
        ),
        curvature=True,
    ),
    ZooCase(
        "frozen-backbone",
        "frozen conv backbone (requires_grad=False) with a linear probe (float64)",
        "torch nn.Conv2d, nn.Linear",
        healthy=Twin(
            _frozen(solved=True),
            lr=0.1,
            model_status=CONVERGED,
            layers=(("backbone.*", FROZEN), ("probe", CONVERGED)),
            ground_truth="The probe is fitted by 500 L-BFGS iterations: loss 0.306 (prior "
            "1.369, noisy labels so the optimum is finite), gradient 1.2e-4; 100 SGD and "
            "100 Adam steps change nothing in 4 digits. The backbone is frozen.",
        ),
        sick=Twin(
            _frozen(solved=False),
            lr=30.0,
            model_status=EXPLODING,
            layers=(("backbone.*", FROZEN), ("probe", EXPLODING)),
            ground_truth="The probe at init, at lr 30: lr·λmax(Hessian) of the probe is 10 "
            "(unstable: > 2); the first SGD step multiplies the loss by 2.2 and 100 steps "
            "end at 8.5 (start 1.39).",
        ),
        curvature=True,
    ),
    ZooCase(
        "multi-head",
        "shared trunk, three heads returned as a dict; the loss ignores the aux head",
        "torch nn.Linear / nn.GELU (dict outputs)",
        healthy=Twin(
            _multi_head(reg_weight=1.0),
            lr=0.1,
            model_status=OK,
            layers=(("heads.aux", CONVERGED), ("*", OK)),
            ground_truth="Loss = CE + MSE. lr·λmax ≤ 0.27; 100 SGD steps at lr 0.1 take "
            "the loss from 2.15 to 0.55; the trunk and the cls and reg heads each lower it "
            "alone. The aux head's gradient is exactly 0 and the loss does not depend on "
            "it (λ = 0): nothing to win, nothing stuck.",
        ),
        sick=Twin(
            _multi_head(reg_weight=1000.0),
            lr=0.1,
            model_status=EXPLODING,
            layers=(
                # lr·λmax 8.6, yet trained alone at lr 0.1 it lowers the loss ×0.13 in 10
                # steps and ×0.006 in 100 (after an oscillation): it does not carry the
                # instability; trunk.2 alone multiplies the loss by 34 in one step.
                ("trunk.0", OK),
                ("trunk.2", EXPLODING),
                ("heads.reg", EXPLODING),
                # The cls loss is < 0.2% of a loss dominated by the ×1000 regression term.
                ("heads.cls", OK_OR_DONE),
                ("heads.aux", CONVERGED),
            ),
            ground_truth="Loss = CE + 1000·MSE at lr 0.1: lr·λmax = 230 for the reg head, "
            "43 and 8 for the trunk's layers, 0.04 for the cls head; the first SGD step "
            "multiplies the loss by 5.7e4. Alone, one SGD step on heads.reg multiplies it by "
            "174 and on trunk.2 by 34, while 100 steps on trunk.0 alone lower it ×0.006.",
        ),
        curvature=True,
    ),
    ZooCase(
        "tanh-solved",
        "3-8-1 tanh MLP at an L-BFGS optimum, 4 hidden units saturated on every sample (float64)",
        "torch nn.Linear / nn.Tanh",
        healthy=Twin(
            _tanh_solved,
            lr=0.01,
            model_status=CONVERGED,
            layers=(("*", CONVERGED),),
            ground_truth="Fitted to a teacher of its own shape by 200 L-BFGS iterations: "
            "loss 5.9e-8, 5e-6 of the constant prediction's 0.0126; gradient norms ≤ 4e-6; "
            "lr·λmax ≤ 0.11; 100 SGD steps change the loss by 0.03%, 100 Adam steps raise "
            "it (1.4e-7).",
        ),
        sick=Twin(
            _tanh_solved,
            lr=0.5,
            model_status=EXPLODING,
            layers=(("0", CONVERGED), ("2", EXPLODING)),
            ground_truth="The same optimum at lr 0.5: lr·λmax(Hessian) = 5.5 for the output "
            "layer (unstable), 0.19 for the hidden layer, which has nothing left to win; "
            "100 SGD steps at lr 0.5 take the loss from 5.9e-8 to 7e100.",
        ),
        curvature=True,
    ),
    ZooCase(
        "relu-dead",
        "ReLU MLP 10-64-64-3 whose second layer is partly (62%) or wholly dead",
        "torch nn.Linear / nn.ReLU",
        healthy=Twin(
            _relu_dead(dead_units=40),
            lr=0.1,
            model_status=OK,
            layers=(("*", OK),),
            ground_truth="40 of layer 2's 64 units have bias −100 (dead on every sample), "
            "24 live: the layer still learns (alone, 20 SGD steps lower the loss by 5.6%) "
            "and passes the signal that layer 0 learns from (0.7%); 100 SGD steps at lr 0.1 "
            "take the loss from 1.10 to 0.31.",
        ),
        sick=Twin(
            _relu_dead(dead_units=64),
            lr=0.1,
            model_status=DEAD,
            layers=(("0", VANISHING), ("2", DEAD), ("4", CONVERGED)),
            ground_truth="All 64 units dead: layers 0 and 2 get exactly zero gradients; "
            "the head sees zeros and, with a zero bias and balanced labels, sits at its own "
            "optimum (gradient 5e-8, rounding); SGD and Adam stay at ln 3 = 1.0986 while "
            "the healthy twin learns.",
        ),
    ),
)
