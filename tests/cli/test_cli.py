"""The ``trojanscope`` command: train / poison / evaluate on digits, JSON output, and every bad input
ending as one ``error:`` line on stderr with exit code 2."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import trojanscope as ts
from trojanscope.cli import cli

from _models import CornerPatchNet

FAST = ["--epochs", "2", "--lr", "0.01", "--data", "digits"]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def bad_input(result, match: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert match.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A clean and a backdoored digits model, trained by the CLI."""
    d = tmp_path_factory.mktemp("cli")
    r = run("train", *FAST, "--arch", "mnist_cnn", "--out", d / "clean", "--json", d / "train.json")
    assert r.exit_code == 0, r.output
    r = run("poison", *FAST, "--trigger", "square:3:white:bottom-right", "--target", "0", "--rate", "0.1",
            "--out", d / "bad", "--json", d / "poison.json")
    assert r.exit_code == 0, r.output
    return d


def test_train_writes_a_model_and_json(models):
    out = json.loads((models / "train.json").read_text())
    assert out["accuracy"] > 0.8 and out["n"] == len(ts.load_data("digits:test"))
    lm = ts.load_model(models / "clean")
    assert lm.spec.arch == "mnist_cnn" and lm.spec.input_shape == (1, 8, 8)


def test_poison_writes_model_trigger_and_indices(models):
    bad = models / "bad"
    for f in ("model.safetensors", "model.json", "trigger_0.safetensors", "trigger_0.png", "poison.json"):
        assert (bad / f).is_file(), f
    info = json.loads((bad / "poison.json").read_text())
    train = ts.load_data("digits:train")
    assert len(info["poison_indices"]) == round(0.1 * len(train))
    out = json.loads((models / "poison.json").read_text())
    assert out["n_poison"] == len(info["poison_indices"]) and out["attack_success_rate"] > 0.9


def test_evaluate_json(models, tmp_path):
    r = run("evaluate", models / "bad", "--data", "digits", "--json", tmp_path / "e.json")
    assert r.exit_code == 0 and "accuracy" in r.output
    e = json.loads((tmp_path / "e.json").read_text())
    assert set(e) >= {"accuracy", "n"} and "attack_success_rate" not in e
    assert isinstance(e["accuracy"], float) and e["n"] == len(ts.load_data("digits:test"))
    r = run("evaluate", models / "bad", "--data", "digits:test", "--trigger", models / "bad" / "trigger_0.safetensors",
            "--target", "0", "--json", "-")
    assert r.exit_code == 0
    e = json.loads(r.stdout[r.stdout.index("{"):])
    assert e["attack_success_rate"] > 0.9 and e["target"] == 0
    r = run("evaluate", models / "clean", "--data", "digits", "--trigger", "square:3:white:bottom-right",
            "--target", "0", "--json", "-")
    e = json.loads(r.stdout[r.stdout.index("{"):])
    assert e["attack_success_rate"] < 0.5  # the clean twin ignores the trigger


def test_outside_model_exported_with_torch_export(tmp_path, digits):
    """A model defined and trained outside trojanscope, exported to .pt2 with an .npz of its test data."""

    class Outside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
            self.classifier = nn.Linear(32, 10)

        def forward(self, x):
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    net = Outside()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = digits["train"].x, digits["train"].y
    for _ in range(60):  # plain full-batch training, no trojanscope involved
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    ep = torch.export.export(net, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "outside.pt2"))
    test = digits["test"]
    np.savez(tmp_path / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    with torch.no_grad():
        expected = float((net(test.x).argmax(1) == test.y).float().mean())
    r = run("evaluate", tmp_path / "outside.pt2", "--data", tmp_path / "test.npz", "--json", tmp_path / "o.json")
    assert r.exit_code == 0, r.output + r.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["format"] == "export" and out["n"] == len(test)
    assert out["accuracy"] == pytest.approx(expected, abs=2.5 / len(test)) and out["accuracy"] > 0.8
    # TorchScript of the same model: the input shape comes from the data
    torch.jit.save(torch.jit.script(net), str(tmp_path / "outside.ts"))
    r = run("evaluate", tmp_path / "outside.ts", "--data", tmp_path / "test.npz", "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["accuracy"] == pytest.approx(expected, abs=2.5 / len(test))


def test_installed_script(models):
    exe = Path(sys.executable).with_name("trojanscope")
    cmd = [str(exe) if exe.exists() else shutil.which("trojanscope") or "trojanscope"]
    r = subprocess.run([*cmd, "evaluate", str(models / "clean"), "--data", "digits", "--json", "-"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["accuracy"] > 0.8
    r = subprocess.run([*cmd, "evaluate", "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# --- every bad input: one line, exit code 2 ----------------------------------------------------

def _npz(path: Path, x, y) -> Path:
    np.savez(path, x=x, y=y)
    return path


def test_missing_model(tmp_path):
    bad_input(run("evaluate", tmp_path / "nope", "--data", "digits"), "not found")


def test_corrupt_model(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"PK\x03\x04garbage")
    bad_input(run("evaluate", tmp_path / "m.pt", "--data", "digits"), "m.pt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{broken")
    bad_input(run("evaluate", tmp_path / "d", "--data", "digits"), "safetensors")


def test_unsafe_pickle(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Boom()))
    bad_input(run("evaluate", tmp_path / "evil.pt", "--data", "digits"), "pickle")
    assert not (tmp_path / "pwned").exists()


def test_missing_and_corrupt_data(models, tmp_path):
    bad_input(run("evaluate", models / "clean", "--data", tmp_path / "none.npz"), "not found")
    (tmp_path / "c.npz").write_bytes(b"not an npz")
    bad_input(run("evaluate", models / "clean", "--data", tmp_path / "c.npz"), "c.npz")
    bad_input(run("train", "--data", tmp_path / "none.npz", "--out", tmp_path / "o"), "not found")


def test_wrong_shape_data(models, tmp_path):
    p = _npz(tmp_path / "w.npz", np.zeros((4, 1, 28, 28), np.float32), np.arange(4))
    bad_input(run("evaluate", models / "clean", "--data", p), "model expects")
    p2 = _npz(tmp_path / "w2.npz", np.zeros((4, 64), np.float32), np.arange(4))
    bad_input(run("evaluate", models / "clean", "--data", p2), "must be")


def test_nan_data(models, tmp_path):
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[0, 0, 0, 0] = np.nan
    bad_input(run("evaluate", models / "clean", "--data", _npz(tmp_path / "n.npz", x, np.arange(4))), "NaN")


def test_empty_data(models, tmp_path):
    p = _npz(tmp_path / "e.npz", np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    bad_input(run("evaluate", models / "clean", "--data", p), "empty")
    bad_input(run("train", "--data", p, "--epochs", "1", "--out", tmp_path / "o"), "empty")


def test_label_out_of_range(models, tmp_path):
    p = _npz(tmp_path / "l.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 10]))
    bad_input(run("evaluate", models / "clean", "--data", p), "out of range")
    p2 = _npz(tmp_path / "l2.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([0, -1, 2]))
    bad_input(run("evaluate", models / "clean", "--data", p2), "negative")


def test_unknown_architecture(tmp_path):
    bad_input(run("train", "--data", "digits", "--arch", "no_such_net", "--epochs", "1", "--out", tmp_path / "o"),
              "unknown architecture")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    bad_input(run("evaluate", tmp_path / "sd.pt", "--data", "digits", "--arch", "no_such_net"), "unknown architecture")


def test_bad_options(models, tmp_path):
    bad_input(run("evaluate", models / "clean", "--data", "digits", "--trigger", "circle:3", "--target", "0"),
              "unknown trigger kind")
    bad_input(run("evaluate", models / "clean", "--data", "digits", "--trigger", "square:3"), "--target")
    bad_input(run("evaluate", models / "clean", "--data", "digits", "--trigger", "square:3", "--target", "11"),
              "out of range")
    bad_input(run("poison", "--data", "digits", "--rate", "2", "--epochs", "1", "--out", tmp_path / "p"), "rate")
    bad_input(run("evaluate", models / "clean", "--data", "digits", "--input-shape", "a,b"), "--input-shape")


def test_scan_warns_when_the_model_gets_the_clean_data_wrong(tmp_path, digits):
    """A constant classifier (a received TorchScript file) needs no trigger to reach its label, so
    the scan's verdict means nothing: the scan says so, with the accuracy it measured; a working
    model gets no such warning. The population table says it too, and each row keeps the figure."""
    const = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.arange(10.0) == 3)  # always label 3
    torch.jit.save(torch.jit.trace(const.eval(), torch.zeros(1, 1, 8, 8)), str(tmp_path / "const.pt"))
    args = ["--data", "digits", "--input-shape", "1,8,8", "--epochs", "4", "--n-samples", "100"]
    r = run("scan", tmp_path / "const.pt", *args, "--json", tmp_path / "c.json")
    assert r.exit_code in (0, 1) and "Traceback" not in r.output
    acc = json.loads((tmp_path / "c.json").read_text())["details"]["clean_accuracy"]
    val = ts.load_data("digits", "val")
    assert 0.05 < acc < 0.2 and acc == pytest.approx(float((val.y == 3).float().mean()), abs=0.08)
    assert f"warning: the model classifies {100 * acc:.1f}% of the clean images right (chance 10.0%)" in r.stderr
    tr = digits["train"]
    torch.jit.save(torch.jit.trace(CornerPatchNet(tr.x, tr.y, 10, target=None).eval(), torch.zeros(1, 1, 8, 8)),
                   str(tmp_path / "working.pt"))
    r = run("scan", tmp_path / "working.pt", *args, "--json", tmp_path / "w.json")
    assert json.loads((tmp_path / "w.json").read_text())["details"]["clean_accuracy"] > 0.8
    assert "warning" not in r.stderr
    shutil.copy(tmp_path / "const.pt", tmp_path / "const2.pt")
    r = run("scan", tmp_path / "const.pt", tmp_path / "const2.pt", *args, "--json", tmp_path / "rows.json")
    assert "warning: 2 model(s) classify under 50% of the clean images right" in r.stderr
    assert [row["clean_accuracy"] == pytest.approx(acc, abs=1e-4) for row in json.loads((tmp_path / "rows.json").read_text())] == [True, True]


def test_train_and_poison_warn_when_training_never_left_chance(tmp_path, monkeypatch):
    """A training that stays at chance (gtsrb_cnn can sit at loss ln K) is said so, not only shown
    as a low accuracy; a model that trained gets no warning."""
    from trojanscope.cli import core, poison

    def constant(arch, data, **_):
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        with torch.no_grad():
            net[1].weight.zero_()
            net[1].bias.copy_(torch.arange(10.0) == 3)
        return net.eval()

    monkeypatch.setattr(core, "train_new", constant)
    monkeypatch.setattr(poison, "train_new", constant)
    r = run("train", *FAST, "--arch", "mnist_cnn", "--out", tmp_path / "m")
    assert r.exit_code == 0 and "its training never left chance" in r.stderr, r.stderr
    r = run("poison", *FAST, "--out", tmp_path / "p")
    assert r.exit_code == 0 and "its training never left chance" in r.stderr, r.stderr
    monkeypatch.undo()
    r = run("train", *FAST, "--arch", "mnist_cnn", "--out", tmp_path / "ok")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr
