"""STRIP: the entropy kernel against hand computations and scipy; the filter on a planted trigger."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

import trojanscope as ts
from trojanscope.defenses import STRIP, create
from trojanscope.defenses.input.strip import overlay_entropy, strip_entropy
from trojanscope.errors import ConfigError, DataError, NotFittedError
from trojanscope.metrics import detection_metrics

from models import PlantedPatchNet, Tempered


def test_entropy_by_hand():
    # copy 1: uniform over 2 classes -> 1 bit; copy 2: certain -> 0 bits; copy 3: uniform over 4 -> 2 bits
    probs = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    assert strip_entropy(probs).tolist() == pytest.approx([(1.0 + 0.0 + 2.0) / 3])
    p = torch.tensor([0.2, 0.3, 0.5])
    hand = -(0.2 * math.log2(0.2) + 0.3 * math.log2(0.3) + 0.5 * math.log2(0.5))
    assert float(overlay_entropy(p)) == pytest.approx(hand, rel=1e-6)


def test_entropy_matches_scipy():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 7, 10, generator=g).softmax(-1)
    probs[0, 0] = torch.nn.functional.one_hot(torch.tensor(3), 10).float()  # exact zeros: 0 log 0 = 0
    ref = scipy.stats.entropy(probs.double().numpy(), base=2, axis=-1).mean(-1)
    np.testing.assert_allclose(strip_entropy(probs).numpy(), ref, rtol=1e-5, atol=1e-6)
    assert strip_entropy(probs).shape == (4,)
    with pytest.raises(DataError):
        strip_entropy(torch.tensor([0.5, 0.5]))


@pytest.fixture(scope="module")
def planted(mnist):
    tr = mnist["train"]
    bad = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=0, patch=4), 10.0)
    clean = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=None, patch=4), 10.0)
    trig = ts.Trigger.square(tr.image_shape, 4, "white", "bottom-right")
    return bad, clean, trig


def test_strip_flags_planted_trigger(planted, mnist):
    bad, _, trig = planted
    strip = STRIP(n_overlays=20).fit(bad, mnist["val"])
    x = mnist["test"].x[:150]
    xt = trig.apply(x)
    scores = torch.cat([strip.score(x), strip.score(xt)])
    flagged = torch.cat([strip.flag(x), strip.flag(xt)])
    truth = torch.cat([torch.zeros(150), torch.ones(150)]).bool()
    m = detection_metrics(scores, truth, flagged)
    assert m["auroc"] > 0.97
    assert m["recall"] >= 0.95  # triggered inputs are rejected
    assert m["fpr"] <= 0.06  # few clean inputs are (target FRR 1%, 250 calibration inputs)
    assert torch.allclose(strip.entropy(xt[:5]), -strip.score(xt[:5]))
    assert strip.clean_scores_.shape == (250,) and strip.overlays_.shape == (250, 1, 28, 28)


def test_strip_clean_model_does_not_cry_wolf(planted, mnist):
    _, clean, trig = planted
    strip = STRIP(n_overlays=20).fit(clean, mnist["val"])
    x = mnist["test"].x[:200]
    assert float(strip.flag(x).float().mean()) <= 0.05
    assert float(strip.flag(trig.apply(x)).float().mean()) <= 0.10  # no backdoor: the patch is nothing special


def test_strip_batch_size_and_seed(planted, mnist):
    bad, _, trig = planted
    x = torch.cat([mnist["test"].x[:10], trig.apply(mnist["test"].x[10:20])])
    a = STRIP(n_overlays=16, batch_size=7).fit(bad, mnist["val"].subset(slice(0, 100)))
    b = STRIP(n_overlays=16, batch_size=1000).fit(bad, mnist["val"].subset(slice(0, 100)))
    assert torch.allclose(a.score(x), b.score(x), atol=1e-5)
    assert a.threshold_ == pytest.approx(b.threshold_, abs=1e-5)
    c = STRIP(n_overlays=16, seed=1).fit(bad, mnist["val"].subset(slice(0, 100)))
    assert not torch.allclose(a.score(x), c.score(x))
    assert torch.equal(a.score(x), a.score(x))  # deterministic across calls


def test_strip_contract(planted, mnist):
    bad, _, _ = planted
    s = create("strip", n_overlays=4)
    assert isinstance(s, STRIP) and "n_overlays=4" in repr(s)
    with pytest.raises(NotFittedError):
        s.score(mnist["test"].x[:2])
    with pytest.raises(ConfigError):
        STRIP(frr=1.5).fit(bad, mnist["val"])
    before = {k: v.clone() for k, v in bad.state_dict().items()}
    bad.train()
    s.fit(bad, mnist["val"].subset(slice(0, 40)))
    assert bad.training  # the caller's mode is restored
    bad.eval()
    assert all(torch.equal(before[k], v) for k, v in bad.state_dict().items())
    with pytest.raises(DataError):
        s.score(torch.zeros(2, 1, 8, 8))
    with pytest.raises(DataError):
        s.score(torch.full((2, 1, 28, 28), 2.0))
    json.dumps(s.get_params())


def test_filter_cli(tmp_path):
    from click.testing import CliRunner

    from trojanscope.cli import cli

    te = ts.load_data("digits", "test").subset(slice(0, 20))
    net = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    ts.save_model(net, tmp_path / "m", ts.ModelSpec("mnist_cnn", (1, 8, 8), 10))
    x = te.x.clone()
    x[10:] = ts.Trigger.square((1, 8, 8), 2, "white", "bottom-right", margin=0).apply(x[10:])
    np.savez(tmp_path / "inp.npz", x=x.numpy(), y=te.y.numpy(), triggered=np.r_[np.zeros(10), np.ones(10)].astype(int))
    r = CliRunner().invoke(cli, ["filter", str(tmp_path / "m"), "--fit", "digits:val", "--data", str(tmp_path / "inp.npz"),
                                 "-p", "n_overlays=4", "--json", str(tmp_path / "f.json"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "f.json").read_text())
    assert len(d["scores"]) == 20 and len(d["flagged"]) == 20 and isinstance(d["threshold"], float)
    assert "far" in d and "frr" in d
    bad = CliRunner().invoke(cli, ["filter", str(tmp_path / "m"), "--fit", "digits:val", "--data", "mnist5k:test"])
    assert bad.exit_code == 2 and "error:" in bad.output
    bad = CliRunner().invoke(cli, ["filter", str(tmp_path / "m"), "--fit", "digits:val", "--data", "digits:test",
                                   "-p", "bogus=1"])
    assert bad.exit_code == 2
