"""The command line: demo (never clobbers), diagnose MODULE:FACTORY, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradsight.cli import main


def test_demo_quick_writes_a_new_run_each_time(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "vanishing" in first and "first/last layer gradient ratio" in first
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert "1 earlier run(s)" in second
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["run-001", "run-002"]
    data = json.loads((tmp_path / "run-001" / "sigmoid-sgd.json").read_text())
    assert data["epochs"] == 2 and data["diagnosis"]["layers"][0]["status"] == "vanishing"
    assert (tmp_path / "run-001" / "relu-he-sgd.html").read_text().startswith("<!doctype html>")
    # Each arm is recorded by the Monitor, and one report compares them.
    assert f"Report: {tmp_path / 'run-002' / 'report.html'}" in second
    report = (tmp_path / "run-001" / "report.html").read_text(encoding="utf-8")
    assert "Comparison" in report and "10-layer sigmoid MLP" in report
    # The remedy's arm: a sigmoid MLP trained with gradsight.optim, diagnosed before and after.
    remedy = json.loads((tmp_path / "run-001" / "sigmoid-gauss-newton.json").read_text())
    assert remedy["arm"].endswith("gradsight.optim.GaussNewton")
    assert remedy["diagnosis_before"]["layers"] and remedy["diagnosis"]["layers"]
    stuck = json.loads((tmp_path / "run-001" / "sigmoid-sgd.json").read_text())
    # the same network: SGD at ~10%, GaussNewton ~65% after 2 epochs (~97% after 40)
    assert remedy["test_accuracy"][-1] > stuck["test_accuracy"][-1] + 0.1
    assert "Before training" in first and "After training" in first
    assert "GaussNewton" in report
    for arm in ("sigmoid-sgd", "relu-he-sgd", "sigmoid-gauss-newton"):
        logdir = tmp_path / "run-001" / arm
        assert (logdir / "run.json").exists() and (logdir / "diagnosis.json").exists()
        assert list(logdir.glob("metrics-*.parquet"))


def test_diagnose_factory(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "my_factory.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make():
                torch.manual_seed(0)
                model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
                batch = (torch.randn(32, 4), torch.randint(0, 2, (32,)))
                return model, batch, nn.functional.cross_entropy
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    out_json = tmp_path / "d.json"
    assert main(["diagnose", "my_factory:make", "--json", str(out_json)]) == 0
    assert "gradsight diagnosis" in capsys.readouterr().out
    assert len(json.loads(out_json.read_text())["layers"]) == 2
    assert main(["diagnose", "my_factory"]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err
    assert main(["diagnose", "no_such_module:make"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err


def test_unknown_argument_exits_2_with_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gradsight", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("gradsight ")


_FACTORIES = """
import torch
from torch import nn

def _parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    batch = (torch.randn(32, 4), torch.randint(0, 2, (32,)))
    return model, batch, nn.CrossEntropyLoss()

def make():
    return _parts()

def swapped():
    model, batch, loss_fn = _parts()
    return batch, model, loss_fn
"""


def test_diagnose_factory_by_path_flags_and_order(tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the suite's threads
    sub = tmp_path / "models"
    sub.mkdir()
    (sub / "mymod.py").write_text(_FACTORIES)
    monkeypatch.chdir(tmp_path)
    out_json = tmp_path / "d.json"
    argv = ["diagnose", "./models/mymod.py:make", "--no-curvature", "--threads", "1"]
    assert main([*argv, "--json", str(out_json)]) == 0
    layers = json.loads(out_json.read_text())["layers"]
    assert len(layers) == 2
    assert all(layer.get("lambda_max") is None for layer in layers)  # --no-curvature
    assert main(["diagnose", "./models/mymod.py:make", "--json", str(out_json)]) == 0
    assert all(la["lambda_max"] is not None for la in json.loads(out_json.read_text())["layers"])
    capsys.readouterr()
    assert main(["diagnose", "./models/mymod.py:swapped"]) == 2
    err = capsys.readouterr().err
    assert "returned (batch, model, loss_fn)" in err and "in that order" in err
    assert main(["diagnose", "./models/nope.py:make"]) == 2
    assert "no file './models/nope.py'" in capsys.readouterr().err
    assert main(["diagnose", "./models/mymod.py:make", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
