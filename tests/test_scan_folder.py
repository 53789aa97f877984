"""`scan` over a population: one row per model, CSV / JSON, resume, failures, workers (Ray, processes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import trojanscope as ts
from trojanscope import population
from trojanscope.cli import cli
from trojanscope.population import SCAN_COLUMNS, scan_population
from trojanscope.rounds import export_program

from _models import CornerPatchNet

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = 2
PARAMS = dict(epochs=40, steps_per_epoch=2, n_samples=160)  # what ARGS give the CLI
ARGS = ["--data", "digits", "--epochs", "40", "--n-samples", "160"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A planted and a clean hand-weighted net as .pt2 programs, and a file that is no model."""
    d = tmp_path_factory.mktemp("models")
    tr = ts.load_data("digits", "train")
    export_program(CornerPatchNet(tr.x, tr.y, 10, target=TARGET), d / "a_planted.pt2", (1, 8, 8))
    export_program(CornerPatchNet(tr.x, tr.y, 10, target=None), d / "b_clean.pt2", (1, 8, 8))
    (d / "c_broken.pt2").write_bytes(b"not a model at all")
    return d


@pytest.fixture(scope="module")
def folder_scan(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    r = CliRunner().invoke(cli, ["scan", str(folder), *ARGS, "--out", str(out), "--json", str(out / "rows.json")])
    return r, out


def test_folder_scan_writes_one_row_per_model(folder_scan, folder):
    r, out = folder_scan
    assert r.exit_code == 1, r.output            # a backdoor was found; the broken file did not stop the run
    with open(out / "scan.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SCAN_COLUMNS
    assert [Path(x["file"]).name for x in rows] == ["a_planted.pt2", "b_clean.pt2", "c_broken.pt2"]
    planted, clean, broken = rows
    assert planted["verdict"] == "backdoor" and planted["flagged_labels"].split()[0] == str(TARGET)
    assert clean["verdict"] == "clean" and clean["flagged_labels"] == ""
    assert 0 <= float(clean["probability"]) < 0.5 < float(planted["probability"]) <= 1
    assert broken["verdict"] == "error" and "unknown model format" in broken["error"] and broken["probability"] == ""
    # three models are too few for the per-label population statistics
    assert [x["population_probability"] for x in rows] == [x["population_label"] for x in rows] == ["", "", ""]
    js = json.loads((out / "scan.json").read_text())
    assert js == json.loads((out / "rows.json").read_text())
    assert [set(SCAN_COLUMNS) <= set(x) for x in js] == [True] * 3
    assert js[0]["evidence"]["label"] == TARGET and js[0]["image_passes"] > 0
    assert float(planted["seconds"]) > 0
    assert "3 models: 1 backdoored, 1 clean, 1 failed" in r.output


def test_glob_and_several_files_name_the_same_models(folder, tmp_path):
    from trojanscope.population import expand_models

    by_glob = expand_models([str(folder / "*.pt2")])
    by_files = expand_models([str(p) for p in sorted(folder.glob("*.pt2"))] + [str(folder / "a_planted.pt2")])
    assert by_glob == by_files == expand_models([str(folder)])
    r = CliRunner().invoke(cli, ["scan", str(tmp_path / "nothing-*.pt2"), *ARGS])
    assert r.exit_code == 2 and "no model file matches" in r.output


def test_a_fifo_in_a_folder_gets_an_error_row_not_silence(folder, tmp_path):
    """A FIFO among the models is listed and refused (never opened: that would block), in the
    serial scan and in the byte reader that feeds Ray's workers; a plain sub-folder is no model."""
    import os
    import shutil

    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(folder / "b_clean.pt2", d / "b_clean.pt2")
    os.mkfifo(d / "a_pipe.pt2")
    (d / "notes").mkdir()
    models = population.expand_models([str(d)])
    assert [p.name for p in models] == ["a_pipe.pt2", "b_clean.pt2"]
    with pytest.raises(ts.DataError, match="is a FIFO, not a regular file"):
        population._read_model_bytes(d / "a_pipe.pt2")
    assert set(population._read_model_bytes(d / "b_clean.pt2")) == {""}
    r = CliRunner().invoke(cli, ["scan", str(d), *ARGS, "--json", "-"])
    assert r.exit_code == 0, r.output
    assert "is a FIFO, not a regular file" in r.output and "Traceback" not in r.output


def test_the_byte_reader_refuses_a_file_over_the_memory_budget(folder, monkeypatch):
    from trojanscope._utils import limits
    from trojanscope.errors import ResourceLimitError

    monkeypatch.setattr(limits, "_budget", 100)
    with pytest.raises(ResourceLimitError, match="over the memory budget"):
        population._read_model_bytes(folder / "a_planted.pt2")


def test_every_model_failing_exits_2(tmp_path):
    for name in ("x.pt2", "y.onnx"):
        (tmp_path / name).write_bytes(b"garbage")
    r = CliRunner().invoke(cli, ["scan", str(tmp_path / "x.pt2"), str(tmp_path / "y.onnx"), *ARGS, "--json", "-"])
    assert r.exit_code == 2
    assert "every model failed" in r.output and "Traceback" not in r.output


def test_resume_keeps_finished_models(folder, folder_scan, monkeypatch, tmp_path):
    _, out = folder_scan
    calls = []
    real = population.scan_one
    monkeypatch.setattr(population, "scan_one", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    before = json.loads((out / "scan.json").read_text())
    rows = scan_population(population.expand_models([str(folder)]), ts.load_data("digits", "val"), PARAMS, out=out)
    assert calls == [] and rows == before                       # nothing scanned again

    # a run killed after its first model keeps that model's row; the rerun scans the others only
    out2 = tmp_path / "killed"
    models = population.expand_models([str(folder)])

    def kill(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan_population(models, ts.load_data("digits", "val"), PARAMS, out=out2, on_row=kill)
    assert len(list((out2 / "rows").glob("*.json"))) == 1
    calls.clear()
    rows = scan_population(models, ts.load_data("digits", "val"), PARAMS, out=out2)
    assert [Path(c).name for c in calls] == ["b_clean.pt2", "c_broken.pt2"]
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in before]
    assert rows[0]["probability"] == before[0]["probability"]


def test_resume_retries_a_model_whose_worker_died(folder, folder_scan, monkeypatch, tmp_path):
    """A row saying the worker died is no verdict on the model: a resumed run scans it again;
    a row saying the model itself is bad is kept."""
    import shutil

    _, out = folder_scan
    out2 = tmp_path / "crashed"
    shutil.copytree(out, out2)
    models = population.expand_models([str(folder)])
    died = population._row_file(out2, models[1])
    died.write_text(json.dumps(population._error_row(str(models[1]), "worker failed: BrokenProcessPool: gone")))
    calls = []
    real = population.scan_one
    monkeypatch.setattr(population, "scan_one", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    rows = scan_population(models, ts.load_data("digits", "val"), PARAMS, out=out2)
    assert [Path(c).name for c in calls] == ["b_clean.pt2"]
    assert rows[1]["verdict"] == "clean" and rows[2]["verdict"] == "error"


def test_local_processes_give_the_serial_rows(folder, folder_scan):
    _, out = folder_scan
    serial = json.loads((out / "scan.json").read_text())
    rows = scan_population(population.expand_models([str(folder)]), ts.load_data("digits", "val"), PARAMS,
                           workers=2, backend="processes")
    assert [(r["verdict"], r["probability"], r["flagged_labels"]) for r in rows] == \
        [(r["verdict"], r["probability"], r["flagged_labels"]) for r in serial]


def test_ray_on_a_local_instance_gives_the_serial_rows(folder, folder_scan):
    ray = pytest.importorskip("ray", reason="the cluster extra (pip install 'trojanscope[cluster]') is not installed")
    _, out = folder_scan
    serial = json.loads((out / "scan.json").read_text())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = scan_population(population.expand_models([str(folder)]), ts.load_data("digits", "val"), PARAMS,
                               workers=2, backend="ray")
    finally:
        ray.shutdown()
    assert [(r["verdict"], r["probability"], r["flagged_labels"]) for r in rows] == \
        [(r["verdict"], r["probability"], r["flagged_labels"]) for r in serial]
    assert "unknown model format" in rows[2]["error"]


def test_resume_rescans_a_replaced_model_or_other_settings(folder, monkeypatch, tmp_path):
    """A stored row belongs to one model file and one scan setting: replace the file, or rerun
    into the same folder with other settings or data, and the model is scanned again instead of
    keeping the other run's verdict."""
    import os
    import shutil

    d = tmp_path / "models"
    d.mkdir()
    for name in ("a_planted.pt2", "b_clean.pt2"):
        shutil.copy(folder / name, d / name)
    models = population.expand_models([str(d)])
    val = ts.load_data("digits", "val")
    out = tmp_path / "out"
    first = scan_population(models, val, PARAMS, out=out)
    assert [r["verdict"] for r in first] == ["backdoor", "clean"]
    calls = []
    real = population.scan_one
    monkeypatch.setattr(population, "scan_one", lambda *a, **k: calls.append(Path(a[0]).name) or real(*a, **k))
    scan_population(models, val, PARAMS, out=out)
    assert calls == []
    shutil.copy(d / "b_clean.pt2", d / "a_planted.pt2")            # a different model under the old name
    st = (d / "b_clean.pt2").stat()
    os.utime(d / "a_planted.pt2", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rows = scan_population(models, val, PARAMS, out=out)
    assert calls == ["a_planted.pt2"] and rows[0]["verdict"] == "clean"
    calls.clear()
    scan_population(models, val, {**PARAMS, "epochs": 30}, out=out)  # other settings
    assert calls == ["a_planted.pt2", "b_clean.pt2"]
    calls.clear()
    scan_population(models, ts.load_data("digits", "test"), {**PARAMS, "epochs": 30}, out=out)  # other data
    assert calls == ["a_planted.pt2", "b_clean.pt2"]
