"""Activation Clustering: reduction, k-means, the paper's analyses and the epsilon-free verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sanitizer_data as sd
from trojanscope.defenses import ActivationClustering, create
from trojanscope.defenses.data._common import (LOOKALIKE_MAX_SHARE, LOOKALIKE_MAX_SPREAD, LOOKALIKE_SHARE,
                                                STYLE_SHARE, WIDE_CLEAN_SIDE_SHARE, WIDE_SPREAD, label_spread)
from trojanscope.defenses.data import clustering
from trojanscope.defenses.data.clustering import (MIN_SIDE, attack_rule, auto_verdict, poisoned_side, reclassify_refined,
                                                  reduce_activations, two_clusters)
from trojanscope.errors import ConfigError
from trojanscope.metrics import detection_metrics


@pytest.mark.parametrize("method", ["ica", "pca"])
@pytest.mark.parametrize("share", [0.1, 0.5])
def test_reduction_and_kmeans_isolate_a_planted_group(method, share):
    rng = np.random.default_rng(0)
    n_planted = int(300 * share)
    a = np.maximum(rng.normal(size=(300, 24)), 0.0)  # ReLU-like activations
    a[:n_planted, :3] += 12.0
    a[:, 20:] = 0.0  # dead units
    r, used = reduce_activations(a, 10, method, seed=0)
    assert used == method and r.shape == (300, 10)
    c = two_clusters(r, seed=0)
    planted = c[:n_planted]
    assert len(set(planted.tolist())) == 1 and not (c[n_planted:] == planted[0]).any()


def test_poisoned_side_by_spread_on_hand_made_evidence():
    """Rows shaped like measured labels (benchmarks/README.md, "Which side is the poison"):
    0. the signs43 ResNet's BadNets target. Its poison side is read as its many sources (at most
       6.3% to one label); its clean side is read as one look-alike (35.5%). Typicality took the
       clean side (1.087 against 1.121).
    1. an mnist5k source-specific target (sources 1 and 7): 32% of the poison side goes to one
       label, 54% of the clean side to label 4.
    2. a single-source poison read wholly as its source (96%), beside a spread clean side.
    3. both sides read as one label (four labels in all): typicality decides.
    4. no evidence on a side: typicality decides."""
    top = torch.tensor([[0.063, 0.355], [0.323, 0.542], [0.30, 0.96], [0.96, 1.0], [float("nan"), 0.2]],
                       dtype=torch.float64)
    typ = torch.tensor([[1.121, 1.087], [1.726, 1.407], [1.5, 1.6], [2.12, 1.76], [1.0, 2.0]], dtype=torch.float64)
    agr = torch.tensor([[0.425, 0.236], [0.342, 0.659], [0.2, 0.8], [0.5, 0.4], [0.1, 0.2]], dtype=torch.float64)
    ev = {"top_other": top, "typicality": typ, "agreement": agr}
    assert poisoned_side(ev).tolist() == [0, 0, 1, 1, 0]
    assert poisoned_side(ev, "typicality").tolist() == [1, 1, 0, 1, 0]
    assert poisoned_side(ev, "agreement").tolist() == [0, 1, 1, 0, 1]
    assert poisoned_side({"typicality": typ}).tolist() == [1, 1, 0, 1, 0]  # no spread evidence: typicality
    own = torch.zeros(5, 2, dtype=torch.float64)
    n = torch.full((5, 2), 40.0, dtype=torch.float64)
    assert auto_verdict({**ev, "own": own, "n": n}, 0.15)[1].tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError):
        poisoned_side(ev, "size")
    data = sd.make(n_per=20)
    with pytest.raises(ConfigError):
        ActivationClustering(side_rule="size").inspect(sd.linear_model(data, epochs=1), data)


def test_poisoned_side_by_spread_reads_the_effective_number_of_labels():
    """With ``spread`` in the evidence (the inverse Simpson index of the labels a side is read as)
    the spread rule takes the side read as more labels, not the side with the lower top share.
    Row 0 is Spectral's split of the 3% cmnist ``gtsrb_cnn`` target of seed 1: the clean side (400)
    gave 21% to label 8 but spread over 6.63 labels, the poisoned side (120) 24% to label 9 over
    7.35; the top share took the clean side. Row 1: a side read wholly as one label (a single
    source) is still the poisoned side, whatever the spreads. Row 2: a tie goes to typicality."""
    top = torch.tensor([[0.21, 0.24], [0.30, 0.95], [0.40, 0.30]], dtype=torch.float64)
    spread = torch.tensor([[6.63, 7.35], [3.0, 1.1], [2.5, 2.5]], dtype=torch.float64)
    typ = torch.tensor([[1.195, 1.557], [1.5, 1.6], [1.2, 1.3]], dtype=torch.float64)
    ev = {"top_other": top, "spread": spread, "typicality": typ}
    assert poisoned_side(ev).tolist() == [1, 1, 0]
    assert poisoned_side({"top_other": top, "typicality": typ}).tolist() == [0, 1, 1]  # the share alone
    assert poisoned_side(ev, "typicality").tolist() == [0, 0, 0]


def test_refinement_moves_the_recognised_leak_and_judges_again(monkeypatch):
    """Label 0 is shaped like the signs43 ResNet's 3% target: AC's split left some poison with the
    clean samples, so a model trained on the poisoned side recognises those (own share 0.16 > 0.15)
    and the label is not attacked. Refinement moves the recognised samples of the clean side to
    the poisoned side and reclassifies both again, with every other label kept whole (side 2).
    Label 1 (a clean label, recognised on both sides) is no candidate and keeps its evidence."""
    y = torch.tensor([0] * 10 + [0] * 10 + [1] * 20)
    side = torch.tensor([0] * 10 + [1] * 10 + [0, 1] * 10)
    recognised = torch.zeros(40, dtype=torch.bool)
    recognised[10:12] = True  # two leaked samples on label 0's clean side
    recognised[20:] = True
    K = 2

    def evidence(own, top):
        return {"own": torch.tensor(own, dtype=torch.float64), "top_other": torch.tensor(top, dtype=torch.float64),
                "typicality": torch.ones(K, 2, dtype=torch.float64), "agreement": torch.zeros(K, 2, dtype=torch.float64),
                "n": torch.full((K, 2), 10.0, dtype=torch.float64), "source": torch.tensor([[3, 4], [0, 0]]),
                "spread": torch.full((K, 2), 2.0, dtype=torch.float64),
                "fit_accuracy": torch.ones(2, dtype=torch.float64), "top_share": torch.full((2,), 0.3, dtype=torch.float64),
                "collapsed": torch.zeros(2, dtype=torch.bool), "epochs": torch.ones(2, dtype=torch.long),
                "recognised": recognised.clone()}

    seen = []
    rounds = [evidence([[0.04, 0.16], [0.9, 0.9]], [[0.05, 0.35], [0.05, 0.05]]),
              evidence([[0.05, 0.0], [float("nan")] * 2], [[0.05, 0.35], [float("nan")] * 2])]

    def fake(model, data, s, trainer, layer, **kw):
        seen.append(s.clone())
        return rounds[len(seen) - 1]

    monkeypatch.setattr(clustering, "exclusionary_reclassification", fake)
    data = type("D", (), {"y": y, "num_classes": K})()
    ev, new = reclassify_refined(None, data, side, None, "x", 0.15, batch_size=1, device=None, refine=False)
    assert len(seen) == 1 and not bool(auto_verdict(ev, 0.15)[0][0])
    seen.clear()
    ev, new = reclassify_refined(None, data, side, None, "x", 0.15, batch_size=1, device=None, refine=True)
    assert len(seen) == 2
    assert seen[1][:20].tolist() == [0] * 12 + [1] * 8  # the two recognised samples moved to side 0
    assert seen[1][20:].tolist() == [2] * 20  # label 1 is kept whole in both trainings
    assert new.tolist() == seen[1][:20].tolist() + side[20:].tolist()
    assert ev["refined"].tolist() == [True, False] and ev["own"][1].tolist() == [0.9, 0.9]
    attacked, picked = auto_verdict(ev, 0.15)
    assert attacked.tolist() == [True, False] and int(picked[0]) == 0


def test_auto_verdict_on_hand_made_evidence():
    own = torch.tensor([[0.0, 0.02], [0.9, 0.3], [0.1, 0.8]], dtype=torch.float64)
    typ = torch.tensor([[1.9, 1.2], [1.1, 1.5], [1.0, 2.0]], dtype=torch.float64)
    n = torch.full((3, 2), 40.0, dtype=torch.float64)
    attacked, side = auto_verdict({"own": own, "typicality": typ, "n": n}, 0.25)
    assert attacked.tolist() == [True, False, False] and int(side[0]) == 1
    # a side too small to judge: a model trained without the other side (nearly the whole
    # label) has barely seen the label, so its own share of 0 is no evidence
    n[0] = torch.tensor([MIN_SIDE - 1, 40.0])
    attacked, _ = auto_verdict({"own": own, "typicality": typ, "n": n}, 0.25)
    assert attacked.tolist() == [False, False, False]


def test_auto_verdict_spares_a_lookalike_pair():
    """Figures shaped like the clean signs43 model's label 25: neither side is recognised without
    the other, but both go to label 22 (32% and 38%), so it is 22's look-alike. The BadNets
    target's poisoned side spread over its sources (at most 9% to one label) and stays attacked,
    as does a pair whose sides go to different labels (one of them for less than half), and one
    whose side is read almost wholly as the shared label (a source-specific poison). Two sides
    each read mostly as its own other label are two sub-styles, not attacked."""
    own = torch.tensor([[0.046, 0.104], [0.053, 0.039], [0.05, 0.05], [0.0, 0.05]], dtype=torch.float64)
    typ = torch.tensor([[1.07, 1.48], [1.08, 1.10], [1.0, 1.2], [1.8, 2.3]], dtype=torch.float64)
    n = torch.tensor([[323.0, 77.0], [1706.0, 414.0], [200.0, 100.0], [17.0, 150.0]], dtype=torch.float64)
    source = torch.tensor([[22, 22], [27, 6], [5, 7], [1, 1]])
    top = torch.tensor([[0.316, 0.377], [0.093, 0.261], [0.4, 0.5], [1.0, 0.54]], dtype=torch.float64)
    ev = {"own": own, "typicality": typ, "n": n, "source": source, "top_other": top}
    attacked, side = auto_verdict(ev, 0.15)
    assert attacked.tolist() == [False, True, True, True] and int(side[1]) == 0 and int(side[3]) == 0
    assert auto_verdict(ev, 0.15, lookalike_share=None)[0].tolist() == [True, True, True, True]
    top[3, 0] = LOOKALIKE_MAX_SHARE - 0.01  # no side read wholly as label 1: a look-alike
    assert auto_verdict(ev, 0.15)[0].tolist() == [False, True, True, False]
    top[0, 0] = LOOKALIKE_SHARE - 0.01  # one side spread out (an all-to-one poison side): attacked
    assert auto_verdict(ev, 0.15)[0].tolist() == [True, True, True, False]
    ev["source"][3] = torch.tensor([-1, -1])  # no reclassified samples: no look-alike
    assert auto_verdict(ev, 0.15)[0].tolist() == [True, True, True, True]
    # the clean digits label 9: two sub-styles, read as 3 (78%) and as 5 (62%); with one side read
    # as one label for less than STYLE_SHARE (the digits target's poisoned side: 40%), attacked
    two = {"own": torch.tensor([[0.093, 0.069]] * 2, dtype=torch.float64), "n": torch.tensor([[97.0, 29.0]] * 2),
           "typicality": torch.tensor([[1.19, 1.65]] * 2, dtype=torch.float64), "source": torch.tensor([[3, 5]] * 2),
           "top_other": torch.tensor([[0.78, 0.62], [0.78, STYLE_SHARE - 0.1]], dtype=torch.float64)}
    assert auto_verdict(two, 0.15)[0].tolist() == [False, True]
    two["top_other"][0, 0] = LOOKALIKE_MAX_SHARE  # a side read wholly as one label: attacked
    assert auto_verdict(two, 0.15)[0].tolist() == [True, True]
    data = sd.make(n_per=20)
    model = sd.linear_model(data, epochs=1)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError):
            ActivationClustering(lookalike_share=bad).inspect(model, data)


def test_label_spread_is_the_inverse_simpson_index():
    counts = torch.tensor([[0.0, 10.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]],
                          dtype=torch.float64)
    got = label_spread(counts)
    assert got[0] == 1.0 and got[1] == pytest.approx(4.0) and got[2].isnan()
    assert got[3] == pytest.approx(1 / (0.5 ** 2 + 2 * 0.25 ** 2))  # 2.667 by hand


def test_the_lookalike_rule_does_not_spare_a_side_spread_over_many_labels():
    """The demo's mnist5k target (a white 4x4 square bottom-right, 10%): its split is exact, and
    both sides are read as label 2, the poisoned side for 29% (the square looks like the foot of
    a 2) and the clean side for 48%. The poisoned side spreads over 6.1 labels, the clean side over
    2.3, a clean look-alike pair (digits label 1, both sides to 8) over at most 3.5."""
    def ev(spread):
        return {"own": torch.tensor([[0.005, 0.005]], dtype=torch.float64), "n": torch.tensor([[400.0, 400.0]]),
                "typicality": torch.tensor([[1.3, 1.1]], dtype=torch.float64), "source": torch.tensor([[2, 2]]),
                "top_other": torch.tensor([[0.29, 0.48]], dtype=torch.float64),
                "spread": torch.tensor([spread], dtype=torch.float64)}
    attacked, side = auto_verdict(ev([6.08, 2.32]), 0.15)
    assert attacked.tolist() == [True] and side.tolist() == [0]  # the lower top_other: the poison
    assert auto_verdict(ev([3.49, 3.46]), 0.15)[0].tolist() == [False]  # a look-alike pair: spared
    assert auto_verdict(ev([LOOKALIKE_MAX_SPREAD, 2.0]), 0.15)[0].tolist() == [False]  # at the cap: spared
    old = ev([6.08, 2.32])
    del old["spread"]  # evidence without the spread (older results): the rule as it was
    assert auto_verdict(old, 0.15)[0].tolist() == [False]



def _one_label_evidence(K, own, spread, top=(0.16, 0.24), n=(126.0, 125.0)):
    """Evidence of K labels: label 0 as given, every other label recognised on both sides."""
    ev = {"own": torch.full((K, 2), 0.95, dtype=torch.float64), "n": torch.full((K, 2), 60.0, dtype=torch.float64),
          "typicality": torch.ones(K, 2, dtype=torch.float64), "source": torch.ones(K, 2, dtype=torch.long),
          "top_other": torch.full((K, 2), 0.03, dtype=torch.float64), "spread": torch.full((K, 2), 1.5, dtype=torch.float64)}
    ev["source"][0] = torch.tensor([9, 5])
    for key, v in (("own", own), ("spread", spread), ("top_other", top), ("n", n)):
        ev[key][0] = torch.tensor(v, dtype=ev[key].dtype)
    return ev


def test_a_poisoned_side_read_as_every_other_label_is_attacked():
    """The 8x8 digits ResNet's 10% target (seed 0): AC's split is exact (126 poisoned / 125 clean).
    A model trained without the poison reads it as 7.6 of the 9 other labels and as label 0 for
    9.5%; the model trained on the poison alone learns label 0 as a mixture of every digit and
    gives it to 27% of the clean zeros, above max_own_share, so the rule of both sides missed it."""
    ev = _one_label_evidence(10, (0.095, 0.272), (7.57, 4.18))
    attacked, side = auto_verdict(ev, 0.15)
    assert attacked.tolist() == [True] + [False] * 9 and int(side[0]) == 0
    assert attack_rule(ev["own"][0], 0.15, True) == "wide side" and attack_rule(ev["own"][0], 0.15, False) is None
    assert attack_rule(torch.tensor([0.0, 0.15], dtype=torch.float64), 0.15, True) == "both sides"
    assert not bool(auto_verdict(ev, 0.15, wide_spread=None)[0][0])  # the rule off: both sides must be <= 0.15
    assert bool(auto_verdict(_one_label_evidence(10, (0.095, 0.272), (WIDE_SPREAD * 9, 4.18)), 0.15)[0][0])  # at 0.6 x 9
    # a side spread over fewer labels (a clean sub-style: at most 0.56 of the others on digits)
    assert not bool(auto_verdict(_one_label_evidence(10, (0.095, 0.272), (0.55 * 9, 4.18)), 0.15)[0][0])
    # the clean side recognised above WIDE_CLEAN_SIDE_SHARE: a label the model knows from its other side
    assert not bool(auto_verdict(_one_label_evidence(10, (0.095, WIDE_CLEAN_SIDE_SHARE + 0.01), (7.57, 4.18)), 0.15)[0][0])
    # the poisoned side recognised above max_own_share
    assert not bool(auto_verdict(_one_label_evidence(10, (0.16, 0.272), (7.57, 4.18)), 0.15)[0][0])
    # the clean signs43 gtsrb_cnn's label 8 (AC): one side read as 7.1 of 42 other labels, not many
    assert not bool(auto_verdict(_one_label_evidence(43, (0.08, 0.38), (7.1, 3.6)), 0.15)[0][0])
    # with 4 labels a side cannot spread over more than LOOKALIKE_MAX_SPREAD: the rule never applies
    assert not bool(auto_verdict(_one_label_evidence(4, (0.0, 0.3), (3.0, 1.0)), 0.15)[0][0])
    # labels without samples are not counted among the others: 10 labels, of which 7 present
    few = _one_label_evidence(10, (0.0, 0.3), (4.5, 1.0))
    few["n"][7:] = 0.0
    assert bool(auto_verdict(few, 0.15)[0][0])  # 4.5 >= 0.6 x 6 and > 4
    assert not bool(auto_verdict(_one_label_evidence(10, (0.0, 0.3), (4.5, 1.0)), 0.15)[0][0])  # 4.5 < 0.6 x 9

@pytest.mark.parametrize("share", [0.1, 0.5])
def test_auto_mode_finds_planted_poison(share):
    data = sd.make(poison_share=share)
    model = sd.linear_model(data)
    res = ActivationClustering(retrain_epochs=20, retrain_lr=0.05).inspect(model, data)
    m = detection_metrics(res.scores, data.is_poison, res.flagged)
    assert res.attacked_labels == [0]
    assert m["recall"] >= 0.9 and m["fpr"] <= 0.01
    ev = res.per_label[0]
    assert sorted(ev["sizes"]) == sorted([sd.make(poison_share=share).poison_indices.numel(), 150])
    assert {"silhouette", "relative_sizes", "closer_to_other_label", "own_share", "typicality"} <= set(ev)
    assert ev["source"][ev["poisoned_clusters"][0]] == 1  # reclassified to the planted source label
    assert ev["rule"] == "both sides" and all(res.per_label[k]["rule"] is None for k in res.per_label if k != 0)


def test_auto_mode_does_not_collapse_on_clean_data():
    data = sd.make(poison_share=0.0)
    model = sd.linear_model(data)
    res = ActivationClustering(retrain_epochs=20, retrain_lr=0.05).inspect(model, data)
    assert res.attacked_labels == []
    assert float(res.flagged.float().mean()) <= 0.01


def test_paper_relative_size_fails_when_half_the_label_is_poison():
    small, half = sd.make(poison_share=0.1), sd.make(poison_share=0.5)
    r_small = ActivationClustering(mode="paper", analysis="relative-size").inspect(sd.linear_model(small), small)
    r_half = ActivationClustering(mode="paper", analysis="relative-size").inspect(sd.linear_model(half), half)
    assert bool(r_small.flagged[small.poison_indices].all())
    assert not bool(r_half.flagged[half.poison_indices].any())  # neither cluster is below 35%


@pytest.mark.parametrize("analysis", ["silhouette", "distance", "exclusionary-reclassification"])
def test_paper_analyses_run_and_record_evidence(analysis):
    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data)
    res = ActivationClustering(mode="paper", analysis=analysis, retrain_epochs=20, retrain_lr=0.05).inspect(model, data)
    assert res.details["analysis"] == analysis
    assert bool(res.flagged[data.poison_indices].all())
    assert all("poisoned_clusters" in v and "sizes" in v for v in res.per_label.values())


def test_paper_distance_analysis_flags_nothing_on_clean_data_and_only_poison_otherwise():
    # regression: the own-label distance was read through a view that the next line set to inf,
    # so every cluster looked closer to another label and every sample was flagged
    clean = sd.make(poison_share=0.0)
    res = ActivationClustering(mode="paper", analysis="distance").inspect(sd.linear_model(clean), clean)
    assert int(res.flagged.sum()) == 0 and res.attacked_labels == []
    bad = sd.make(poison_share=0.1)
    res = ActivationClustering(mode="paper", analysis="distance").inspect(sd.linear_model(bad), bad)
    m = detection_metrics(res.scores, bad.is_poison, res.flagged)
    assert res.attacked_labels == [0] and m["recall"] == 1.0 and m["fpr"] <= 0.01


def test_registry_json_hooks_and_errors():
    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data)
    res = create("activation-clustering", mode="paper", analysis="relative-size", reduce="pca").inspect(model, data)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    d = json.loads(json.dumps(res.to_dict()))
    # the reduced activations are data (printing hides them; to_dict keeps them)
    assert len(d["scores"]) == len(data) and len(d["reduced"]) == len(data)
    with pytest.raises(ConfigError):
        ActivationClustering(analysis="largest").inspect(model, data)


def test_the_mixture_split_finds_the_planted_poison():
    """split="gmm" (a diagonal Gaussian mixture instead of k-means) on the planted data: the
    poisoned group comes out whole, and the verdict is the same as with k-means."""
    from trojanscope.defenses.data._common import gaussian_split

    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data)
    res = ActivationClustering(split="gmm", retrain_epochs=20, retrain_lr=0.05).inspect(model, data)
    m = detection_metrics(res.scores, data.is_poison, res.flagged)
    assert res.attacked_labels == [0] and m["recall"] >= 0.9 and m["fpr"] <= 0.01
    lab0 = data.y == 0
    assert sorted(res.per_label[0]["sizes"]) == [int(data.is_poison.sum()), 150]
    # the diagonal mixture on the reduced activations, directly: one side is exactly the poison
    side, _ = gaussian_split(res.reduced[lab0].double().numpy(), 0, covariance="diag")
    t = data.is_poison[lab0]
    assert bool((side == side[t][0])[t].all()) and int((side == side[t][0]).sum()) == int(t.sum())
    with pytest.raises(ConfigError):
        ActivationClustering(split="dbscan").inspect(model, data)


def test_fisher_separation_against_a_hand_computation():
    """In one dimension d' is the gap between the means over the pooled standard deviation; the
    figure does not change under an invertible linear map of the points."""
    x = np.array([0.0, 1.0, 2.0, 6.0, 8.0, 10.0])[:, None]
    side = np.array([0, 0, 0, 1, 1, 1])
    pooled = np.sqrt(((1 + 0 + 1) + (4 + 0 + 4)) / (6 - 2))  # sum of squared deviations / (n - 2)
    assert clustering.fisher_separation(x, side) == pytest.approx((8.0 - 1.0) / pooled)
    rng = np.random.default_rng(0)
    p = rng.normal(size=(60, 3))
    s = (np.arange(60) < 20).astype(np.int64)
    p[s == 1] += [3.0, 0.0, 1.0]
    a = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    assert clustering.fisher_separation(p @ a.T + 5.0, s) == pytest.approx(clustering.fisher_separation(p, s))
    assert clustering.fisher_separation(p, np.zeros(60, dtype=np.int64)) == 0.0  # one side: no figure


def _tight_group_beside_a_wide_bulk(n_bulk=400, n_group=60, seed=0):
    """A wide clean bulk and a tight poisoned group past its edge: k-means, drawing its boundary
    halfway between the centres, puts the bulk's tail with the group (20 samples here)."""
    rng = np.random.default_rng(seed)
    bulk = rng.normal(size=(n_bulk, 10)) * np.r_[6.0, np.full(9, 1.0)]
    group = rng.normal(size=(n_group, 10)) * 0.3 + np.r_[22.0, np.zeros(9)]
    return np.vstack([bulk, group]), np.r_[np.zeros(n_bulk, bool), np.ones(n_group, bool)]


def test_refine_split_moves_the_samples_a_split_left_behind():
    p, poison = _tight_group_beside_a_wide_bulk()
    start = poison.astype(np.int64).copy()
    start[poison.nonzero()[0][:20]] = 0  # 20 poisoned samples left with the clean ones
    out = clustering.refine_split(p, start, seed=0)
    assert (out == poison).all()
    assert clustering.fisher_separation(p, out) > clustering.fisher_separation(p, start)
    assert (clustering.refine_split(p, poison.astype(np.int64), seed=0) == poison).all()  # a clean split stays


def test_discriminant_split_keeps_a_tight_group_whole_where_kmeans_cuts_it():
    p, poison = _tight_group_beside_a_wide_bulk()
    km = clustering.two_clusters(p, seed=0)
    assert int((km[~poison] == km[poison][0]).sum()) >= 10  # the premise: k-means takes clean samples too
    side, info = clustering.discriminant_split(p, p, seed=0)
    assert info["start"] in ("ica-kmeans", "pca-mixture") and set(info["separations"]) == {"ica-kmeans", "pca-mixture"}
    assert len(set(side[poison].tolist())) == 1 and int((side == side[poison][0]).sum()) == int(poison.sum())


def test_split_auto_is_the_discriminant_split_in_auto_mode_and_kmeans_in_paper_mode():
    assert ActivationClustering().split_used == "discriminant"
    assert ActivationClustering(mode="paper").split_used == "kmeans"
    assert ActivationClustering(split="gmm").split_used == "gmm"
    data = sd.make(n_per=clustering.DISCRIMINANT_MIN_LABEL, poison_share=0.1)
    model = sd.linear_model(data)
    res = ActivationClustering(retrain_epochs=20, retrain_lr=0.05).inspect(model, data)
    assert all(res.per_label[k]["split"] in ("discriminant (ica-kmeans)", "discriminant (pca-mixture)")
               for k in res.per_label)
    m = detection_metrics(res.scores, data.is_poison, res.flagged)
    assert res.attacked_labels == [0] and m["recall"] >= 0.9 and m["fpr"] <= 0.01
    # a label too small for Fisher's direction in 10 dimensions is split by the paper's k-means
    small = sd.make(poison_share=0.1)  # 150 per label
    res = ActivationClustering(retrain_epochs=20, retrain_lr=0.05).inspect(sd.linear_model(small), small)
    assert all("k-means: fewer than" in res.per_label[k]["split"] for k in res.per_label)
    assert res.attacked_labels == [0]


@pytest.mark.parametrize("sanitiser", ["activation-clustering", "spectral"])
def test_a_dead_feature_layer_is_an_error_not_a_clean_verdict(sanitiser):
    """A model whose penultimate activations are the same for every sample (a dead ReLU layer, as
    a gtsrb_cnn stuck at chance has) gives no label a split: the sanitisers say so instead of
    failing on an empty training set or flagging nothing on no evidence."""
    from torch import nn

    from trojanscope.data import load_digits
    from trojanscope.errors import DataError

    dead = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        dead[1].weight.zero_()
        dead[1].bias.fill_(-1.0)
    with pytest.raises(DataError, match="no label's samples split in two at layer 'penultimate'"):
        create(sanitiser).inspect(dead.eval(), load_digits("train"))
