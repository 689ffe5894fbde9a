"""Whether SGD at the learning rate blows up: the trial, who carries it, and diagnose.

lr·λmax > 2 at the starting point was the exploding test; on transformers models it
called a Falcon that trains at lr 1 (loss 4.18 → 0.05) exploding and a Wav2Vec2 that
goes NaN at step 6 ok. The ground truths here come from plain SGD runs with torch.optim.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsight
from gradsight.diagnosis.trial import carriers, sgd_trial
from zoo import CASES


def _sgd_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int
) -> list[float]:
    """The reference: torch.optim.SGD on a copy, full batch."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps + 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        losses.append(float(loss))
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize(("lr", "blows_up"), [(0.5, False), (400.0, True)])
def test_the_trial_is_sgd_on_a_copy_and_leaves_the_model_as_it_was(
    lr: float, blows_up: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model(x).sum().backward()  # the user's own .grad, which must stay
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    trial = sgd_trial(model, (x, y), F.cross_entropy, list(model.parameters()), lr, steps=10)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # weights and BatchNorm statistics
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert trial.blew_up is blows_up
    reference = _sgd_losses(model, x, y, lr, steps=len(trial.losses) - 1)
    assert trial.losses == pytest.approx(reference, rel=1e-4, nan_ok=True)
    if blows_up:
        assert trial.at == len(trial.losses) - 1
        last = trial.losses[-1]
        assert not math.isfinite(last) or last > 1.2 * trial.losses[0]
        assert "full-batch SGD at lr 400" in trial.describe()
    else:
        assert trial.at is None and len(trial.losses) == 11


class _ScalarLinear(nn.Module):
    """f(x) = u·v·x: the two-layer scalar linear network of the catapult (Lewkowycz et
    al. 2020), whose SGD dynamics have a closed form."""

    def __init__(self, u: float, v: float) -> None:
        super().__init__()
        self.u = nn.Linear(1, 1, bias=False, dtype=torch.float64)
        self.v = nn.Linear(1, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.u.weight.fill_(u)
            self.v.weight.fill_(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(x))


def _half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * F.mse_loss(out, target)


def test_a_catapult_that_falls_back_is_not_a_blow_up() -> None:
    """L = ½(uv)² from u = 3, v = 0.1 at lr 0.4: the Hessian's lr·λmax is 3.6 and the
    loss rises ×160 by step 3, then the catapult lowers the curvature and the loss falls
    to 1e-8 of its start by step 20 (the closed-form recursion u ← u − lr·r·v, v ← v −
    lr·r·u, r = uv). Stopping at the first rise called it exploding; the trial judges
    where SGD ends. A run that stays up is still a blow-up."""
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    model = _ScalarLinear(3.0, 0.1)
    u, v, reference = 3.0, 0.1, []
    for _ in range(21):
        r = u * v
        reference.append(0.5 * r * r)
        u, v = u - 0.4 * r * v, v - 0.4 * r * u
    trial = sgd_trial(model, (x, y), _half_mse, list(model.parameters()), 0.4)
    assert trial.losses == pytest.approx(reference, rel=1e-9)
    assert max(trial.losses) > 100 * trial.losses[0] and trial.losses[-1] < 1e-6 * trial.losses[0]
    assert not trial.blew_up
    assert "after a spike to 7.22 at step 3" in trial.describe()
    d = gradsight.diagnose(model, (x, y), _half_mse, lr=0.4)
    assert d.status != "exploding" and d.trial_blew_up is False, d.summary
    assert "after a spike to 7.22 at step 3" in d.summary
    # At lr 1 the same net diverges, and the trial says so.
    assert sgd_trial(model, (x, y), _half_mse, list(model.parameters()), 1.0).blew_up
    assert gradsight.diagnose(model, (x, y), _half_mse, lr=1.0).status == "exploding"


def test_a_spike_that_ends_in_a_frozen_loss_is_a_collapse_not_a_recovery() -> None:
    """A Mamba at lr 3 (transformers, from a config): the loss climbs to 75.8 by step 12,
    its hidden states overflow to 1e35, the last RMSNorm outputs zero and the loss sits
    at exactly the uniform prediction's, ln 64 = 4.1589, with a zero gradient, below its
    start 4.53; 50 SGD steps end in NaN. That is a collapse. A catapult keeps moving
    after it falls back, and a loss that stays put without a spike is not a blow-up."""
    from gradsight.diagnosis.trial import Trial, _collapsed

    mamba = (4.5321, 2.5531, 1.5692, 1.1138, 1.1759, 1.7108, 1.6181, 2.0895, 2.7256, 4.5409)
    mamba += (8.4744, 27.1595, 75.8034) + (4.158883,) * 8
    assert _collapsed(mamba, 1.1, 3)
    catapult = (0.045, 0.302, 1.89, 7.22, 0.00208, 0.000905, 0.000393, 0.00017, 7.37e-05)
    assert not _collapsed(catapult, 1.1, 3)
    steady = (2.0, 1.5, 1.2) + (1.0,) * 6  # converged, never above the start
    assert not _collapsed(steady, 1.1, 3)
    fitted = (0.3, 0.9, 2.5, 0.01) + (0.0,) * 5  # a spike, then every sample fitted
    assert not _collapsed(fitted, 1.1, 3)
    text = Trial(lr=3.0, losses=mamba, rise=1.1, at=20).describe()
    assert "up to 75.8 at step 12" in text and "freezes at 4.159" in text
    assert "collapsed" in text
    # End to end: a ReLU net whose first step at lr 60 throws the hidden unit's weight
    # far negative. The unit is dead from step 2, the output is zero and the loss sits at
    # mean(y²) = 1.0, just above its start 0.989 (×1.011: within 1.1×) for good.
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False))
    model = model.double()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[2].weight.fill_(0.1)
    x = torch.linspace(0.1, 1, 32, dtype=torch.float64)[:, None]
    y = torch.ones(32, 1, dtype=torch.float64)
    trial = sgd_trial(model, (x, y), F.mse_loss, list(model.parameters()), 60.0)
    assert trial.blew_up and trial.losses[2:] == (1.0,) * 19, trial.losses
    d = gradsight.diagnose(model, (x, y), F.mse_loss, lr=60.0)
    assert d.status == "exploding" and "the network collapsed" in d.summary


def _multi_head_instability():  # type: ignore[no-untyped-def]
    """The zoo's sick multi-head twin as :func:`carriers` sees it: the built twin, the
    model returning one tensor and its loss, their layer-name prefix, each module's
    trainable parameters, the blocks' lr·λmax (measured at lr 0.1) and the loss at the
    start."""
    from gradsight._outputs import tensor_output

    built = next(c for c in CASES if c.key == "multi-head").twins()["sick"].build(0)
    model = built.model
    blocks = {
        name: [p for p in m.parameters(recurse=False) if p.requires_grad]
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    }
    products = {"trunk.0": 8.6, "trunk.2": 43.0, "heads.reg": 230.0, "heads.cls": 0.04}
    adapted = tensor_output(model, model(built.batch[0]), built.loss_fn)
    assert adapted is not None
    wrapped, loss, prefix = adapted
    start = float(built.loss_fn(model(built.batch[0]), built.batch[1]))
    return built, wrapped, loss, prefix, blocks, products, start


def test_the_carriers_of_the_multi_head_instability_are_the_ones_that_blow_up_alone() -> None:
    """Loss = CE + 1000·MSE at lr 0.1 (the zoo's sick multi-head): one SGD step on the
    regression head alone multiplies the loss by 174 and on trunk.2 by 34; trunk.0, at
    lr·λmax 8.6, lowers it ×0.006 in 100 steps alone. The cls and aux heads are flat."""
    built, wrapped, loss, prefix, blocks, products, start = _multi_head_instability()
    lr = next(c for c in CASES if c.key == "multi-head").twins()["sick"].lr
    for c in (1.0, 1e-6, 1e6):  # the same carriers and shares at every scale of the loss
        found = carriers(
            wrapped,
            built.batch,
            lambda out, t, c=c: c * loss(out, t),
            {prefix + n: ps for n, ps in blocks.items()},
            {prefix + n: v for n, v in products.items()},
            lr / c,
            loss=c * start,
        )
        names = {n.removeprefix(prefix) for n in found}
        assert names == {"trunk.2", "heads.reg"}, (c, found)
        assert all(0 <= carrier.share <= 1 for carrier in found.values())
        assert found[prefix + "trunk.2"].alone == pytest.approx(34, rel=0.05)


def test_a_carrier_is_a_candidate_whose_freezing_stops_the_blow_up() -> None:
    """With the trial rerun with a layer frozen: the candidates (the two largest shares
    of the top eigenvector, the two largest gradients) are tried in turn, and those
    whose freezing stops the blow-up carry it, with that run as the evidence. Where none
    does, the one-pass tests decide as before, and the reason says that freezing the
    layer alone was tried and does not stop it (BLOOM with weights ×100: the embedding
    norm holds 41% of the sharpest direction, yet only freezing ln_f trains the rest)."""
    from gradsight.diagnosis.trial import Trial

    built, wrapped, loss, prefix, blocks, products, start = _multi_head_instability()
    tried: list[str] = []
    calm = Trial(lr=0.1, losses=(start, 0.5 * start), rise=1.1, at=None)
    blown = Trial(lr=0.1, losses=(start, float("nan")), rise=1.1, at=1)

    # Frozen, trunk.2 does not blow up either, but the loss ends above its start (a
    # spike that fell back short of it): the rest does not train, so it does not count.
    risen = Trial(lr=0.1, losses=(start, 100 * start, 1.05 * start), rise=1.1, at=None)

    def frozen(name: str) -> Trial:
        tried.append(name.removeprefix(prefix))
        if name.endswith("heads.reg"):
            return calm
        return risen if name.endswith("trunk.2") else blown

    def found(frozen_trial):  # type: ignore[no-untyped-def]
        return carriers(
            wrapped,
            built.batch,
            loss,
            {prefix + n: ps for n, ps in blocks.items()},
            {prefix + n: v for n, v in products.items()},
            0.1,
            loss=start,
            frozen_trial=frozen_trial,
        )

    out = found(frozen)
    assert {n.removeprefix(prefix) for n in out} == {"heads.reg"}
    assert out[prefix + "heads.reg"].frozen is calm
    assert "with it frozen the same step trains the rest" in out[prefix + "heads.reg"].describe()
    assert 2 <= len(tried) <= 4 and len(set(tried)) == len(tried)  # candidates only, once each
    assert "trunk.2" in tried
    assert "heads.cls" not in tried and "heads.aux" not in tried  # flat heads: no candidates
    # No freezing stops it: the one-pass tests (trunk.2 and heads.reg blow up alone),
    # and the reason says that freezing either alone was tried and does not stop it.
    out = found(lambda name: blown)
    assert {n.removeprefix(prefix) for n in out} == {"trunk.2", "heads.reg"}
    assert all(c.frozen is None and c.not_alone for c in out.values())
    assert "yet freezing it alone does not stop the blow-up" in out[prefix + "trunk.2"].describe()
    # Not tried (the frozen runs could not run): nothing is said of them.
    out = found(lambda name: None)
    assert all(not c.not_alone for c in out.values())
    assert "freezing" not in out[prefix + "trunk.2"].describe()


def test_a_frozen_run_s_losses_are_written_so_that_they_differ() -> None:
    """tanh-solved frozen: 5.8835e-08 → 5.8754e-08 is a fall, not "5.88e-08 to 5.88e-08"."""
    from gradsight.diagnosis.trial import Carrier, Trial

    fell = Trial(lr=1.0, losses=(5.8835e-08, 5.8754e-08), rise=1.1, at=None)
    text = Carrier(0.0, frozen=fell).describe()
    assert "from 5.883e-08 to 5.875e-08" in text
    fell = Trial(lr=1.0, losses=(4.16, 2.5), rise=1.1, at=None)
    assert "from 4.16 to 2.5" in Carrier(0.3, frozen=fell).describe()


def _tiny_falcon() -> tuple[nn.Module, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        bias=False,
    )
    gen = torch.Generator().manual_seed(1000)
    seq = [torch.randint(0, 64, (16, 1), generator=gen)]
    for _ in range(16):
        seq.append((3 * seq[-1] + 1) % 64)  # a bigram the model can learn
    tokens = torch.cat(seq, 1)
    return FalconForCausalLM(config), ({"input_ids": tokens[:, :-1]}, tokens[:, 1:])


def _lm_loss(out, targets):  # type: ignore[no-untyped-def]
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize(("lr", "exploding"), [(1.0, False), (10.0, True)])
def test_a_falcon_at_the_edge_of_stability_trains_and_past_it_explodes(
    lr: float, exploding: bool
) -> None:
    """transformers' Falcon from a config, full-batch SGD. At lr 1 its tied embedding's
    lr·λmax is 5.9 (8.8 for the whole model's Hessian), yet the loss falls monotonically
    4.18 → 0.05 in 40 steps (the sharpness falls to 1.9 by step 20): the old lr·λmax > 4
    rule called it exploding. At lr 10 the loss is NaN by step 8."""
    model, batch = _tiny_falcon()
    d = gradsight.diagnose(model, batch, _lm_loss, lr=lr)
    statuses = {layer.name: layer.status for layer in d.layers}
    assert (d.status == "exploding") is exploding, d.summary
    if exploding:
        assert statuses["transformer.word_embeddings"] == "exploding"
        assert "The step is unstable: full-batch SGD at lr 10" in d.summary
    else:
        assert "exploding" not in statuses.values()
        emb = d.layer("transformer.word_embeddings")
        assert "At the edge of stability" in emb.reason
        assert "20 full-batch SGD steps at lr 1 take the loss from 4.1" in emb.reason
    # The ground truth, by torch.optim.SGD.
    train = copy.deepcopy(model)
    opt = torch.optim.SGD(train.parameters(), lr=lr)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = _lm_loss(train(**batch[0]), batch[1])
        losses.append(float(loss))
        loss.backward()
        opt.step()
    final = float(_lm_loss(train(**batch[0]), batch[1]))
    assert (not math.isfinite(final) or final > losses[0]) is exploding


def test_a_wav2vec2_whose_blocks_all_look_stable_still_explodes() -> None:
    """transformers' Wav2Vec2 from a config, SGD at lr 10: every block's lr·λmax is below
    2.9 (the classifier's λmax 0.28), so the old rule said ok, but the whole model's
    Hessian gives lr·λmax ≈ 6 and the loss is NaN by step 6. The trial sees it; the
    classifier and projector hold most of the sharpest direction."""
    import math as m

    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        classifier_proj_size=16,
        num_labels=4,
    )
    model = Wav2Vec2ForSequenceClassification(config)
    gen = torch.Generator().manual_seed(1000)
    y = torch.randint(0, 4, (16,), generator=gen)
    t = torch.arange(1600) / 16000.0
    freqs = torch.tensor([200.0, 600.0, 1500.0, 3000.0])
    x = torch.sin(2 * m.pi * freqs[y][:, None] * t) + 0.1 * torch.randn(16, 1600, generator=gen)

    def loss_fn(out, targets):  # type: ignore[no-untyped-def]
        return F.cross_entropy(out.logits, targets)

    d = gradsight.diagnose(model, ({"input_values": x}, y), loss_fn, lr=10.0)
    assert d.status == "exploding", d.summary
    exploding = {layer.name for layer in d.layers if layer.status == "exploding"}
    assert exploding & {"classifier", "projector"}, exploding
    assert all((layer.lambda_max or 0.0) * 10 < 4 for layer in d.layers)


def test_a_trial_on_a_negative_loss_says_how_much_it_rose_not_a_ratio() -> None:
    """A loss below zero (a log-likelihood to maximize, written as its negative plus a
    constant) rises by an amount, not by a factor: "×0.5, above ×1.2" would read
    backwards."""
    from gradsight.diagnosis.trial import Trial

    trial = Trial(lr=1.0, losses=(-2.0, -1.5), rise=1.2, at=1)
    text = trial.describe()
    assert "from -2 to -1.5 (up by 0.5, more than 0.2× its size) by step 1" in text
    assert "×" not in text.split("(")[1].split(",")[0]


def test_a_trial_that_neither_blows_up_nor_falls_does_not_claim_training_steadies() -> None:
    from gradsight.diagnosis.trial import Trial

    fell = Trial(lr=1.0, losses=(2.0, 1.9, 1.5), rise=1.2, at=None)
    flat = Trial(lr=1.0, losses=(2.0, 2.1, 2.2), rise=1.2, at=None)
    assert "steadies itself" in fell.outcome()
    assert "does not fall" in flat.outcome() and "steadies" not in flat.outcome()
    # Fallen, but to no better than a constant prediction (a conv net at 100× its lr
    # ends 20 steps at 1.46 from 1.49, above the constant's 1.43): not steadied.
    above = fell.outcome(baseline=1.4)
    assert "steadies" not in above and "no better than predicting a constant (1.4)" in above
    assert "steadies itself" in fell.outcome(baseline=1.6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_trial_steps_as_the_user_s_sgd_does_momentum_and_all(nesterov: bool) -> None:
    """With the optimizer given, the trial is its SGD: momentum (continuing from the
    buffers its state holds), Nesterov, weight decay, each group's own lr; the reference
    is torch.optim.SGD stepping a copy of the model and of the optimizer's state."""
    from gradsight.diagnosis.trial import sgd_settings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.3},
            {"params": model[2].parameters(), "lr": 0.1, "weight_decay": 1e-2},
        ],
        momentum=0.9,
        nesterov=nesterov,
    )
    for _ in range(3):  # momentum buffers in its state
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = list(model.parameters())
    state = copy.deepcopy(opt.state_dict())
    trial = sgd_trial(
        model, (x, y), F.cross_entropy, params, 0.3, settings=sgd_settings(opt, params, 0.3)
    )
    assert opt.state_dict()["state"].keys() == state["state"].keys()
    for key, value in state["state"].items():  # the optimizer's state is left as it was
        assert torch.equal(
            opt.state_dict()["state"][key]["momentum_buffer"], value["momentum_buffer"]
        )
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(
        [
            {"params": twin[0].parameters(), "lr": 0.3},
            {"params": twin[2].parameters(), "lr": 0.1, "weight_decay": 1e-2},
        ],
        momentum=0.9,
        nesterov=nesterov,
    )
    twin_opt.load_state_dict(copy.deepcopy(state))
    reference = []
    for _ in range(len(trial.losses)):
        twin_opt.zero_grad()
        loss = F.cross_entropy(twin(x), y)
        reference.append(float(loss))
        loss.backward()
        twin_opt.step()
    assert trial.losses == pytest.approx(reference, rel=1e-5)
    assert "SGD (momentum 0.9) steps at lr 0.3" in trial.describe()
    plain = sgd_trial(model, (x, y), F.cross_entropy, params, 0.3)
    assert plain.losses != pytest.approx(trial.losses, rel=1e-5)  # the settings matter


def test_the_sharpest_direction_of_a_large_model_by_power_iteration_is_the_dense_one() -> None:
    """Beyond the memory Lanczos may take, the carriers' top eigenvector comes from power
    iteration, shifted where the largest curvature in magnitude is negative. Against the
    dense float64 Hessian of a small net (autograd.functional.hessian): the eigenvector
    of its most positive eigenvalue, also where a negative one is larger in magnitude."""
    from gradsight.curvature import HessianOperator
    from gradsight.diagnosis.trial import _sharpest_direction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
    params = list(model.parameters())
    for sign in (1.0, -1.0):  # -1: the loss's negative, whose largest |λ| is negative

        def loss_fn(out, t, sign=sign):  # type: ignore[no-untyped-def]
            return sign * F.cross_entropy(out, t)

        op = HessianOperator(model, (x, y), loss_fn)
        dense = op.to_dense()
        vals, vecs = torch.linalg.eigh(dense)
        v = _sharpest_direction(op, max_matvecs=400)
        assert abs(float(v @ vecs[:, -1])) > 0.99, (sign, vals[[0, -1]])
    assert len(params) == 4


def _tiny_deit() -> tuple[nn.Module, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    config = DeiTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=4,
    )
    gen = torch.Generator().manual_seed(1000)
    y = torch.randint(0, 4, (32,), generator=gen)
    x = 0.3 * torch.randn(32, 3, 16, 16, generator=gen)
    for i in range(32):  # the bright quadrant is the class
        r, c = divmod(int(y[i]), 2)
        x[i, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 1.0
    return DeiTForImageClassification(config), ({"pixel_values": x}, y)


def test_without_curvature_a_first_order_overshoot_is_checked_by_the_trial() -> None:
    """transformers' DeiT at SGD lr 0.1: lr·‖g‖² is several times the loss, so by first
    order the step overshoots (past Polyak's step), and curvature=False called layers
    exploding; 40 SGD steps train it. Where the first-order test fires, the step is now
    taken (one forward pass) and decides."""

    def loss_fn(out, targets):  # type: ignore[no-untyped-def]
        return F.cross_entropy(out.logits, targets)

    model, batch = _tiny_deit()
    grads = torch.autograd.grad(loss_fn(model(**batch[0]), batch[1]), list(model.parameters()))
    first = float(loss_fn(model(**batch[0]), batch[1]))
    assert 0.1 * sum(float(g.square().sum()) for g in grads) > 2 * first  # it overshoots
    d = gradsight.diagnose(model, batch, loss_fn, lr=0.1, curvature=False)
    assert d.status != "exploding", d.summary
    # One step (one forward pass, from the gradient just taken) checks the claim.
    assert (
        "The step does not blow up: one full-batch SGD step at lr 0.1 takes the loss" in d.summary
    )
    assert not any("overshoots" in layer.reason for layer in d.layers)
    train = copy.deepcopy(model)  # the ground truth
    opt = torch.optim.SGD(train.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(train(**batch[0]), batch[1])
        loss.backward()
        opt.step()
    assert float(loss) < first


def test_the_trial_is_part_of_the_result_and_survives_json() -> None:
    """The trial's losses and outcome are fields of the diagnosis (for a report or a
    stored run), NaN included, and read back from JSON."""
    import json

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    calm = gradsight.diagnose(model, (x, y), F.cross_entropy, lr=0.1)
    assert calm.trial_blew_up is False and len(calm.trial_losses or []) == 21
    assert (
        gradsight.diagnose(model, (x, y), F.cross_entropy, lr=0.1, curvature=False).trial_losses
        is None
    )
    wild = gradsight.diagnose(model, (x, y), F.cross_entropy, lr=1e4)
    assert wild.trial_blew_up is True
    wild.trial_losses = [*(wild.trial_losses or []), float("nan")]
    back = gradsight.Diagnosis.from_dict(json.loads(wild.to_json()))
    assert back.trial_blew_up is True
    assert back.trial_losses is not None and math.isnan(back.trial_losses[-1])
    assert back.trial_losses[:-1] == wild.trial_losses[:-1]
