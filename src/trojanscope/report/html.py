"""The HTML report: one self-contained page (images embedded as data URIs, no network).

``render_run(run_dir)`` turns a bench run folder into ``report.html``; ``write_report(path,
sections)`` does the same for a few results of one command (``scan``, ``inspect-data``,
``filter`` with ``--report``). The page comes from ``templates/report.html`` (Jinja2).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils.results import to_jsonable
from ..errors import ConfigError
from . import plots

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
FAMILY_NAMES = {"model": "Model detection", "data": "Data sanitising", "input": "Input filtering",
                "repair": "Repair", "chain": "Chain"}
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

def _fmt(col: str, v: Any) -> str:
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


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _mean(vals: Sequence[Any]) -> float | None:
    v = [float(x) for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _backdoored(r: Mapping[str, Any]) -> bool:
    return r.get("asr_before") is not None


# --- scoring a row (for the scoreboard's colours and the verdict) -----------------------------------

def row_outcome(r: Mapping[str, Any]) -> tuple[float | None, str]:
    """How well the defence did in one cell, in [0, 1] (1 = it did its job), and a short label."""
    if r.get("error"):
        return None, "failed"
    fam, bd = r.get("family"), _backdoored(r)
    if fam == "model":
        infected = r.get("verdict") == "infected"
        if not bd:
            return (0.0, "false alarm") if infected else (1.0, "clean ✓")
        if r.get("target_found"):
            return 1.0, "target found"
        return (0.35, "wrong label") if infected else (0.0, "missed")
    if fam == "input":
        if bd and r.get("far") is not None:
            return 1.0 - float(r["far"]), f"FAR {_pct(r['far'])}"
        frr = r.get("frr")
        return (None, "–") if frr is None else (max(0.0, 1.0 - 5 * float(frr)), f"FRR {_pct(frr)}")
    drop = max(0.0, float(r.get("ca_before") or 0) - float(r.get("ca_after") or 0)) if r.get("ca_after") is not None else 0.0
    if fam == "data":
        if bd and r.get("asr_after") is not None:
            return max(0.0, 1.0 - float(r["asr_after"]) - 2 * drop), f"ASR {_pct(r['asr_after'])}"
        cr = r.get("clean_removed")
        return (None, "–") if cr is None else (max(0.0, 1.0 - 5 * float(cr)), f"removed {_pct(cr)}")
    if fam in ("repair", "chain"):
        if bd and r.get("asr_after") is not None:
            return max(0.0, 1.0 - float(r["asr_after"]) - 2 * drop), f"ASR {_pct(r['asr_after'])}"
        return max(0.0, 1.0 - 5 * drop), f"CA {_pct(r.get('ca_after'))}"
    return None, "–"


def _color(score: float | None) -> str:
    if score is None:
        return "#eef2f7"
    return f"hsl({120 * max(0.0, min(1.0, score)):.0f}, 62%, 86%)"


def defense_sentence(name: str, family: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence, in words, on how a defence did across the attacks (HTML, name in bold)."""
    ok = [r for r in rows if not r.get("error")]
    bd = [r for r in ok if _backdoored(r)]
    cl = [r for r in ok if not _backdoored(r)]
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
        far, frr, auc = _mean([r.get("far") for r in bd]), _mean([r.get("frr") for r in ok]), \
            _mean([r.get("auroc") for r in bd])
        s = f"{n} let {_pct(far)} of stamped inputs through while rejecting {_pct(frr)} of clean ones" if far is not None \
            else f"{n} rejected {_pct(frr)} of clean inputs"
        return s + (f" (AUROC {auc:.2f})" if auc is not None else "") + tail + "."
    before, after = _mean([r.get("asr_before") for r in bd]), _mean([r.get("asr_after") for r in bd])
    drop = _mean([(r["ca_before"] - r["ca_after"]) for r in ok if r.get("ca_after") is not None
                  and r.get("ca_before") is not None])
    cost = "" if drop is None else (f" at a cost of {100 * drop:.1f} points of clean accuracy" if drop > 0.0005
                                    else " with no loss of clean accuracy")
    if family == "data":
        pr, cr = _mean([r.get("poison_removed") for r in bd]), _mean([r.get("clean_removed") for r in ok])
        s = f"{n} removed {_pct(pr)} of the poison and {_pct(cr)} of the clean samples" if pr is not None \
            else f"{n} removed {_pct(cr)} of the clean samples"
        if after is not None:
            s += f"; retraining on the rest left an attack success of {_pct(after)} (was {_pct(before)})"
        return s + cost + tail + "."
    if after is None:
        return f"{n} kept {_pct(_mean([r.get('ca_after') for r in ok]))} clean accuracy{tail}."
    return f"{n} took the attack success from {_pct(before)} to {_pct(after)}{cost}{tail}."


# --- figures of one defence ---------------------------------------------------------------------------

def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a damaged side file costs a gallery, not the report
        log.warning("cannot read %s: %s", path, e)
        return {}


def _triggers_from(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, mask, pattern)`` for every trigger stored as ``<key>.mask`` / ``<key>.pattern``."""
    out = []
    for k in sorted(tensors, key=_natural):
        if k.endswith(".mask"):
            base = k[:-5]
            if f"{base}.pattern" in tensors:
                out.append((base, tensors[k], tensors[f"{base}.pattern"]))
    return out


def _natural(s: str) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _trigger_image(mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """What a trigger adds: ``m * p`` on black, with the mask's extent as a faint blue where ``p`` is dark."""
    m = mask.float().clamp(0, 1)[None]
    p = pattern.float().clamp(0, 1)
    if p.shape[0] == 1:
        p = p.expand(3, -1, -1)
    img = m * p
    tint = torch.tensor([0.10, 0.25, 0.55])[:, None, None] * m * (1 - p.mean(0, keepdim=True))
    return (img + tint).clamp(0, 1)


def _label_of(key: str) -> int | None:
    last = key.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else None


def _gallery(rec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], planted: Sequence[Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i, t in enumerate(planted):
        items.append({"src": plots.image_uri(_trigger_image(t.mask, t.pattern), scale=3),
                      "caption": "planted" if len(planted) == 1 else f"planted {i + 1}", "cls": "planted"})
    res = rec.get("result") or {}
    flagged = {int(v) for v in res.get("flagged_labels", [])}
    targets = set((rec.get("extras") or {}).get("true_targets", []))
    norms = res.get("l1_norms")
    for key, m, p in _triggers_from(tensors)[:64]:
        lab = _label_of(key)
        cls = []
        if lab is not None and lab in flagged:
            cls.append("flagged")
        if lab is not None and lab in targets:
            cls.append("target")
        cap = f"label {lab}" if lab is not None else key
        if lab is not None and isinstance(norms, list) and lab < len(norms) and norms[lab] is not None:
            cap += f" · {norms[lab]:.0f}"
        items.append({"src": plots.image_uri(_trigger_image(m, p), scale=3), "caption": cap, "cls": " ".join(cls)})
    return items


def _find_images(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, np.ndarray]]:
    """Image-like arrays inside a result dict: 2-D maps (heat maps) and ``(N, C, H, W)`` samples,
    found under keys naming a heat map, a map, samples or a distribution."""
    found: list[tuple[str, np.ndarray]] = []
    if depth > 3:
        return found
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            kl = str(k).lower()
            if isinstance(v, list) and any(w in kl for w in ("heatmap", "heat_map", "map", "sample", "distribution",
                                                             "images")):
                try:
                    a = np.asarray(v, dtype=float)
                except (ValueError, TypeError):
                    a = None
                if a is not None and (a.ndim == 2 and min(a.shape) >= 3 or a.ndim in (3, 4) and a.shape[-1] >= 3):
                    found.append((f"{path}{k}", a))
                    continue
            found += _find_images(v, f"{path}{k}.", depth + 1)
    return found


def _panel_title(rec: Mapping[str, Any], multi_seed: bool) -> str:
    r = rec["row"]
    return f"{r['attack']} (seed {r['seed']})" if multi_seed else str(r["attack"])


def defense_figures(records: Sequence[Mapping[str, Any]], *, planted: Mapping[str, Sequence[Any]] | None = None,
                    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    multi_seed: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The figures (and trigger galleries) of one defence over its cells.

    Args:
        records: cell records of one defence (``row``, ``result``, ``extras``, ``params``).
        planted: the planted triggers by cell id (for the gallery).
        tensors: stored tensors by cell id (reversed triggers).

    Returns:
        ``(figures, galleries)``: figures are ``{"src", "caption"}``; galleries ``{"title", "items"}``.
    """
    planted, tensors = planted or {}, tensors or {}
    ok = [r for r in records if not r["row"].get("error") and r.get("result") is not None]
    figs: list[dict[str, Any]] = []
    galleries: list[dict[str, Any]] = []
    if not ok:
        return figs, galleries
    fam = ok[0]["row"].get("family")
    params = ok[0].get("params") or {}
    titles = [_panel_title(r, multi_seed) for r in ok]
    if fam == "model":
        scored = [(t, r["result"], (r.get("extras") or {}).get("true_targets", [])) for t, r in zip(titles, ok)
                  if isinstance(r["result"].get("scores"), list) and len(r["result"]["scores"]) > 1]
        known = any(len(sc[2]) for sc in scored)  # a bench knows the planted targets; a scan alone does not
        if scored:
            thr = float(params.get("anomaly_threshold", params.get("threshold", 2.0)) or 2.0)
            figs.append({"src": plots.anomaly_bars(scored, threshold=thr),
                         "caption": ("Anomaly index per label (red: flagged, amber: the planted target; dashed: the "
                                     "threshold). A backdoor target stands out above the line." if known else
                                     "Anomaly index per label (red: flagged; dashed: the threshold). A backdoor "
                                     "target stands out above the line.")})
        normed = [s for s in scored if isinstance(s[1].get("l1_norms"), list)]
        if normed:
            figs.append({"src": plots.norm_box(normed),
                         "caption": ("L1 norm of the reversed trigger of each label: the box holds the other labels, "
                                     "red points the planted target(s); a backdoor needs a much smaller trigger."
                                     if known else "L1 norm of the reversed trigger of each label: a backdoor "
                                     "target needs a much smaller trigger than the others, an outlier below the "
                                     "box.")})
        for t, r in zip(titles, ok):
            items = _gallery(r, tensors.get(r.get("id", ""), {}), planted.get(r.get("id", ""), []))
            if len(items) > len(planted.get(r.get("id", ""), [])):
                galleries.append({"title": t, "thumbs": items})
    elif fam == "input":
        panels = [(t, (r.get("extras") or {}).get("clean_scores", []), (r.get("extras") or {}).get("triggered_scores", []),
                   (r.get("extras") or {}).get("threshold")) for t, r in zip(titles, ok)
                  if (r.get("extras") or {}).get("clean_scores")]
        if panels:
            labels = tuple((ok[0].get("extras") or {}).get("labels") or ("clean", "triggered"))
            figs.append({"src": plots.score_histograms(panels, xlabel="score", labels=labels),  # type: ignore[arg-type]
                         "caption": "Scores of clean (blue) and stamped (red) test inputs (higher = more suspicious); "
                                    "inputs right of the dashed threshold are rejected. Well separated histograms mean a good filter."})
    elif fam == "data":
        panels = []
        truth = all("is_poison" in (r.get("extras") or {}) for r in ok)
        for t, r in zip(titles, ok):
            s = r["result"].get("scores") or []
            if truth:
                red = set((r.get("extras") or {}).get("is_poison", []))
            else:  # no ground truth (one command's report): what the sanitiser flagged
                red = set(r["result"].get("flagged_indices") or [])
            if s:
                pm = np.isin(np.arange(len(s)), list(red))
                arr = np.asarray([np.nan if v is None else v for v in s], dtype=float)
                panels.append((t, arr[~pm], arr[pm], None))
        if panels:
            names = ("clean", "poisoned") if truth else ("kept", "flagged")
            figs.append({"src": plots.score_histograms(panels, xlabel="suspicion score", labels=names),
                         "caption": f"Scores of {names[0]} (blue) and {names[1]} (red) training samples, as the "
                                    f"sanitiser ranked them (higher = more suspicious)."})
        proj = [(t, (r.get("extras") or {}).get("projection")) for t, r in zip(titles, ok)]
        src = plots.projections([p for p in proj if p[1]])
        if src:
            figs.append({"src": src, "caption": "2-D projection (PCA) of the penultimate activations of the target "
                                                "label's training samples: poisoned in red, flagged ringed."})
    elif fam == "chain":
        panels = [(t, r["result"].get("history") or []) for t, r in zip(titles, ok)]
        src = plots.curves(panels)
        if src:
            figs.append({"src": src, "caption": "Clean accuracy and attack success of the defended system after each "
                                                "step of the chain (inputs a filter rejects count as neither)."})
    elif fam == "repair":
        panels = []
        for t, r in zip(titles, ok):
            res = r["result"]
            hist = (res.get("details") or {}).get("pruning_curve") or res.get("history") or []
            panels.append((t, hist))
        planted_asr = all((r.get("extras") or {}).get("evaluated", True) for r in ok)
        src = plots.curves(panels, names=None if planted_asr else {"attack_success": "ASR (reversed trigger)"})
        if src:
            what = "the planted trigger's attack success" if planted_asr else \
                "the attack success of the defence's own reversed trigger (it never sees the planted one)"
            figs.append({"src": src, "caption": f"The repair's curve: clean accuracy and {what} as the repair "
                                                f"proceeds. Panels are missing where the repair had nothing to do."})
    maps = [(t, a) for t, r in zip(titles, ok) for k, a in _find_images(r["result"]) if a.ndim == 2]
    src = plots.heatmaps(maps[:8]) if maps else None
    if src:
        figs.append({"src": src, "caption": "Heat map of the suspected target label: bright where a small window "
                                            "of trigger pixels sends inputs to that label."})
    for t, r in zip(titles, ok):
        for k, a in _find_images(r["result"]):
            if a.ndim in (3, 4):
                src = plots.image_grid(a, title=f"{t}: {k}")
                if src:
                    figs.append({"src": src, "caption": f"Samples ({k}): triggers drawn from the learnt "
                                                        f"distribution, each stamped on black."})
                break
    return figs, galleries


# --- the page ---------------------------------------------------------------------------------------

def _env() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def render(context: Mapping[str, Any]) -> str:
    """The page for ``context`` (see :func:`run_context` / :func:`single_context`)."""
    return _env().get_template("report.html").render(**context)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
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
            cells.append({"text": _fmt(c, v), "sort": sort, "num": isinstance(sort, (int, float))})
        body.append({"cells": cells, "error": bool(r.get("error")), "color": _color(score)})
    return {"columns": [{"key": c, "title": _HEADERS.get(c, c), "tip": _TIPS.get(c, "")} for c in cols], "rows": body}


def run_context(run_dir: str | Path) -> dict[str, Any]:
    """Everything the page shows for a bench run folder."""
    from ..bench import COLUMNS, load_cells
    from ..triggers import Trigger

    run = Path(run_dir)
    recs = load_cells(run)
    if not recs:
        raise ConfigError(f"{run} holds no finished cells (is it a `trojanscope bench` run folder?)")
    cfg = _read_json(run / "config.json")
    meta = _read_json(run / "meta.json")
    attack_order = [a["name"] for a in cfg.get("attacks", [])]
    defense_order = [d["name"] for d in cfg.get("defenses", [])]
    fam_rank = {f: i for i, f in enumerate(FAMILY_NAMES)}

    def key(rec: Mapping[str, Any]) -> tuple:
        r = rec["row"]
        return (fam_rank.get(r.get("family"), 9),
                defense_order.index(r["defense"]) if r["defense"] in defense_order else 999, r["defense"],
                attack_order.index(r["attack"]) if r["attack"] in attack_order else 999, r["attack"], r["seed"])

    recs.sort(key=key)
    rows = [rec["row"] for rec in recs]
    seeds = sorted({r["seed"] for r in rows})
    attacks = sorted({r["attack"] for r in rows}, key=lambda a: (attack_order.index(a) if a in attack_order else 999, a))
    defenses: list[str] = []
    for r in rows:
        if r["defense"] not in defenses:
            defenses.append(r["defense"])

    # planted triggers of each attack, by cell id
    planted_by_attack: dict[tuple[str, int], list[Trigger]] = {}
    for a in attacks:
        for s in seeds:
            mdir = run / "models" / f"{_safe(a)}__s{s}"
            trigs = []
            for p in sorted(mdir.glob("trigger_*.safetensors"), key=lambda p: _natural(p.name)):
                try:
                    trigs.append(Trigger.load(p))
                except Exception as e:
                    log.warning("cannot read planted trigger %s: %s", p, e)
            planted_by_attack[(a, s)] = trigs
    planted = {rec.get("id", ""): planted_by_attack.get((rec["row"]["attack"], rec["row"]["seed"]), []) for rec in recs}
    tensors = {rec.get("id", ""): _load_tensors(run / "cells" / rec["tensor_file"]) for rec in recs
               if rec.get("tensor_file")}

    # scoreboard: defences x attacks (mean over seeds)
    board_rows = []
    for d in defenses:
        drows = [r for r in rows if r["defense"] == d]
        cells = []
        for a in attacks:
            cr = [r for r in drows if r["attack"] == a]
            if not cr:
                cells.append({"text": "n/a", "color": "#f8fafc", "title": "not applicable"})
                continue
            outs = [row_outcome(r) for r in cr]
            scores = [s for s, _ in outs if s is not None]
            score = float(np.mean(scores)) if scores else None
            labels = [lab for _, lab in outs]
            # every seed's outcome in the cell (the same one once), not the first with an ellipsis
            text = labels[0] if len(set(labels)) == 1 else " / ".join(labels)
            cells.append({"text": text, "color": _color(score),
                          "title": "; ".join(f"seed {r['seed']}: {lab}" for r, (_, lab) in zip(cr, outs))})
        board_rows.append({"defense": d, "family": drows[0].get("family") or "", "cells": cells})

    # verdicts and defence cards
    cards = []
    scores_by_def: dict[str, float] = {}
    for d in defenses:
        drecs = [rec for rec in recs if rec["row"]["defense"] == d]
        drows = [rec["row"] for rec in drecs]
        fam = next((r.get("family") for r in drows if r.get("family")), "")
        s = [row_outcome(r)[0] for r in drows if _backdoored(r)]
        s = [v for v in s if v is not None]
        if s:
            scores_by_def[d] = float(np.mean(s))
        figs, galleries = defense_figures(drecs, planted=planted, tensors=tensors, multi_seed=len(seeds) > 1)
        params = next((rec.get("params") for rec in drecs if rec.get("params")), {})
        cards.append({"name": d, "family": fam, "family_name": FAMILY_NAMES.get(fam, fam or "?"),
                      "cls": next((rec.get("defense_class") for rec in drecs if rec.get("defense_class")), ""),
                      "doc": _doc_of(drecs), "sentence": defense_sentence(d, fam, drows), "figures": figs,
                      "galleries": galleries, "params": _params_rows(params),
                      "planted_known": any(planted.get(rec.get("id", "")) for rec in drecs),
                      "errors": [f"{r['attack']} (seed {r['seed']}): {r['error']}" for r in drows if r.get("error")],
                      "seconds": sum(float(r.get("seconds") or 0) for r in drows)})

    headline, verdict_class = _headline(scores_by_def, rows)
    mean_asr = plots.scoreboard_bars(rows)
    expected = len(_read_json(run / "plan.json").get("cells", [])) or len(rows)
    attacked = [{"name": a, "ca": _mean([r["ca_before"] for r in rows if r["attack"] == a]),
                 "asr": _mean([r["asr_before"] for r in rows if r["attack"] == a]),
                 "planted": [plots.image_uri(_trigger_image(t.mask, t.pattern), scale=3)
                             for t in planted_by_attack.get((a, seeds[0]), [])][:2],
                 "trigger": ", ".join(t.name for t in planted_by_attack.get((a, seeds[0]), [])) or "none"}
                for a in attacks]
    for a in attacked:
        a["ca_text"], a["asr_text"] = _pct(a["ca"]), _pct(a["asr"])
    return {
        "title": f"trojanscope bench · {cfg.get('dataset', '?')}",
        "subtitle": f"{len(attacks)} attacks × {len(defenses)} defences × {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
                    f"· {cfg.get('arch', '?')}, {cfg.get('epochs', '?')} epochs",
        "headline": headline, "verdict_class": verdict_class,
        "verdicts": [c["sentence"] for c in cards],
        "stats": [{"label": "cells", "value": f"{len(rows)}" + (f" / {expected}" if expected and expected != len(rows) else "")},
                  {"label": "failed", "value": str(sum(bool(r.get("error")) for r in rows))},
                  {"label": "compute", "value": f"{sum(float(r.get('seconds') or 0) for r in rows) / 60:.1f} min"},
                  {"label": "mean CA of the attacked models",
                   "value": _pct(_mean([a["ca"] for a in attacked]))}],
        "attacks": attacks, "attacked": attacked, "board": board_rows, "mean_asr_plot": mean_asr,
        "table": _table(rows, COLUMNS), "cards": cards, "meta": _meta_rows(meta), "config": _config_rows(cfg),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def effect(family: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A few words on what a defence achieved against the backdoored models."""
    bd = [r for r in rows if _backdoored(r) and not r.get("error")]
    if family == "model":
        return f"found the target in {sum(bool(r.get('target_found')) for r in bd)} of {len(bd)} backdoored models"
    if family == "input":
        return f"let {_pct(_mean([r.get('far') for r in bd]))} of stamped inputs through " \
               f"at {_pct(_mean([r.get('frr') for r in rows]))} false rejections"
    return f"attack success {_pct(_mean([r.get('asr_before') for r in bd]))} → " \
           f"{_pct(_mean([r.get('asr_after') for r in bd]))}"


def _headline(scores: Mapping[str, float], rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
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


def _doc_of(recs: Sequence[Mapping[str, Any]]) -> str:
    from ..defenses import DEFENSES

    for rec in recs:
        name = rec.get("defense_name") or rec["row"].get("defense")
        try:
            cls = DEFENSES.get(name)
        except ConfigError:
            continue
        import re

        doc = (cls.__doc__ or "").strip().splitlines()
        return re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], doc[0]) if doc else ""
    return ""


def _params_rows(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(k, json.dumps(to_jsonable(v)) if not isinstance(v, str) else v) for k, v in params.items()]


def _meta_rows(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in meta.items() if v is not None]


def _config_rows(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in cfg.items():
        if k == "attacks":
            v = ", ".join(a["name"] for a in v)
        elif k == "defenses":
            v = ", ".join(d["name"] for d in v)
        out.append((k, v if isinstance(v, str) else json.dumps(v)))
    return out


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def render_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a bench run folder (default ``RUN_DIR/report.html``); returns its path."""
    ctx = run_context(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(ctx), encoding="utf-8")
    return path


# --- one command's results ---------------------------------------------------------------------------

def _family_of(result: Any) -> str:
    from ..defenses.base import RepairResult, SanitizeResult, ScanResult

    if isinstance(result, ScanResult):
        return "model"
    if isinstance(result, SanitizeResult):
        return "data"
    if isinstance(result, RepairResult):
        return "repair"
    d = plots.as_dict(result)
    if "clean_scores" in d or "threshold" in d:
        return "input"
    if "flagged_labels" in d:
        return "model"
    if "flagged" in d:
        return "data"
    return "repair" if "history" in d else ""


def _single_verdict(title: str, fam: str, d: Mapping[str, Any]) -> tuple[str, str]:
    if "heatmap" in d and "peak" in d:
        return f"{title}: heat map of label {d.get('target')}, hottest at {tuple(d['peak'])}.", "neutral"
    if fam == "model" and "infected" not in d:
        return f"{title}: results for label {d.get('target', '?')}.", "neutral"
    if not fam:
        return f"{title}.", "neutral"
    if fam == "model":
        labs = d.get("flagged_labels") or []
        if d.get("infected"):
            return (f"{title}: backdoor found. Suspected target label{'s' if len(labs) > 1 else ''}: "
                    f"{', '.join(map(str, labs))}.", "bad")
        return f"{title}: no backdoor found.", "good"
    if fam == "data":
        f = d.get("flagged_indices") or []
        n = len(d.get("scores") or [])
        return f"{title}: {len(f)} of {n} samples flagged as poisoned.", "bad" if f else "good"
    if fam == "input":
        sc = d.get("scores") or []
        thr = d.get("threshold")
        if sc and thr is not None:
            k = sum(1 for v in sc if v is not None and v > thr)
            return f"{title}: {k} of {len(sc)} inputs flagged as carrying a trigger.", "bad" if k else "good"
        return f"{title}: filter fitted (threshold {thr}).", "neutral"
    hist = d.get("history") or []
    last = hist[-1] if hist and isinstance(hist[-1], Mapping) else {}
    acc = last.get("test_accuracy", last.get("accuracy"))
    return f"{title}: repaired model ready" + (f", accuracy {_pct(acc)}." if acc is not None else "."), "neutral"


def single_context(sections: Sequence[Any], *, title: str | None = None, verdict: str | None = None) -> dict[str, Any]:
    """The page for the results of one command; see :func:`write_report`."""
    from ..bench import _trigger_tensors

    cards, verdicts, classes = [], [], []
    for i, sec in enumerate(sections):
        if isinstance(sec, tuple) and len(sec) == 2:
            sec = {"title": sec[0], "result": sec[1]}
        elif not isinstance(sec, Mapping) or "result" not in sec:
            sec = {"result": sec}
        res = sec["result"]
        d = plots.as_dict(res)
        fam = sec.get("family") or _family_of(res)
        name = sec.get("title") or type(res).__name__
        extras = {k: to_jsonable(v) for k, v in sec.items() if k not in ("title", "result", "family", "planted")}
        if fam == "input" and "clean_scores" not in extras and "clean_scores" in d:
            extras["clean_scores"] = d["clean_scores"]
        if fam == "input" and "triggered_scores" not in extras and "scores" in d:
            extras["triggered_scores"] = d["scores"]
        if fam == "input" and "threshold" not in extras:
            extras["threshold"] = d.get("threshold")
        row = {"attack": sec.get("data_name", name), "defense": name, "seed": 0, "family": fam}
        rec = {"id": f"s{i}", "row": row, "result": d, "extras": extras, "params": d.get("params") or {}}
        tens = _trigger_tensors(res) if dataclasses.is_dataclass(res) else {}
        planted = [sec["planted"]] if sec.get("planted") is not None else []
        figs, galleries = defense_figures([rec], planted={"s" + str(i): planted}, tensors={"s" + str(i): tens})
        v, c = _single_verdict(name, fam, d)
        verdicts.append(v)
        classes.append(c)
        cards.append({"name": name, "family": fam, "family_name": FAMILY_NAMES.get(fam, fam or "result"),
                      "cls": type(res).__name__, "doc": "", "sentence": v, "figures": figs, "galleries": galleries,
                      "planted_known": bool(planted),
                      "params": _params_rows(d.get("params") or {}), "errors": [], "seconds": d.get("seconds") or 0})
    vclass = "bad" if "bad" in classes else ("good" if classes and all(c == "good" for c in classes) else "neutral")
    from ..bench import run_metadata

    return {"title": title or "trojanscope report", "subtitle": "", "headline": verdict or " ".join(verdicts[:1]),
            "verdict_class": vclass, "verdicts": verdicts[1:] if verdict is None else verdicts, "stats": [],
            "attacks": [], "attacked": [], "board": [], "mean_asr_plot": None, "table": None, "cards": cards,
            "meta": _meta_rows(run_metadata()), "config": [], "generated": time.strftime("%Y-%m-%d %H:%M:%S")}


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
            ``RepairResult``, or a dict), a ``(title, result)`` pair, or a dict with ``result`` and
            optionally ``title``, ``family``, ``planted`` (a known :class:`Trigger`, shown beside the
            reversed ones), ``true_targets``, ``is_poison`` (indices), and for an input filter
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
