"""The page of a ``trojanscope bench`` run: the verdict, the scoreboard (defences x attacks), the
attacked models, one card per defence (its figures and galleries), the full table, the settings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import plots
from .displays import Display
from .figures import trigger_uri
from .html import (FAMILY_NAMES, backdoored, color, config_rows, defense_sentence, headline, mean, meta_rows,
                   params_rows, pct, render, row_outcome, table)
from .store import CellRecord, RunData, load_run


def render_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a bench run folder (default ``RUN_DIR/report.html``); returns its path."""
    ctx = run_context(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(ctx), encoding="utf-8")
    return path


def run_context(run_dir: str | Path) -> dict[str, Any]:
    """Everything the page shows for a bench run folder."""
    from ..bench import COLUMNS

    run = load_run(run_dir)
    cells = _ordered(run)
    rows = [c.row for c in cells]
    seeds = sorted({c.seed for c in cells})
    attack_order = [a["name"] for a in run.config.get("attacks", [])]
    attacks = sorted({c.attack for c in cells}, key=lambda a: (attack_order.index(a) if a in attack_order else 999, a))
    defenses = list(dict.fromkeys(c.defense for c in cells))
    cards = [_card(d, [c for c in cells if c.defense == d], multi_seed=len(seeds) > 1) for d in defenses]
    scores = {}
    for card in cards:
        score = card.pop("score")
        if score is not None:
            scores[card["name"]] = score
    text, verdict_class = headline(scores, rows)
    attacked = _attacked(attacks, cells, seeds[0])
    cfg, expected = run.config, run.planned or len(rows)
    return {
        "title": f"trojanscope bench · {cfg.get('dataset', '?')}",
        "subtitle": f"{len(attacks)} attacks × {len(defenses)} defences × {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
                    f"· {cfg.get('arch', '?')}, {cfg.get('epochs', '?')} epochs",
        "headline": text, "verdict_class": verdict_class,
        "verdicts": [c["sentence"] for c in cards],
        "stats": [{"label": "cells", "value": f"{len(rows)}" + (f" / {expected}" if expected and expected != len(rows) else "")},
                  {"label": "failed", "value": str(sum(bool(r.get("error")) for r in rows))},
                  {"label": "compute", "value": f"{sum(float(r.get('seconds') or 0) for r in rows) / 60:.1f} min"},
                  {"label": "mean CA of the attacked models",
                   "value": pct(mean([a["ca"] for a in attacked]))}],
        "attacks": attacks, "attacked": attacked, "board": _scoreboard(defenses, attacks, cells),
        "mean_asr_plot": plots.scoreboard_bars(rows),
        "table": table(rows, COLUMNS), "cards": cards, "meta": meta_rows(run.meta), "config": config_rows(cfg),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _ordered(run: RunData) -> list[CellRecord]:
    """The cells by family, then in the order the config lists defences and attacks, then seed."""
    attack_order = [a["name"] for a in run.config.get("attacks", [])]
    defense_order = [d["name"] for d in run.config.get("defenses", [])]
    fam_rank = {f: i for i, f in enumerate(FAMILY_NAMES)}

    def key(c: CellRecord) -> tuple:
        return (fam_rank.get(c.row.get("family"), 9),
                defense_order.index(c.defense) if c.defense in defense_order else 999, c.defense,
                attack_order.index(c.attack) if c.attack in attack_order else 999, c.attack, c.seed)

    return sorted(run.cells, key=key)


def _scoreboard(defenses: Sequence[str], attacks: Sequence[str], cells: Sequence[CellRecord]) -> list[dict[str, Any]]:
    """One row per defence, one coloured cell per attack (the outcome, mean over seeds)."""
    board = []
    for d in defenses:
        drows = [c.row for c in cells if c.defense == d]
        out = []
        for a in attacks:
            cr = [r for r in drows if r["attack"] == a]
            if not cr:
                out.append({"text": "n/a", "color": "#f8fafc", "title": "not applicable"})
                continue
            outs = [row_outcome(r) for r in cr]
            scores = [s for s, _ in outs if s is not None]
            score = float(np.mean(scores)) if scores else None
            labels = [lab for _, lab in outs]
            # every seed's outcome in the cell (the same one once), not the first with an ellipsis
            text = labels[0] if len(set(labels)) == 1 else " / ".join(labels)
            out.append({"text": text, "color": color(score),
                        "title": "; ".join(f"seed {r['seed']}: {lab}" for r, (_, lab) in zip(cr, outs))})
        board.append({"defense": d, "family": drows[0].get("family") or "", "cells": out})
    return board


def _card(name: str, cells: Sequence[CellRecord], *, multi_seed: bool) -> dict[str, Any]:
    """One defence's card; ``score`` (its mean outcome on backdoored models, or None) is for the headline."""
    rows = [c.row for c in cells]
    fam = next((r.get("family") for r in rows if r.get("family")), "")
    s = [v for v in (row_outcome(r)[0] for r in rows if backdoored(r)) if v is not None]
    display = Display.from_records(cells, multi_seed=multi_seed)
    params = next((c.params for c in cells if c.params), {})
    return {"name": name, "family": fam, "family_name": FAMILY_NAMES.get(fam, fam or "?"),
            "cls": next((c.defense_class for c in cells if c.defense_class), ""),
            "doc": _doc_of(cells), "sentence": defense_sentence(name, fam, rows), "figures": display.figures(),
            "galleries": display.galleries(), "params": params_rows(params),
            "planted_known": any(c.planted for c in cells),
            "errors": [f"{r['attack']} (seed {r['seed']}): {r['error']}" for r in rows if r.get("error")],
            "seconds": sum(float(r.get("seconds") or 0) for r in rows),
            "score": float(np.mean(s)) if s else None}


def _attacked(attacks: Sequence[str], cells: Sequence[CellRecord], seed: int) -> list[dict[str, Any]]:
    """The attacked models: mean CA and ASR over seeds, the planted triggers of the first seed."""
    out = []
    for a in attacks:
        rows = [c.row for c in cells if c.attack == a]
        planted = next((c.planted for c in cells if c.attack == a and c.seed == seed), ())
        ca, asr = mean([r["ca_before"] for r in rows]), mean([r["asr_before"] for r in rows])
        out.append({"name": a, "ca": ca, "asr": asr, "planted": [trigger_uri(t) for t in planted][:2],
                    "trigger": ", ".join(t.name for t in planted) or "none", "ca_text": pct(ca), "asr_text": pct(asr)})
    return out


def _doc_of(cells: Sequence[CellRecord]) -> str:
    """The first line of the defence class's docstring (roles such as ``:class:`X``` reduced to ``X``)."""
    import re

    from ..defenses import DEFENSES

    for c in cells:
        try:
            cls = DEFENSES.get(c.defense_name or c.defense)
        except ConfigError:
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        return re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], doc[0]) if doc else ""
    return ""
