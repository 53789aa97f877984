"""The page of one command's results (``scan``, ``inspect-data``, ``filter`` with ``--report``): one
card per result, its figures from the :class:`~trojanscope.report.displays.Display` of its kind."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .displays import Display
from .html import FAMILY_NAMES, meta_rows, params_rows, render

#: Keys of a section dict that are not extras of its result.
_SECTION_KEYS = ("title", "result", "family", "planted", "data_name")


def _section(sec: Any) -> Mapping[str, Any]:
    """A section as a dict with ``result`` (from a result, a ``(title, result)`` pair or a dict)."""
    if isinstance(sec, tuple) and len(sec) == 2:
        return {"title": sec[0], "result": sec[1]}
    if not isinstance(sec, Mapping) or "result" not in sec:
        return {"result": sec}
    return sec


def _card(i: int, sec: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """One result's card and the tone of its verdict."""
    res = sec["result"]
    name = sec.get("title") or type(res).__name__
    planted = [sec["planted"]] if sec.get("planted") is not None else []
    extras = {k: v for k, v in sec.items() if k not in _SECTION_KEYS}
    display = Display.from_result(res, title=sec.get("data_name", name), family=sec.get("family"), planted=planted,
                                  extras=extras, cell_id=f"s{i}")
    cell = display.panels[0][1]
    verdict, tone = display.verdict(name)
    d = cell.result or {}
    return {"name": name, "family": cell.family, "family_name": FAMILY_NAMES.get(cell.family, cell.family or "result"),
            "cls": type(res).__name__, "doc": "", "sentence": verdict, "figures": display.figures(),
            "galleries": display.galleries(), "planted_known": bool(planted),
            "params": params_rows(d.get("params") or {}), "errors": [], "seconds": d.get("seconds") or 0}, tone


def single_context(sections: Sequence[Any], *, title: str | None = None, verdict: str | None = None) -> dict[str, Any]:
    """The page for the results of one command; see :func:`write_report`."""
    from ..bench import run_metadata

    cards, tones = [], []
    for i, sec in enumerate(sections):
        card, tone = _card(i, _section(sec))
        cards.append(card)
        tones.append(tone)
    verdicts = [c["sentence"] for c in cards]
    vclass = "bad" if "bad" in tones else ("good" if tones and all(c == "good" for c in tones) else "neutral")
    return {"title": title or "trojanscope report", "subtitle": "", "headline": verdict or " ".join(verdicts[:1]),
            "verdict_class": vclass, "verdicts": verdicts[1:] if verdict is None else verdicts, "stats": [],
            "attacks": [], "attacked": [], "board": [], "mean_asr_plot": None, "table": None, "cards": cards,
            "meta": meta_rows(run_metadata()), "config": [], "generated": time.strftime("%Y-%m-%d %H:%M:%S")}


def filter_section(title: str, scores: Any, threshold: float, *, truth: Any = None, clean_scores: Any = None,
                   params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A :func:`write_report` section for an input filter's scores on some inputs.

    With ``truth`` (``(N,)`` bool, True = triggered) the histogram splits the inputs by it;
    otherwise it sets the inputs beside the filter's own clean (fitting) scores.
    """
    s = torch.as_tensor(scores).float().cpu()
    sec: dict[str, Any] = {"title": title, "family": "input",
                           "result": {"scores": s.tolist(), "threshold": float(threshold), "params": dict(params or {})}}
    if truth is not None:
        t = torch.as_tensor(truth).bool().cpu()
        sec.update(clean_scores=s[~t].tolist(), triggered_scores=s[t].tolist())
    else:
        sec.update(clean_scores=[] if clean_scores is None else torch.as_tensor(clean_scores).float().tolist(),
                   triggered_scores=s.tolist(), labels=["clean (fit)", "inputs"])
    return sec


def write_report(path: str | Path, sections: Sequence[Any], *, title: str | None = None,
                 verdict: str | None = None) -> Path:
    """Write a self-contained HTML page for the results of one command.

    Args:
        path: the HTML file to write.
        sections: results to show, each a result (``ScanResult``, ``SanitizeResult``,
            ``RepairResult``, ``HeatmapResult``..., whose class picks its figures, or a dict with
            ``family``), a ``(title, result)`` pair, or a dict with ``result`` and optionally
            ``title``, ``family`` (``model``, ``data``, ``input``, ``repair``: needed when the
            result is a dict), ``planted`` (a known :class:`Trigger`, shown beside the reversed
            ones), ``true_targets``, ``is_poison`` (indices), and for an input filter
            ``clean_scores``, ``triggered_scores`` (or ``scores``) and ``threshold``.
        title: the page title.
        verdict: the sentence at the top (default: from the first result).

    Example:
        >>> # in a command module: `if report: write_report(report, [("Neural Cleanse", result)])`
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render(single_context(sections, title=title, verdict=verdict)), encoding="utf-8")
    return p
