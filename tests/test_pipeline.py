"""Chains of defences: every family in a Pipeline, figures after each step, both orders."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import trojanscope as ts
from trojanscope.defenses import STRIP, DataSanitizer, ModelDetector, Pruning, SanitizeResult, ScanResult
from trojanscope.errors import ConfigError
from trojanscope.pipeline import Pipeline, evaluator, reinitialise
from trojanscope.training import train

from _models import PlantedPatchNet, Tempered


class BrightCorner(DataSanitizer):
    """A test sanitiser: flags samples whose bottom-right 2x2 corner is all white."""

    def __init__(self) -> None:
        pass

    def _inspect(self, model: nn.Module, dataset: Any, *, trusted: Any) -> SanitizeResult:
        s = dataset.x[:, :, -2:, -2:].flatten(1).min(1).values
        return SanitizeResult(scores=s, flagged=s > 0.99)


class Verdict(ModelDetector):
    """A test detector: infected when the model sends most white-cornered images to one label."""

    def __init__(self) -> None:
        pass

    def _scan(self, model: nn.Module, clean_data: Any, *, callback: Any) -> ScanResult:
        x = clean_data.x.clone()
        x[:, :, -2:, -2:] = 1.0
        counts = torch.bincount(model(x).argmax(1), minlength=clean_data.num_classes).float()
        frac = counts / counts.sum()
        return ScanResult(infected=bool(frac.max() > 0.5), flagged_labels=[int(frac.argmax())] if frac.max() > 0.5 else [],
                          scores=frac)


@pytest.fixture(scope="module")
def planted(mnist):
    tr = mnist["train"]
    bad = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=0, patch=4), 10.0)
    return bad, ts.Trigger.square(tr.image_shape, 4, "white", "bottom-right")


def test_strip_in_front_of_pruned_model(planted, mnist):
    bad, trig = planted
    before = {k: v.clone() for k, v in bad.state_dict().items()}
    ev = evaluator(mnist["test"], trig, 0)
    res = Pipeline([STRIP(n_overlays=16), "prune"]).run(bad, mnist["val"], evaluate=ev)
    h = res.history
    assert [r["defense"] for r in h] == ["(start)", "strip", "prune"]
    assert h[0]["attack_success"] > 0.95 and "clean_rejected" not in h[0]
    assert h[1]["triggered_rejected"] > 0.9 and h[1]["clean_rejected"] < 0.06
    assert h[1]["attack_success_end_to_end"] < 0.1
    assert h[2]["attack_success"] < 0.05 and h[2]["n_pruned"] == 1
    assert h[2]["refitted_filters"] == 1  # STRIP is recalibrated on the model it now guards
    assert res.filters[0].model_ is res.model
    assert all(torch.equal(before[k], v) for k, v in bad.state_dict().items())
    json.dumps(res.to_dict())


def test_repair_then_filter_order(planted, mnist):
    bad, trig = planted
    res = Pipeline([Pruning(), ("strip", {"n_overlays": 8})]).run(bad, mnist["val"],
                                                                  evaluate=evaluator(mnist["test"], trig, 0))
    assert [r["defense"] for r in res.history] == ["(start)", "prune", "strip"]
    assert res.history[-1]["attack_success_accepted"] < 0.05
    assert 0 <= res.history[-1]["clean_rejected"] <= 0.1


def _tiny(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))


def test_data_sanitiser_both_orders(digits):
    tr, val, test = digits["train"], digits["val"], digits["test"]
    trig = ts.Trigger.square(tr.image_shape, 2, "white", "bottom-right", margin=0)
    atk = ts.BadNets(trig, target=0, rate=0.1)
    poisoned = atk.poison(tr)
    bad = _tiny()
    train(bad, poisoned, epochs=3, lr=3e-3, batch_size=32)
    ev = evaluator(test, trig, 0)
    kw = dict(epochs=3, lr=3e-3, batch_size=32)
    a = Pipeline([BrightCorner(), ("prune", {})], retrain="scratch", **kw).run(bad, val, train_data=poisoned, evaluate=ev)
    b = Pipeline([("prune", {}), BrightCorner(), Verdict()], retrain="continue", **kw).run(
        bad, val, train_data=poisoned, evaluate=ev)
    assert a.history[1]["n_removed"] >= len(poisoned.poison_indices)
    assert a.train_data is not None and a.train_data.is_poison.sum() == 0  # every poisoned sample removed
    assert a.history[1]["attack_success"] < 0.2  # retrained from scratch on clean data
    assert a.history[1]["retrain_tries"] == 1 and a.results[0]["retrain"][0]["init"] == "default"
    assert "infected" in b.history[3]
    # "continue" keeps the pruned channels at zero while retraining
    pruned = b.results[0]["details"]["pruned_channels"]
    assert float(b.model[3].weight.detach()[pruned].abs().sum()) == 0.0
    for r in a.history + b.history:
        assert "accuracy" in r and "seconds" in r


def test_a_retraining_that_stays_at_chance_is_tried_again(digits, monkeypatch):
    import trojanscope.training as training

    tr, val = digits["train"], digits["val"]
    trig = ts.Trigger.square(tr.image_shape, 2, "white", "bottom-right", margin=0)
    poisoned = ts.BadNets(trig, target=0, rate=0.1).poison(tr)
    bad = _tiny()
    train(bad, poisoned, epochs=2, lr=3e-3, batch_size=32)
    real, calls = training.train, []

    def stuck_first(model, data, **kw):  # the first retraining ends at chance
        out = real(model, data, **kw)
        calls.append(kw.get("seed"))
        if len(calls) == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            out.history[-1]["accuracy"] = 0.1
        return out

    monkeypatch.setattr(training, "train", stuck_first)
    res = Pipeline([BrightCorner()], epochs=2, lr=3e-3, batch_size=32, seed=5).run(bad, val, train_data=poisoned)
    tries = res.results[0]["retrain"]
    assert calls == [5, 5] and res.history[1]["retrain_tries"] == 2
    assert [(t["seed"], t["init"]) for t in tries] == [(5, "default"), (5, "he")]
    assert tries[0]["train_accuracy"] == 0.1 and tries[1]["train_accuracy"] > 0.5
    assert ts.clean_accuracy(res.model, digits["test"]) > 0.5
    # the kept model is the He-initialised run's: the same weights as that run done directly
    twin = reinitialise(bad, 5, "he")
    real(twin, res.train_data, epochs=2, lr=3e-3, batch_size=32, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), res.model.parameters()))


def test_pipeline_errors_and_reinit(digits):
    net = _tiny()
    with pytest.raises(ConfigError):
        Pipeline([BrightCorner()]).run(net, digits["val"])  # a sanitiser needs train_data
    with pytest.raises(ConfigError):
        Pipeline([]).run(net, digits["val"])
    with pytest.raises(ConfigError):
        Pipeline(["no-such-defence"]).run(net, digits["val"])
    with pytest.raises(ConfigError):
        Pipeline([42]).run(net, digits["val"])  # type: ignore[list-item]
    r1, r2 = reinitialise(net, 1), reinitialise(net, 1)
    assert torch.equal(r1[0].weight, r2[0].weight) and not torch.equal(r1[0].weight, net[0].weight)
    assert "Pruning(" in repr(Pipeline(["prune"]))


def test_pipeline_cli(tmp_path):
    from click.testing import CliRunner

    from trojanscope.cli import cli

    net = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    ts.save_model(net, tmp_path / "m", ts.ModelSpec("mnist_cnn", (1, 8, 8), 10))
    r = CliRunner().invoke(cli, ["pipeline", str(tmp_path / "m"), "--step", "prune", "--step", "strip:n_overlays=4",
                                 "--fit", "digits:val", "--test", "digits:test", "--trigger", "square:2:white:bottom-right",
                                 "--target", "0", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "p.json"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "p.json").read_text())
    assert [h["defense"] for h in d["history"]] == ["(start)", "prune", "strip"]
    assert "attack_success_end_to_end" in d["history"][-1]
    assert ts.load_model(tmp_path / "out").model is not None
    bad = CliRunner().invoke(cli, ["pipeline", str(tmp_path / "m"), "--step", "nope", "--fit", "digits:val"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_pipeline_cli_threads(tmp_path):
    """--threads runs the chain on that many torch threads and gives the caller's count back; the
    figures are those of a run on that count (here the same model, pruning only)."""
    from click.testing import CliRunner

    from trojanscope.cli import cli

    net = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    ts.save_model(net, tmp_path / "m", ts.ModelSpec("mnist_cnn", (1, 8, 8), 10))
    before = torch.get_num_threads()
    args = ["pipeline", str(tmp_path / "m"), "--step", "prune", "--fit", "digits:val", "--test", "digits:test",
            "--device", "cpu"]
    runs = [CliRunner().invoke(cli, args + ["--threads", "1", "--json", str(tmp_path / f"p{i}.json")]) for i in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    assert torch.get_num_threads() == before
    h = [[{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((tmp_path / f"p{i}.json").read_text())["history"]]
         for i in range(2)]
    assert h[0] == h[1] and h[0][-1]["defense"] == "prune" and h[0][-1]["n_pruned"] > 0
    bad = CliRunner().invoke(cli, args + ["--threads", "0"])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
