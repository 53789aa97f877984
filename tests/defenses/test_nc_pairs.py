"""Neural Cleanse's (source, target) pair search: source-restricted jobs, pair evidence, the detector's plumbing."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from trojanscope.defenses.model._nc_evidence import matched_norms
from trojanscope.defenses.model.neural_cleanse import (NeuralCleanse, NeuralCleanseResult, OptimiserSettings,
                                                       pair_evidence, pair_matrix,
                                                       reverse_engineer_triggers, reverse_pairs)
from trojanscope.errors import ConfigError, DataError

from _models import NC_FAST as FAST
from _models import SourceCornerNet

#: tiny tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES, TARGET = (1, 7), 9


@pytest.fixture(scope="module")
def nets(digits):
    tr = digits["train"]
    return {"planted": SourceCornerNet(tr.x, tr.y, 10, target=TARGET, sources=SOURCES),
            "clean": SourceCornerNet(tr.x, tr.y, 10, target=None)}


@pytest.fixture(scope="module")
def opt_data(digits):
    return NeuralCleanse(**FAST).split(digits["val"])[0]


@pytest.fixture(scope="module")
def scans(nets, digits):
    return {name: NeuralCleanse(**FAST, pairs=True).scan(net, digits["val"]) for name, net in nets.items()}


# --- pair evidence against a hand computation ------------------------------------------------

def test_pair_evidence_against_numpy():
    rng = np.random.default_rng(0)
    k = 5
    n = rng.uniform(10, 30, size=(k, k))
    n[3, 1] = 0.5                        # the planted pair
    n[2, :] = rng.uniform(2, 3, size=k)  # a source easy to move anywhere
    n[2, 2] = n[0, 4] = np.nan           # a pair not run
    np.fill_diagonal(n, np.nan)
    ev = pair_evidence(torch.from_numpy(n))
    off = n[np.isfinite(n)]
    logs = np.log(off)
    med = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - med))
    assert (ev["pair_source"], ev["pair_target"]) == (3, 1)
    assert ev["pair_log_index"] == pytest.approx((med - np.log(0.5)) / mad)
    assert ev["pair_log_ratio"] == pytest.approx(med - np.log(0.5))
    rows = [np.median(np.log(r[np.isfinite(r)])) - np.log(r[np.isfinite(r)]).min() for r in n]
    assert ev["pair_row_ratio"] == pytest.approx(max(rows)) and ev["pair_row_source"] == int(np.argmax(rows)) == 3


def test_pair_evidence_edge_cases():
    flat = torch.full((3, 3), 4.0).fill_diagonal_(math.nan)
    ev = pair_evidence(flat)
    assert ev["pair_log_index"] == 0.0 and ev["pair_log_ratio"] == 0.0 and ev["pair_row_ratio"] == 0.0
    assert (ev["pair_source"], ev["pair_target"]) == (0, 1)  # the first pair on a tie
    zero = flat.clone()
    zero[2, 0] = 0.0                                          # clamped to 1e-6; MAD 0: capped at 50
    assert pair_evidence(zero)["pair_log_index"] == 50.0
    with pytest.raises(DataError):
        pair_evidence(torch.full((3, 3), math.nan))
    with pytest.raises(DataError):
        pair_evidence(torch.ones(3, 4))


# --- the kernel's source-restricted jobs ---------------------------------------------------------

KERNEL = OptimiserSettings(epochs=40, steps_per_epoch=2, samples_per_step=16)
PAIRS = [(1, 9), (7, 9), (3, 9), (1, 5), (0, 2)]


@pytest.fixture(scope="module")
def batched(nets, opt_data):
    return reverse_pairs(nets["planted"], opt_data.x, opt_data.y, KERNEL, pairs=PAIRS, seed=3)


def test_pair_jobs_batched_and_sequential_agree(batched, nets, opt_data):
    seq = reverse_pairs(nets["planted"], opt_data.x, opt_data.y, dataclasses.replace(KERNEL, mode="sequential"),
                        pairs=PAIRS, seed=3)
    assert batched.sources.tolist() == [s for s, _ in PAIRS] and batched.targets.tolist() == [t for _, t in PAIRS]
    torch.testing.assert_close(seq.l1_norms, batched.l1_norms, rtol=0.02, atol=0.05)
    torch.testing.assert_close(seq.masks, batched.masks, rtol=0.05, atol=0.02)
    assert torch.equal(seq.reached, batched.reached) and seq.image_passes == batched.image_passes


def test_pair_jobs_do_not_depend_on_chunking(batched, nets, opt_data):
    # 32 images per forward pass: the 5 pairs run in chunks of 2, 2, 1
    small = reverse_pairs(nets["planted"], opt_data.x, opt_data.y, dataclasses.replace(KERNEL, batch_size=32),
                          pairs=PAIRS, seed=3)
    torch.testing.assert_close(small.l1_norms, batched.l1_norms, rtol=0.02, atol=0.05)
    torch.testing.assert_close(small.masks, batched.masks, rtol=0.05, atol=0.02)


def test_pair_jobs_use_their_sources_images(batched, nets, opt_data):
    # the image passes: every active job stamps samples_per_step images of its source per step
    per_epoch = KERNEL.steps_per_epoch * KERNEL.samples_per_step
    assert batched.image_passes == int(batched.epochs.sum()) * per_epoch
    # a pair job's trigger moves its own source: the planted pairs (1, 9) and (7, 9) take far
    # smaller triggers than (1, 5) from the same source, and smaller than (3, 9) to the same target
    n = batched.l1_norms
    assert bool(batched.reached[:2].all()) and float(n[:2].max()) < min(0.25 * float(n[3]), 0.6 * float(n[2]))
    # a source with fewer images than samples_per_step: padded, its repeats weighted 0
    few = torch.cat([(opt_data.y == 1).nonzero().flatten()[:5], (opt_data.y != 1).nonzero().flatten()])
    r = reverse_pairs(nets["planted"], opt_data.x[few], opt_data.y[few], KERNEL, pairs=[(1, 9), (3, 9)], seed=3)
    assert r.image_passes == int(r.epochs.sum()) * per_epoch and torch.isfinite(r.l1_norms).all()


def test_default_pairs_and_matrix(nets, opt_data):
    r = reverse_pairs(nets["clean"], opt_data.x, opt_data.y, OptimiserSettings(epochs=1, steps_per_epoch=1,
                                                                                  samples_per_step=2))
    assert len(r) == 90 and r.sources.tolist()[:10] == [0] * 9 + [1] and r.targets.tolist()[:10] == [*range(1, 10), 0]
    m = pair_matrix(r, 10)
    assert torch.isnan(m.diagonal()).all() and int(torch.isfinite(m).sum()) == 90
    assert float(m[3, 5]) == float(r.l1_norms[3 * 9 + 4])
    assert r.trigger(0).name == "neural-cleanse:source0-label1"
    part = reverse_pairs(nets["clean"], opt_data.x, opt_data.y,
                         OptimiserSettings(epochs=1, steps_per_epoch=1, samples_per_step=2), pairs=[(2, 4)])
    pm = pair_matrix(part, 10)
    assert int(torch.isfinite(pm).sum()) == 1 and float(pm[2, 4]) == float(part.l1_norms[0])


def test_sources_validation(nets, opt_data):
    net, x, y = nets["clean"], opt_data.x, opt_data.y
    one = dict(epochs=1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="targets"):
        reverse_engineer_triggers(net, x, y, sources=[1], **one)
    with pytest.raises(ConfigError, match="one label per target"):
        reverse_engineer_triggers(net, x, y, targets=[9, 9], sources=[1], **one)
    with pytest.raises(ConfigError, match="differ"):
        reverse_engineer_triggers(net, x, y, targets=[9, 3], sources=[1, 3], **one)
    with pytest.raises(ConfigError, match="source labels"):
        reverse_engineer_triggers(net, x, y, targets=[9], sources=[10], **one)
    with pytest.raises(DataError, match=r"source label\(s\) \[1\]"):
        reverse_engineer_triggers(net, x[y != 1], y[y != 1], targets=[9], sources=[1], **one)
    with pytest.raises(ConfigError, match="pairs"):
        reverse_pairs(net, x, y, OptimiserSettings(**one), pairs=[1, 9])
    r = reverse_engineer_triggers(net, x, y, targets=[9], sources=[1], **one)
    assert r.sources.tolist() == [1]


def test_without_sources_unchanged(nets, opt_data):
    """No sources: the per-label jobs as before (same masks, no sources recorded)."""
    x, y = opt_data.x, opt_data.y
    a = reverse_engineer_triggers(nets["planted"], x, y, targets=[9, 3], epochs=3, steps_per_epoch=2, seed=1)
    assert a.sources is None and a.trigger(0).name == "neural-cleanse:label9"
    b = reverse_engineer_triggers(nets["planted"], x, y, targets=[9, 3], epochs=3, steps_per_epoch=2, seed=1,
                                  batch_size=16)
    torch.testing.assert_close(a.masks, b.masks, rtol=0.05, atol=0.02)


# --- the detector ----------------------------------------------------------------------------------

def test_pair_scan_finds_the_source_specific_backdoor(scans):
    r = scans["planted"]
    # the per-label scan misses it: no label's trigger flips every source
    assert TARGET not in r.flagged_labels and r.evidence["log_index"] < 3
    # the pair scan finds a planted pair, far below the others at matched budgets
    ev = r.evidence
    assert ev["pair_target"] == TARGET and ev["pair_source"] in SOURCES
    assert ev["pair_log_index"] > 4 and ev["pair_row_ratio"] > 0.4
    assert ev["pair_log_index"] > scans["clean"].evidence["pair_log_index"] + 1.5
    n = r.pair_l1_norms
    assert n.shape == (10, 10) and torch.isnan(n.diagonal()).all() and torch.isfinite(n).sum() == 90
    assert (int(n.nan_to_num(1e9).argmin()) // 10, int(n.nan_to_num(1e9).argmin()) % 10) == (ev["pair_source"], TARGET)


def test_pair_scan_on_the_clean_twin_stays_modest(scans):
    ev = scans["clean"].evidence
    assert ev["pair_log_index"] < 3.5 and ev["pair_log_ratio"] < 0.5


def test_pair_scan_with_halving_over_pairs(nets, opt_data):
    """The full budget ("all") and the detector's halving agree on the planted pair; the
    matched norms are what the detector's evidence reads."""
    r = reverse_pairs(nets["planted"], opt_data.x, opt_data.y,
                      NeuralCleanse(**FAST).settings("all"), seed=0)
    ev = pair_evidence(pair_matrix(r, 10))
    assert (ev["pair_source"], ev["pair_target"]) == (1, TARGET) and ev["pair_log_index"] > 6
    half = reverse_pairs(nets["planted"], opt_data.x, opt_data.y, NeuralCleanse(**FAST).settings("halving"), seed=0)
    assert bool(half.dropped.any()) and half.image_passes < r.image_passes
    hev = pair_evidence(pair_matrix(half, 10, matched_norms(half.l1_norms, half.norm_trace, half.epochs)))
    assert (hev["pair_source"], hev["pair_target"]) == (1, TARGET)


def test_pairs_scan_plumbing(scans, nets, digits, tmp_path):
    r = scans["planted"]
    plain = NeuralCleanse(**FAST).scan(nets["planted"], digits["val"])
    # the label scan and its verdict are those of pairs=False; the pair jobs' cost is added
    assert torch.equal(plain.l1_norms, r.l1_norms) and plain.flagged_labels == r.flagged_labels
    assert plain.probability == r.probability and plain.pair_l1_norms is None
    assert not any(k.startswith("pair_") for k in plain.evidence) and "pair_image_passes" not in plain.details
    assert r.image_passes == plain.image_passes + r.details["pair_image_passes"] > plain.image_passes
    assert {k: v for k, v in r.evidence.items() if not k.startswith("pair_")} == plain.evidence
    assert NeuralCleanse(pairs=True).get_params()["pairs"] is True
    with pytest.raises(ConfigError):
        NeuralCleanse(pairs=1).scan(nets["clean"], digits["val"])
    # JSON and save / load keep the pair norms (NaN diagonal)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["pair_l1_norms"][0][0] is None and d["evidence"]["pair_target"] == TARGET
    r.save(tmp_path / "scan")
    back = NeuralCleanseResult.load(tmp_path / "scan")
    assert torch.equal(back.pair_l1_norms.nan_to_num(-1), r.pair_l1_norms.nan_to_num(-1))
    assert back.evidence == r.evidence
    plain.save(tmp_path / "plain")
    assert NeuralCleanseResult.load(tmp_path / "plain").pair_l1_norms is None
