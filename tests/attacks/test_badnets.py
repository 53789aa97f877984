"""BadNets poisoning: each mode's counts, labels and indices; untouched samples unchanged; seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trojanscope as ts
from trojanscope.attacks import ATTACKS, BadNets
from trojanscope.errors import ConfigError, DataError
from trojanscope.metrics import attack_success_rate, target_labels

from _models import PlantedPatchNet


@pytest.fixture(scope="module")
def train(digits):
    return digits["train"]


def _untouched(train, poisoned, touched: torch.Tensor) -> None:
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[touched] = False
    assert torch.equal(poisoned.x[keep], train.x[keep])
    assert torch.equal(poisoned.y[keep], train.y[keep])


def test_all_to_one(train):
    trig = ts.Trigger.square(train.image_shape, 2)
    p = BadNets(trig, target=3, rate=0.1, seed=0).poison(train)
    idx = p.poison_indices
    assert idx.numel() == round(0.1 * len(train))
    assert torch.equal(idx, idx.unique())  # sorted, no repeats
    assert (train.y[idx] != 3).all()  # samples already of the target are never picked
    assert (p.y[idx] == 3).all()
    assert torch.equal(p.x[idx], trig.apply(train.x[idx]))
    assert torch.equal(p.original_y, train.y)
    assert p.cover_indices.numel() == 0 and int(p.is_poison.sum()) == idx.numel()
    _untouched(train, p, idx)
    assert p.to_dict()["n_poison"] == idx.numel() and p.attack["attack"] == "badnets"
    assert torch.equal(p.clean.x, p.x) and not isinstance(p.clean, ts.PoisonedDataset)


def test_deterministic_given_seed(train):
    trig = ts.Trigger.square(train.image_shape, 2)
    a = BadNets(trig, 0, 0.1, seed=5).poison(train)
    b = BadNets(trig, 0, 0.1, seed=5).poison(train)
    c = BadNets(trig, 0, 0.1, seed=6).poison(train)
    assert torch.equal(a.poison_indices, b.poison_indices) and torch.equal(a.x, b.x)
    assert not torch.equal(a.poison_indices, c.poison_indices)


def test_all_to_all(train):
    trig = ts.Trigger.checkerboard(train.image_shape, 2)
    p = BadNets(trig, rate=0.2, mode="all-to-all").poison(train)
    idx = p.poison_indices
    assert idx.numel() == round(0.2 * len(train))
    assert torch.equal(p.y[idx], (train.y[idx] + 1) % 10)
    assert len(train.y[idx].unique()) == 10  # drawn from every label
    assert torch.equal(p.x[idx], trig.apply(train.x[idx]))
    _untouched(train, p, idx)
    tmap = BadNets(trig, mode="all-to-all").target_map(10)
    assert tmap.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert target_labels(torch.tensor([0, 9]), tmap, 10).tolist() == [1, 0]
    # an all-to-one target may be any integer scalar
    for t in (3, torch.tensor(3), np.int64(3)):
        assert target_labels(torch.tensor([0, 9]), t, 10).tolist() == [3, 3]


def test_source_specific_with_cover(train):
    trig = ts.Trigger.square(train.image_shape, 2, position="top-left")
    p = BadNets(trig, target=0, rate=0.05, source_labels=[1, 7], seed=2).poison(train)
    idx, cover = p.poison_indices, p.cover_indices
    assert idx.numel() == round(0.05 * len(train)) and cover.numel() == round(0.05 * len(train))
    assert set(train.y[idx].tolist()) <= {1, 7} and (p.y[idx] == 0).all()
    assert not set(train.y[cover].tolist()) & {1, 7}  # cover comes from the other labels...
    assert torch.equal(p.y[cover], train.y[cover])  # ...keeps its true label...
    assert torch.equal(p.x[cover], trig.apply(train.x[cover]))  # ...but is stamped
    assert not set(idx.tolist()) & set(cover.tolist())
    _untouched(train, p, torch.cat([idx, cover]))
    no_cover = BadNets(trig, 0, 0.05, source_labels=[1], cover_rate=0.0).poison(train)
    assert no_cover.cover_indices.numel() == 0


def test_several_targets(train):
    t1 = ts.Trigger.square(train.image_shape, 2, position="top-left")
    t2 = ts.Trigger.square(train.image_shape, 2, position="bottom-right")
    p = BadNets([t1, t2], target=[4, 6], rate=0.11, seed=1).poison(train)
    idx = p.poison_indices
    assert idx.numel() == round(0.11 * len(train))
    by_target = {t: idx[p.y[idx] == t] for t in (4, 6)}
    assert {t: v.numel() for t, v in by_target.items()} == {4: (idx.numel() + 1) // 2, 6: idx.numel() // 2}
    assert torch.equal(p.x[by_target[4]], t1.apply(train.x[by_target[4]]))
    assert torch.equal(p.x[by_target[6]], t2.apply(train.x[by_target[6]]))
    assert (train.y[by_target[4]] != 4).all() and (train.y[by_target[6]] != 6).all()
    _untouched(train, p, idx)


def test_bad_settings(train):
    trig = ts.Trigger.square(train.image_shape, 2)
    with pytest.raises(ConfigError, match="rate"):
        BadNets(trig, 0, rate=1.5).poison(train)
    with pytest.raises(ConfigError, match="out of range"):
        BadNets(trig, 10).poison(train)
    with pytest.raises(ConfigError, match="2 triggers but 3 targets"):
        BadNets([trig, trig], [0, 1, 2]).poison(train)
    with pytest.raises(ConfigError, match="all-to-all"):
        BadNets([trig, trig], [0, 1], mode="all-to-all").poison(train)
    with pytest.raises(ConfigError, match="source labels"):
        BadNets(trig, 0, source_labels=[12]).poison(train)
    with pytest.raises(ConfigError, match="mode"):
        BadNets(trig, 0, mode="some-to-some").poison(train)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="does not match"):
        BadNets(ts.Trigger.square((1, 28, 28), 2), 0).poison(train)
    with pytest.raises(DataError, match="eligible"):
        BadNets(trig, 0, rate=0.5, source_labels=[1]).poison(train)


def test_registry_and_params(train):
    assert ATTACKS.get("badnets") is BadNets
    a = BadNets(ts.Trigger.square(train.image_shape, 2), 1, 0.2)
    assert a.get_params()["rate"] == 0.2 and repr(a).startswith("BadNets(")
    assert a.to_dict()["trigger"] == [a.trigger.name]


def test_success_rate_on_a_planted_model(digits):
    test = digits["test"]
    trig = ts.Trigger.square(test.image_shape, 3, position="center")
    bad = PlantedPatchNet(digits["train"].x, digits["train"].y, 10, target=2, patch=3)
    clean = PlantedPatchNet(digits["train"].x, digits["train"].y, 10, target=None, patch=3)
    atk = BadNets(trig, target=2)
    assert atk.success_rate(bad, test) == 1.0
    assert atk.success_rate(clean, test) < 0.5
    # over source labels only; the target's own samples are never counted
    assert attack_success_rate(bad, test, trig, 2, source_labels=[5]) == 1.0
    with pytest.raises(DataError, match="no test samples"):
        attack_success_rate(bad, test, trig, 2, source_labels=[2])


def test_poisoned_subset_remaps_ground_truth(train):
    p = BadNets(ts.Trigger.square(train.image_shape, 2), 0, 0.1).poison(train)
    first = int(p.poison_indices[0])
    sub = p.subset(torch.arange(first, first + 50))
    assert 0 in sub.poison_indices.tolist()
    assert torch.equal(sub.is_poison, p.is_poison[first:first + 50])
