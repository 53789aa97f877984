"""Provenance filtering: a poisoned source is flagged in both variants; clean sources are not."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import sanitizer_data as sd
from trojanscope.data import ImageDataset
from trojanscope.defenses import ProvenanceFilter, create
from trojanscope.training import Retrainer, architecture_of, retrain
from trojanscope.errors import DataError


def _trusted() -> ImageDataset:
    clean = sd.make(n_per=60, seed=7)
    return ImageDataset(clean.x, clean.y, clean.num_classes)


@pytest.mark.parametrize("variant", ["trusted", "untrusted"])
def test_poisoned_source_is_flagged(variant):
    data = sd.make(poison_share=0.5, groups=4, poison_group=3)
    model = sd.linear_model(data)
    trusted = _trusted() if variant == "trusted" else None
    res = ProvenanceFilter(retrain_epochs=20, retrain_lr=0.05).inspect(model, data, trusted=trusted)
    assert res.variant == variant
    assert res.flagged_segments == [3]
    assert bool(res.flagged[data.groups == 3].all()) and not bool(res.flagged[data.groups != 3].any())
    assert res.per_segment[3]["score"] > max(res.per_segment[s]["score"] for s in (0, 1, 2))
    json.dumps(res.to_dict())


@pytest.mark.parametrize("variant", ["trusted", "untrusted"])
def test_no_source_flagged_when_clean(variant):
    data = sd.make(groups=4)
    model = sd.linear_model(data)
    trusted = _trusted() if variant == "trusted" else None
    res = ProvenanceFilter(retrain_epochs=20, retrain_lr=0.05).inspect(model, data, trusted=trusted)
    assert res.flagged_segments == [] and not bool(res.flagged.any())


def test_paper_mode_records_with_and_without():
    data = sd.make(poison_share=0.5, groups=4, poison_group=3)
    res = create("provenance", mode="paper", retrain_epochs=20, retrain_lr=0.05).inspect(
        sd.linear_model(data), data, trusted=_trusted())
    assert set(res.per_segment) == {0, 1, 2, 3}
    assert all({"accuracy_with", "accuracy_without"} <= set(v) for v in res.per_segment.values())


def test_errors():
    data = sd.make()
    model = sd.linear_model(data)
    with pytest.raises(DataError, match="provenance"):
        ProvenanceFilter().inspect(model, data)
    with pytest.raises(DataError, match="2 segments"):
        ProvenanceFilter().inspect(model, dataclasses.replace(data, groups=torch.zeros(len(data), dtype=torch.long)))


def test_retrain_removes_and_reports(mnist):
    data = sd.make(poison_share=0.5)
    model = sd.linear_model(data)
    fresh = Retrainer(epochs=1, seed=3).fresh(model, data)
    assert not torch.equal(fresh[1].weight, model[1].weight)
    assert architecture_of(model) is None
    test = _trusted()
    r = retrain(model, data, data.is_poison, test=test, epochs=20, lr=0.05)
    assert r.n_removed == data.poison_indices.numel() and r.n_kept == len(data) - r.n_removed
    assert r.accuracy is not None and r.accuracy > 0.95
