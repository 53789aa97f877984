"""Trigger thumbnails and galleries for the report's defence cards.

A gallery shows, for one cell, the planted trigger(s) (when the page knows them) beside the
triggers the defence reversed, one per label, the flagged labels and the planted targets marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import plots
from .store import CellRecord, natural_key

#: At most this many reversed triggers per gallery.
MAX_THUMBS = 64


def trigger_image(mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """What a trigger adds: ``m * p`` on black, with the mask's extent as a faint blue where ``p`` is dark."""
    m = mask.float().clamp(0, 1)[None]
    p = pattern.float().clamp(0, 1)
    if p.shape[0] == 1:
        p = p.expand(3, -1, -1)
    img = m * p
    tint = torch.tensor([0.10, 0.25, 0.55])[:, None, None] * m * (1 - p.mean(0, keepdim=True))
    return (img + tint).clamp(0, 1)


def trigger_uri(trigger: Any) -> str:
    """A trigger's thumbnail (:func:`trigger_image`, 3x) as a PNG data URI."""
    return plots.image_uri(trigger_image(trigger.mask, trigger.pattern), scale=3)


def stored_triggers(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, mask, pattern)`` for every trigger stored as ``<key>.mask`` / ``<key>.pattern``."""
    out = []
    for k in sorted(tensors, key=natural_key):
        if k.endswith(".mask"):
            base = k[:-5]
            if f"{base}.pattern" in tensors:
                out.append((base, tensors[k], tensors[f"{base}.pattern"]))
    return out


def label_of(key: str) -> int | None:
    """The label a stored trigger belongs to (the key's last part, e.g. ``details.triggers.3``)."""
    last = key.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else None


def gallery(cell: CellRecord) -> list[dict[str, Any]]:
    """The thumbnails of one cell: the planted triggers, then the reversed ones (``src``,
    ``caption``, ``cls``: ``planted``, ``flagged``, ``target``)."""
    planted: Sequence[Any] = cell.planted
    items: list[dict[str, Any]] = []
    for i, t in enumerate(planted):
        items.append({"src": trigger_uri(t), "caption": "planted" if len(planted) == 1 else f"planted {i + 1}",
                      "cls": "planted"})
    res = cell.result or {}
    flagged = {int(v) for v in res.get("flagged_labels", [])}
    targets = set(cell.extras.get("true_targets", []))
    norms = res.get("l1_norms")
    for key, m, p in stored_triggers(cell.tensors)[:MAX_THUMBS]:
        lab = label_of(key)
        cls = []
        if lab is not None and lab in flagged:
            cls.append("flagged")
        if lab is not None and lab in targets:
            cls.append("target")
        cap = f"label {lab}" if lab is not None else key
        if lab is not None and isinstance(norms, list) and lab < len(norms) and norms[lab] is not None:
            cap += f" · {norms[lab]:.0f}"
        items.append({"src": plots.image_uri(trigger_image(m, p), scale=3), "caption": cap, "cls": " ".join(cls)})
    return items


def galleries(panels: Sequence[tuple[str, CellRecord]]) -> list[dict[str, Any]]:
    """One gallery per cell that holds reversed triggers (``title``, ``thumbs``)."""
    out = []
    for title, cell in panels:
        items = gallery(cell)
        if len(items) > len(cell.planted):
            out.append({"title": title, "thumbs": items})
    return out
