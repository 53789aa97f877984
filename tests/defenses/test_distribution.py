"""MESA: kernels by hand, generators on a tiny BadNets model, and the distribution repair."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import trojanscope as ts
from trojanscope.defenses import DEFENSES
from trojanscope.defenses.model import distribution as mesa
from trojanscope.defenses.model.distribution import (BatchedMLP, DistributionReport, TriggerDistribution, dv_bound,
                                                     ensemble_weights, stamp, staircase_levels, trigger_success)
from trojanscope.defenses.repair.distribution_unlearning import DistributionUnlearning
from trojanscope.report._explain_plots import save_distribution_grid
from trojanscope.training import train_new

POS = (4, 4)  # the planted 3x3 square's top-left corner on the 8x8 digits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(digits, device):
    train = digits["train"]
    trig = ts.Trigger.square(train.image_shape, 3, "white", POS)
    model = train_new("mnist_cnn", ts.BadNets(trig, target=0, rate=0.1).poison(train), seed=0, epochs=8,
                      device=device, arch_kwargs={"hidden": 64})
    return model, trig


@pytest.fixture(scope="module")
def fitted(planted, digits):
    model, _ = planted
    dist = TriggerDistribution(n_levels=4, trigger_size=3, position=POS, steps=80, samples_per_step=8,
                               images_per_step=8)
    report = dist.explain(model, digits["val"], 0)  # the fitted state stays on dist
    assert isinstance(report, DistributionReport) and report.distribution is dist and report.seconds > 0
    assert report.params == dist.get_params() and "distribution" not in report.to_dict()
    return dist


def test_levels_and_weights_by_hand():
    assert staircase_levels(5).tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    # steps of psi(a) = a: 0.5 and 0.5; volumes e^1 and e^0
    w = ensemble_weights(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5]))
    assert w.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], rel=1e-5)
    # psi(a) = a^2: steps 0.25 and 0.75
    w2 = ensemble_weights(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.5]), shape_power=2.0)
    assert w2.tolist() == pytest.approx([0.25, 0.75], rel=1e-5)


def test_dv_bound_by_hand():
    tj, tm = torch.tensor([1.0, 3.0]), torch.tensor([0.0, math.log(3.0)])
    assert float(dv_bound(tj, tm)) == pytest.approx(2.0 - math.log(2.0), rel=1e-6)


def test_stamp_matches_trigger_apply():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 6, 6, generator=g)
    masks, patterns = torch.rand(3, 6, 6, generator=g), torch.rand(3, 1, 6, 6, generator=g)
    out = stamp(x, masks, patterns)
    assert out.shape == (3, 5, 1, 6, 6)
    for i in range(3):
        assert torch.allclose(out[i], ts.Trigger(masks[i], patterns[i]).apply(x), atol=1e-6)


def test_testing_function_is_mean_target_probability(planted, digits):
    model, trig = planted
    x = digits["val"].x[:7]
    masks = torch.stack([trig.mask, torch.zeros_like(trig.mask)])
    patterns = torch.stack([trig.pattern, trig.pattern])
    f = mesa.testing_function(model, x, masks, patterns, 0)
    expect = [F.softmax(model(trig.apply(x)), 1)[:, 0].mean(), F.softmax(model(x), 1)[:, 0].mean()]
    assert f.detach().tolist() == pytest.approx([float(e.detach()) for e in expect], rel=1e-4)
    assert float(f[0].detach()) > float(f[1].detach())
    asr = trigger_success(model, x, masks, patterns, 0, batch_size=3)
    assert asr.tolist() == pytest.approx(trigger_success(model, x, masks, patterns, 0).tolist())


def test_batched_mlp_is_independent_mlps():
    net = BatchedMLP(3, [4, 5, 2], generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 6, 4)
    out = net(h)
    for i in range(3):
        one = F.elu(h[i] @ net.weights[0][i] + net.biases[0][i]) @ net.weights[1][i] + net.biases[1][i]
        assert torch.allclose(out[i], one, atol=1e-5)


def test_fit_meets_the_levels(fitted, planted, digits):
    model, _ = planted
    hist = fitted.history_
    first = sum(hist[0]["penalty"])
    last = sum(sum(h["penalty"]) for h in hist[-10:]) / 10
    assert last < first
    rep = fitted.report(model, digits["test"], n=40)
    assert rep.asr.shape == (4, 40)
    assert float(rep.valid_share[-1]) >= 0.8          # top level: ASR > 0.75
    assert float(rep.asr[-1].mean()) > float(rep.asr[0].mean())
    assert float(fitted.weights_.sum()) == pytest.approx(1.0, rel=1e-5)
    assert rep.to_dict()["position"] == list(POS)


def test_mine_learns_and_generators_do_not_collapse(fitted):
    # the statistics networks get several steps on a large noise batch per generator step, so the
    # MI (entropy) estimates are well above zero at every level, the top one included
    assert float(fitted.entropies_.min()) > 0.1
    assert all(max(h["mi"]) > 0 for h in fitted.history_[-5:])
    top = fitted.sample_tensors(100, level=fitted.n_levels - 1).patterns[:, 0, POS[0]:POS[0] + 3, POS[1]:POS[1] + 3]
    assert float(top.std(0).mean()) > 0.01          # the samples differ: not one point


def test_expand_at_places(fitted):
    out = torch.rand(3, 9, generator=torch.Generator().manual_seed(0))
    m0, p0 = fitted._expand(out)
    m1, p1 = fitted._expand(out, torch.tensor([POS] * 3))
    assert torch.equal(m0, m1) and torch.equal(p0, p1)
    m2, p2 = fitted._expand(out, torch.tensor([[0, 0], [5, 1], [2, 3]]))
    assert torch.equal(p2[1, 0, 5:8, 1:4], out[1].reshape(3, 3)) and float(m2[1].sum()) == 9
    assert float(m2[1, 5:8, 1:4].min()) == 1 and float(p2[1].abs().sum()) == pytest.approx(float(out[1].sum()))


def test_places_and_place_success(fitted, planted, digits):
    model, _ = planted
    c = fitted.places_within(1)
    assert c[0].tolist() == list(POS) and c.shape == (9, 2)
    assert fitted.places_within(0).tolist() == [list(POS)]
    c3 = fitted.places_within(3)                    # clipped to the 8x8 image: rows and cols 1..5
    assert c3.shape == (25, 2) and int(c3.min()) == 1 and int(c3.max()) == 5
    st = fitted.sample_tensors(40, places=c, seed=0)
    assert {tuple(p) for p in st.places.tolist()} <= {tuple(p) for p in c.tolist()}
    for i in range(40):
        r, q = st.places[i].tolist()
        assert float(st.masks[i, r:r + 3, q:q + 3].sum()) == 9 and float(st.masks[i].sum()) == 9
    assert fitted.sample_tensors(4).places.tolist() == [list(POS)] * 4
    with pytest.raises(ts.ConfigError):
        fitted.sample_tensors(2, places=torch.tensor([[6, 6]]))
    far = torch.tensor([[0, 0], [0, 5]])
    asr = fitted.place_success(model, digits["val"], torch.cat([torch.tensor([POS]), far]), min_beta=0.5)
    assert asr.shape == (3,) and float(asr[0]) > 0.5 and float(asr[0]) > float(asr[1:].max())


def test_sampling_shapes_and_seeds(fitted, tmp_path):
    st = fitted.sample_tensors(6, seed=1)
    assert st.masks.shape == (6, 8, 8) and st.patterns.shape == (6, 1, 8, 8)
    assert torch.equal(st.masks, fitted.sample_tensors(6, seed=1).masks)
    assert float(st.masks[:, :POS[0]].sum()) == 0 and float(st.masks[:, POS[0]:POS[0] + 3, POS[1]:POS[1] + 3].min()) == 1
    top = fitted.sample_tensors(5, level=3)
    assert top.levels.tolist() == [3] * 5
    assert set(fitted.sample_tensors(50, min_beta=0.5).levels.tolist()) <= {2, 3}
    trigs = fitted.sample(3)
    assert len(trigs) == 3 and all(isinstance(t, ts.Trigger) for t in trigs)
    png = save_distribution_grid(fitted, tmp_path / "grid.png", n_per_level=4)
    assert png.stat().st_size > 1000


def test_not_fitted_and_bad_args(digits):
    with pytest.raises(ts.NotFittedError):
        TriggerDistribution().sample(2)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ts.ConfigError):
        TriggerDistribution(position=(7, 7), trigger_size=3).explain(net, digits["val"], 0)
    with pytest.raises(ts.ConfigError, match="row, col"):
        TriggerDistribution(position=(5,), trigger_size=3).explain(net, digits["val"], 0)  # was an IndexError
    with pytest.raises(ts.ConfigError):
        TriggerDistribution(n_levels=0).explain(net, digits["val"], 0)
    with pytest.raises(ts.ConfigError):
        DistributionUnlearning().repair(net, digits["val"])  # no target


def test_distribution_repair_removes_backdoor(fitted, planted, digits):
    model, trig = planted
    test = digits["test"]
    ca0, asr0 = ts.clean_accuracy(model, test), ts.attack_success_rate(model, test, trig, 0)
    assert asr0 > 0.9
    before = [p.detach().clone() for p in model.parameters()]
    res = DistributionUnlearning(rate=0.3, epochs=4).repair(model, digits["train"], scan=fitted)
    assert ts.attack_success_rate(res.model, test, trig, 0) < 0.2
    places = res.details["places"]                  # the located place and the valid ones near it
    assert places[0] == list(POS) and len(places) >= 1
    assert all(abs(r - POS[0]) <= 3 and abs(q - POS[1]) <= 3 for r, q in places)
    assert len(res.details["place_success"]) == len(fitted.places_within(3))
    fixed = DistributionUnlearning(rate=0.3, epochs=1, shift=0).repair(model, digits["train"], scan=fitted)
    assert fixed.details["places"] == [list(POS)] and fixed.details["place_success"] is None
    assert ts.clean_accuracy(res.model, test) >= ca0 - 0.05
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert res.details["target"] == 0 and DEFENSES.get("distribution-unlearn") is DistributionUnlearning
    # the report of a fitted distribution is a scan too: reused as it is, no refit
    again = DistributionUnlearning(epochs=0, shift=0).repair(model, digits["val"], scan=fitted.report(model, digits["val"], n=4))
    assert again.details["target"] == 0 and again.details["betas"] == fitted.betas_.tolist()
    assert DEFENSES.get("trigger-distribution") is TriggerDistribution and TriggerDistribution.family == "explain"
