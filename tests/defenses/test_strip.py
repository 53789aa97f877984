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
from trojanscope.defenses.input.strip import (StripDecisions, overlay_entropy, own_label_surprisal, sequential_decision,
                                              strip_entropy, superimpose)
from trojanscope.errors import ConfigError, DataError, NotFittedError
from trojanscope.metrics import detection_metrics

from _models import PlantedPatchNet, Tempered


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


def test_own_label_surprisal_by_hand_and_against_numpy():
    # logits (0, 0): p = 1/2 -> 1 bit; logits (ln 3, 0) read at label 0: p = 3/4 -> log2(4/3) bits
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    hand = [1.0, math.log2(4 / 3)]
    assert own_label_surprisal(logits, torch.tensor([0]))[0].tolist() == pytest.approx(hand, rel=1e-6)
    assert own_label_surprisal(logits, torch.tensor([1]))[0, 1].item() == pytest.approx(2.0, rel=1e-6)  # p = 1/4
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 7, generator=g) * 4
    lab = torch.tensor([6, 0, 3])
    zz = z.double().numpy()
    logp = zz - zz.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -logp[np.arange(3)[:, None], np.arange(5)[None, :], lab.numpy()[:, None]] / np.log(2)
    np.testing.assert_allclose(own_label_surprisal(z, lab).numpy(), ref, rtol=1e-5)
    # far from the label the softmax underflows to 0; the surprisal stays finite
    assert torch.isfinite(own_label_surprisal(torch.tensor([[[0.0, 200.0]]]), torch.tensor([0]))).all()
    with pytest.raises(DataError):
        own_label_surprisal(z, lab[:2])


@pytest.fixture(scope="module")
def planted(mnist):
    tr = mnist["train"]
    bad = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=0, patch=4), 10.0)
    clean = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=None, patch=4), 10.0)
    trig = ts.Trigger.square(tr.image_shape, 4, "white", "bottom-right")
    return bad, clean, trig


@pytest.mark.parametrize("statistic", ["entropy", "own_label"])
def test_strip_flags_planted_trigger(planted, mnist, statistic):
    bad, _, trig = planted
    strip = STRIP(n_overlays=20, statistic=statistic).fit(bad, mnist["val"])
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


@pytest.mark.parametrize("statistic", ["entropy", "own_label"])
def test_strip_clean_model_does_not_cry_wolf(planted, mnist, statistic):
    _, clean, trig = planted
    strip = STRIP(n_overlays=20, statistic=statistic).fit(clean, mnist["val"])
    x = mnist["test"].x[:200]
    assert float(strip.flag(x).float().mean()) <= 0.05
    assert float(strip.flag(trig.apply(x)).float().mean()) <= 0.10  # no backdoor: the patch is nothing special


def test_own_label_statistic_on_a_received_model(planted, mnist):
    """The own-label statistic on a TorchScript copy of the planted model: the same decisions as on
    the module, the same at another batch size, and every triggered input flagged. The own
    label is the model's label for each input alone, so the scores average the per-copy surprisal
    at that label (checked against a direct computation on one input's copies)."""
    bad, _, trig = planted
    val, x = mnist["val"], mnist["test"].x[:200]
    xt = trig.apply(x)
    scripted = torch.jit.trace(bad, val.x[:2])
    kw = dict(n_overlays=16, statistic="own_label", early_stop=False)
    on_module = STRIP(**kw).fit(bad, val)
    on_file = STRIP(**kw, batch_size=40).fit(scripted, val)
    assert on_file.calibration_ == "global"  # the own-label statistic keeps the paper's threshold by default
    a, b = on_module.decide(torch.cat([x, xt])), on_file.decide(torch.cat([x, xt]))
    assert torch.equal(a.flagged, b.flagged)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-5)
    assert bool(b.flagged[200:].all()) and float(b.flagged[:200].float().mean()) <= 0.05
    d = on_file._draws(0, 1)[0]
    copies = superimpose(x[:1].repeat(16, 1, 1, 1), on_file.overlays_[d], on_file.alpha_, clip=on_file.clip_)
    with torch.no_grad():
        own = bad(x[:1]).argmax(1)
        direct = own_label_surprisal(bad(copies)[None], own).double().mean()
    assert float(-b.scores[0]) == pytest.approx(float(direct), abs=1e-4)
    with pytest.raises(ConfigError):
        STRIP(statistic="variance").fit(bad, val)


def test_sequential_decision_by_hand():
    mean, std = torch.tensor([0.01, 0.9, 0.2, 0.0]), torch.tensor([0.01, 0.5, 0.5, 0.0])
    got = sequential_decision(mean, std, 16, 0.15, delta=0.01, min_std=0.05)
    t = scipy.stats.t.ppf(0.99, 15)
    half = t * np.maximum(std.numpy(), 0.05) / 4.0  # c = t_{n-1}(1 - delta) max(s, floor) / sqrt(n)
    want = np.where(mean.numpy() + half < 0.15, 1, np.where(mean.numpy() - half > 0.15, -1, 0))
    assert got.tolist() == want.tolist() == [1, -1, 0, 1]
    assert sequential_decision(mean, std, 1, 0.15).tolist() == [0, 0, 0, 0]  # one copy: no bound
    # a tighter delta widens the bound: what was decided at 0.2 may wait, never the reverse
    loose = sequential_decision(mean, std, 16, 0.15, delta=0.2)
    assert ((got == 0) | (got == loose)).all() and (loose != 0).sum() >= (got != 0).sum()


def test_early_and_fixed_agree_where_clear(planted, mnist):
    bad, _, trig = planted
    # the early rule's mechanics at the reference's overlay weight (the planted net's clean
    # entropies sit lower under the heavier greyscale default, so fewer decide in one round)
    x = torch.cat([mnist["test"].x[:60], trig.apply(mnist["test"].x[60:120])])
    fixed = STRIP(n_overlays=64, early_stop=False, alpha=1.0).fit(bad, mnist["val"])
    early = STRIP(n_overlays=64, alpha=1.0).fit(bad, mnist["val"])
    assert early.threshold_ == fixed.threshold_  # calibrated on all 64 overlays either way
    f, e = fixed.decide(x), early.decide(x)
    assert isinstance(e, StripDecisions) and torch.equal(f.n_overlays, torch.full((120,), 64))
    assert torch.equal(e.flagged, e.scores > e.threshold)
    assert torch.equal(e.flagged, early.flag(x)) and torch.equal(e.scores, early.score(x))
    # entropy at least 3/4 of the boundary's away from it (boundary 0.03 bit, triggered inputs at 0)
    clear = (f.scores - f.threshold).abs() > 0.75 * abs(f.threshold)
    assert int(clear.sum()) >= 100
    assert torch.equal(e.flagged[clear], f.flagged[clear])
    assert bool(f.flagged[60:].all()) and bool(e.flagged[60:].all())  # every triggered input caught
    assert e.mean_overlays < 0.75 * 64 and int(e.n_overlays[:60].median()) <= 16  # clean digits go early
    # the floor is calibrated: replayed on the calibration inputs, the early rule agrees with the fixed one
    assert early.min_std_ in [0.0125 * 2 ** k for k in range(12)] and early.calibration_overlays_ < 64
    pinned = STRIP(n_overlays=64, min_std=0.0125, alpha=1.0).fit(bad, mnist["val"])
    assert pinned.min_std_ == 0.0125 and pinned.decide(x).mean_overlays <= e.mean_overlays
    assert (e.n_overlays % 8 == 0).all() and int(e.n_overlays.min()) >= 8
    # early inputs used a prefix of the fixed filter's overlays: one round equals the first 8 of 64
    # (the scores less each input's label shift: the shifts are calibrated on 8 and on 64 overlays)
    one = STRIP(n_overlays=8, early_stop=False, alpha=1.0).fit(bad, mnist["val"])
    dec8 = e.n_overlays == 8
    with torch.no_grad():
        lab = bad(x).argmax(1)
    raw_one, raw_early = one.score(x) - one.label_shift_[lab].float(), e.scores - early.label_shift_[lab].float()
    assert torch.allclose(raw_one[dec8], raw_early[dec8], atol=1e-5)


def test_strip_batch_size_and_seed(planted, mnist):
    bad, _, trig = planted
    x = torch.cat([mnist["test"].x[:10], trig.apply(mnist["test"].x[10:20])])
    for early in (False, True):
        a = STRIP(n_overlays=32, batch_size=5, early_stop=early).fit(bad, mnist["val"].subset(slice(0, 100)))
        b = STRIP(n_overlays=32, batch_size=1000, early_stop=early).fit(bad, mnist["val"].subset(slice(0, 100)))
        da, db = a.decide(x), b.decide(x)
        assert torch.equal(da.n_overlays, db.n_overlays) and torch.equal(da.flagged, db.flagged)
        assert torch.allclose(da.scores, db.scores, atol=1e-5)
    a = STRIP(n_overlays=16, batch_size=7).fit(bad, mnist["val"].subset(slice(0, 100)))
    b = STRIP(n_overlays=16, batch_size=1000).fit(bad, mnist["val"].subset(slice(0, 100)))
    assert torch.allclose(a.score(x), b.score(x), atol=1e-5)
    assert a.threshold_ == pytest.approx(b.threshold_, abs=1e-5)
    c = STRIP(n_overlays=16, seed=1).fit(bad, mnist["val"].subset(slice(0, 100)))
    assert not torch.allclose(a.score(x), c.score(x))
    assert torch.equal(a.score(x), a.score(x))  # deterministic across calls


def test_stream_equals_in_memory(planted, mnist):
    bad, _, trig = planted
    x = torch.cat([mnist["test"].x[:150], trig.apply(mnist["test"].x[150:300])])  # > one block of draws
    strip = STRIP(n_overlays=24).fit(bad, mnist["val"].subset(slice(0, 100)))
    whole = strip.decide(x)
    items = [x[0], x[1:40], *x[40:45], x[45:300].numpy()]  # single images, batches, an array
    parts = list(strip.flag_stream(items, chunk_size=37))
    assert [p.start for p in parts] == list(range(0, 300, 37))
    assert all(len(p) == 37 for p in parts[:-1]) and len(parts[-1]) == 300 - 37 * 8
    got = StripDecisions.concat(parts)
    assert torch.equal(got.flagged, whole.flagged) and torch.equal(got.n_overlays, whole.n_overlays)
    assert torch.allclose(got.scores, whole.scores, atol=1e-6)
    assert bool(whole.flagged[150:].all()) and float(whole.flagged[:150].float().mean()) < 0.1
    d = json.loads(json.dumps(got.to_dict()))
    assert len(d["scores"]) == len(d["n_overlays"]) == 300
    with pytest.raises(DataError):
        list(strip.flag_stream([torch.zeros(1, 28, 28, 1, 1)]))


def test_strip_contract(planted, mnist):
    bad, _, _ = planted
    s = create("strip", n_overlays=4)
    assert isinstance(s, STRIP) and "n_overlays=4" in repr(s)
    with pytest.raises(NotFittedError):
        s.score(mnist["test"].x[:2])
    with pytest.raises(ConfigError):
        STRIP(frr=1.5).fit(bad, mnist["val"])
    with pytest.raises(ConfigError):
        STRIP(round_size=0).fit(bad, mnist["val"])
    with pytest.raises(ConfigError):
        STRIP(delta=0.0).fit(bad, mnist["val"])
    with pytest.raises(ConfigError):
        STRIP(min_std=-1.0).fit(bad, mnist["val"])
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
    base = ["filter", str(tmp_path / "m"), "--fit", "digits:val", "-p", "n_overlays=16", "--device", "cpu"]
    r = CliRunner().invoke(cli, base + ["--data", str(tmp_path / "inp.npz"), "--json", str(tmp_path / "f.json"),
                                        "--chunk-size", "3", "--csv", str(tmp_path / "f.csv")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "f.json").read_text())
    assert len(d["scores"]) == len(d["flagged"]) == len(d["overlays"]) == 20 and isinstance(d["threshold"], float)
    assert "far" in d and "frr" in d and all(8 <= u <= 16 for u in d["overlays"])
    rows = (tmp_path / "f.csv").read_text().splitlines()
    assert rows[0] == "index,score,flagged,overlays,triggered" and len(rows) == 21
    assert [int(r.split(",")[3]) for r in rows[1:]] == d["overlays"]
    # one chunk or many: the same decisions
    r = CliRunner().invoke(cli, base + ["--data", str(tmp_path / "inp.npz"), "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["flagged"] == d["flagged"] and g["overlays"] == d["overlays"]
    np.testing.assert_allclose(g["scores"], d["scores"], atol=1e-5)
    # a folder of images (any depth), streamed, with their paths
    from PIL import Image

    for i in range(5):
        sub = tmp_path / "imgs" / ("a" if i < 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8)).resize((16, 16)).save(sub / f"{i}.png")
    r = CliRunner().invoke(cli, base + ["--data", str(tmp_path / "imgs"), "--chunk-size", "2", "--quiet",
                                        "--json", str(tmp_path / "h.json"), "--csv", str(tmp_path / "h.csv")])
    assert r.exit_code == 0, r.output
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["paths"] == ["a/0.png", "a/1.png", "a/2.png", "b/3.png", "b/4.png"] and len(h["overlays"]) == 5
    assert (tmp_path / "h.csv").read_text().splitlines()[0] == "index,score,flagged,overlays,path"
    # the one-pass filter reports one forward pass per input
    bad = CliRunner().invoke(cli, ["filter", str(tmp_path / "m"), "--fit", "digits:val", "--data", "mnist5k:test"])
    assert bad.exit_code == 2 and "error:" in bad.output
    bad = CliRunner().invoke(cli, ["filter", str(tmp_path / "m"), "--fit", "digits:val", "--data", "digits:test",
                                   "-p", "bogus=1"])
    assert bad.exit_code == 2
    np.savez(tmp_path / "lie.npz", x=np.zeros((4, 8, 8), np.uint8))
    raw = bytearray((tmp_path / "lie.npz").read_bytes())
    i = raw.find(b"(4, 8, 8)")
    raw[i:i + 9] = b"(9, 8, 8)"  # the header claims more images than the member holds
    (tmp_path / "lie.npz").write_bytes(bytes(raw))
    for spec in ("lie.npz", "nothing.npz"):
        bad = CliRunner().invoke(cli, base + ["--data", str(tmp_path / spec)])
        assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output, bad.output


def test_superimpose_by_hand():
    # a magenta pixel under a bright overlay pixel: the clipped sum saturates it towards white, the
    # unclipped one keeps its difference from the overlay
    x, o = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.9, 0.7]])
    assert superimpose(x, o, clip=True).tolist() == [pytest.approx([1.0, 0.9, 1.0])]
    assert superimpose(x, o, clip=False).tolist() == [pytest.approx([1.2, 0.9, 1.7])]
    assert superimpose(x, o, 0.5, clip=False).tolist() == [pytest.approx([1.1, 0.45, 1.35])]
    assert (superimpose(x, o, clip=False) - o).tolist() == [pytest.approx(x[0].tolist())]


def test_overlay_weight_follows_the_sum(planted, mnist):
    """``alpha=None`` weighs the overlay 1.5 on a clipped sum and 1.0 on an unclipped one; an
    explicit ``alpha`` wins, and it is the weight the perturbed copies are built with."""
    from trojanscope.defenses.input.strip import CLIPPED_ALPHA

    bad, _, _ = planted
    val = mnist["val"]
    assert STRIP(n_overlays=4).fit(bad, val).alpha_ == CLIPPED_ALPHA == 1.5
    assert STRIP(n_overlays=4, clip=False).fit(bad, val).alpha_ == 1.0
    assert STRIP(n_overlays=4, alpha=0.7).fit(bad, val).alpha_ == 0.7
    with pytest.raises(ts.ConfigError):
        STRIP(alpha=0.0).fit(bad, val)
    # the score at the default equals the score at an explicit 1.5, and differs from 1.0's
    x = mnist["test"].x[:8]
    default = STRIP(n_overlays=8, early_stop=False).fit(bad, val).score(x)
    assert torch.equal(default, STRIP(n_overlays=8, early_stop=False, alpha=1.5).fit(bad, val).score(x))
    assert not torch.equal(default, STRIP(n_overlays=8, early_stop=False, alpha=1.0).fit(bad, val).score(x))


def test_strip_clips_greyscale_and_not_colour_by_default(mnist):
    """The default sum is clipped on one channel and not on three; an explicit ``clip`` wins. On a
    colour model with a planted magenta-patch backdoor the clipped sum turns the patch towards
    white under bright overlays and lets nearly every triggered input through; the default keeps
    its contrast and catches far more, without flagging more of the clean twin's inputs."""
    from trojanscope.data import load_data

    assert STRIP(n_overlays=4).fit(PlantedPatchNet(mnist["train"].x, mnist["train"].y, 10), mnist["val"]).clip_
    col = load_data("cmnist:val")
    p = torch.randperm(len(col), generator=torch.Generator().manual_seed(0))
    tr, val, test = col.subset(p[:200]), col.subset(p[200:400]), col.subset(p[400:])
    magenta = (1.0, 0.0, 1.0)
    bad = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=0, patch=4, colour=magenta), 10.0)
    clean = Tempered(PlantedPatchNet(tr.x, tr.y, 10, target=None, patch=4, colour=magenta), 10.0)
    xt = ts.Trigger.parse("square:4:#ff00ff:bottom-right", col.image_shape).apply(test.x)
    assert bool((bad(xt).argmax(1) == 0).all())  # the backdoor works
    default, clipped = STRIP(n_overlays=16).fit(bad, val), STRIP(n_overlays=16, clip=True).fit(bad, val)
    assert default.clip_ is False and clipped.clip_ is True
    far_default = 1 - float(default.flag(xt).float().mean())
    far_clipped = 1 - float(clipped.flag(xt).float().mean())
    assert far_clipped > 0.9 and far_default < far_clipped - 0.3
    assert float(STRIP(n_overlays=16).fit(clean, val).flag(test.x).float().mean()) < 0.1


def test_label_means_by_hand_and_against_numpy():
    from trojanscope.defenses.input.strip import label_means

    # label 0: (1 + 1 + 1 x 2) / 3; label 1: (4 + 2) / 2; label 2 (no input): the mean, 2
    assert label_means(torch.tensor([1.0, 1.0, 4.0]), torch.tensor([0, 0, 1]), 3, prior=1.0).tolist() == \
        pytest.approx([4 / 3, 3.0, 2.0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, generator=g), torch.randint(0, 7, (200,), generator=g)
    m, prior = float(x.double().mean()), 5.0
    ref = [(x[y == k].double().sum().item() + prior * m) / (int((y == k).sum()) + prior) for k in range(9)]
    np.testing.assert_allclose(label_means(x, y, 9, prior=prior).numpy(), ref, rtol=1e-12)
    assert label_means(x, y, 9, prior=0.0)[:7].tolist() == pytest.approx([x[y == k].double().mean().item()
                                                                          for k in range(7)])
    with pytest.raises(DataError):
        label_means(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3)


def test_joint_thresholds_flag_at_most_frr_together():
    from trojanscope.defenses.base import threshold_for_rate
    from trojanscope.defenses.input.strip import joint_thresholds

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g)
    for b, r_expected in ((a.clone(), 0.05), (torch.randn(1000, generator=g), None)):  # the same, independent
        ta, tb, r = joint_thresholds(a, b, 0.05)
        rate = float(((a > ta) | (b > tb)).double().mean())
        assert rate <= 0.05 and rate >= 0.05 - 0.003  # as many as allowed, to a few inputs
        # the inputs flagged at the 1 - r quantiles of the two scores
        assert torch.equal(a > ta, a > threshold_for_rate(a, r)) and torch.equal(b > tb, b > threshold_for_rate(b, r))
        # each threshold sits in the middle of a gap between scores, not on one (rounding cannot flip it)
        for x, t in ((a, ta), (b, tb)):
            gap = (x[x <= t].max(), x[x > t].min())
            assert float(gap[0]) < t < float(gap[1]) and t == pytest.approx(float(sum(gap)) / 2)
        if r_expected is not None:
            assert r == pytest.approx(r_expected)
        else:  # two independent scores: each flags about half of the budget
            assert 0.025 <= r < 0.03


@pytest.mark.parametrize("early", [False, True])
def test_label_calibration_flags_the_planted_trigger_and_spares_clean_inputs(planted, mnist, early):
    """calibration="label": the decisions are the union of the paper's boundary and one on the
    statistic less the input's label's calibration mean, checked against that rule computed by hand
    from the calibration run; the planted trigger is caught and the clean model not accused."""
    from trojanscope.defenses.input.strip import joint_thresholds, label_means

    bad, clean, trig = planted
    val, x = mnist["val"], mnist["test"].x[:150]
    xt = trig.apply(x)
    strip = STRIP(n_overlays=20, early_stop=early).fit(bad, val)  # the default for the entropy
    assert strip.calibration_ == "label"
    d_clean, d_trig = strip.decide(x), strip.decide(xt)
    assert float(d_trig.flagged.float().mean()) >= 0.95 and float(d_clean.flagged.float().mean()) <= 0.06
    assert strip.label_shift_.shape == (10,) and bool((strip.label_shift_ >= 0).all())
    # the rule by hand, from a global-calibration run with the same overlays (the same draws)
    ref = STRIP(n_overlays=20, early_stop=False, calibration="global").fit(bad, val)
    g = torch.Generator().manual_seed(ref._base_seed())
    perm = torch.randperm(len(val), generator=g)
    calib = val.x[perm[ref.overlays_.shape[0]:]]
    with torch.no_grad():
        lab_cal, lab_x = bad(calib).argmax(1), bad(torch.cat([x, xt])).argmax(1)
    h_cal = -ref.clean_scores_.double()
    mu = label_means(h_cal, lab_cal, 10)
    t_g, t_c, _ = joint_thresholds(-h_cal, -h_cal + mu[lab_cal], 0.01)
    assert strip.threshold_ == pytest.approx(t_g)
    h = -ref.decide(torch.cat([x, xt])).scores.double()
    by_hand = (-h > t_g) | (-h > t_c - mu[lab_x])
    assert float(((-h_cal > t_g) | (-h_cal > t_c - mu[lab_cal])).double().mean()) <= 0.01  # the calibration's FRR
    if not early:
        assert torch.equal(torch.cat([d_clean.flagged, d_trig.flagged]), by_hand)
    else:  # early decisions differ from the fixed rule only where the bound errs
        assert float((torch.cat([d_clean.flagged, d_trig.flagged]) != by_hand).float().mean()) <= 0.02
    # the clean model: no more clean inputs flagged, and the patch is nothing special
    on_clean = STRIP(n_overlays=20, calibration="label", early_stop=early).fit(clean, val)
    assert float(on_clean.flag(x).float().mean()) <= 0.05 and float(on_clean.flag(xt).float().mean()) <= 0.10


def test_label_calibration_on_a_received_model(planted, mnist):
    """The label calibration on a TorchScript copy: the same thresholds and decisions as on the
    module, at another batch size too."""
    bad, _, trig = planted
    val, x = mnist["val"], mnist["test"].x[:100]
    xs = torch.cat([x, trig.apply(x)])
    scripted = torch.jit.trace(bad, val.x[:2])
    on_module = STRIP(n_overlays=16, calibration="label").fit(bad, val)
    on_file = STRIP(n_overlays=16, calibration="label", batch_size=48).fit(scripted, val)
    assert on_file.threshold_ == pytest.approx(on_module.threshold_, abs=1e-5)
    torch.testing.assert_close(on_file.label_shift_, on_module.label_shift_, atol=1e-5, rtol=1e-5)
    a, b = on_module.decide(xs), on_file.decide(xs)
    assert torch.equal(a.flagged, b.flagged) and torch.equal(a.n_overlays, b.n_overlays)
    assert bool(b.flagged[100:].all())
    with pytest.raises(ConfigError):
        STRIP(calibration="per-class").fit(bad, val)
