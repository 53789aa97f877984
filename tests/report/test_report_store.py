"""The report's typed reader of a run folder, and figures chosen by the kind of result (not by
which keys a result dict happens to have)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trojanscope._utils.results import trigger_tensors
from trojanscope.defenses import ScanResult
from trojanscope.defenses.model.heatmap import HeatmapResult
from trojanscope.errors import ConfigError
from trojanscope.report import CellRecord, Display, load_run, render_run
from trojanscope.report.displays import HeatmapDisplay, ScanDisplay
from trojanscope.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")


def _heatmap() -> HeatmapResult:
    g = torch.Generator().manual_seed(0)
    return HeatmapResult(target=2, heatmap=torch.rand(8, 8, generator=g), window=3, stride=1,
                         positions=torch.zeros(1, 2), strength=torch.ones(1), window_asr=torch.ones(1),
                         window_l1=torch.ones(1), region=torch.ones(8, 8), bbox=(4, 4, 7, 7), peak=(5, 5),
                         trigger=Trigger.square((1, 8, 8), 3), trigger_asr=1.0)


def _cell(folder: Path, cid: str, defense: str, family: str, cls: str, result: dict, tensors=None, **row) -> None:
    rec = {"id": cid, "row": {"attack": "badnets-patch", "defense": defense, "family": family, "seed": 0,
                              "ca_before": 0.9, "asr_before": 0.95, **row},
           "result": result, "extras": {"true_targets": [2]}, "params": {}, "defense_name": defense,
           "defense_class": cls}
    if tensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{cid}.safetensors"))
        rec["tensor_file"] = f"{cid}.safetensors"
    (folder / f"{cid}.json").write_text(json.dumps(rec))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    cells = tmp_path / "cells"
    cells.mkdir()
    hm = _heatmap()
    _cell(cells, "a", "heatmap", "model", "MovingWindowSearch", hm.to_dict(), trigger_tensors(hm),
          verdict="label 2: peak on the trigger")
    samples = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _cell(cells, "b", "trigger-distribution", "model", "TriggerDistribution",
          {"target": 2, "samples": samples.tolist()}, verdict="label 2: 80% valid samples")
    scan = ScanResult(infected=True, flagged_labels=[2], scores=torch.linspace(-1, 3, 10))
    # a detector's result whose dict has a map-like entry: a scan draws no heat map for it
    _cell(cells, "c", "_t-scan", "model", "SomeDetector", {**scan.to_dict(), "some_map": torch.rand(8, 8).tolist()},
          verdict="infected", target_found=True)
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "digits"}))
    return tmp_path


def test_load_run_reads_typed_records(run_dir):
    run = load_run(run_dir)
    by = {c.id: c for c in run.cells}
    assert all(isinstance(c, CellRecord) for c in run.cells) and run.config["dataset"] == "digits"
    assert [by[k].kind for k in "abc"] == ["heatmap", "distribution", "scan"]
    assert by["a"].backdoored and by["a"].error is None and by["a"].planted == ()
    assert set(by["a"].tensors) == {"trigger.mask", "trigger.pattern"}
    with pytest.raises(ConfigError, match="no finished cells"):
        load_run(run_dir / "nowhere")


def test_figures_follow_the_kind(run_dir):
    run = load_run(run_dir)
    by = {c.id: c for c in run.cells}
    hm = Display.from_records([by["a"]])
    assert isinstance(hm, HeatmapDisplay) and len(hm.figures()) == 1 and len(hm.galleries()) == 1
    assert "Samples" in Display.from_records([by["b"]]).figures()[0]["caption"]
    scan = Display.from_records([by["c"]])
    assert isinstance(scan, ScanDisplay)
    assert [f["caption"].split(" ")[0] for f in scan.figures()] == ["Anomaly"]  # no heat map of "some_map"
    text = render_run(run_dir).read_text()
    assert "Heat map of the suspected target label" in text and "triggers drawn from the learnt" in text


def test_from_result_picks_the_display_by_type():
    d = Display.from_result(_heatmap(), title="hm")
    assert isinstance(d, HeatmapDisplay) and "heat map of label 2" in d.verdict("hm")[0]
    assert type(Display.from_result({"scores": [1.0]}, title="x")) is Display  # a dict without a family
    assert Display.from_result({"scores": [1.0], "threshold": 0.5}, title="x", family="input").kind == "filter"


def test_sanitizer_pngs_follow_the_result_type(tmp_path):
    """``inspect-data --out``: a figure per attacked label by the result's class, or the segments of
    a provenance result."""
    from trojanscope.defenses.data.clustering import ClusteringResult
    from trojanscope.defenses.data.provenance import ProvenanceResult
    from trojanscope.defenses.data.spectral import SpectralResult
    from trojanscope.report.files import sanitizer_pngs

    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    flagged = torch.arange(40) >= 36
    common = {"scores": torch.rand(40, generator=g), "flagged": flagged, "attacked_labels": [0, 1], "per_label": {}}
    spec = SpectralResult(**common, params={"mode": "auto"})
    clus = ClusteringResult(**common, clusters=(torch.arange(40) // 20), reduced=torch.rand(40, 3, generator=g))
    prov = ProvenanceResult(scores=torch.rand(40, generator=g), flagged=flagged, groups=torch.arange(40) // 10,
                            flagged_segments=[3], per_segment={s: {"score": 0.1 * s} for s in range(4)},
                            variant="trusted")
    assert [Path(p).name for p in sanitizer_pngs(spec, y, tmp_path / "s", name="spectral")] == \
        ["label_0_spectral.png", "label_1_spectral.png"]
    assert len(sanitizer_pngs(clus, y, tmp_path / "c", name="clustering")) == 2
    assert [Path(p).name for p in sanitizer_pngs(prov, y, tmp_path / "p", name="provenance")] == \
        ["provenance_segments.png"]
    assert all(p.stat().st_size > 1000 for p in tmp_path.rglob("*.png"))
