"""Figures for the report, as self-contained ``data:image/png;base64`` URIs (matplotlib, Agg).

Each function takes results (the dataclasses or their ``to_dict()``) or plain arrays and returns
a data URI, so the page needs no network and no side files. Functions that draw several panels
take a list of ``(title, ...)`` tuples and draw them as small multiples.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

CLEAN = "#3b82f6"
POISON = "#ef4444"
GOOD = "#10b981"
MUTED = "#94a3b8"
INK = "#1e293b"
THRESH = "#334155"

_STYLE = {
    "font.size": 8.5, "axes.titlesize": 9.5, "axes.titleweight": "bold", "axes.labelsize": 8.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#cbd5e1",
    "axes.labelcolor": INK, "xtick.color": "#475569", "ytick.color": "#475569", "axes.grid": True,
    "grid.color": "#e2e8f0", "grid.linewidth": 0.6, "axes.axisbelow": True, "legend.frameon": False,
    "legend.fontsize": 7.5, "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
}


def as_dict(result: Any) -> dict[str, Any]:
    """A result as a plain dict (``to_dict()`` of a dataclass, or the mapping itself)."""
    if result is None:
        return {}
    if isinstance(result, Mapping):
        return dict(result)
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise TypeError(f"cannot read a {type(result).__name__} as a result")


def _arr(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v if v is not None else [], dtype=float)


def fig_to_uri(fig: plt.Figure, *, dpi: int = 110) -> str:
    """Render ``fig`` as a PNG data URI and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_uri(img: Any, *, scale: int = 4) -> str:
    """An image ``(C, H, W)`` or ``(H, W)`` in [0, 1] as a PNG data URI, upscaled ``scale`` x (nearest)."""
    from PIL import Image

    a = _arr(img)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)[..., :3]
    a = np.clip(np.nan_to_num(a), 0, 1)
    if scale > 1:
        a = a.repeat(scale, 0).repeat(scale, 1)
    im = Image.fromarray((a * 255).round().astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, *, width: float = 3.1, height: float = 2.3, max_cols: int = 4) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(max_cols, max(1, n))
    rows = math.ceil(n / cols)
    # constrained layout: a panel's title never runs into the x labels of the row above
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def anomaly_bars(panels: Sequence[tuple[str, Any, Sequence[int]]], *, threshold: float = 2.0,
                 key: str = "scores") -> str:
    """Neural Cleanse: the anomaly index of every label, one panel per scan, the threshold drawn.

    Args:
        panels: ``(title, scan result, true target labels)``; the result's ``key`` holds one
            anomaly index per label (higher = more suspicious) and ``flagged_labels`` the verdict.
        threshold: the decision threshold (a dashed line).
    """
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(panels))
        for ax, (title, res, targets) in zip(axes, panels):
            d = as_dict(res)
            s = _arr(d.get(key))
            flagged = set(int(v) for v in d.get("flagged_labels", []))
            k = np.arange(len(s))
            colors = [POISON if i in flagged else (MUTED if i not in targets else "#f59e0b") for i in k]
            ax.bar(k, s, color=colors, width=0.72)
            ax.axhline(threshold, color=THRESH, ls="--", lw=1)
            ax.text(len(s) - 0.5, threshold, f" threshold {threshold:g}", va="bottom", ha="right", fontsize=7,
                    color=THRESH)
            every = len(s) > 0 and set(range(len(s))) <= set(int(t) for t in targets)
            if not every:  # all-to-all: every label is a target, so no label is marked
                for t in targets:
                    if 0 <= t < len(s):
                        ax.annotate("target", (t, max(s[t], 0)), xytext=(0, 3), textcoords="offset points",
                                    ha="center", fontsize=7, color=INK)
            ax.set_xticks(k)
            ax.set_title(f"{title} (all-to-all: every label a target)" if every and len(title) < 20 else title)
            ax.set_xlabel("label")
            ax.set_ylabel("anomaly index")
            ax.grid(axis="x", visible=False)
        return fig_to_uri(fig)


def norm_box(panels: Sequence[tuple[str, Any, Sequence[int]]], *, key: str = "l1_norms") -> str:
    """Neural Cleanse: the L1 norms of the reversed triggers, infected (true target) vs other labels.

    One box pair per scan; the infected labels' norms are drawn as red points over their box.
    """
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(max(4.0, 1.15 * len(panels) + 1.5), 2.8))
        pos, labels = [], []
        for i, (title, res, targets) in enumerate(panels):
            n = _arr(as_dict(res).get(key))
            if n.size == 0:
                continue
            tmask = np.zeros(n.size, dtype=bool)
            tmask[[t for t in targets if 0 <= t < n.size]] = True
            others = n[~tmask]
            bp = ax.boxplot([others], positions=[i], widths=0.5, patch_artist=True, showfliers=True,
                            medianprops={"color": INK}, flierprops={"markersize": 3, "markerfacecolor": MUTED,
                                                                    "markeredgecolor": MUTED})
            for b in bp["boxes"]:
                b.set_facecolor("#dbeafe")
                b.set_edgecolor(CLEAN)
            if tmask.any():
                first = "infected label" not in ax.get_legend_handles_labels()[1]
                ax.scatter(np.full(tmask.sum(), i), n[tmask], color=POISON, zorder=3, s=28,
                           label="infected label" if first else None)
            pos.append(i)
            labels.append(title)
        ax.set_xticks(pos, labels, rotation=20, ha="right")
        ax.set_ylabel("L1 norm of the reversed mask")
        known = any(len(t) for _, _, t in panels)  # a scan alone does not know which label is infected
        ax.set_title("Trigger size: infected vs other labels" if known else "Trigger size per label")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right")
        return fig_to_uri(fig)


def score_histograms(panels: Sequence[tuple[str, Any, Any, float | None]], *, xlabel: str = "score",
                     labels: tuple[str, str] = ("clean", "triggered")) -> str:
    """Histograms of scores of clean vs suspicious inputs (STRIP entropy, sanitiser scores), the
    threshold drawn; one panel per ``(title, clean scores, other scores, threshold)``."""
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(panels))
        for ax, (title, a, b, thr) in zip(axes, panels):
            a, b = _arr(a), _arr(b)
            both = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
            if both.size == 0:
                ax.set_title(title)
                continue
            lo, hi = float(both.min()), float(both.max())
            if thr is not None and math.isfinite(thr):
                lo, hi = min(lo, thr), max(hi, thr)
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
            ax.hist(a[np.isfinite(a)], bins=bins, color=CLEAN, alpha=0.55, label=f"{labels[0]} ({a.size})", density=True)
            if b.size:
                ax.hist(b[np.isfinite(b)], bins=bins, color=POISON, alpha=0.55, label=f"{labels[1]} ({b.size})",
                        density=True)
            if thr is not None and math.isfinite(thr):
                ax.axvline(thr, color=THRESH, ls="--", lw=1)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("density")
            ax.legend(loc="best")
        return fig_to_uri(fig)


def reliability_diagram(panels: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> str:
    """The reliability diagram of a detector's probabilities over a population: per bin
    (:func:`trojanscope.population.reliability_bins`) the share of backdoored models against the
    mean predicted probability, the diagonal being perfect calibration; each point is labelled
    with its number of models. One panel per ``(title, bins)``."""
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(panels), width=3.0, height=3.0)
        for ax, (title, bins) in zip(axes, panels):
            ax.plot([0, 1], [0, 1], color=MUTED, ls="--", lw=1)
            xs = [b["mean_probability"] for b in bins]
            ys = [b["share_backdoored"] for b in bins]
            ax.plot(xs, ys, "o-", color=POISON, lw=1.2, ms=4)
            for b, x, y in zip(bins, xs, ys):
                ax.annotate(str(b["n"]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("predicted probability")
            ax.set_ylabel("share backdoored")
            ax.set_title(title)
        return fig_to_uri(fig)


_X_KEYS = ("ratio", "pruned", "fraction", "step", "epoch")
_Y_KEYS = (("accuracy", "accuracy (val)", CLEAN, "-"), ("test_accuracy", "CA (test)", GOOD, "-"),
           ("attack_success", "ASR", POISON, "-"))


def curves(panels: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], *,
           names: Mapping[str, str] | None = None) -> str | None:
    """Repair curves (e.g. ratio pruned vs CA and ASR), one panel per ``(title, history)``.

    The x axis is the first of ``ratio``, ``pruned``, ``fraction``, ``step``, ``epoch`` found in the
    history's rows; the y values are ``accuracy``, ``test_accuracy`` and ``attack_success``
    (legend names overridden by ``names``).
    """
    usable = [(t, h) for t, h in panels if h and isinstance(h[0], Mapping)]
    if not usable:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(usable))
        for ax, (title, hist) in zip(axes, usable):
            xk = next((k for k in _X_KEYS if k in hist[0]), None)
            xs = [r.get(xk) for r in hist] if xk else list(range(len(hist)))
            labels = None
            if xk is None and "stage" in hist[0]:
                labels = [str(r.get("stage")) for r in hist]
            elif xk == "step" and "defense" in hist[0]:
                labels = [str(r.get("defense")) for r in hist]
            for key, lab, col, ls in _Y_KEYS:
                ys = [r.get(key) for r in hist]
                if any(isinstance(y, (int, float)) for y in ys):
                    ax.plot(xs, [np.nan if y is None else y for y in ys], ls, color=col, lw=1.6, marker="o",
                            ms=2.5, label=(names or {}).get(key, lab))
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(title)
            ax.set_xlabel({"ratio": "share of channels pruned", "pruned": "channels pruned"}.get(xk or "", xk or "step"))
            if labels:
                ax.set_xticks(xs, labels)
            ax.legend(loc="best")
        return fig_to_uri(fig)


def projections(panels: Sequence[tuple[str, Mapping[str, Any]]]) -> str | None:
    """2-D projections of the activations of one label's samples: poisoned (ground truth) in red,
    clean in blue, samples the defence flagged ringed in black; one panel per ``(title, projection)``
    with ``xy`` ``(N, 2)``, ``poison`` and ``flagged`` ``(N,)``."""
    usable = [(t, p) for t, p in panels if p and p.get("xy")]
    if not usable:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(usable), height=2.6)
        for ax, (title, p) in zip(axes, usable):
            xy = _arr(p["xy"])
            poison = np.asarray(p.get("poison", [False] * len(xy)), dtype=bool)
            flagged = np.asarray(p.get("flagged", [False] * len(xy)), dtype=bool)
            ax.scatter(xy[~poison, 0], xy[~poison, 1], s=7, color=CLEAN, alpha=0.55, lw=0, label="clean")
            ax.scatter(xy[poison, 0], xy[poison, 1], s=7, color=POISON, alpha=0.7, lw=0, label="poisoned")
            if flagged.any():
                ax.scatter(xy[flagged, 0], xy[flagged, 1], s=20, facecolors="none", edgecolors=INK, lw=0.5,
                           label="flagged")
            ax.set_title(f"{title} (label {p.get('label')})")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(loc="best", markerscale=1.5)
        return fig_to_uri(fig)


def heatmaps(panels: Sequence[tuple[str, Any]], *, cmap: str = "magma") -> str | None:
    """2-D maps (e.g. a moving-window heat map of the model's response), one panel per ``(title, map)``."""
    usable = [(t, _arr(m)) for t, m in panels]
    usable = [(t, m) for t, m in usable if m.ndim == 2 and m.size]
    if not usable:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(usable), width=2.6, height=2.4)
        for ax, (title, m) in zip(axes, usable):
            im = ax.imshow(m, cmap=cmap, interpolation="nearest")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        return fig_to_uri(fig)


def image_grid(images: Any, *, title: str = "", max_images: int = 32, cols: int = 8) -> str | None:
    """A grid of images ``(N, C, H, W)`` in [0, 1] (e.g. samples of a trigger distribution)."""
    a = _arr(images)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] == 0:
        return None
    a = np.clip(np.nan_to_num(a[:max_images]), 0, 1)
    n = a.shape[0]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.0 * rows + (0.3 if title else 0)), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                img = a[i]
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        if title:
            fig.suptitle(title, fontsize=9)
        return fig_to_uri(fig)


def scoreboard_bars(rows: Sequence[Mapping[str, Any]], *, key: str = "asr_after") -> str | None:
    """Mean ``key`` per defence across the attacks (a compact overview; lower is better for ASR)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and r.get("asr_before") is not None:
            by.setdefault(str(r["defense"]), []).append(float(v))
    if not by:
        return None
    names = sorted(by, key=lambda n: np.mean(by[n]))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 0.32 * len(names) + 0.9))
        vals = [100 * np.mean(by[n]) for n in names]
        ax.barh(names, vals, color=[GOOD if v < 20 else ("#f59e0b" if v < 60 else POISON) for v in vals])
        for i, v in enumerate(vals):
            ax.text(v + 1, i, f"{v:.0f}%", va="center", fontsize=7.5)
        ax.set_xlim(0, 105)
        ax.invert_yaxis()
        ax.set_xlabel("mean attack success after the defence (%)")
        ax.grid(axis="y", visible=False)
        return fig_to_uri(fig)
