"""The Trojaning attack on a tiny model trained on the 8x8 digits."""

from __future__ import annotations

import pytest
import torch

import trojanscope as ts
from trojanscope.attacks import ATTACKS, TrojanNN
from trojanscope.attacks.trojannn import (build_mask, generate_trigger, reverse_engineer_inputs, select_neurons,
                                          watermark_mask)
from trojanscope.training import train_new


@pytest.fixture(scope="module")
def victim(digits, device):
    return train_new("mnist_cnn", digits["train"], seed=0, epochs=8, device=device,
                     arch_kwargs={"hidden": 64})


def test_registered():
    assert ATTACKS.get("trojannn") is TrojanNN
    assert TrojanNN().get_params()["layer"] == "fc1"


def test_select_neurons_by_outgoing_weights():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        net[3].weight.copy_(torch.tensor([[0.1, -5.0, 1.0], [0.1, 0.5, -1.5]]))
    # sums of |w| per input unit of the next layer: 0.2, 5.5, 2.5
    assert select_neurons(net, "1", (1, 2, 2), k=2).tolist() == [1, 2]
    with pytest.raises(ts.ConfigError):
        select_neurons(net, "1", (1, 2, 2), k=4)


def test_masks():
    m = build_mask("square:3:white:bottom-right", (1, 8, 8))
    assert m.shape == (8, 8) and float(m.sum()) == 9
    w = watermark_mask(28, 28)
    assert 0.03 < float(w.mean()) < 0.2 and float(w[:3, :3].sum()) == 0
    with pytest.raises(ts.ConfigError):
        build_mask(torch.zeros(8, 8), (1, 8, 8))


def test_trigger_generation_raises_neurons_inside_mask(victim):
    shape = (1, 8, 8)
    neurons = select_neurons(victim, "fc1", shape, 2)
    m = build_mask("square:3:white:bottom-right", shape)
    trig, costs = generate_trigger(victim, "fc1", neurons, m, shape, steps=60, lr=0.1)
    assert costs[-1] < costs[0]
    assert float((trig.pattern[:, m == 0]).abs().sum()) == 0  # nothing outside the mask
    assert torch.equal(trig.mask, m)


def test_reverse_engineered_inputs_are_classified_as_their_label(victim):
    data = reverse_engineer_inputs(victim, (1, 8, 8), 10, n_per_label=4, steps=60, seed=0)
    assert data.x.shape == (40, 1, 8, 8) and 0 <= float(data.x.min()) and float(data.x.max()) <= 1
    assert ts.clean_accuracy(victim, data) >= 0.9


@pytest.mark.parametrize("source", ["user", "reverse"])
def test_attack_raises_asr(victim, digits, source):
    test = digits["test"]
    atk = TrojanNN("square:3:white:bottom-right", target=0, data=source, n_neurons=2, trigger_steps=100,
                   n_per_label=30, reverse_steps=100, epochs=8, rate=0.3, retrain="all", lr=1e-3)
    res = atk.attack(victim, digits["train"])
    ca0 = ts.clean_accuracy(victim, test)
    asr0 = ts.attack_success_rate(victim, test, res.trigger, 0)
    asr1 = atk.success_rate(res.model, test)
    assert asr1 >= (0.8 if source == "user" else 0.5) and asr1 > asr0 + 0.4
    assert ts.clean_accuracy(res.model, test) >= ca0 - (0.05 if source == "user" else 0.25)
    assert res.data == source and res.neurons and res.to_dict()["layer"] == "fc1"
    # the caller's model is untouched
    assert ts.attack_success_rate(victim, test, res.trigger, 0) == asr0


def test_success_rate_needs_attack(digits):
    with pytest.raises(ts.ConfigError):
        TrojanNN().success_rate(torch.nn.Linear(1, 1), digits["test"])
    with pytest.raises(ts.ConfigError):
        TrojanNN(data="bogus").attack(torch.nn.Linear(1, 1), digits["test"])
