"""The benchmark matrix: config validation, the table, per-family glue, caching and resume."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
from click.testing import CliRunner

from benchkit import registered
from trojanscope.bench import (COLUMNS, BenchConfig, cell_id, default_config, load_config, parse_config, quick_config,
                               run_bench)
from trojanscope.defenses.repair.neural_cleanse import SMALL_SET_UNLEARNING
from trojanscope.cli import cli
from trojanscope.errors import ConfigError

ATTACKS = ["clean", "badnets-patch", "badnets-all-to-all"]



#: tiny tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def test_defenses():
    with registered() as names:
        yield names


def tiny(attacks=("badnets-patch", "badnets-blended"), defenses=("_t-confidence", "_t-finetune"), **kw) -> BenchConfig:
    raw = {"dataset": "digits", "epochs": 1, "attacks": list(attacks), "defenses": list(defenses), **kw}
    return parse_config(raw)


def test_tiny_bench_produces_the_table(tmp_path, test_defenses):
    t0 = time.perf_counter()
    res = run_bench(tiny(), tmp_path, progress=False)
    wall = time.perf_counter() - t0
    assert len(res.rows) == 4 and not res.failed
    assert {(r["attack"], r["defense"]) for r in res.rows} == {
        (a, d) for a in ("badnets-patch", "badnets-blended") for d in ("_t-confidence", "_t-finetune")}
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and tuple(rows[0]) == COLUMNS
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["attack"] for r in data] == [r["attack"] for r in res.rows]
    for r in res.rows:
        assert 0 <= r["ca_before"] <= 1 and 0 <= r["asr_before"] <= 1 and 0 < r["seconds"] < wall
        if r["family"] == "input":
            assert 0 <= r["far"] <= 1 and 0 <= r["frr"] <= 1 and r["auroc"] is not None
        else:
            assert r["ca_after"] is not None and r["asr_after"] is not None
    # the BadNets patch is learnt even in one epoch on digits
    assert max(r["asr_before"] for r in res.rows if r["attack"] == "badnets-patch") > 0.3
    # one model per attack (plus none shared): trained once, cached in the run folder
    assert sorted(res.trained) == ["badnets-blended-s0", "badnets-patch-s0"]
    assert (tmp_path / "models" / "badnets-patch__s0" / "model.safetensors").is_file()
    assert (tmp_path / "models" / "badnets-patch__s0" / "trigger_0.safetensors").is_file()


def test_every_family_glue(tmp_path, test_defenses):
    res = run_bench(tiny(attacks=ATTACKS, defenses=test_defenses), tmp_path, progress=False)
    assert not res.failed
    by = {(r["attack"], r["defense"]): r for r in res.rows}
    # model detector: a verdict, flagged labels, target found (None on the clean model)
    det = by[("badnets-patch", "_t-logit")]
    assert det["verdict"] == "infected" and det["target_found"] is True
    assert by[("clean", "_t-logit")]["target_found"] is None and by[("clean", "_t-logit")]["asr_before"] is None
    # data sanitiser: poison / clean removed, then a retrained model
    san = by[("badnets-patch", "_t-distance")]
    # the top 10% by distance are flagged: measured 87% of the poison and 5.9% of the clean images
    assert san["poison_removed"] > 0.8 and san["clean_removed"] < 0.07 and san["asr_after"] is not None
    assert by[("clean", "_t-distance")]["poison_removed"] is None
    # input filter on the clean model: FRR only
    assert by[("clean", "_t-confidence")]["far"] is None and by[("clean", "_t-confidence")]["frr"] is not None
    # all-to-all: ASR counts each label's own target; every label is a target
    assert by[("badnets-all-to-all", "_t-logit")]["asr_before"] is not None
    cell = json.loads((tmp_path / "cells" / f"{cell_id('badnets-patch', '_t-finetune', 0)}.json").read_text())
    assert cell["params"] == {"epochs": 1, "lr": 0.001}
    assert [h["epoch"] for h in cell["result"]["history"]] == [0, 1]
    assert "attack_success" in cell["result"]["history"][0]  # the evaluate callback of the glue
    assert (tmp_path / "cells" / f"{cell_id('badnets-patch', '_t-logit', 0)}.safetensors").is_file()


class Killed(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing(tmp_path, test_defenses):
    cfg = tiny()
    done: list[str] = []

    def kill_after_three(cid, row):
        done.append(cid)
        if len(done) == 3:
            raise Killed

    with pytest.raises(Killed):
        run_bench(cfg, tmp_path, progress=False, on_cell=kill_after_three)
    assert len(list((tmp_path / "cells").glob("*.json"))) == 3
    stamps = {c: (tmp_path / "cells" / f"{c}.json").stat().st_mtime_ns for c in done}
    again: list[str] = []
    res = run_bench(cfg, tmp_path, progress=False, on_cell=lambda cid, row: again.append(cid))
    assert sorted(res.reused) == sorted(done)
    assert not set(again) & set(done) and len(again) == 1
    assert {c: (tmp_path / "cells" / f"{c}.json").stat().st_mtime_ns for c in done} == stamps
    # both models were trained before the kill: the one still needed is loaded, not trained again
    assert res.trained == [] and res.loaded == ["badnets-blended-s0"]
    assert len(res.rows) == 4
    # a third run computes nothing
    res3 = run_bench(cfg, tmp_path, progress=False)
    assert res3.computed == [] and len(res3.reused) == 4 and res3.trained == []


def test_max_cells_and_changed_settings(tmp_path, test_defenses):
    cfg = tiny(defenses=["_t-confidence"])
    res = run_bench(cfg, tmp_path, progress=False, max_cells=1)
    assert len(res.computed) == 1
    # a defence setting changed: that defence's cells are recomputed, the models reused
    cfg2 = tiny(defenses=["_t-confidence"], params={"_t-confidence": {"frr": 0.1}})
    res2 = run_bench(cfg2, tmp_path, progress=False)
    assert len(res2.computed) == 2 and res2.trained == ["badnets-blended-s0"]
    assert all(abs(r["frr"] - 0.1) < 0.1 for r in res2.rows)


def test_config_file_and_errors(tmp_path, test_defenses):
    p = tmp_path / "bench.toml"
    p.write_text('dataset = "digits"\nepochs = 1\nseeds = [0, 1]\nattacks = ["badnets-patch"]\n'
                 'defenses = ["input"]\n[[attack]]\nname = "red"\ntrigger = "square:2:red:top-left"\ntarget = 3\n'
                 '[params._t-confidence]\nfrr = 0.02\n')
    cfg = load_config(p)
    assert cfg.seeds == (0, 1) and [a.name for a in cfg.attacks] == ["badnets-patch", "red"]
    from trojanscope.defenses import list_defenses

    assert [d.name for d in cfg.defenses] == list_defenses("input")  # a family names all its defences
    assert {d.name: dict(d.params) for d in cfg.defenses}["_t-confidence"] == {"frr": 0.02}
    bad = {
        "unknown key 'epoch'": {"epoch": 3},
        "epochs must be an integer": {"epochs": "3"},
        "unknown attack 'badnet'": {"attacks": ["badnet"]},
        "unknown defence 'stirp'": {"defenses": ["stirp"]},
        "takes no parameter 'alpha'": {"defenses": ["_t-confidence"], "params": {"_t-confidence": {"alpha": 1}}},
        "seeds repeat": {"seeds": [1, 1]},
        "attack names repeat": {"attacks": ["badnets-patch", "badnets-patch"]},
        "unknown arch": {"arch": "vgg99"},
        "rate is out of range": {"rate": 1.5},
        "unknown recipe 'sgdd'": {"recipe": "sgdd"},
    }
    # a recipe brings its learning rate unless the config sets one; it is part of the models' cache key
    from trojanscope.training import RECIPES

    sgd = parse_config({"recipe": "sgd", "arch": "gtsrb_cnn"})
    assert sgd.recipe == "sgd" and sgd.lr == RECIPES["sgd"]["lr"] and sgd.training["recipe"] == "sgd"
    assert parse_config({"recipe": "sgd", "lr": 0.01}).lr == 0.01
    assert "recipe" not in parse_config({}).training  # caches from before the key keep their fingerprint
    for msg, raw in bad.items():
        with pytest.raises(ConfigError, match=msg):
            parse_config(raw)
    (tmp_path / "broken.toml").write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_quick_preset_has_four_attacks_and_every_defence(test_defenses):
    cfg = quick_config()
    assert cfg.dataset == "mnist5k" and len([a for a in cfg.attacks if a.attack != "clean"]) >= 4
    assert {"_t-logit", "_t-distance", "_t-confidence", "_t-finetune"} <= {d.defense for d in cfg.defenses}
    units = [d for d in cfg.defenses if d.name == "fine-prune (units)"]  # beside the paper's channels
    assert len(units) == 1 and units[0].defense == "fine-prune" and units[0].params["granularity"] == "unit"
    # the variants sit beside their paper defaults, each built from the registered defence
    rows = {d.name: d for d in cfg.defenses}
    assert rows["nc-prune (units)"].defense == "nc-prune" and rows["nc-prune"].params == {}
    # unlearning gets all of the val split (the paper's 10% is of the training set)
    assert rows["unlearn (3 epochs, SGD)"].params == {"share": 1.0, **SMALL_SET_UNLEARNING}
    assert rows["unlearn"].params == {"share": 1.0}
    assert {d.name for d in default_config().defenses} >= {"fine-prune (units)", "nc-prune (units)",
                                                           "unlearn (3 epochs, SGD)"}


def test_cli_bench_and_bad_config(tmp_path, test_defenses):
    p = tmp_path / "b.toml"
    p.write_text('dataset = "digits"\nepochs = 1\nattacks = ["badnets-pixel"]\ndefenses = ["_t-finetune"]\n')
    r = CliRunner().invoke(cli, ["bench", "--config", str(p), "--out", str(tmp_path / "run"), "--no-report",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "badnets-pixel" in r.output and (tmp_path / "run" / "results.csv").is_file()
    p.write_text('attacks = ["nope"]\n')
    r = CliRunner().invoke(cli, ["bench", "--config", str(p), "--out", str(tmp_path / "run2")])
    assert r.exit_code == 2 and "unknown attack 'nope'" in r.output


def test_users_own_data(tmp_path, test_defenses):
    from trojanscope.data import load_data, save_npz

    save_npz(load_data("digits", "all"), tmp_path / "mine.npz")
    cfg = tiny(attacks=["badnets-source-specific"], defenses=["_t-finetune"], dataset=str(tmp_path / "mine.npz"))
    res = run_bench(cfg, tmp_path / "run", progress=False)
    assert not res.failed and len(res.rows) == 1
    # split 80 / 10 / 10: the test inputs stamped for ASR are from the source labels only
    assert res.rows[0]["asr_before"] is not None and res.rows[0]["ca_after"] is not None


def test_chains_run_in_order(tmp_path, test_defenses):
    cfg = parse_config({"dataset": "digits", "epochs": 1, "attacks": ["badnets-patch"], "defenses": [],
                        "chain": [{"steps": ["_t-distance", "_t-finetune"], "retrain": "continue"},
                                  {"name": "filter+tune", "steps": ["_t-finetune", "_t-confidence"]}]})
    assert [d.name for d in cfg.defenses] == ["_t-distance > _t-finetune", "filter+tune"]
    res = run_bench(cfg, tmp_path, progress=False)
    assert not res.failed, res.failed
    by = {r["defense"]: r for r in res.rows}
    assert by["_t-distance > _t-finetune"]["family"] == "chain"
    assert by["_t-distance > _t-finetune"]["verdict"].startswith("_t-distance > _t-finetune (removed ")
    for r in res.rows:
        assert 0 <= r["ca_after"] <= 1 and 0 <= r["asr_after"] <= 1
    cell = json.loads((tmp_path / "cells" / f"{cell_id('badnets-patch', 'filter+tune', 0)}.json").read_text())
    assert [h["defense"] for h in cell["result"]["history"]] == ["(start)", "_t-finetune", "_t-confidence"]
    with pytest.raises(ConfigError, match="at least two steps"):
        parse_config({"chain": [{"steps": ["_t-finetune"]}]})
    with pytest.raises(ConfigError, match="retrain must be"):
        parse_config({"chain": [{"steps": ["_t-finetune", "_t-logit"], "retrain": "later"}]})


def test_trigger_size_and_place_from_the_scan():
    # the distribution tools are sized and placed from the scan's reversed mask, not the attack
    from trojanscope.bench import DefenseSpec, SharedScan, make_defense, mask_box
    from trojanscope.triggers import Trigger

    mask = torch.zeros(28, 28)
    mask[23:27, 23:27] = 1.0
    mask[2, 2] = 0.5  # stray mass: 3% of the total
    trigs = [Trigger(torch.zeros(28, 28), torch.zeros(1, 28, 28), "l0"), Trigger(mask, torch.ones(1, 28, 28), "l1")]
    scan = SharedScan([1], torch.tensor([0.0, 3.0]), trigs, True)
    assert scan.suspected_size() == 4 and mask_box(mask, 4) == (23, 23) and scan.suspected_position(4) == (23, 23)
    blend = Trigger(torch.full((28, 28), 0.2), torch.ones(1, 28, 28), "blend")
    spread = SharedScan([1], torch.tensor([0.0, 3.0]), [trigs[0], blend], True)
    assert spread.suspected_size() is None  # no window up to half the side holds 80%
    d = make_defense(DefenseSpec("distribution-unlearn", "distribution-unlearn", {"epochs": 3}), 0, scan)
    assert (d.trigger_size, tuple(d.position), d.epochs) == (4, (23, 23), 3)
    d = make_defense(DefenseSpec("distribution-unlearn", "distribution-unlearn", {"trigger_size": 3}), 0, scan)
    assert d.trigger_size == 3  # the user's size wins
    d = make_defense(DefenseSpec("distribution-unlearn", "distribution-unlearn", {}), 0, spread)
    assert d.trigger_size == 3  # nothing to go on: the class default
