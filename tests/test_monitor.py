"""gradsight.Monitor: exact numbers, training unchanged, scaled losses, accumulation."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsight
from gradsight import GradsightError, Monitor
from gradsight.curvature import top_eigenvalues
from gradsight.probes import SignalFlow, SignalProbe
from gradsight.store import load_run


def _model(act: type[nn.Module] = nn.Sigmoid, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 3)
    )


def _data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, steps: int, mon: Monitor | None, opt: torch.optim.Optimizer) -> None:
    for i in range(steps):
        x, y = _data(32, seed=i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()


def _reference(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, SignalFlow]:
    """A float64 batch and the full probe's measurement of one backward pass on it."""
    x, y = _data()
    x = x.double()
    with SignalProbe(model) as probe:
        nn.functional.cross_entropy(model(x), y).backward()
    return x, y, probe.result()


def test_training_with_the_monitor_is_bitwise_unchanged(tmp_path: Path) -> None:
    plain = _model(nn.ReLU)
    watched = _model(nn.ReLU)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(watched.parameters(), lr=0.05, momentum=0.9)
    _train(plain, 100, None, opt_a)
    with Monitor(watched, logdir=tmp_path / "run", optimizer=opt_b) as mon:
        _train(watched, 100, mon, opt_b)
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)
    run = load_run(tmp_path / "run")
    assert run.complete and len(run.series("loss")[""][0]) == 100
    steps, _ = run.series("update_ratio")["2"]
    assert steps.tolist() == list(range(0, 100, 10))  # update_every=10 by default


def test_recorded_numbers_match_direct_computation(tmp_path: Path) -> None:
    model = _model(nn.Sigmoid).double()
    x, y, ref = _reference(model)
    grads = {
        n: m.weight.grad.norm() ** 2 + m.bias.grad.norm() ** 2
        for n, m in model.named_children()
        if isinstance(m, nn.Linear)
    }
    model.zero_grad()
    with Monitor(model, logdir=tmp_path / "r", activation_samples=None) as mon:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
    run = load_run(tmp_path / "r")
    for name, sq in grads.items():
        assert run.series("grad_norm")[name][1][0] == pytest.approx(math.sqrt(float(sq)), rel=1e-12)
        assert run.series("signal_norm")[name][1][0] == pytest.approx(
            ref[name].signal_norm, rel=1e-12
        )
    for name in ("0", "2"):
        act = ref[name].activation
        assert act is not None
        for metric in ("saturation", "dead_fraction", "mean_derivative", "rms_derivative"):
            got = run.series(metric)[name][1][0]
            assert got == pytest.approx(getattr(act, metric), abs=1e-12), metric
    # weight factor of layer "2" = ‖∂L/∂(sigmoid output of "0")‖ / ‖δ_2‖
    wf = run.series("activation_signal_norm")["0"][1][0] / run.series("signal_norm")["2"][1][0]
    assert wf == pytest.approx(ref["2"].weight_factor, rel=1e-12)
    assert run.series("loss")[""][1][0] == pytest.approx(float(loss.detach()))


def test_every_and_evaluation_passes(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, logdir=tmp_path / "r", every=3, optimizer=opt, update_every=1) as mon:
        for _ in range(7):
            _train(model, 1, mon, opt)
            with torch.no_grad():  # an evaluation pass between steps records nothing
                model(torch.randn(500, 6))
    run = load_run(tmp_path / "r")
    assert run.series("grad_norm")["0"][0].tolist() == [0, 3, 6]
    assert run.series("update_ratio")["0"][0].tolist() == [0, 3, 6]
    assert run.series("saturation")["0"][0].tolist() == [0, 3, 6]


def test_scaled_losses_are_reported_unscaled(tmp_path: Path) -> None:
    x, y = _data()
    norms = {}
    for key, scale in (("plain", None), ("scaled", 1024.0)):
        model = _model()
        with Monitor(model, logdir=tmp_path / key, loss_scale=scale) as mon:
            loss = nn.functional.cross_entropy(model(x), y)
            (loss * (scale or 1.0)).backward()
            mon.step(loss)
        run = load_run(tmp_path / key)
        norms[key] = {m: run.series(m)["0"][1][0] for m in ("grad_norm", "signal_norm")}
    for metric in ("grad_norm", "signal_norm"):
        assert norms["scaled"][metric] == pytest.approx(norms["plain"][metric], rel=1e-5)
    assert load_run(tmp_path / "scaled").series("loss_scale")[""][1][0] == 1024.0


def test_grad_scaler(tmp_path: Path) -> None:
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref = _model()
    nn.functional.cross_entropy(ref(x), y).backward()
    with Monitor(model, logdir=tmp_path / "r", scaler=scaler, optimizer=opt) as mon:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        mon.step(loss)
        scaler.step(opt)
        scaler.update()
    run = load_run(tmp_path / "r")
    expected = math.sqrt(float(ref[0].weight.grad.norm() ** 2 + ref[0].bias.grad.norm() ** 2))
    assert run.series("grad_norm")["0"][1][0] == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_combines_micro_batches(tmp_path: Path) -> None:
    model = _model()
    (x1, y1), (x2, y2) = _data(seed=1), _data(seed=2)
    with SignalProbe(model) as probe:
        nn.functional.cross_entropy(model(x1), y1).backward()
        nn.functional.cross_entropy(model(x2), y2).backward()
    ref = probe.result()
    expected = model[2].weight.grad.norm() ** 2 + model[2].bias.grad.norm() ** 2
    model.zero_grad()
    with Monitor(model, logdir=tmp_path / "r") as mon:
        nn.functional.cross_entropy(model(x1), y1).backward()
        nn.functional.cross_entropy(model(x2), y2).backward()
        mon.step()
    run = load_run(tmp_path / "r")
    assert run.series("grad_norm")["2"][1][0] == pytest.approx(math.sqrt(float(expected)), rel=1e-6)
    assert run.series("signal_norm")["2"][1][0] == pytest.approx(ref["2"].signal_norm, rel=1e-6)


def test_curvature_tier(tmp_path: Path) -> None:
    model = _model(nn.Tanh, width=8).double()
    x, y = _data(48)
    batch = (x.double(), y)
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(
            model, logdir=tmp_path / "r", curvature_every=2, optimizer=opt, curvature_probes=6
        ) as mon:
            for step in range(4):
                opt.zero_grad()
                loss = loss_fn(model(batch[0]), y)
                loss.backward()
                if step < 2:
                    mon.step(loss)  # no batch yet: warned once, skipped
                else:
                    mon.step(loss, batch=batch, loss_fn=loss_fn)
                    if step == 2:
                        expected = float(
                            top_eigenvalues(
                                model, batch, loss_fn, params="2", kind="ggn", tol=1e-8
                            )[0]
                        )
                opt.step()
    messages = [str(w.message) for w in caught if "curvature tier needs" in str(w.message)]
    assert len(messages) == 1
    run = load_run(tmp_path / "r")
    steps, lam = run.series("lambda_max")["2"]
    assert steps.tolist() == [2]
    assert lam[0] == pytest.approx(expected, rel=2e-2)
    for metric in ("trace", "step_ratio", "headroom", "lr_lambda_max"):
        assert set(run.series(metric)) == {"0", "2", "4"}, metric
    assert run.diagnosis is not None and run.diagnosis["layers"][0]["name"] == "0"


def test_errors(tmp_path: Path) -> None:
    model = _model()
    Monitor(model, logdir=tmp_path / "r").close()
    with pytest.raises(GradsightError, match="already holds a gradsight run"):
        Monitor(model, logdir=tmp_path / "r")
    mon = Monitor(model, logdir=tmp_path / "r", overwrite=True)
    mon.close()
    mon.close()  # idempotent
    with pytest.raises(GradsightError, match="Monitor is closed"):
        mon.step()
    with pytest.raises(GradsightError, match="every must be a positive int"):
        Monitor(model, logdir=tmp_path / "s", every=0)
    with pytest.raises(GradsightError, match=r"expects a torch\.nn\.Module"):
        Monitor("model", logdir=tmp_path / "t")  # type: ignore[arg-type]
    other = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(GradsightError, match="not a trainable parameter"):
        Monitor(model, logdir=tmp_path / "u", optimizer=other)


def test_hooks_removed_on_close_and_on_exception(tmp_path: Path) -> None:
    model = _model()
    before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(RuntimeError), Monitor(model, logdir=tmp_path / "r"):
        raise RuntimeError("user code failed")
    assert sum(len(m._forward_hooks) for m in model.modules()) == before
    assert load_run(tmp_path / "r").complete


def test_public_names() -> None:
    assert gradsight.Monitor is Monitor and callable(gradsight.report)


def test_update_ratios_with_a_closure_optimizer(tmp_path: Path) -> None:
    """With optimizer.step(closure) the backward (and mon.step) run inside step()."""
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=1)
    x, y = _data(32)
    expected = []
    with Monitor(model, logdir=tmp_path / "r", optimizer=opt, update_every=2) as mon:
        for _ in range(5):
            before = [p.detach().clone() for p in model[0].parameters()]

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss)
                return loss

            opt.step(closure)
            delta = math.sqrt(
                sum(
                    float((p - b).pow(2).sum())
                    for p, b in zip(model[0].parameters(), before, strict=True)
                )
            )
            norm = math.sqrt(sum(float(p.pow(2).sum()) for p in model[0].parameters()))
            expected.append(delta / norm)
    steps, values = load_run(tmp_path / "r").series("update_ratio")["0"]
    assert steps.tolist() == [0, 2, 4]
    assert values.tolist() == pytest.approx([expected[0], expected[2], expected[4]], rel=1e-5)


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU, nn.GELU])
def test_statistics_of_every_step_survive_the_deferred_reduction(
    tmp_path: Path, act: type[nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Buffers of a few steps only, and batch sizes that change (new shapes, new groups):
    # every step's activation statistics must still be its own, exactly.
    monkeypatch.setattr("gradsight.probes._deferred.BUFFER_BYTES", 3 * 2 * 40 * 16 * 8)
    model = _model(act).double()
    sizes = [40, 40, 40, 40, 17, 40, 40, 40, 40, 40, 40, 23, 23, 40]
    expected: list[dict[tuple[str, str], float]] = []
    with Monitor(model, logdir=tmp_path / "r", activation_samples=None) as mon:
        for i, n in enumerate(sizes):
            x, y = _data(n, seed=i)
            x = x.double()
            with SignalProbe(model) as probe:
                nn.functional.cross_entropy(model(x), y).backward()
            ref = probe.result()
            expected.append(
                {
                    (name, metric): getattr(ref[name].activation, metric)
                    for name in ("0", "2")
                    for metric in ("saturation", "dead_fraction", "mean_derivative")
                }
            )
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            model.zero_grad()
    run = load_run(tmp_path / "r")
    for (name, metric), _ in expected[0].items():
        steps, values = run.series(metric)[name]
        assert steps.tolist() == list(range(len(sizes)))
        want = [e[(name, metric)] for e in expected]
        assert values.tolist() == pytest.approx(want, abs=1e-12), (name, metric)


def test_passes_while_paused_are_not_recorded(tmp_path: Path) -> None:
    model = _model(nn.Tanh).double()
    x, y, ref = _reference(model)
    model.zero_grad()
    with Monitor(model, logdir=tmp_path / "r", diagnose_at_close=False) as mon:
        with mon.paused():  # e.g. an optimizer's own curvature pass, on other data
            nn.functional.cross_entropy(model(2 * x), y).backward()
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
        assert mon._probe.recording  # restored after the block
    run = load_run(tmp_path / "r")
    for name in ("0", "2", "4"):
        got = run.series("signal_norm")[name][1][0]
        assert got == pytest.approx(ref[name].signal_norm, rel=1e-12)


def test_an_optimizer_with_its_own_backward_passes_is_measured_on_the_loss_only(
    tmp_path: Path,
) -> None:
    # GaussNewton runs backward passes of its own (output Hessian, factor signals); the
    # demo's step measures one plain pass and runs the optimizer inside mon.paused().
    from gradsight.demo.train import gauss_newton_step
    from gradsight.optim import GaussNewton

    model = _model(nn.Sigmoid).double()
    x, y = _data()
    x = x.double()
    opt = GaussNewton(model)
    refs = []
    with Monitor(model, logdir=tmp_path / "r", optimizer=opt, diagnose_at_close=False) as mon:
        for _ in range(3):
            twin = _model(nn.Sigmoid).double()  # this step's parameters, without the
            twin.load_state_dict(model.state_dict())  # hooks (deepcopy would copy them)
            _, _, ref = _reference(twin)
            refs.append(ref)
            gauss_newton_step(model, opt, x, y, mon)
    run = load_run(tmp_path / "r")
    for name in ("0", "2", "4"):
        steps, values = run.series("signal_norm")[name]
        assert steps.tolist() == [0, 1, 2]
        want = [ref[name].signal_norm for ref in refs]
        assert values.tolist() == pytest.approx(want, rel=1e-12)


class _Heads(nn.Module):
    """A trunk and two heads returned as a dict (as multi-task models and Hugging Face
    models do: the curvature engine needs one tensor, so the tier flattens the heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.cls = nn.Linear(16, 3)
        self.reg = nn.Linear(16, 1)
        self.gru = nn.GRU(16, 4, batch_first=True)  # not covered by the engine: exact products

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        seq, _ = self.gru(h.unsqueeze(1))
        return {"cls": self.cls(h) + seq[:, 0, :1], "reg": self.reg(h)}


def _heads_loss(out: dict[str, torch.Tensor], t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(out["cls"], t[0]) + nn.functional.mse_loss(
        out["reg"].squeeze(1), t[1]
    )


def test_curvature_tier_on_structured_outputs_and_a_failing_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model returning a dict of heads (a ModelOutput alike) gets its curvature, as
    diagnose does, instead of the tier failing as a whole; a layer whose measurement
    raises is left out with one warning, the other layers' curvature is recorded."""
    from gradsight.monitor._curvature import CurvatureTier

    torch.manual_seed(0)
    model = _Heads()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    targets = (torch.randint(0, 3, (32,), generator=gen), torch.randn(32, generator=gen))
    exact = CurvatureTier._exact

    def gru_fails(self, model, prefix, layer, *args):  # type: ignore[no-untyped-def]
        if layer == "gru":
            raise RuntimeError("injected: no products for this layer")
        return exact(self, model, prefix, layer, *args)

    monkeypatch.setattr(CurvatureTier, "_exact", gru_fails)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(model, logdir=tmp_path / "r", curvature_every=1, optimizer=opt) as mon:
            for _ in range(2):
                opt.zero_grad()
                loss = _heads_loss(model(x), targets)
                loss.backward()
                mon.step(loss, batch=(x, targets), loss_fn=_heads_loss)
                opt.step()
    messages = [str(w.message) for w in caught if "gradsight" in str(w.message)]
    assert not any("curvature tier failed" in m for m in messages), messages
    assert sum("could not be measured (first: 'gru'" in m for m in messages) == 1, messages
    lam = load_run(tmp_path / "r").series("lambda_max")
    assert set(lam) == {"trunk", "cls", "reg"}
    assert all(values[0] > 0 for _, values in lam.values())


def test_curvature_tier_with_a_transformers_model_s_own_loss(tmp_path: Path) -> None:
    """``loss_fn = lambda out, y: out.loss``: the tier uses the model's own loss function
    of its logits (as diagnose does) instead of failing on a loss that does not depend
    on the outputs it replaces."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = transformers.BertForMaskedLM(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (8, 10), generator=gen)
    inputs = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def own(out, t):  # type: ignore[no-untyped-def]
        return out.loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(model, logdir=tmp_path / "r", curvature_every=1, optimizer=opt) as mon:
            for _ in range(2):
                opt.zero_grad()
                loss = model(**inputs).loss
                loss.backward()
                mon.step(loss, batch=(inputs, None), loss_fn=own)
                opt.step()
    assert not [str(w.message) for w in caught if "curvature" in str(w.message)]
    lam = load_run(tmp_path / "r").series("lambda_max")
    assert len(lam) >= 10 and all(values[0] > 0 for _, values in lam.values())
