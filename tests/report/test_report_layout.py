"""Report layout (issue 17): grid titles clear of the row above, every seed in a scoreboard cell,
no "target" over every bar of an all-to-all panel, no "planted" trigger in a single scan's
captions, and the heat map picture quoting the same attack success as the text."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from trojanscope.defenses import ScanResult
from trojanscope.report import plots, write_report
from trojanscope.triggers import Trigger

matplotlib.use("Agg")


def _capture_figures(monkeypatch) -> list:
    """Keep every figure the plotting code saves (the PNG itself says nothing about its texts)."""
    import matplotlib.figure

    saved = []
    orig = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        self.canvas.draw()
        saved.append(self)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    monkeypatch.setattr(plots.plt, "close", lambda *a: None)
    return saved


def test_grid_titles_do_not_overlap_the_x_labels_of_the_row_above(monkeypatch):
    saved = _capture_figures(monkeypatch)
    scans = [(f"badnets-patch s{i}", {"scores": [0.1 * j for j in range(10)], "flagged_labels": []}, [0])
             for i in range(8)]  # 8 panels: two rows of four
    plots.anomaly_bars(scans)
    fig = saved[-1]
    r = fig.canvas.get_renderer()
    axes = [a for a in fig.axes if a.get_visible()]
    top, bottom = axes[0], axes[4]
    xlabel = top.xaxis.label.get_window_extent(r)
    ticks = [t.get_window_extent(r) for t in top.get_xticklabels() if t.get_text()]
    title = bottom.title.get_window_extent(r)
    assert title.y1 < min([xlabel.y0] + [t.y0 for t in ticks]), (title, xlabel)


def test_all_to_all_panels_do_not_mark_every_bar_as_the_target(monkeypatch):
    saved = _capture_figures(monkeypatch)
    res = {"scores": [0.1 * j for j in range(10)], "flagged_labels": []}
    plots.anomaly_bars([("all-to-all", res, list(range(10))), ("patch", res, [0])])
    fig = saved[-1]
    a2a, one = [a for a in fig.axes if a.get_visible()][:2]
    assert [t.get_text() for t in a2a.texts].count("target") == 0
    assert "every label" in a2a.get_title()
    assert [t.get_text() for t in one.texts].count("target") == 1


def _visible_text(html: str) -> str:
    import re

    html = re.sub(r"<style.*?</style>|<script.*?</script>", " ", html, flags=re.S)
    html = re.sub(r'<img[^>]*>', " ", html)  # alt texts too would be visible to a screen reader; keep it simple
    return re.sub(r"<[^>]+>", " ", html).lower()


def test_single_scan_report_does_not_mention_a_planted_trigger(tmp_path):
    k = 10
    trig = [Trigger.square((1, 8, 8), 2 + (j == 3), "white") for j in range(k)]
    scan = ScanResult(infected=True, flagged_labels=[3], scores=torch.linspace(-1, 3, k), params={"threshold": 2.0},
                      details={"triggers": trig, "l1_norms": [float(t.l1_norm) for t in trig]})
    html = write_report(tmp_path / "one.html", [("Neural Cleanse", scan)], title="scan").read_text()
    assert "planted" not in _visible_text(html) and "planted" not in " ".join(
        a.lower() for a in __import__("re").findall(r'alt="([^"]*)"', html))
    # with a known trigger (as a bench knows it), the page does say which one was planted
    html = write_report(tmp_path / "two.html", [{"title": "Neural Cleanse", "result": scan, "planted": trig[3]}],
                        title="scan").read_text()
    assert "planted" in _visible_text(html)


def test_heatmap_png_quotes_the_attack_success_of_the_text(monkeypatch, tmp_path):
    from trojanscope.defenses.model.heatmap import HeatmapResult
    from trojanscope.report._explain_plots import save_heatmap_png

    saved = _capture_figures(monkeypatch)
    hm = HeatmapResult(target=0, heatmap=torch.rand(8, 8), window=3, stride=1, positions=torch.zeros(1, 2),
                       strength=torch.ones(1), window_asr=torch.ones(1), window_l1=torch.ones(1),
                       region=torch.ones(8, 8), bbox=(4, 4, 7, 7), peak=(5, 5),
                       trigger=Trigger.square((1, 8, 8), 3), trigger_asr=1.0, seconds=0.0)
    save_heatmap_png(hm, tmp_path / "h.png", asr=0.989)
    titles = " ".join(a.get_title() for a in saved[-1].axes)
    assert "98.9%" in titles and "100%" not in titles


def test_two_seed_scoreboard_cells_show_every_seed(tmp_path):
    from benchkit import registered
    from trojanscope.bench import parse_config, run_bench
    from trojanscope.report import render_run

    with registered():
        cfg = parse_config({"dataset": "digits", "epochs": 1, "seeds": [0, 1], "attacks": ["badnets-patch"],
                            "defenses": ["_t-finetune"]})
        res = run_bench(cfg, tmp_path / "run", progress=False)
    labels = sorted({f"ASR {round(100 * r['asr_after'])}%" for r in res.rows})
    text = render_run(tmp_path / "run").read_text()
    board = text[text.index('class="board"'):text.index("</table>", text.index('class="board"'))]
    assert "…" not in board
    for lab in labels:
        assert lab in board, (lab, board[-600:])
