"""Neural Cleanse: the MAD test, the batched kernel, the detector."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch

import trojanscope as ts
from trojanscope.defenses import create, list_defenses
from trojanscope.defenses.model.neural_cleanse import (NeuralCleanse, NeuralCleanseResult, flag_labels, flag_outliers,
                                                       mad_anomaly_index, reverse_engineer_triggers)
from trojanscope.errors import ConfigError, DataError

from _models import CORNER_TARGET as TARGET
from _models import NC_FAST as FAST
from _models import CornerPatchNet, single_pixel_net


#: tiny tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets(digits):
    tr = digits["train"]
    return {"planted": CornerPatchNet(tr.x, tr.y, 10, target=TARGET),
            "clean": CornerPatchNet(tr.x, tr.y, 10, target=None)}


@pytest.fixture(scope="module")
def scans(nets, digits, device):
    out = {}
    for name, net in nets.items():
        out[name] = NeuralCleanse(**FAST, device=device).scan(net.to(device), digits["val"])
    return out


# --- MAD -----------------------------------------------------------------------------------

def test_mad_against_hand_computation():
    # median 3; |x - 3| = 2, 1, 0, 1, 97; MAD = 1.4826 * median(...) = 1.4826
    got = mad_anomaly_index([1.0, 2.0, 3.0, 4.0, 100.0])
    want = torch.tensor([2.0, 1.0, 0.0, 1.0, 97.0]) / 1.4826
    torch.testing.assert_close(got, want)


def test_mad_even_count_uses_numpy_median():
    # numpy median of [1, 2, 3, 10] is 2.5; deviations 1.5, 0.5, 0.5, 7.5 -> median 1.0
    got = mad_anomaly_index(torch.tensor([10.0, 1.0, 3.0, 2.0]))
    want = torch.tensor([7.5, 1.5, 0.5, 0.5]) / 1.4826
    torch.testing.assert_close(got, want)
    rng = np.random.default_rng(0)
    v = rng.normal(size=12)
    ref = np.abs(v - np.median(v)) / (1.4826 * np.median(np.abs(v - np.median(v))))
    np.testing.assert_allclose(mad_anomaly_index(v).numpy(), ref, rtol=1e-5)


def test_flags_only_small_outliers():
    assert flag_outliers([10.0, 10.5, 11.0, 11.5, 12.0, 1.0]).nonzero().flatten().tolist() == [5]
    assert not flag_outliers([1.0, 1.1, 1.2, 1.3, 50.0]).any()  # large norms are never flagged
    assert not flag_outliers([10.0, 10.5, 11.0, 11.5, 12.0, 9.0]).any()  # index <= 2


def test_mad_zero_and_bad_input():
    idx = mad_anomaly_index([5.0, 5.0, 5.0, 1.0])
    assert idx[:3].tolist() == [0.0, 0.0, 0.0] and torch.isinf(idx[3])
    with pytest.raises(DataError):
        mad_anomaly_index([])
    with pytest.raises(DataError):
        mad_anomaly_index([1.0, float("nan")])


# --- the detector --------------------------------------------------------------------------------

def test_registered_and_default_constructible():
    assert "neural-cleanse" in list_defenses("model")
    nc = create("neural-cleanse", epochs=3)
    assert isinstance(nc, NeuralCleanse) and nc.get_params()["epochs"] == 3


def test_scan_finds_the_planted_target(scans, nets, digits):
    r = scans["planted"]
    assert isinstance(r, NeuralCleanseResult)
    assert r.infected and r.flagged_labels == [TARGET]
    assert float(r.anomaly_indices[TARGET]) > 2
    assert int(r.l1_norms.argmin()) == TARGET
    assert float(r.attack_success[TARGET]) > 0.9
    # the reversed mask sits in the corner the detector watches
    mask = r.triggers[TARGET].mask
    assert float(mask[-2:, -2:].sum()) > 0.5 * float(mask.sum())
    # the reversed trigger works on the model through the ordinary metric
    assert ts.attack_success_rate(nets["planted"], digits["test"], r.triggers[TARGET], TARGET) > 0.9


def test_clean_twin_is_not_flagged(scans):
    r = scans["clean"]
    assert not r.infected and r.flagged_labels == []
    assert float(r.anomaly_indices.max()) < 10


def test_log_scale_outlier_test(scans, nets, digits, device):
    """outlier_scale="log" runs the same search and applies the MAD test to log norms (the
    paper's schedule and rule, so that only the scale differs)."""
    for name, net in nets.items():
        kw = dict(**FAST, schedule="all", decision="mad", device=device)
        r = NeuralCleanse(**kw, outlier_scale="log").scan(net.to(device), digits["val"])
        l1 = NeuralCleanse(**kw, outlier_scale="l1").scan(net.to(device), digits["val"])
        torch.testing.assert_close(r.l1_norms, l1.l1_norms)
        torch.testing.assert_close(r.anomaly_indices, mad_anomaly_index(l1.l1_norms.double().log()))
        assert r.flagged_labels == ([TARGET] if name == "planted" else [])
    with pytest.raises(ConfigError):
        NeuralCleanse(outlier_scale="sqrt").scan(nets["clean"], digits["val"])


def test_default_rule_flags_a_trigger_far_below_widely_spread_clean_norms():
    """Issue 17: a single-pixel trigger reversed perfectly (|m|_1 2.46 against 48-131 for the
    other labels of an MNIST model) got the paper's L1 index 1.84, so the verdict was "clean";
    the default rule (the MAD test on log norms, threshold 3) flags it (7.18 there)."""
    norms = torch.tensor([2.46, 48.0, 50.0, 52.0, 60.0, 100.0, 110.0, 120.0, 125.0, 131.0], dtype=torch.float64)
    nc = NeuralCleanse()
    assert (nc.outlier_scale, nc.anomaly_threshold) == ("log", 3.0)
    assert not flag_outliers(norms, 2.0).any()                          # the paper's rule misses it
    assert flag_outliers(norms.log(), nc.anomaly_threshold).nonzero().flatten().tolist() == [0]
    # a clean spread of the same width, with no outlier, is not flagged on either scale
    assert not flag_outliers(norms[1:].log(), 3.0).any() and not flag_outliers(norms[1:], 2.0).any()


def test_min_ratio_guards_a_tight_cluster_of_clean_norms():
    """Clean norms within 2% of each other: MAD = 1.4826 * 0.1 on L1, so a label 1.25x below the
    median gets index 13.5 on L1 and 14.5 on the log scale; it is flagged only with min_ratio=1."""
    tight = torch.tensor([8.0, 9.9, 10.0, 10.0, 10.1, 10.2], dtype=torch.float64)
    med = 10.0
    assert float(mad_anomaly_index(tight)[0]) == pytest.approx((med - 8.0) / (1.4826 * 0.1), rel=1e-4)
    assert flag_labels(tight, min_ratio=1.0).tolist() == [True] + [False] * 5
    assert not flag_labels(tight).any() and not flag_labels(tight, scale="l1", threshold=2.0, min_ratio=1.5).any()
    assert flag_labels(tight, min_ratio=1.25).tolist()[0]          # exactly 1.25x below: the bound is inclusive
    assert NeuralCleanse().min_ratio == 1.5
    # a 1.6x smaller norm among the same tight cluster is flagged by the default rule
    assert flag_labels(torch.tensor([6.25, 9.9, 10.0, 10.0, 10.1, 10.2])).tolist()[0]
    with pytest.raises(ConfigError):
        NeuralCleanse(min_ratio=0.5).scan(torch.nn.Linear(1, 1), None)


def test_default_scan_finds_a_single_pixel_trigger_the_paper_rule_misses(digits, device):
    tr = digits["train"]
    planted, clean = (single_pixel_net(tr.x, tr.y, 10, target=t).to(device) for t in (TARGET, None))
    r = NeuralCleanse(**FAST, device=device).scan(planted, digits["val"])
    assert r.infected and r.flagged_labels == [TARGET]
    n = r.l1_norms.double()
    assert float(n[TARGET]) * 5 < float(n[torch.arange(10) != TARGET].min())  # reversed: far below every other
    assert not flag_outliers(n, 2.0)[TARGET]                                    # L1 index < 2: the paper misses it
    paper = NeuralCleanse(**FAST, outlier_scale="l1", anomaly_threshold=2.0, device=device).scan(planted, digits["val"])
    assert not paper.infected
    assert not NeuralCleanse(**FAST, device=device).scan(clean, digits["val"]).infected


def test_result_fields_and_json(scans):
    r = scans["planted"]
    k = 10
    assert r.l1_norms.shape == (k,) and r.anomaly_indices.shape == (k,) and r.scores.shape == (k,)
    assert r.per_source_attack_success.shape == (k, k)
    assert torch.isnan(r.per_source_attack_success.diagonal()).all()
    assert float(r.scores[TARGET]) == pytest.approx(float(r.anomaly_indices[TARGET]))
    assert len(r.triggers) == k and r.triggers[0].shape == (1, 8, 8)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["infected"] is True and d["flagged_labels"] == [TARGET]
    row = d["labels"][TARGET]
    assert set(row) >= {"label", "l1_norm", "anomaly_index", "attack_success", "flagged"} and row["flagged"]
    assert d["seconds"] == r.seconds and r.seconds > 0  # the scan's wall time, kept by to_dict


def test_caller_model_untouched(nets, digits):
    net = nets["planted"]
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    NeuralCleanse(epochs=2, steps_per_epoch=1, n_samples=64, n_holdout=32).scan(net, digits["val"])
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())
    net.eval()


def test_works_on_torchscript(nets, digits):
    traced = torch.jit.trace(nets["planted"].eval(), digits["val"].x[:2])
    r = NeuralCleanse(**FAST).scan(traced, digits["val"])
    assert r.flagged_labels == [TARGET]


def test_bad_input(nets, digits):
    with pytest.raises(DataError):
        NeuralCleanse().scan(nets["clean"], digits["val"].x)
    with pytest.raises(ConfigError):
        NeuralCleanse(mode="parallel").scan(nets["clean"], digits["val"])
    with pytest.raises(ConfigError):
        NeuralCleanse(epochs=0).scan(nets["clean"], digits["val"])


# --- the kernel ----------------------------------------------------------------------------------

KERNEL = dict(epochs=25, steps_per_epoch=2, seed=3)


@pytest.fixture(scope="module")
def batched(nets, digits):
    v = digits["val"]
    return reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], **KERNEL)


def test_batched_and_sequential_agree(batched, nets, digits):
    v = digits["val"]
    seq = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], mode="sequential", **KERNEL)
    torch.testing.assert_close(seq.l1_norms, batched.l1_norms, rtol=0.02, atol=0.05)
    assert torch.equal(seq.reached, batched.reached)
    assert flag_outliers(seq.l1_norms).tolist() == flag_outliers(batched.l1_norms).tolist()
    assert flag_outliers(batched.l1_norms).nonzero().flatten().tolist() == [TARGET]


def test_result_does_not_depend_on_batch_size(batched, nets, digits):
    v = digits["val"]
    # 64 images per forward pass: the 10 labels run in chunks of 2
    small = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], batch_size=64, **KERNEL)
    torch.testing.assert_close(small.l1_norms, batched.l1_norms, rtol=0.02, atol=0.05)
    torch.testing.assert_close(small.masks, batched.masks, rtol=0.05, atol=0.02)


def test_label_subset_and_region(batched, nets, digits):
    v = digits["val"]
    sub = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], targets=[TARGET, 5], **KERNEL)
    assert sub.targets.tolist() == [TARGET, 5] and sub.masks.shape == (2, 8, 8)
    region = torch.zeros(8, 8)
    region[:4, :4] = 1
    reg = reverse_engineer_triggers(nets["planted"], v.x[:160], v.y[:160], targets=[TARGET], region=region,
                                    epochs=3, steps_per_epoch=1)
    assert float(reg.masks[0][region == 0].abs().max()) == 0.0
    with pytest.raises(ConfigError):
        reverse_engineer_triggers(nets["planted"], v.x[:16], v.y[:16], targets=[10], epochs=1)
    with pytest.raises(ConfigError):
        reverse_engineer_triggers(nets["planted"], v.x[:16], v.y[:16], region=torch.ones(3, 3), epochs=1)


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_scan_and_repair(nets, digits, tmp_path):
    from click.testing import CliRunner

    from trojanscope.cli import cli
    from trojanscope.data import save_npz

    save_npz(digits["val"], tmp_path / "clean.npz")
    planted = torch.jit.trace(nets["planted"].eval(), digits["val"].x[:2])
    planted.save(str(tmp_path / "planted.pt"))
    clean = torch.jit.trace(nets["clean"].eval(), digits["val"].x[:2])
    clean.save(str(tmp_path / "clean.pt"))
    runner = CliRunner()
    fast = ["--epochs", "40", "--n-samples", "160", "--input-shape", "1,8,8", "--data", str(tmp_path / "clean.npz")]
    t0 = time.perf_counter()
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--out", str(tmp_path / "scan"),
                            "--json", str(tmp_path / "scan.json")])
    wall = time.perf_counter() - t0
    assert r.exit_code == 1, r.output
    assert "BACKDOOR FOUND" in r.output
    d = json.loads((tmp_path / "scan.json").read_text())
    assert d["infected"] is True and d["flagged_labels"] == [TARGET] and 0 < d["seconds"] < wall
    assert [row["label"] for row in d["labels"]] == list(range(10))
    assert {"l1_norm", "anomaly_index", "attack_success", "flagged"} <= set(d["labels"][0])
    for f in (f"label_{TARGET}_mask.png", f"label_{TARGET}_pattern.png", f"label_{TARGET}_stamped.png",
              f"trigger_{TARGET}.safetensors", "scan.json"):
        assert (tmp_path / "scan" / f).is_file()
    r = runner.invoke(cli, ["scan", str(tmp_path / "clean.pt"), *fast])
    assert r.exit_code == 0, r.output
    assert "no backdoor found" in r.output
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--outlier-scale", "log"])
    assert r.exit_code == 1, r.output
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--decision", "mad", "--anomaly-threshold", "1e9"])
    assert r.exit_code == 0, r.output  # the same search, the paper's rule; no index is that large
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--decision", "probability", "--threshold", "0.9999999"])
    assert r.exit_code == 0 and "probability" in r.output, r.output  # a stricter probability threshold
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--anomaly-threshold", "-1"])
    assert r.exit_code == 2 and "anomaly_threshold" in r.output
    # the min_ratio guard: the planted target's trigger is not 1e6x below the median, so no verdict
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--min-ratio", "1e6"])
    assert r.exit_code == 0 and "below the median (< --min-ratio 1e+06)" in r.output, r.output
    r = runner.invoke(cli, ["scan", str(tmp_path / "planted.pt"), *fast, "--epochs", "10", "--pairs", "true",
                            "--json", str(tmp_path / "pairs.json")])
    assert r.exit_code == 1 and "pairs (evidence only): smallest trigger from label" in r.output, r.output
    pj = json.loads((tmp_path / "pairs.json").read_text())
    assert "pair_log_index" in pj["evidence"]
    r = runner.invoke(cli, ["scan", str(tmp_path / "missing.pt"), *fast])
    assert r.exit_code == 2 and "error:" in r.output
    # a received TorchScript model is repaired and written back as TorchScript
    with warnings.catch_warnings(record=True) as seen:  # and without torch's notes about copying the rebuilt graph
        warnings.simplefilter("always")
        r = runner.invoke(cli, ["repair", str(tmp_path / "planted.pt"), "--input-shape", "1,8,8", "--method", "nc-prune",
                                "--data", str(tmp_path / "clean.npz"), "--out", str(tmp_path / "rep_ts"), "--scan",
                                str(tmp_path / "scan")])
    assert r.exit_code == 0, r.output
    assert not [w for w in seen if "LeafSpec" in str(w.message)]
    written = [f for f in (tmp_path / "rep_ts").iterdir() if f.suffix != ".json"]
    assert written and {ts.load_model(f, input_shape=(1, 8, 8)).format for f in written} == {"torchscript"}
    # unlearning whose fine-tuning diverges says so: from lr 100 it backs off to a rate that works
    # (lr 1 on this model); at 1e6 every try diverges
    unlearn = ["repair", str(tmp_path / "planted.pt"), "--input-shape", "1,8,8", "--method", "unlearn", "--data",
               str(tmp_path / "clean.npz"), "--scan", str(tmp_path / "scan"), "-p", "share=1.0", "-p", "epochs=3",
               "-p", "optimizer=sgd"]
    r = runner.invoke(cli, [*unlearn, "-p", "lr=100", "--out", str(tmp_path / "rep_lr")])
    assert r.exit_code == 0 and "note: the fine-tuning failed at lr 100: diverged" in r.output, r.output
    assert json.loads((tmp_path / "rep_lr" / "repair.json").read_text())["details"]["lr_used"] == pytest.approx(1.0)
    r = runner.invoke(cli, [*unlearn, "-p", "lr=1e6", "--out", str(tmp_path / "rep_div")])
    assert r.exit_code == 0 and "nothing repaired: the fine-tuning failed at every learning rate" in r.output, r.output
    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    ts.save_model(model, tmp_path / "net", ts.ModelSpec("mnist_cnn", (1, 8, 8), 10))
    r = runner.invoke(cli, ["repair", str(tmp_path / "net"), "--method", "unlearn", "--data",
                            str(tmp_path / "clean.npz"), "--out", str(tmp_path / "rep"), "--scan", str(tmp_path / "scan")])
    assert r.exit_code == 0, r.output
    assert ts.load_model(tmp_path / "rep").spec.extra["repaired_with"]["method"] == "unlearn"
    assert json.loads((tmp_path / "rep" / "repair.json").read_text())["details"]["labels"] == [TARGET]
    r = runner.invoke(cli, ["repair", "--help"])
    assert "nc-prune" in r.output and "unlearn" in r.output


def test_result_save_load_round_trip_and_bad_files(scans, tmp_path):
    res = scans["planted"]
    res.save(tmp_path / "scan")
    back = NeuralCleanseResult.load(tmp_path / "scan")
    assert NeuralCleanseResult.load(tmp_path / "scan" / "scan.json").flagged_labels == res.flagged_labels
    assert back.flagged_labels == res.flagged_labels and back.infected == res.infected
    assert back.params == res.params and back.evidence == res.evidence and back.details == res.details
    for name in ("scores", "l1_norms", "anomaly_indices", "attack_success", "flagged", "reached"):
        assert torch.equal(getattr(back, name), getattr(res, name).cpu()), name
    assert torch.equal(back.per_source_attack_success.nan_to_num(-1), res.per_source_attack_success.nan_to_num(-1))
    assert all(torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern) and a.name == b.name
               for a, b in zip(back.triggers, res.triggers))
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["labels"] == res.labels()
    # a damaged tensor file, a bad label, a foreign JSON: one DataError each, nothing unpickled
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    res.save(bad)
    t = load_file(str(bad / "scan.safetensors"))
    t["trigger_masks"] = t["trigger_masks"] * float("nan")
    save_file(t, str(bad / "scan.safetensors"), metadata={"format": "trojanscope.neural-cleanse-result"})
    with pytest.raises(DataError, match="trigger_masks"):
        NeuralCleanseResult.load(bad)
    t["trigger_masks"] = t["trigger_masks"][:, :4].contiguous()
    save_file(t, str(bad / "scan.safetensors"), metadata={"format": "trojanscope.neural-cleanse-result"})
    with pytest.raises(DataError, match="trigger_masks"):
        NeuralCleanseResult.load(bad)
    res.save(bad)
    d = json.loads((bad / "scan.json").read_text())
    d["flagged_labels"] = [10]
    (bad / "scan.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="flagged labels"):
        NeuralCleanseResult.load(bad)
    (bad / "scan.json").write_text(json.dumps({"flagged_labels": [2], "scores": [0.0] * 10}))
    with pytest.raises(DataError, match="not a scan result"):
        NeuralCleanseResult.load(bad)
    with pytest.raises(DataError):
        NeuralCleanseResult.load(tmp_path / "missing")
