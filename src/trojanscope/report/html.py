"""The HTML page of a report: formatting, the results table, the verdicts in words, rendering.

The page comes from ``templates/report.html`` (Jinja2), filled with a context built by
:func:`trojanscope.report.bench_page.run_context` (a bench run folder) or
:func:`trojanscope.report.command_page.single_context` (the results of one command).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._utils.results import to_jsonable

TEMPLATES = Path(__file__).parent / "templates"
FAMILY_NAMES = {"model": "Model detection", "data": "Data sanitising", "input": "Input filtering",
                "repair": "Repair", "chain": "Chain", "population": "Population score"}
_PERCENT = {"ca_before", "asr_before", "ca_after", "asr_after", "poison_removed", "clean_removed", "far", "frr"}
_HEADERS = {"attack": "Attack", "defense": "Defence", "family": "Family", "seed": "Seed", "ca_before": "CA",
            "asr_before": "ASR", "ca_after": "CA after", "asr_after": "ASR after", "verdict": "Verdict",
            "flagged_labels": "Flagged", "target_found": "Target found", "poison_removed": "Poison removed",
            "clean_removed": "Clean removed", "auroc": "AUROC", "far": "FAR", "frr": "FRR", "seconds": "Seconds",
            "error": "Error"}
_TIPS = {"ca_before": "clean accuracy of the attacked model", "asr_before": "attack success rate of the attacked model",
         "ca_after": "clean accuracy after the defence (filters: clean inputs accepted and right)",
         "asr_after": "attack success after the defence (filters: stamped inputs accepted and sent to the target)",
         "far": "false acceptance rate: stamped inputs the filter let through",
         "frr": "false rejection rate: clean inputs the filter rejected",
         "poison_removed": "share of the poisoned samples the sanitiser removed",
         "clean_removed": "share of the clean samples the sanitiser removed",
         "auroc": "area under the ROC curve of the scores (poisoned / stamped vs clean)"}


# --- formatting ----------------------------------------------------------------------------------

def fmt(col: str, v: Any) -> str:
    """A table value as text: shares of the percentage columns as ``12.3%``, seconds to 0.1, other
    floats to 3 places, booleans as yes/no, a missing value as a dash."""
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if col in _PERCENT:
            return f"{100 * v:.1f}%"
        if col == "seconds":
            return f"{v:.1f}"
        return f"{v:.3f}"
    return str(v)


def pct(v: float | None) -> str:
    """A share as a whole percentage (a dash if unknown)."""
    return "–" if v is None else f"{100 * v:.0f}%"


def mean(vals: Sequence[Any]) -> float | None:
    """The mean of the finite numbers among ``vals`` (None if there is none)."""
    v = [float(x) for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def backdoored(r: Mapping[str, Any]) -> bool:
    """Whether a row's attacked model carries a backdoor (its attack success was measured)."""
    return r.get("asr_before") is not None


# --- scoring a row (for the scoreboard's colours and the verdict) -----------------------------------

def row_outcome(r: Mapping[str, Any]) -> tuple[float | None, str]:
    """How well the defence did in one cell, in [0, 1] (1 = it did its job), and a short label."""
    if r.get("error"):
        return None, "failed"
    fam, bd = r.get("family"), backdoored(r)
    if fam == "model":
        infected = r.get("verdict") == "infected"
        if not bd:
            return (0.0, "false alarm") if infected else (1.0, "clean ✓")
        if r.get("target_found"):
            return 1.0, "target found"
        return (0.35, "wrong label") if infected else (0.0, "missed")
    if fam == "input":
        if bd and r.get("far") is not None:
            return 1.0 - float(r["far"]), f"FAR {pct(r['far'])}"
        frr = r.get("frr")
        return (None, "–") if frr is None else (max(0.0, 1.0 - 5 * float(frr)), f"FRR {pct(frr)}")
    drop = max(0.0, float(r.get("ca_before") or 0) - float(r.get("ca_after") or 0)) if r.get("ca_after") is not None else 0.0
    if fam == "data":
        if bd and r.get("asr_after") is not None:
            return max(0.0, 1.0 - float(r["asr_after"]) - 2 * drop), f"ASR {pct(r['asr_after'])}"
        cr = r.get("clean_removed")
        return (None, "–") if cr is None else (max(0.0, 1.0 - 5 * float(cr)), f"removed {pct(cr)}")
    if fam in ("repair", "chain"):
        if bd and r.get("asr_after") is not None:
            return max(0.0, 1.0 - float(r["asr_after"]) - 2 * drop), f"ASR {pct(r['asr_after'])}"
        return max(0.0, 1.0 - 5 * drop), f"CA {pct(r.get('ca_after'))}"
    return None, "–"


def color(score: float | None) -> str:
    """The background of an outcome in [0, 1]: red (0) to green (1), grey if unknown."""
    if score is None:
        return "#eef2f7"
    return f"hsl({120 * max(0.0, min(1.0, score)):.0f}, 62%, 86%)"


def defense_sentence(name: str, family: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence, in words, on how a defence did across the attacks (HTML, name in bold)."""
    ok = [r for r in rows if not r.get("error")]
    bd = [r for r in ok if backdoored(r)]
    cl = [r for r in ok if not backdoored(r)]
    n = f"<b>{html.escape(name)}</b>"
    failed = len(rows) - len(ok)
    tail = f" ({failed} cell{'s' if failed != 1 else ''} failed)" if failed else ""
    if not ok:
        return f"{n} failed on every attack{tail}."
    if family == "model" and any(r.get("verdict") not in ("infected", "clean", None) for r in ok):
        # an explainer of a suspected label (heat map, trigger distribution)
        return f"{n} looked at the label the scan suspected: " + "; ".join(
            f"{html.escape(str(r['attack']))}: {html.escape(str(r.get('verdict')))}" for r in ok) + tail + "."
    if family == "model":
        found = sum(bool(r.get("target_found")) for r in bd)
        alarms = sum(r.get("verdict") == "infected" for r in cl)
        s = f"{n} found the target label in {found} of {len(bd)} backdoored model{'s' if len(bd) != 1 else ''}" if bd \
            else f"{n} ran on clean models only"
        if cl:
            s += f"; {'no false alarm' if not alarms else f'{alarms} false alarm' + ('s' if alarms > 1 else '')} " \
                 f"on the clean model{'s' if len(cl) > 1 else ''}"
        return s + tail + "."
    if family == "input":
        far, frr, auc = mean([r.get("far") for r in bd]), mean([r.get("frr") for r in ok]), \
            mean([r.get("auroc") for r in bd])
        s = f"{n} let {pct(far)} of stamped inputs through while rejecting {pct(frr)} of clean ones" if far is not None \
            else f"{n} rejected {pct(frr)} of clean inputs"
        return s + (f" (AUROC {auc:.2f})" if auc is not None else "") + tail + "."
    before, after = mean([r.get("asr_before") for r in bd]), mean([r.get("asr_after") for r in bd])
    drop = mean([(r["ca_before"] - r["ca_after"]) for r in ok if r.get("ca_after") is not None
                  and r.get("ca_before") is not None])
    cost = "" if drop is None else (f" at a cost of {100 * drop:.1f} points of clean accuracy" if drop > 0.0005
                                    else " with no loss of clean accuracy")
    if family == "data":
        pr, cr = mean([r.get("poison_removed") for r in bd]), mean([r.get("clean_removed") for r in ok])
        s = f"{n} removed {pct(pr)} of the poison and {pct(cr)} of the clean samples" if pr is not None \
            else f"{n} removed {pct(cr)} of the clean samples"
        if after is not None:
            s += f"; retraining on the rest left an attack success of {pct(after)} (was {pct(before)})"
        return s + cost + tail + "."
    if after is None:
        return f"{n} kept {pct(mean([r.get('ca_after') for r in ok]))} clean accuracy{tail}."
    return f"{n} took the attack success from {pct(before)} to {pct(after)}{cost}{tail}."


# --- the page ---------------------------------------------------------------------------------------

def _env() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def render(context: Mapping[str, Any]) -> str:
    """The page for ``context`` (built by :func:`~trojanscope.report.bench_page.run_context` or
    :func:`~trojanscope.report.command_page.single_context`)."""
    return _env().get_template("report.html").render(**context)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    """The results table: the ``columns`` that hold a value in some row, each row's cells (text and
    sort key) and its colour by :func:`row_outcome`."""
    cols = [c for c in columns if any(r.get(c) not in (None, "") for r in rows) or c in ("attack", "defense")]
    body = []
    for r in rows:
        score, _ = row_outcome(r)
        cells = []
        for c in cols:
            v = r.get(c)
            sort = v if isinstance(v, (int, float)) and not isinstance(v, bool) else ("" if v is None else str(v))
            if isinstance(v, bool):
                sort = int(v)
            cells.append({"text": fmt(c, v), "sort": sort, "num": isinstance(sort, (int, float))})
        body.append({"cells": cells, "error": bool(r.get("error")), "color": color(score)})
    return {"columns": [{"key": c, "title": _HEADERS.get(c, c), "tip": _TIPS.get(c, "")} for c in cols], "rows": body}


def effect(family: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A few words on what a defence achieved against the backdoored models."""
    bd = [r for r in rows if backdoored(r) and not r.get("error")]
    if family == "model":
        return f"found the target in {sum(bool(r.get('target_found')) for r in bd)} of {len(bd)} backdoored models"
    if family == "input":
        return f"let {pct(mean([r.get('far') for r in bd]))} of stamped inputs through " \
               f"at {pct(mean([r.get('frr') for r in rows]))} false rejections"
    return f"attack success {pct(mean([r.get('asr_before') for r in bd]))} → " \
           f"{pct(mean([r.get('asr_after') for r in bd]))}"


def headline(scores: Mapping[str, float], rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The page's first sentence (the best and the weakest defence by mean outcome ``scores``) and
    its tone: ``good``, ``mixed``, ``bad`` or ``neutral``."""
    if not scores:
        return "No backdoored model was evaluated, so no defence could be scored.", "neutral"
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    worst = min(scores, key=scores.get)  # type: ignore[arg-type]
    fam = {r["defense"]: r.get("family") or "" for r in rows}
    by = {d: [r for r in rows if r["defense"] == d] for d in (best, worst)}
    sb = scores[best]
    text = f"{best} did best against these backdoors: {effect(fam[best], by[best])}."
    if worst != best:
        text += f" Weakest: {worst} ({effect(fam[worst], by[worst])})."
    return text, "good" if sb >= 0.8 else ("mixed" if sb >= 0.4 else "bad")


def params_rows(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A defence's parameters as ``(name, JSON text)`` rows."""
    return [(k, json.dumps(to_jsonable(v)) if not isinstance(v, str) else v) for k, v in params.items()]


def meta_rows(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Versions and machine as ``(name, value)`` rows (unknown ones left out)."""
    return [(k, str(v)) for k, v in meta.items() if v is not None]


def config_rows(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A run's settings as ``(name, value)`` rows (attacks and defences by name)."""
    out = []
    for k, v in cfg.items():
        if k == "attacks":
            v = ", ".join(a["name"] for a in v)
        elif k == "defenses":
            v = ", ".join(d["name"] for d in v)
        out.append((k, v if isinstance(v, str) else json.dumps(v)))
    return out
