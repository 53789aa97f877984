"""Neural Cleanse's repairs: neuron pruning and unlearning."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import trojanscope as ts
from trojanscope.defenses import create, list_defenses
from trojanscope.defenses.model.neural_cleanse import NeuralCleanse
from trojanscope.defenses._triggers import label_triggers, resolve_triggers
from trojanscope.defenses.repair.neural_cleanse import (COLLAPSE_SHARE, NeuronPruning, Unlearning, activation_gap,
                                                        collapse_check, unlearning_set)
from trojanscope.errors import ConfigError, UnsupportedModelError
from trojanscope.models import ModelSpec, load_model, save_model

from _models import CORNER_TARGET as TARGET
from _models import NC_FAST as FAST
from _models import CornerPatchNet


#: tiny tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_registered():
    assert {"nc-prune", "unlearn"} <= set(list_defenses("repair"))
    assert isinstance(create("nc-prune"), NeuronPruning) and isinstance(create("unlearn"), Unlearning)


def test_activation_gap():
    clean = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    trig = torch.tensor([[1.0, 5.0]])
    assert activation_gap(clean, trig).tolist() == [0.0, 4.0]
    conv = torch.ones(2, 3, 2, 2)
    assert activation_gap(conv, 2 * conv).tolist() == [1.0, 1.0, 1.0]


def test_pruning_removes_the_backdoor(setup, digits):
    planted, scan, trigger = setup
    snap = _snapshot(planted)
    r = NeuronPruning(stop_asr=0.05).repair(planted, digits["val"], scan=scan)
    assert _unchanged(planted, snap) and r.model is not planted
    h = r.history
    assert h[0]["ratio"] == 0 and h[0]["attack_success"] > 0.9
    assert h[-1]["attack_success"] < 0.05 and r.details["reached_stop"]
    assert all(set(p) == {"ratio", "n_pruned", "accuracy", "attack_success"} for p in h)
    assert [p["n_pruned"] for p in h] == sorted(p["n_pruned"] for p in h)
    assert h[-1]["ratio"] < 0.2
    test = digits["test"]
    assert ts.attack_success_rate(r.model, test, trigger, TARGET) < 0.05
    assert ts.clean_accuracy(r.model, test) >= ts.clean_accuracy(planted, test) - 0.05
    # pruned = zeroed columns of the last linear layer; same architecture, plain state dict
    cols = torch.tensor(r.details["pruned"])
    assert float(r.model.fc.weight.detach()[:, cols].abs().sum()) == 0.0
    assert set(r.model.state_dict()) == set(planted.state_dict())
    json.dumps(r.to_dict())


def test_pruning_an_output_layer_zeroes_its_rows(setup, digits):
    planted, scan, _ = setup
    r = NeuronPruning(layer="detect", step=1.0).repair(planted, digits["val"], scan={TARGET: scan.triggers[TARGET]})
    assert float(r.model.detect.weight.detach().abs().sum()) == 0.0
    assert float(r.model.detect.bias.detach().abs().sum()) == 0.0
    with pytest.raises(UnsupportedModelError):  # flatten feeds fc together with the detector: not prunable
        NeuronPruning(layer="flatten").repair(planted, digits["val"], scan=scan)


def test_unlearning_unlearns_the_reversed_trigger(setup, digits):
    planted, scan, trigger = setup
    snap = _snapshot(planted)
    r = Unlearning(share=1.0, epochs=3, lr=0.05).repair(planted, digits["train"], scan=scan)
    assert _unchanged(planted, snap)
    before, after = r.history
    assert before["attack_success"] > 0.9 and after["attack_success"] < 0.1
    assert after["accuracy"] >= before["accuracy"] - 0.02
    assert r.details["n_stamped"] == round(0.2 * len(digits["train"]))
    assert ts.attack_success_rate(r.model, digits["test"], trigger, TARGET) < ts.attack_success_rate(
        planted, digits["test"], trigger, TARGET)


def test_unlearning_starts_again_at_a_smaller_rate_when_its_fine_tuning_diverges(setup, digits):
    planted, scan, trigger = setup
    tr = digits["train"]
    # SGD at lr 100 sends this model's unlearning loss from 5.4 up to about 32; lr 10 unlearns
    r = Unlearning(share=1.0, epochs=3, lr=100.0, optimizer="sgd").repair(planted, tr, scan=scan)
    direct = Unlearning(share=1.0, epochs=3, lr=10.0, optimizer="sgd").repair(planted, tr, scan=scan)
    assert [(a["lr"], a["failed"] is None) for a in r.details["fine_tune"]] == [(100.0, False), (pytest.approx(10.0), True)]
    assert r.details["repaired"] is True and r.details["lr_used"] == pytest.approx(10.0)
    assert r.details["note"].startswith("the fine-tuning failed at lr 100: diverged (loss ")
    assert r.details["note"].endswith("; unlearned at lr 10")
    assert all(torch.equal(p, q) for p, q in zip(r.model.state_dict().values(), direct.model.state_dict().values()))
    assert r.history[-1]["attack_success"] < 0.1
    assert ts.attack_success_rate(r.model, digits["test"], trigger, TARGET) < 0.1
    # a rate at which every try diverges: the model comes back as it was, and says so
    snap = _snapshot(planted)
    bad = Unlearning(share=1.0, epochs=3, lr=1e6, optimizer="sgd").repair(planted, tr, scan=scan)
    assert bad.details["repaired"] is False and "failed at every learning rate" in bad.details["reason"]
    assert [a["failed"][:8] for a in bad.details["fine_tune"]] == ["diverged"] * 3
    assert all(torch.equal(v, snap[k]) for k, v in bad.model.state_dict().items())
    assert len(bad.history) == 1
    json.dumps(bad.to_dict())


def test_collapse_check_fails_a_model_that_lost_half_its_accuracy_above_chance(setup, digits):
    planted, _, _ = setup
    val = digits["val"]
    check = collapse_check(planted, val)
    assert check(planted) is None
    dead = copy.deepcopy(planted)
    with torch.no_grad():
        dead.fc.weight.zero_()
        dead.fc.bias.copy_(torch.arange(10.0))  # always label 9
    acc0, acc = ts.clean_accuracy(planted, val), ts.clean_accuracy(dead, val)
    floor = 0.1 + COLLAPSE_SHARE * (acc0 - 0.1)
    assert acc < floor
    assert check(dead) == (f"clean accuracy on {len(val)} held-out samples fell from {acc0:.1%} to {acc:.1%} "
                           f"(below {floor:.1%})")


def test_unlearning_keeps_a_run_that_does_not_collapse(setup, digits):
    planted, scan, _ = setup
    for share in (0.5, 1.0):  # checked on the clean samples left out / on the unstamped ones
        r = Unlearning(share=share, epochs=3, lr=0.05).repair(planted, digits["train"], scan=scan)
        assert [a["failed"] for a in r.details["fine_tune"]] == [None] and "note" not in r.details
        assert r.details["repaired"] is True and r.history[-1]["attack_success"] < 0.1


def test_unlearning_that_collapses_the_model_is_tried_again(setup, digits, monkeypatch):
    import trojanscope.training as training

    planted, scan, _ = setup
    real, seen = training.fine_tune, []

    def first_run_collapses(m, d, **k):  # the first run ends as a constant classifier whose loss is low
        out = real(m, d, **k)
        if not seen:
            seen.append(k["lr"])
            with torch.no_grad():
                m.fc.weight.zero_()
                m.fc.bias.copy_(0.1 * torch.arange(10.0))
        return out

    monkeypatch.setattr(training, "fine_tune", first_run_collapses)
    r = Unlearning(share=0.5, epochs=3, lr=0.05).repair(planted, digits["train"], scan=scan)
    fails = [a["failed"] for a in r.details["fine_tune"]]
    assert seen == [0.05] and len(fails) == 2 and fails[1] is None
    assert fails[0].startswith("clean accuracy on ") and "held-out samples fell from" in fails[0]
    assert r.details["fine_tune"][0]["loss_after"] < r.details["fine_tune"][0]["loss_before"]
    assert r.details["lr_used"] == pytest.approx(0.005) and r.details["repaired"] is True
    assert r.history[-1]["accuracy"] > 0.5


def test_unlearning_set(setup, digits):
    _, scan, _ = setup
    tr = digits["train"]
    ds, stamped = unlearning_set(tr, [scan.triggers[TARGET]], share=0.1, poison_ratio=0.2, seed=1)
    assert abs(len(ds) - 0.1 * len(tr)) <= 10
    assert int(stamped.sum()) == round(0.2 * len(ds))
    assert torch.bincount(ds.y, minlength=10).min() >= 1  # stratified, true labels kept


def test_repairs_run_the_scan_themselves_and_spare_a_clean_model(digits, tmp_path):
    tr = digits["train"]
    clean = CornerPatchNet(tr.x, tr.y, 10, target=None)
    for repair in (Unlearning(seed=0), NeuronPruning(seed=0)):
        r = repair.repair(clean, digits["val"])
        assert r.details["repaired"] is False and r.details["scan"]["infected"] is False
        assert ts.clean_accuracy(r.model, digits["test"]) == ts.clean_accuracy(clean, digits["test"])


def test_trigger_arguments(setup, digits):
    planted, scan, _ = setup
    trig = label_triggers(planted, digits["val"], resolve_triggers([scan.triggers[TARGET]]))
    assert list(trig) == [TARGET]  # a bare trigger's label is the one it sends inputs to
    with pytest.raises(ConfigError):
        resolve_triggers("nope")
    with pytest.raises(ConfigError):
        NeuronPruning(step=0.0).repair(planted, digits["val"], scan=scan)


def test_repaired_model_saves_and_loads(digits, tmp_path):
    # a built-in architecture round-trips through save_model / load_model after pruning
    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    trig = {0: ts.Trigger.square((1, 8, 8), 2, "white", "bottom-right")}
    r = NeuronPruning(layer="last_conv", step=0.1, max_ratio=0.2, stop_asr=0.0).repair(model, digits["val"],
                                                                                       scan=trig)
    assert r.history[-1]["n_pruned"] == 6  # 20% of 32 channels, 3 at a time
    # flatten: each position of the last feature map is a neuron, pruned by zeroing fc1's columns
    f = NeuronPruning(layer="flatten", step=0.25, max_ratio=0.5, stop_asr=0.0).repair(model, digits["val"],
                                                                                     scan=trig)
    cols = torch.tensor(f.details["pruned"])
    assert cols.numel() == 64 and float(f.model.fc1.weight.detach()[:, cols].abs().sum()) == 0.0
    # granularity="unit" names the same neurons on any architecture: the units the head reads
    u = NeuronPruning(granularity="unit", layer="last_conv", step=0.25, max_ratio=0.5,
                      stop_asr=0.0).repair(model, digits["val"], scan=trig)
    assert u.details["layer"] == "fc1" and u.details["pruned"] == f.details["pruned"]
    # without a layer, units mean the last convolutional block's (the penultimate layer's units
    # are its channels), channels mean the paper's penultimate layer
    d = NeuronPruning(granularity="unit", step=0.25, max_ratio=0.5, stop_asr=0.0).repair(model, digits["val"],
                                                                                         scan=trig)
    assert d.details["layer"] == "fc1" and d.details["pruned"] == f.details["pruned"]
    assert NeuronPruning(step=0.5, max_ratio=0.5, stop_asr=0.0).repair(
        model, digits["val"], scan=trig).details["layer"] == "fc2"
    v = NeuronPruning(layer="fc1:input", step=0.25, max_ratio=0.5, stop_asr=0.0).repair(model, digits["val"],
                                                                                       scan=trig)
    assert v.details["pruned"] == f.details["pruned"]
    spec = ModelSpec("mnist_cnn", (1, 8, 8), 10)
    save_model(r.model, tmp_path / "m", spec)
    back = load_model(tmp_path / "m").model
    x = digits["test"].x[:8]
    with torch.no_grad():
        torch.testing.assert_close(back(x), r.model(x))
