"""Plain aligned text tables, as every command prints its results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    if v is None:
        return "-"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
          headers: dict[str, str] | None = None, percent: Sequence[str] = ()) -> str:
    """A plain aligned text table; ``percent`` columns are shown as percentages."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    heads = [(headers or {}).get(c, c) for c in cols]
    def cell(r: dict[str, Any], c: str) -> str:
        v = r.get(c)
        if c in percent and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{100 * v:.1f}%"
        if c == "seconds" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v:.1f}"
        return fmt(v)
    body = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(out)


def _numeric(s: str) -> bool:
    return s.replace(".", "", 1).replace("%", "").replace("-", "", 1).isdigit()


def columns(rows: Sequence[dict[str, Any]], skip: Sequence[str] = ()) -> list[str]:
    """Every key of ``rows``, in the order first seen (rows of a history may differ), but ``skip``."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k not in skip]
    return cols
