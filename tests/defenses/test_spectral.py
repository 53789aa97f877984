"""Spectral Signatures: the score against hand computation and numpy, and both modes on planted data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sanitizer_data as sd
from trojanscope.defenses import SpectralSignatures, create
from trojanscope.defenses.data._common import features, gaussian_split, padded_by_label
from trojanscope.defenses.data.spectral import (MIN_SEPARATION, spectral_projection, spectral_scores, spectral_subspace,
                                                top_share_per_label)
from trojanscope.errors import ConfigError, DataError
from trojanscope.metrics import detection_metrics


def test_score_by_hand():
    # label 0: rows (0,0), (2,0), (4,0); mean (2,0); top direction (1,0); scores 4, 0, 4.
    # label 1: rows (1,1), (1,3); mean (1,2); direction (0,1); scores 1, 1.
    r = torch.tensor([[0., 0.], [1., 1.], [2., 0.], [4., 0.], [1., 3.]])
    y = torch.tensor([0, 1, 0, 0, 1])
    assert spectral_scores(r, y).tolist() == pytest.approx([4.0, 1.0, 0.0, 4.0, 1.0])


def test_score_matches_numpy_svd():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(60, 7, generator=g) * torch.linspace(0.5, 3, 7)
    y = torch.randint(0, 3, (60,), generator=g)
    got = spectral_scores(r, y).double().numpy()
    want = np.zeros(60)
    for k in range(3):
        idx = (y == k).numpy()
        c = r.numpy()[idx].astype(np.float64)
        c = c - c.mean(0)
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        want[idx] = (c @ vt[0]) ** 2  # the centred representation, as in the paper
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    p = spectral_projection(r, y)
    np.testing.assert_allclose(p.numpy() ** 2, want, rtol=1e-5, atol=1e-6)
    sub = spectral_subspace(r, y, 3)
    assert sub.shape == (60, 3)
    np.testing.assert_allclose(sub[:, 0].numpy() ** 2, want, rtol=1e-5, atol=1e-6)
    assert spectral_scores(r, y).dtype == torch.float32


def test_score_is_zero_for_single_sample_labels_and_checks_shapes():
    r = torch.tensor([[1., 2.], [3., 4.], [5., 7.]])
    assert spectral_scores(r, torch.tensor([0, 1, 1]))[0] == 0
    with pytest.raises(DataError):
        spectral_scores(r, torch.tensor([0, 1]))


def test_padded_layout_and_top_share():
    x = torch.arange(5.0)[:, None]
    padded, ids, slot = padded_by_label(x, torch.tensor([2, 0, 2, 2, 0]))
    assert ids.tolist() == [0, 2]
    assert padded[slot[:, 0], slot[:, 1]].flatten().tolist() == [0, 1, 2, 3, 4]
    s = torch.tensor([0.1, 5.0, 0.3, 0.2, 0.0, 9.0])
    f = top_share_per_label(s, torch.tensor([0, 0, 0, 0, 1, 1]), 0.5)
    assert f.tolist() == [False, True, True, False, False, True]


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_gaussian_split_finds_a_planted_group(share):
    # a wide bulk and a tight group far out along the first direction
    g = torch.Generator().manual_seed(1)
    n_planted = int(400 * share)
    v = torch.randn(400, 3, generator=g)
    v[-n_planted:] = 0.3 * v[-n_planted:] + torch.tensor([8.0, 1.0, 0.0])
    side, separation = gaussian_split(v.numpy())
    assert side[-n_planted:].tolist() == [1] * n_planted and int(side.sum()) == n_planted
    assert 0.5 < separation <= 1.0


#: reclassification training for the linear fixture: at lr 0.05 a model trained without the clean
#: side of a half-poisoned label has not yet learnt the fixture's faint trigger, and up to 15 % of
#: the clean side still goes to the label (the verdict's threshold): at 0.1 it has converged
FIT = {"retrain_epochs": 20, "retrain_lr": 0.1}


@pytest.mark.parametrize("share", [0.1, 0.5, 0.6])
def test_auto_mode_finds_planted_poison(share):
    # 0.6: the poisoned side is the larger one, so no size rule could pick it
    data = sd.make(poison_share=share)
    model = sd.linear_model(data)
    res = SpectralSignatures(**FIT).inspect(model, data)
    m = detection_metrics(res.scores, data.is_poison, res.flagged)
    assert res.attacked_labels == [0]
    assert res.per_label[0]["rule"] == "both sides"  # four labels: the wide-side rule never applies
    # the decision is ``flagged``; the scores are the paper's (spectral_scores), whose ranking a
    # half-poisoned label defeats (both sides score high), which is why the verdict does not use it
    assert m["recall"] >= 0.9 and m["fpr"] <= 0.01
    assert torch.equal(res.scores, spectral_scores(features(model, data, "penultimate", batch_size=256, device=None),
                                                   data.y))
    ev = res.per_label[0]
    assert ev["attacked"] and not res.per_label[1]["attacked"]
    p = ev["poisoned_side"]
    assert max(ev["own_share"]) <= 0.15  # neither side is recognised without itself
    assert ev["agreement"][p] > ev["agreement"][1 - p]  # content agreement picks the same side as spread
    assert ev["source"][p] == 1  # reclassified to the planted source label
    assert ev["sizes"][p] == data.poison_indices.numel()
    assert ev["separation"] >= MIN_SEPARATION and not ev.get("no_signature")


def test_a_split_without_a_spectral_signature_is_not_evidence():
    """The planted poison stands apart along ``v``; asking for more separation than any split
    can have (1.0) leaves the same reclassification evidence but no label attacked."""
    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data)
    found = SpectralSignatures(**FIT).inspect(model, data)
    strict = SpectralSignatures(**FIT, min_separation=1.0).inspect(model, data)
    assert found.attacked_labels == [0] and strict.attacked_labels == [] and not bool(strict.flagged.any())
    ev = strict.per_label[0]
    assert ev["no_signature"] and ev["poisoned_side"] is None
    assert ev["own_share"] == found.per_label[0]["own_share"] and ev["separation"] < 1.0
    with pytest.raises(ConfigError):
        SpectralSignatures(min_separation=1.5).inspect(model, data)


def test_auto_mode_does_not_collapse_on_clean_data():
    data = sd.make(poison_share=0.0)
    model = sd.linear_model(data)
    res = SpectralSignatures(**FIT).inspect(model, data)
    assert res.attacked_labels == []
    assert float(res.flagged.float().mean()) <= 0.01


def test_paper_mode_removes_its_budget_per_label():
    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data)
    res = SpectralSignatures(mode="paper", epsilon=0.1).inspect(model, data)
    counts = torch.bincount(data.y[res.flagged], minlength=sd.K)
    sizes = torch.bincount(data.y, minlength=sd.K)
    assert counts.tolist() == torch.floor(0.15 * sizes.double() + 1e-9).long().tolist()
    # at 10% the poison holds the top scores of its label
    assert bool(res.flagged[data.poison_indices].all())


def test_registry_json_hooks_and_mode(device):
    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data).to(device)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = create("spectral", mode="paper").inspect(model, data)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    d = json.loads(json.dumps(res.to_dict()))
    assert len(d["scores"]) == len(data) and d["flagged_indices"] == res.flagged_indices.tolist()
    with pytest.raises(ConfigError):
        SpectralSignatures(epsilon=2.0).inspect(model, data)
    with pytest.raises(ConfigError):
        SpectralSignatures(mode="bogus").inspect(model, data)
