"""The HTML report: rendered from a bench run and from single results, checked in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchkit import registered
from trojanscope.bench import parse_config, run_bench
from trojanscope.cli import cli
from trojanscope.defenses import RepairResult, SanitizeResult, ScanResult
from trojanscope.report import plots, render_run, write_report
from trojanscope.triggers import Trigger

#: Injected by the test (never shipped in the page): records errors from the first moment, and on
#: load writes what it saw into the DOM, which Chromium's --dump-dom prints.
_PROBE_HEAD = """<script>window.__errs=[];window.addEventListener('error',function(e){window.__errs.push(
(e.message||'')+' '+((e.target&&e.target.src)||'').slice(0,40))},true);(function(){var ce=console.error;
console.error=function(){window.__errs.push('console.error: '+Array.prototype.join.call(arguments,' '));
ce.apply(console,arguments)}})();</script>"""
_PROBE_TAIL = """<script>window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0)}).map(function(i){return i.alt});
var v=document.getElementById('verdict');var d=document.createElement('pre');d.id='probe';
d.textContent=JSON.stringify({images:imgs.length,broken:bad,errors:window.__errs,
verdict:v?v.innerText:null});document.body.appendChild(d)});</script>"""


def chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        msg = "headless Chromium is needed to check the report: apt-get install -y chromium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def browse(page: Path, tmp: Path, *, screenshot: Path | None = None) -> tuple[dict, str]:
    """Load ``page`` (with the probe injected) in headless Chromium: the probe's findings and the
    console lines Chromium logged."""
    html = page.read_text()
    probed = tmp / f"probed_{page.name}"
    probed.write_text(html.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_TAIL + "</body>", 1))
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp / 'chrome-profile'}"]
    r = subprocess.run(base + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                               probed.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the page did not finish loading in Chromium (rc {r.returncode}): {r.stderr[-800:]}"
    import html as _html

    probe = json.loads(_html.unescape(m.group(1)))
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    if screenshot is not None:
        subprocess.run(base + ["--hide-scrollbars", "--window-size=1300,2400", f"--screenshot={screenshot}",
                               page.as_uri()], capture_output=True, timeout=120)
    return probe, "\n".join(console)



#: tiny tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    with registered():
        cfg = parse_config({"dataset": "digits", "epochs": 4, "attacks": ["clean", "badnets-patch", "badnets-pattern"],
                            "defenses": ["_t-logit", "_t-distance", "_t-confidence", "_t-finetune"]})
        res = run_bench(cfg, out, progress=False)
    assert not res.failed
    return out


def test_bench_report_renders_in_chromium(run_dir, tmp_path):
    page = render_run(run_dir)
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # self-contained
    assert "<table" in text and "Scoreboard" in text
    probe, console = browse(page, tmp_path, screenshot=tmp_path / "report.png")
    assert probe["errors"] == [] and console == "", (probe["errors"], console)
    assert probe["images"] >= 8 and probe["broken"] == []
    assert probe["verdict"] and "verdict" in probe["verdict"].lower() and "against these backdoors" in probe["verdict"]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_probe_catches_broken_pages(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><head></head><body><div id="verdict">Verdict: x</div>'
                   '<img alt="broken" src="data:image/png;base64,AAAA"><script>nope();</script></body></html>')
    probe, console = browse(bad, tmp_path)
    assert probe["broken"] == ["broken"] and probe["errors"] and "nope" in console


def test_report_cli(run_dir, tmp_path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(cli, ["report", str(run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "_t-distance" in out.read_text()
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no finished cells" in r.output


def test_write_report_for_single_results(tmp_path):
    k = 10
    trig = [Trigger.square((1, 8, 8), 2 + (j == 3), "white") for j in range(k)]
    scan = ScanResult(infected=True, flagged_labels=[3], scores=torch.linspace(-1, 3, k), params={"threshold": 2.0},
                      details={"triggers": trig})
    san = SanitizeResult(scores=torch.arange(20.0), flagged=torch.arange(20) >= 17)
    rep = RepairResult(model=torch.nn.Linear(2, 2), history=[{"ratio": r / 10, "accuracy": 0.9 - r / 50}
                                                             for r in range(5)])
    filt = {"clean_scores": torch.randn(50).tolist(), "scores": (torch.randn(30) + 3).tolist(), "threshold": 1.5}
    page = write_report(tmp_path / "one.html", [("Neural Cleanse", scan), {"title": "Spectral", "result": san},
                                                 ("Pruning", rep), {"title": "STRIP", "result": filt,
                                                                    "family": "input"}],
                        title="scan of model.safetensors")
    text = page.read_text()
    assert "backdoor found" in text and "label: 3" in text
    assert "3 of 20 samples flagged" in text and "inputs flagged as carrying a trigger" in text
    probe, console = browse(page, tmp_path)
    assert probe["errors"] == [] and console == "" and probe["broken"] == []
    assert probe["images"] >= 4 + k  # anomaly bars, histograms, curve, gallery
    assert "backdoor found" in probe["verdict"]


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_plots_take_results_and_give_pngs():
    scan = ScanResult(infected=False, flagged_labels=[], scores=torch.zeros(4))
    img = _decode(plots.anomaly_bars([("a", scan, [1]), ("b", scan.to_dict(), [])]))
    assert img.size[0] > img.size[1] > 50
    assert _decode(plots.score_histograms([("x", [1, 2, 3], [4, 5], 3.5)])).size[0] > 100
    assert _decode(plots.norm_box([("x", {"l1_norms": [5, 6, 7, 1]}, [3])])).size[0] > 100
    assert plots.curves([("x", [])]) is None
    assert _decode(plots.image_grid(torch.rand(5, 1, 8, 8))).size[0] > 50
    assert _decode(plots.image_uri(torch.rand(3, 4, 4), scale=2)).size == (8, 8)


def test_scan_report_flag(run_dir, tmp_path):
    page = tmp_path / "scan.html"
    r = CliRunner().invoke(cli, ["scan", str(run_dir / "models" / "badnets-patch__s0"), "--data", "digits:val",
                                 "--epochs", "3", "--report", str(page), "--device", "cpu"])
    # the page says what the exit code says (3 epochs: measured 'no backdoor found', at anomaly
    # index 1.79 against 2, too thin a margin to pin)
    verdict = {0: "Neural Cleanse: no backdoor found.", 1: "Neural Cleanse: backdoor found."}
    assert r.exit_code in verdict, r.output
    text = page.read_text()
    assert verdict[r.exit_code] in text and verdict[1 - r.exit_code] not in text
    probe, console = browse(page, tmp_path)
    assert probe["errors"] == [] and console == "" and probe["broken"] == [] and probe["images"] >= 11


def test_filter_and_inspect_data_report_flags(run_dir, tmp_path):
    model = str(run_dir / "models" / "badnets-patch__s0")
    page = tmp_path / "filter.html"
    r = CliRunner().invoke(cli, ["filter", model, "--fit", "digits:val", "--data", "digits:test", "--method", "strip",
                                 "-p", "n_overlays=4", "--report", str(page), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "inputs flagged as carrying a trigger" in page.read_text()
    page2 = tmp_path / "inspect.html"
    r = CliRunner().invoke(cli, ["inspect-data", model, "--data", "digits:train", "--method", "spectral", "--mode",
                                 "paper", "--report", str(page2), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "samples flagged as poisoned" in page2.read_text()
    for p in (page, page2):
        probe, console = browse(p, tmp_path)
        assert probe["errors"] == [] and console == "" and probe["broken"] == [] and probe["images"] >= 1
