"""`bench score`: a population scan scored against a round's truth (ROC-AUC, cross-entropy,
reliability), by hand; bad scan and truth files are refused with one error line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from trojanscope.cli import cli
from trojanscope.errors import ConfigError, DataError
from trojanscope.population import FAILED_PROBABILITY, reliability_bins, score_scan

PROB = [0.9, 0.2, 0.7, 0.4, 0.1, None]          # the last model failed to scan
BACKDOORED = [True, False, False, True, False, True]


def rows_and_truth():
    rows = [{"file": f"r/models/model_{i:03d}.pt2", "probability": p, "error": None if p is not None else "boom",
             "flagged_labels": [3] if (p or 0) > 0.5 else [], "population_probability": None, "population_label": None}
            for i, p in enumerate(PROB)]
    truth = {f"model_{i:03d}": {"name": f"model_{i:03d}", "backdoored": b, "arch": "a" if i % 2 else "b",
                                "mode": "all-to-one" if b else None, "target": 3 if b else None}
             for i, b in enumerate(BACKDOORED)}
    truth["model_099"] = {"name": "model_099", "backdoored": True, "excluded": "attack too weak", "arch": "a"}
    return rows, truth


def test_score_scan_by_hand():
    rows, truth = rows_and_truth()
    s = score_scan(rows, truth)
    # positives 0.9, 0.4, 0.5 (failed) against negatives 0.2, 0.7, 0.1: 7 of the 9 pairs ordered
    assert s["roc_auc"] == pytest.approx(7 / 9) and s["n"] == 6 and s["positives"] == 3 and s["failed"] == 1
    p = np.array([0.9, 0.2, 0.7, 0.4, 0.1, FAILED_PROBABILITY])
    t = np.array(BACKDOORED)
    assert s["cross_entropy"] == pytest.approx(-np.mean(np.where(t, np.log(p), np.log(1 - p))))
    assert (s["false_positives"], s["true_positives"], s["a2o_target_flagged"]) == (1, 1, "1/3")
    assert s["detected_by_mode"] == {"all-to-one": "1/3"} and s["correct_by_arch"] == {"a": "1/3", "b": "2/3"}
    assert s["unscanned"] == [] and s["unmatched"] == []     # the excluded model is not asked for
    assert score_scan(rows, truth, threshold=0.3)["true_positives"] == 3  # the failed 0.5 too
    # a row with no truth is reported, not scored; a truth with no row too
    s2 = score_scan(rows[1:] + [{"file": "x/stray.pt2", "probability": 0.3, "error": None}], truth)
    assert s2["n"] == 5 and s2["unmatched"] == ["stray"] and s2["unscanned"] == ["model_000"]
    with pytest.raises(ConfigError):
        score_scan([{"file": "nothing.pt2", "probability": 0.1}], truth)


def test_reliability_bins_by_hand():
    b = reliability_bins([0.05, 0.15, 0.5, 0.55, 1.0], [False, True, False, True, True], n_bins=5)
    assert [(x["lo"], x["n"]) for x in b] == [(0.0, 2), (0.4, 2), (0.8, 1)]
    assert b[0]["mean_probability"] == pytest.approx(0.1) and b[0]["share_backdoored"] == 0.5
    assert b[1]["mean_probability"] == pytest.approx(0.525) and b[2]["share_backdoored"] == 1.0
    with pytest.raises(ConfigError):
        reliability_bins([0.1, 0.2], [True])


def test_cli_scores_writes_json_and_report(tmp_path):
    rows, truth = rows_and_truth()
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "scan.json").write_text(json.dumps(rows))
    (tmp_path / "round" / "truth").mkdir(parents=True)
    for name, t in truth.items():
        (tmp_path / "round" / "truth" / f"{name}.json").write_text(json.dumps(t))
    r = CliRunner().invoke(cli, ["bench", "score", str(tmp_path / "scan"), str(tmp_path / "round"),
                                 "--json", str(tmp_path / "s.json"), "--report", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert list(s) == ["probability"] and s["probability"]["roc_auc"] == pytest.approx(7 / 9)
    assert "6 models scored (3 backdoored)" in r.output
    html = (tmp_path / "r.html").read_text()
    assert "ROC-AUC 0.778" in html and html.count("data:image/png;base64,") == 2


@pytest.mark.parametrize("bad", ["garbage", "[1, 2]", "{\"file\": 1}", "[" * 100000, b"\xff\xfe"])
def test_cli_refuses_bad_scan_files(tmp_path, bad):
    rows, truth = rows_and_truth()
    (tmp_path / "truth.json").write_text(json.dumps(list(truth.values())))
    f = tmp_path / "scan.json"
    f.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    r = CliRunner().invoke(cli, ["bench", "score", str(f), str(tmp_path / "truth.json")])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output, r.output


def test_cli_refuses_a_fifo_and_a_bad_truth(tmp_path):
    rows, _ = rows_and_truth()
    (tmp_path / "scan.json").write_text(json.dumps(rows))
    os.mkfifo(tmp_path / "fifo")
    r = CliRunner().invoke(cli, ["bench", "score", str(tmp_path / "fifo"), str(tmp_path / "scan.json")])
    assert r.exit_code == 2 and "FIFO" in r.output
    (tmp_path / "t.json").write_text(json.dumps([{"name": "model_000"}]))
    r = CliRunner().invoke(cli, ["bench", "score", str(tmp_path / "scan.json"), str(tmp_path / "t.json")])
    assert r.exit_code == 2 and "not a round's truth" in r.output
    r = CliRunner().invoke(cli, ["bench", "score", str(tmp_path / "scan.json"), str(tmp_path)])
    assert r.exit_code == 2 and "holds no truth" in r.output


def test_read_json_file_guards(tmp_path):
    """The one guarded JSON reader: size cap, FIFO, nesting, encoding, each one DataError."""
    from trojanscope._utils.limits import read_json_file

    f = tmp_path / "a.json"
    f.write_text(json.dumps({"rows": list(range(100))}))
    assert read_json_file(f)["rows"][-1] == 99
    with pytest.raises(DataError, match="more than"):
        read_json_file(f, "scan", max_bytes=64)
    f.write_text("[" * 100000)
    with pytest.raises(DataError, match="nests too deeply|not valid JSON"):
        read_json_file(f)
    f.write_bytes(b"\xff\xfe[]")
    with pytest.raises(DataError, match="not UTF-8"):
        read_json_file(f)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="FIFO"):
        read_json_file(tmp_path / "fifo")


def test_a_hostile_scan_result_is_refused(tmp_path):
    """``repair --scan DIR`` reads a scan result the user was handed: a deeply nested scan.json
    is a DataError (exit 2), not a RecursionError."""
    from trojanscope.defenses.model.neural_cleanse import NeuralCleanseResult

    (tmp_path / "scan.json").write_text("[" * 100000)
    (tmp_path / "scan.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(DataError):
        NeuralCleanseResult.load(tmp_path)


def test_load_truth_checks_the_rows(tmp_path):
    from trojanscope.rounds import load_truth

    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "m.json").write_text(json.dumps({"name": "m", "backdoored": "yes"}))
    with pytest.raises(DataError, match="not a round's truth"):
        load_truth(tmp_path)
    (tmp_path / "truth" / "m.json").write_text(json.dumps({"name": "m", "backdoored": False}))
    assert load_truth(tmp_path) == {"m": {"name": "m", "backdoored": False}}
