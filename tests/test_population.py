"""The population round, the trojan probability and the label schedule of Neural Cleanse."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trojanscope.defenses.model.neural_cleanse import (CALIBRATION, NeuralCleanse, matched_norms,
                                                       reverse_engineer_triggers, scan_evidence,
                                                       trojan_probability)
from trojanscope.defenses.model._nc_evidence import per_source_attack_success
from trojanscope.errors import ConfigError
from trojanscope.models import load_model
from trojanscope.population import population_scores
from trojanscope.rounds import MODES, RoundSpec, draw_config, generate_round, load_truth, make_trigger, round_plan

from _models import CornerPatchNet

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = 2
FAST = dict(epochs=40, steps_per_epoch=2, n_samples=160, n_holdout=200)


# --- the probability -----------------------------------------------------------------------

@pytest.mark.parametrize("schedule", sorted(CALIBRATION))
def test_probability_in_unit_interval_and_monotone(schedule):
    cal = CALIBRATION[schedule]
    assert all(c >= 0 for c in cal["coef"].values())
    grid = np.linspace(0, 40, 21)
    base = {"log_gap": 0.1, "log_index": 1.0, "log_ratio": 0.2, "holdout_asr": 0.5}
    for f in cal["coef"]:
        ps = [trojan_probability({**base, f: v}, cal) for v in (grid if f != "holdout_asr" else np.linspace(0, 1, 11))]
        assert all(0.0 <= p <= 1.0 for p in ps)
        assert all(b >= a for a, b in zip(ps, ps[1:])), f
    # extreme evidence saturates without overflow
    assert trojan_probability({"log_gap": 1e6, "log_index": 1e6, "log_ratio": 1e6, "holdout_asr": 1}, cal) == \
        pytest.approx(1.0)
    assert trojan_probability({"log_gap": 0, "log_index": 0, "log_ratio": 0, "holdout_asr": 0}, cal) < 0.5


def test_probability_hand_computation():
    cal = {"intercept": -1.0, "coef": {"a": 2.0, "b": 0.5}}
    z = -1.0 + 2.0 * 0.3 + 0.5 * 2.0
    assert trojan_probability({"a": 0.3, "b": 2.0}, cal) == pytest.approx(1 / (1 + math.exp(-z)))


def test_evidence_hand_computation():
    # one norm 20x below nine equal ones: log ratio log(20); MAD of the log norms is 0 -> capped index
    ev = scan_evidence([2.5] + [50.0] * 9, [0.9] + [0.1] * 9)
    assert ev["label"] == 0 and ev["log_ratio"] == pytest.approx(math.log(20))
    assert ev["log_index"] == 50.0 and ev["holdout_asr"] == pytest.approx(0.9)
    assert ev["log_gap"] == pytest.approx(math.log(20))
    # the gap is read from the raw norms when given (two easy labels: a small gap)
    ev = scan_evidence([2.5] + [50.0] * 9, [0.0] * 10, raw_norms=[10.0, 12.0] + [40.0] * 8)
    assert ev["log_gap"] == pytest.approx(math.log(1.2)) and ev["log_ratio"] == pytest.approx(math.log(20))
    # a single-pixel-like trigger among spread clean norms (48-131): the log scale flags it
    norms = [2.46, 48, 60, 75, 80, 90, 100, 110, 120, 131]
    ev = scan_evidence(norms, [1.0] * 10)
    logn = np.log(norms)
    med = np.median(logn)
    mad = 1.4826 * np.median(np.abs(logn - med))
    assert ev["log_index"] == pytest.approx((med - logn[0]) / mad, rel=1e-5)
    assert ev["log_index"] > 5
    # the smallest norm at the median: no evidence
    ev = scan_evidence([3.0, 3.0, 3.0], [0.0] * 3)
    assert ev["log_index"] == 0.0 and ev["log_ratio"] == 0.0


def test_matched_norms_hand_computation():
    # label 0 is the smallest: its norm went 40 -> 10 -> 5 over epochs 1-3; label 1 stopped after
    # epoch 1 at 40, label 2 after epoch 2 at 30, label 3 ran to the end at 20
    trace = torch.tensor([[40.0, 40, 50, 60], [10.0, 40, 30, 30], [5.0, 40, 30, 20]], dtype=torch.float64)
    got = matched_norms(torch.tensor([5.0, 40, 30, 20]), trace, torch.tensor([3, 1, 2, 3]))
    want = torch.tensor([5.0, 40 * 5 / 40, 30 * 5 / 10, 20], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    # no trace: unchanged
    torch.testing.assert_close(matched_norms(torch.tensor([1.0, 2.0]), None, torch.tensor([1, 1])),
                               torch.tensor([1.0, 2.0], dtype=torch.float64))


# --- the schedule ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nets(digits):
    tr = digits["train"]
    return {"planted": CornerPatchNet(tr.x, tr.y, 10, target=TARGET),
            "clean": CornerPatchNet(tr.x, tr.y, 10, target=None)}


def test_halving_keeps_the_target_with_fewer_passes(nets, digits):
    v = digits["val"]
    kw = dict(epochs=40, steps_per_epoch=2, seed=3)
    full = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], schedule="all", **kw)
    half = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], schedule="halving", **kw)
    assert half.image_passes < full.image_passes / 2
    assert int(half.l1_norms.argmin()) == TARGET == int(full.l1_norms.argmin())
    assert not bool(half.dropped[TARGET]) and int(half.dropped.sum()) == 8   # 10 -> 4 -> 2 kept
    assert bool((half.epochs[half.dropped] < 40).all())
    assert half.norm_trace.shape == (int(half.epochs.max()), 10)
    # the schedule only ever stops jobs: a job it kept matches the full run until its own end
    torch.testing.assert_close(half.norm_trace[:10, TARGET], full.norm_trace[:10, TARGET])
    with pytest.raises(ConfigError):
        reverse_engineer_triggers(nets["planted"], v.x[:16], v.y[:16], schedule="some", epochs=1)


def test_first_rung_costs_about_a_ten_label_rung(nets, digits):
    from trojanscope.defenses.model._nc_optimise import OptimiserSettings

    cfg = OptimiserSettings(samples_per_step=16)
    assert [cfg.first_rung_samples(j) for j in (2, 10, 11, 20, 43, 90)] == [16, 16, 15, 8, 4, 4]  # ceil(160 / J), >= 4
    assert OptimiserSettings(samples_per_step=16, halving_first_samples=16).first_rung_samples(43) == 16
    with pytest.raises(ConfigError):
        OptimiserSettings(samples_per_step=16, halving_first_samples=17).check()
    # the kernel: 20 jobs (each label twice), every epoch inside the first rung, no early stop
    v = digits["val"]
    kw = dict(epochs=4, steps_per_epoch=2, samples_per_step=16, halving_first=4, early_stop=False, seed=0)
    twenty = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], targets=list(range(10)) * 2,
                                       schedule="halving", **kw)
    assert twenty.image_passes == 20 * 4 * 2 * 8
    ten = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], schedule="halving", **kw)
    assert ten.image_passes == 10 * 4 * 2 * 16  # up to 10 jobs: the full mini-batches, as before
    full = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], targets=list(range(10)) * 2,
                                     schedule="all", **kw)
    assert full.image_passes == 20 * 4 * 2 * 16  # "all" is not touched


def test_halving_scan_records_the_norms_its_rule_read(nets, digits):
    r = NeuralCleanse(**FAST, schedule="halving").scan(nets["planted"], digits["val"])
    tested = torch.tensor(r.details["tested_l1_norms"], dtype=torch.float64)
    final = r.l1_norms.double()
    # matched_norms scales the labels that stopped early down by the smallest label's later shrink
    assert tested.shape == (10,) and bool((tested <= final + 1e-6).all()) and bool((tested < final - 1e-6).any())
    assert r.details["median_tested_l1_norm"] == pytest.approx(float(np.median(tested.numpy())))
    assert int(tested.argmin()) == TARGET


def test_halving_scan_measures_held_out_success_of_the_kept_labels_only(nets, digits):
    half = NeuralCleanse(**FAST, schedule="halving").scan(nets["planted"], digits["val"])
    full = NeuralCleanse(**FAST, schedule="all").scan(nets["planted"], digits["val"])
    measured = half.details["holdout_labels"]
    dropped = half.details["dropped"]
    assert TARGET in measured and set(measured).isdisjoint(dropped) and len(measured) == 10 - len(dropped)
    n = half.details["n_holdout"]
    assert half.details["holdout_image_passes"] == len(measured) * n
    assert full.details["holdout_labels"] == list(range(10)) and full.details["holdout_image_passes"] == 10 * n
    ps = half.per_source_attack_success
    assert bool(ps[dropped].isnan().all()) and not bool(ps[measured].isnan().all(1).any())
    # the target's held-out success is the same figure either way (its trigger ran the same budget)
    assert half.evidence["holdout_asr"] == pytest.approx(float(half.attack_success[TARGET]))
    assert float(half.attack_success[TARGET]) > 0.9 and not bool(half.attack_success.isnan().any())


def test_per_source_success_of_triggers_for_given_targets():
    class Corner(torch.nn.Module):  # label 2 when the top-left pixel is bright, else the input's mean decides 0 / 1
        def forward(self, x):
            out = torch.zeros(len(x), 3)
            out[:, 2] = 10.0 * (x[:, 0, 0, 0] > 0.5)
            out[torch.arange(len(x)), (x.mean((1, 2, 3)) > 0.3).long()] += 1.0
            return out

    from trojanscope.data.dataset import ImageDataset

    x = torch.zeros(4, 1, 2, 2)
    x[2:] = 0.6  # two dark images of label 0, two bright ones of label 1
    data = ImageDataset(x, torch.tensor([0, 0, 1, 1]))
    masks = torch.zeros(2, 2, 2)
    masks[0, 0, 0] = 1.0  # stamps the top-left pixel: everything goes to 2
    patterns = torch.ones(2, 1, 2, 2)
    r = per_source_attack_success(Corner(), masks, patterns, data, 3, targets=[2, 0])
    # trigger 0 -> label 2: both sources sent; trigger 1 (empty mask) -> label 0: label 1's images stay 1
    assert torch.equal(r.nan_to_num(-1), torch.tensor([[1.0, 1.0, -1.0], [-1.0, 0.0, -1.0]]))


@pytest.mark.parametrize("schedule", ["halving", "all"])
def test_scan_probability_separates_planted_and_clean(nets, digits, schedule):
    res = {k: NeuralCleanse(**FAST, schedule=schedule, decision="probability", outlier_scale="log").scan(n, digits["val"]) for k, n in nets.items()}
    assert 0 <= res["clean"].probability < 0.5 < res["planted"].probability <= 1
    assert res["planted"].infected and res["planted"].flagged_labels[0] == TARGET
    assert not res["clean"].infected and res["clean"].flagged_labels == []
    d = res["planted"].to_dict()
    assert set(d["evidence"]) >= {"log_gap", "log_index", "log_ratio", "holdout_asr", "calibration"}
    assert d["probability"] == pytest.approx(res["planted"].probability)
    # a threshold set by the user decides the verdict
    strict = NeuralCleanse(**FAST, schedule=schedule, decision="probability", outlier_scale="log", threshold=min(0.999999, res["planted"].probability + 1e-6))
    assert not strict.scan(nets["planted"], digits["val"]).infected


def test_mad_decision_is_the_papers_rule(nets, digits):
    r = NeuralCleanse(**FAST, schedule="all", decision="mad", outlier_scale="l1").scan(nets["planted"], digits["val"])
    assert r.infected == bool(r.flagged.any()) and TARGET in r.flagged_labels


# --- the round --------------------------------------------------------------------------------

def test_round_plan_is_balanced_and_names_tell_nothing():
    spec = RoundSpec(n=40, seed=7)
    plan = round_plan(spec, (1, 28, 28), 10)
    assert len(plan) == 40 and sum(s["backdoored"] for s in plan) == 20
    assert {s["mode"] for s in plan if s["backdoored"]} == set(MODES)
    assert {s["arch"] for s in plan} == set(spec.architectures)
    for mode in MODES:  # each mode is drawn on at least two architectures
        assert len({s["arch"] for s in plan if s["mode"] == mode}) >= 2
    names = [s["name"] for s in plan]
    assert names == sorted(set(names))
    flags = [s["backdoored"] for s in plan]
    assert flags != sorted(flags) and flags != sorted(flags, reverse=True)
    assert round_plan(spec, (1, 28, 28), 10) == plan                      # deterministic
    with pytest.raises(ConfigError):
        round_plan(RoundSpec(n=1), (1, 28, 28), 10)
    with pytest.raises(ConfigError):
        round_plan(RoundSpec(architectures=("alexnet",)), (1, 28, 28), 10)


def test_drawn_configurations_and_triggers_are_in_range():
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(200):
        mode = MODES[i % 3]
        cfg = draw_config(rng, backdoored=True, mode=mode, arch="mnist_cnn", num_classes=10, image_shape=(1, 28, 28))
        t = cfg["trigger"]
        kinds.add(t["kind"])
        assert (0.10 if mode == "all-to-all" else 0.01) <= cfg["rate"] <= 0.15
        if t["kind"] == "blend":
            assert 0.05 <= t["alpha"] <= 0.3
        else:
            assert 2 <= t["size"] <= 7 and t["row"] + t["size"] <= 28 and t["col"] + t["size"] <= 28
        if mode == "source-specific":
            assert len(cfg["sources"]) == 2 and cfg["target"] not in cfg["sources"]
        trig = make_trigger(t, (1, 28, 28))
        assert trig.shape == (1, 28, 28)
        if t["kind"] in ("solid", "checkerboard", "random-binary"):
            m = trig.mask
            rows, cols = m.nonzero(as_tuple=True)
            assert int(rows.min()) >= t["row"] and int(rows.max()) < t["row"] + t["size"]
            assert int(cols.min()) >= t["col"] and int(cols.max()) < t["col"] + t["size"]
    assert kinds == {"solid", "random-binary", "checkerboard", "blend", "rgba"}
    clean = draw_config(rng, backdoored=False, mode=None, arch="bn_resnet", num_classes=10, image_shape=(1, 28, 28))
    assert "trigger" not in clean and not clean["backdoored"]


def test_generate_round_writes_programs_and_separate_truth(tmp_path):
    spec = RoundSpec(n=2, seed=3, data="digits", epochs=1, min_asr=0.0, architectures=("mnist_cnn", "bn_resnet"))
    rows = generate_round(tmp_path, spec)
    assert len(rows) == 2 and sum(r["backdoored"] for r in rows) == 1
    files = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert files == sorted(f"{r['name']}.pt2" for r in rows)                # the scanner's folder: models only
    truth = load_truth(tmp_path)
    assert set(truth) == {r["name"] for r in rows}
    for r in rows:
        lm = load_model(tmp_path / r["file"])
        assert lm.format == "export" and lm.spec.num_classes == 10
        assert 0 <= r["clean_accuracy"] <= 1
    assert json.loads((tmp_path / "truth.json").read_text()) == rows
    # resumed: nothing is trained again
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models").iterdir()}
    assert generate_round(tmp_path, spec) == rows
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models").iterdir()} == before
    with pytest.raises(ConfigError, match="other settings"):
        generate_round(tmp_path, RoundSpec(n=4, seed=3, data="digits", epochs=1))


def test_all_to_all_members_train_longer_on_the_whole_split(tmp_path, monkeypatch):
    """An all-to-all slot trains on the whole train split for all_to_all_epoch_factor x the
    epochs (its backdoor is learnt from a tenth of the poison per label); the others on their
    subset for the round's epochs."""
    import trojanscope.rounds as rounds

    seen = {}

    def fake_train(cfg, train, test, *, epochs):
        seen[cfg.get("mode")] = (len(train), epochs)
        model = rounds.build_architecture(cfg["arch"], train.image_shape, train.num_classes, 0)
        figs = {"clean_accuracy": 0.9, "train_seconds": 0.0}
        if cfg["backdoored"]:
            figs.update(attack_success=1.0, trigger_name="t", trigger_l1=1.0)
        return model.eval(), figs

    monkeypatch.setattr(rounds, "train_member", fake_train)
    spec = RoundSpec(n=6, seed=1, data="digits", epochs=2, train_size=300, architectures=("mnist_cnn",))
    generate_round(tmp_path, spec)
    from trojanscope.data import load_data

    full = len(load_data("digits", "train"))
    assert seen["all-to-all"] == (full, 2 * spec.all_to_all_epoch_factor)
    assert seen["all-to-one"][1] == seen["source-specific"][1] == seen[None][1] == 2
    assert seen["all-to-one"][0] < full


def test_population_scores_against_hand_computation():
    s = population_scores([0.9, 0.8, 0.3, 0.1], [True, True, False, False])
    assert s["roc_auc"] == 1.0
    assert s["cross_entropy"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.7) + math.log(0.9)) / 4)
    s = population_scores([0.4, 0.6], [True, False])
    assert s["roc_auc"] == 0.0 and s["positives"] == 1


def test_population_label_z_by_hand():
    """Each model's own scale is removed, then each label is compared with the same label in the
    other models: a label that is always small is not suspicious, one small in one model is."""
    from trojanscope.population import population_label_z

    # label 1 is easy in every model (half the others); model 2's label 0 is 8x below its usual
    norms = np.array([[40.0, 20.0, 40.0, 40.0],
                      [80.0, 40.0, 80.0, 80.0],
                      [5.0, 20.0, 40.0, 40.0],
                      [40.0, 22.0, 44.0, 40.0]])
    z = population_label_z(norms)
    logn = np.log(norms)
    rel = logn - np.median(logn, 1, keepdims=True)
    usual = np.median(rel, 0)
    spread = np.maximum(1.4826 * np.median(np.abs(rel - usual), 0), 1e-3)
    np.testing.assert_allclose(z, (rel - usual) / spread)
    assert np.unravel_index(np.argmin(z), z.shape) == (2, 0)  # the planted one, not the easy label 1
    assert z[:, 1].min() > -1.0  # the easy label is at its usual place in every model
    # a common scale of one model changes nothing
    np.testing.assert_allclose(population_label_z(norms * np.array([[1.0], [3.0], [1.0], [0.5]])), z)
    for bad in (np.ones((1, 4)), np.ones(4), np.array([[1.0, np.nan], [1.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 1.0]])):
        with pytest.raises(ConfigError):
            population_label_z(bad)


def test_population_probability_rows():
    """Rows of 12 models: the one whose label 3 is far below that label's usual norm gets the
    highest population probability; error rows, other label sets and unknown schedules get None."""
    from trojanscope.defenses.model._nc_evidence import POPULATION_CALIBRATION
    from trojanscope.population import MIN_POPULATION, add_population_probability

    rng = np.random.default_rng(0)
    usual = np.array([40.0, 45.0, 12.0, 50.0, 42.0, 38.0, 47.0, 44.0, 41.0, 46.0])  # label 2: easy everywhere
    ev = {"label": 2, "log_gap": 0.3, "log_index": 2.0, "log_ratio": 0.2, "holdout_asr": 0.95}

    def row(norms, **kw):
        return {"file": "m", "error": None, "evidence": dict(ev), "l1_norms": list(norms), **kw}

    rows = [row(usual * rng.lognormal(0.0, 0.2, 10) * rng.uniform(0.5, 2.0)) for _ in range(11)]
    planted = usual.copy()
    planted[3] = 8.0
    rows.insert(5, row(planted))
    rows.append({"file": "bad", "error": "unknown model format", "evidence": None, "l1_norms": None})
    rows.append(row(np.ones(43)))  # another label set, alone
    rows.append(row([float("nan")] + [1.0] * 9))  # a hostile model's non-finite norms: left out, no error
    add_population_probability(rows, "all")
    p = [r["population_probability"] for r in rows]
    assert all(v is not None and 0 <= v <= 1 for v in p[:12]) and p[12] is None and p[13] is None and p[14] is None
    assert rows[5]["population_label"] == 3 and int(np.argmax(p[:12])) == 5 and p[5] > 0.5
    assert max(p[:5] + p[6:12]) < 0.5  # the easy label 2 is nobody's anomaly
    assert all(r["population_label"] != 2 or r["population_z"] < 3 for r in rows[:12])
    # the same evidence with a larger pop_z never gets a lower probability (non-negative coefficient)
    assert all(c >= 0 for cal in POPULATION_CALIBRATION.values() for c in cal["coef"].values())
    add_population_probability(rows[: MIN_POPULATION - 1], "all")
    assert all(r["population_probability"] is None for r in rows[: MIN_POPULATION - 1])
    add_population_probability(rows, "no-such-schedule")
    assert all(r["population_probability"] is None for r in rows)


def test_population_is_normalised_per_architecture_with_enough_members():
    """Two architectures of the same labels, each with its own easy label (2 for ``a``, 5 for the
    ``b`` models): over the mixed population every ``b`` model's label 5 looks anomalous; with
    ``structure`` each architecture is normalised against its own models, so no clean model is
    anyone's anomaly and the planted label 3 of a ``b`` model stands out. An architecture with
    fewer than MIN_STRUCTURE_POPULATION members falls back to the whole label set."""
    from trojanscope.population import MIN_STRUCTURE_POPULATION as M, add_population_probability

    rng = np.random.default_rng(2)
    usual_a = np.array([40.0, 45.0, 12.0, 50.0, 42.0, 38.0, 47.0, 44.0, 41.0, 46.0])
    usual_b = usual_a.copy()
    usual_b[[2, 5]] = 44.0, 10.0

    def row(usual, structure):
        return {"file": "m", "error": None, "structure": structure, "l1_norms": list(usual * rng.lognormal(0.0, 0.05, 10)),
                "evidence": {"label": 0, "log_gap": 0.3, "log_index": 2.0, "log_ratio": 0.2, "holdout_asr": 0.95}}

    na = M + 5
    rows = [row(usual_a, "a") for _ in range(na)] + [row(usual_b, "b") for _ in range(M)]
    planted = na + 3
    rows[planted]["l1_norms"][3] = 6.0  # a backdoor in a "b" model
    mixed = [{k: v for k, v in r.items() if k != "structure"} for r in rows]
    add_population_probability(mixed, "all")
    clean_b = [i for i in range(na, na + M) if i != planted]
    assert all(mixed[i]["population_label"] == 5 for i in clean_b)
    assert min(mixed[i]["population_z"] for i in clean_b) > max(r["population_z"] for r in mixed[:na])
    add_population_probability(rows, "all")
    z = [r["population_z"] for r in rows]
    assert rows[planted]["population_label"] == 3 and int(np.argmax(z)) == planted
    assert not any(rows[i]["population_label"] == 5 for i in clean_b)
    assert max(z[i] for i in clean_b) < min(mixed[i]["population_z"] for i in clean_b)
    # one "b" model short of a population of its own: the b models are judged by the whole set again
    add_population_probability(rows[:na + M - 1], "all")
    assert all(r["population_label"] == 5 for i, r in enumerate(rows[na:na + M - 1], na) if i != planted)


def test_model_structure_is_the_architecture_not_the_weights():
    from trojanscope.population import model_structure

    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10)) for _ in range(2))
    a(torch.zeros(1, 1, 8, 8)), b(torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    narrow = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12))
    assert model_structure(a) == model_structure(b) and len(model_structure(a)) == 12
    assert model_structure(wide) != model_structure(narrow) != model_structure(a)


def test_population_pair_z_leaves_the_diagonal_out():
    """``(M, K, K)`` pair norms: the NaN diagonal stays NaN and does not enter the medians; the
    off-diagonal cells are normalised as labels are (the same formula, by hand)."""
    from trojanscope.population import add_population_probability, population_label_z

    rng = np.random.default_rng(1)
    k, m = 4, 12
    base = rng.uniform(20, 60, (k, k))
    pairs = base[None] * rng.lognormal(0.0, 0.15, (m, k, k))
    pairs[7, 1, 3] = 2.0                      # model 7: source 1 -> target 3 is far below its usual
    pairs[:, np.arange(k), np.arange(k)] = np.nan
    z = population_label_z(pairs)
    assert np.isnan(z[:, np.arange(k), np.arange(k)]).all() and not np.isnan(z[:, 0, 1]).any()
    logn = np.log(pairs)
    rel = logn - np.nanmedian(logn.reshape(m, -1), 1)[:, None, None]
    off = ~np.eye(k, dtype=bool)
    usual = np.where(off, np.nanmedian(np.where(off, rel, 0.0), 0), np.nan)  # the diagonal: no median
    spread = np.maximum(1.4826 * np.nanmedian(np.where(off, np.abs(rel - usual), 0.0), 0), 1e-3)
    np.testing.assert_allclose(z[:, off], ((rel - usual) / spread)[:, off])
    assert np.unravel_index(np.nanargmin(z), z.shape) == (7, 1, 3)
    # in rows: the pair and its z are reported (no calibration is needed for that)
    rows = [{"file": "m", "error": None, "evidence": {"log_gap": 0.1, "log_index": 1.0, "log_ratio": 0.1, "holdout_asr": 0.9},
             "l1_norms": [40.0, 41.0, 39.0, 42.0],
             "pair_l1_norms": [[None if i == j else float(p[i, j]) for j in range(k)] for i in range(k)]} for p in pairs]
    add_population_probability(rows, "all")
    assert rows[7]["population_pair"] == [1, 3] and rows[7]["population_pair_z"] == max(r["population_pair_z"] for r in rows)
    # the rows statistic: the mean over sources of each source's lowest pair z, by hand
    for i, r in enumerate(rows):
        assert r["population_pair_rows_z"] == pytest.approx(np.mean(-np.nanmin(z[i], axis=1)), abs=1e-4)
    # without the pair scan's own evidence the pair calibration cannot apply: no probability, no error
    assert all(r["population_probability"] is None for r in rows)
    for r in rows:  # with it, the pair calibration ranks the planted pair's model first
        r["evidence"].update(pair_log_index=1.0, pair_log_ratio=0.5, pair_row_ratio=1.0)
    add_population_probability(rows, "all")
    p = [r["population_probability"] for r in rows]
    assert all(v is not None and 0 <= v <= 1 for v in p) and int(np.argmax(p)) == 7
