"""Pruning, Fine-Pruning and the pruning-aware attack on tiny setups."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import trojanscope as ts
from trojanscope.attacks import ATTACKS, PruningAware
from trojanscope.defenses import FinePruning, Pruning, create
from trojanscope._utils.masking import (frozen_channels, mean_channel_activation, mean_unit_activation, unit_layer,
                                        prunable_modules, pruning_order, zero_channels)
from trojanscope.metrics import attack_evaluator
from trojanscope.errors import ConfigError, UnsupportedModelError
from trojanscope.training import train

from _models import PlantedPatchNet


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def planted(mnist):
    tr = mnist["train"]
    trig = ts.Trigger.square(tr.image_shape, 4, "white", "bottom-right")
    return PlantedPatchNet(tr.x, tr.y, 10, target=0, patch=4), PlantedPatchNet(tr.x, tr.y, 10, target=None, patch=4), trig


def _tiny(seed: int = 0) -> nn.Module:
    """Conv(8) - ReLU - pool - Conv(16) ("3", the last conv) - ReLU - Linear: trains in a second on digits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))


@pytest.fixture(scope="module")
def digits_net(digits):
    """A tiny CNN trained on 8x8 digits, and a BadNets twin (2x2 white square, target 0)."""
    tr = digits["train"]
    trig = ts.Trigger.square(tr.image_shape, 2, "white", "bottom-right", margin=0)
    atk = ts.BadNets(trig, target=0, rate=0.1)
    clean, bad = _tiny(), _tiny()
    train(clean, tr, epochs=4, lr=3e-3, batch_size=32)
    train(bad, atk.poison(tr), epochs=4, lr=3e-3, batch_size=32)
    return clean, bad, atk


def test_pruning_order_and_activation():
    assert pruning_order(torch.tensor([3.0, 1.0, 2.0, 1.0])).tolist() == [1, 3, 2, 0]
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0, 2.0]).view(3, 1, 1, 1))
        net[0].bias.zero_()
    x = torch.rand(5, 1, 4, 4)
    act = mean_channel_activation(net, x, "0", batch_size=2)
    assert act.tolist() == pytest.approx([float(x.mean()), 0.0, 2 * float(x.mean())], rel=1e-6)


def test_pruning_removes_planted_backdoor(planted, mnist):
    bad, _, trig = planted
    val, test = mnist["val"], mnist["test"]
    before = _state(bad)
    ev = attack_evaluator(trig, 0, test)
    assert ev(bad)["attack_success"] > 0.95
    res = Pruning().repair(bad, val, monitor=ev)
    # the detector channel is dormant on clean data: pruned first, at no accuracy cost
    assert res.details["pruned_channels"] == [0]
    assert res.history[-1]["attack_success"] < 0.05
    assert res.details["accuracy_after"] >= res.details["accuracy_before"]  # a few natural strokes fired it
    assert float(res.model.detect.weight.detach().abs().sum()) == 0.0
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in bad.state_dict().items())
    json.dumps(res.to_dict())


def test_pruning_clean_model_keeps_accuracy(planted, mnist):
    _, clean, _ = planted
    res = create("prune").repair(clean, mnist["val"])
    assert res.details["accuracy_before"] - res.details["accuracy_after"] <= 0.04


def test_pruning_curve_and_stop_rule(digits_net, digits):
    _, bad, atk = digits_net
    val, test = digits["val"], digits["test"]
    res = Pruning(layer="3").repair(bad, val, monitor=attack_evaluator(atk.triggers[0], 0, test))
    h = res.history
    assert h[0]["pruned"] == 0 and "attack_success" in h[0] and "test_accuracy" in h[0]
    assert [r["pruned"] for r in h] == list(range(len(h)))
    acc0, k = h[0]["accuracy"], res.details["n_pruned"]
    assert all(acc0 - r["accuracy"] <= 0.04 + 1e-9 for r in h[:k + 1])
    if k < res.details["n_channels"]:  # stopped: the next step crossed the threshold
        assert acc0 - h[k + 1]["accuracy"] > 0.04
    pruned = res.details["pruned_channels"]
    w = res.model[3].weight.detach()
    assert float(w[pruned].abs().sum()) == 0.0 and float(res.model[3].bias.detach()[pruned].abs().sum()) == 0.0
    assert res.details["accuracy_after"] == pytest.approx(h[k]["accuracy"])
    # a fixed ratio
    r2 = Pruning(layer="3", ratio=0.5).repair(bad, val)
    assert r2.details["n_pruned"] == 8
    # the saved model stays a plain state dict of the same architecture
    assert set(res.model.state_dict()) == set(bad.state_dict())


def test_pruning_batch_size_independent(digits_net, digits):
    _, bad, _ = digits_net
    a = Pruning(batch_size=37).repair(bad, digits["val"])
    b = Pruning(batch_size=500).repair(bad, digits["val"])
    assert a.details["order"] == b.details["order"] and a.details["n_pruned"] == b.details["n_pruned"]
    assert [r["accuracy"] for r in a.history] == [r["accuracy"] for r in b.history]


def test_fine_pruning_tiny(digits_net, digits):
    _, bad, atk = digits_net
    val, test = digits["val"], digits["test"]
    before = _state(bad)
    fp = FinePruning(epochs=2, lr=1e-3)
    res = fp.repair(bad, val, monitor=attack_evaluator(atk.triggers[0], 0, test))
    assert [r["stage"] for r in res.history] == ["before", "pruned", "fine-tuned"]
    assert all("attack_success" in r and "accuracy" in r for r in res.history)
    pruned = res.details["pruned_channels"]
    assert float(res.model[3].weight.detach()[pruned].abs().sum()) == 0.0  # pruned channels stay pruned
    assert res.history[-1]["test_accuracy"] >= res.history[0]["test_accuracy"] - 0.1
    assert all(torch.equal(before[k], v) for k, v in bad.state_dict().items())
    assert res.model is not bad and isinstance(create("fine-prune"), FinePruning)


def test_mask_helpers_and_bn():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(2, 1, 5, 5))
    name, mods = prunable_modules(net, "0")
    assert name == "0" and [n for n, _ in mods] == ["0", "1"]  # the BatchNorm is masked too
    params = ["0.weight", "0.bias", "1.weight", "1.bias"]
    zero_channels(net, params, [1, 2])
    net.eval()
    with torch.no_grad():
        out = net[1](net[0](torch.rand(3, 1, 5, 5)))
    assert float(out[:, [1, 2]].abs().sum()) == 0.0 and float(out[:, 0].abs().sum()) > 0
    with frozen_channels(net, {p: [1, 2] for p in params}):
        train(net, ts.ImageDataset(torch.rand(16, 1, 5, 5), torch.randint(0, 2, (16,)), 2), epochs=2, lr=0.1)
    assert float(net[0].weight.detach()[[1, 2]].abs().sum()) == 0.0
    assert float(net[1].bias.detach()[[1, 2]].abs().sum()) == 0.0
    with pytest.raises(UnsupportedModelError):
        prunable_modules(net, "2")
    with pytest.raises(ConfigError):
        Pruning(max_drop=2.0).repair(net, ts.ImageDataset(torch.rand(4, 1, 5, 5), torch.tensor([0, 1, 0, 1]), 2))


def test_pruning_aware_attack_tiny(digits_net, digits):
    clean, _, atk = digits_net
    assert ATTACKS.get("pruning-aware") is PruningAware
    pa = PruningAware(atk.triggers[0], target=0, epochs=3, lr=3e-3, batch_size=32, ratio=0.5)
    before = _state(clean)
    info: dict = {}
    bad = pa.implant(clean, digits["train"], details=info)
    assert all(torch.equal(before[k], v) for k, v in clean.state_dict().items())
    assert len(info["pruned_channels"]) == 8
    assert pa.success_rate(bad, digits["test"]) > 0.6
    # the reinstated channels are dormant (decoys): zero mean activation on clean and triggered inputs
    x = digits["test"].x
    act = mean_channel_activation(bad, torch.cat([x, atk.triggers[0].apply(x)]), "3")
    assert float(act[info["pruned_channels"]].max()) == 0.0
    assert float(bad[3].weight.detach()[info["pruned_channels"]].abs().sum()) > 0  # full width again


# --- unit granularity: one channel at one position -------------------------------------------------

def test_unit_helpers_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4), nn.ReLU(), nn.Linear(4, 2))
    name, lin = unit_layer(net, "last_conv")
    assert name == "3" and lin is net[3]  # the first Linear after the last convolution
    assert unit_layer(net, "5")[1] is net[5]
    with pytest.raises(UnsupportedModelError):
        unit_layer(net, "0")
    x = torch.rand(7, 1, 3, 3)
    with torch.no_grad():
        expected = net[1](net[0](x)).flatten(1).abs().mean(0).double()
    assert torch.allclose(mean_unit_activation(net, x, lin, batch_size=3), expected)
    zero_channels(net, ["3.weight"], [1, 4], dim=1)
    assert float(net[3].weight.detach()[:, [1, 4]].abs().sum()) == 0.0 and float(net[3].weight.detach()[:, 0].abs().sum()) > 0
    data = ts.ImageDataset(torch.rand(16, 1, 3, 3), torch.randint(0, 2, (16,)), 2)
    with frozen_channels(net, {"3.weight": [1, 4]}, {"3.weight": 1}):
        train(net, data, epochs=2, lr=0.1)
    assert float(net[3].weight.detach()[:, [1, 4]].abs().sum()) == 0.0 and float(net[3].weight.detach()[:, 0].abs().sum()) > 0


def test_unit_fine_pruning_removes_corner_patch(trained):
    """The demo's corner patch rides on ordinary channels at the corner's positions: units there are
    dark on clean digits, so unit pruning removes them first, and fine-tuning cannot bring them back."""
    ev = attack_evaluator(trained.trigger, 0, trained.test.subset(torch.arange(200)))
    before = _state(trained.backdoored)
    res = FinePruning(granularity="unit", step=48, epochs=1, lr=1e-3).repair(trained.backdoored, trained.val,
                                                                              monitor=ev)
    h = {r["stage"]: r for r in res.history}
    assert h["before"]["attack_success"] > 0.9
    assert h["pruned"]["attack_success"] < 0.05 and h["fine-tuned"]["attack_success"] < 0.05
    assert h["fine-tuned"]["test_accuracy"] >= h["before"]["test_accuracy"] - 0.03
    assert res.details["granularity"] == "unit" and res.details["n_neurons"] == trained.backdoored.fc1.in_features
    assert float(res.model.fc1.weight.detach()[:, res.details["pruned_channels"]].abs().sum()) == 0.0
    assert all(torch.equal(before[k], v) for k, v in trained.backdoored.state_dict().items())


def test_unit_pruning_clean_model_keeps_accuracy(trained):
    res = Pruning(granularity="unit", step=48).repair(trained.clean, trained.val)
    assert res.details["n_pruned"] > 0
    assert res.details["accuracy_before"] - res.details["accuracy_after"] <= 0.04
    a = Pruning(granularity="unit", step=48, batch_size=64).repair(trained.clean, trained.val)
    assert a.details["order"] == res.details["order"] and a.details["n_pruned"] == res.details["n_pruned"]


def test_repair_cli_takes_method_params(tmp_path):
    from click.testing import CliRunner

    from trojanscope.cli import cli

    net = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    ts.save_model(net, tmp_path / "m", ts.ModelSpec("mnist_cnn", (1, 8, 8), 10))
    base = ["repair", str(tmp_path / "m"), "--method", "fine-prune", "--data", "digits:val", "--device", "cpu"]
    r = CliRunner().invoke(cli, base + ["-p", "granularity=unit", "-p", "epochs=1", "--out", str(tmp_path / "o"),
                                        "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["params"]["granularity"] == "unit" and d["params"]["epochs"] == 1
    assert d["details"]["n_neurons"] == net.fc1.in_features
    assert ts.load_model(tmp_path / "o").model is not None
    for bad in (["-p", "granularity=pixel"], ["-p", "nope=1"], ["-p", "novalue"]):
        r = CliRunner().invoke(cli, base + bad + ["--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, r.output
