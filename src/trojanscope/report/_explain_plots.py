"""Figures of the explain family: the moving-window heat map and the trigger distribution's samples.

Plotting lives in :mod:`trojanscope.report`; the defences only compute. Both functions write a
PNG with matplotlib (the Agg backend) and return its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._utils.batching import generator

if TYPE_CHECKING:
    from ..defenses.model.distribution import DistributionReport, TriggerDistribution
    from ..defenses.model.heatmap import HeatmapResult


def save_heatmap_png(result: "HeatmapResult", path: str | Path, *, background: torch.Tensor | None = None,
                     truth: tuple[int, int, int, int] | None = None, asr: float | None = None) -> Path:
    """Write the heat map as a PNG (matplotlib): the map, the hot region's box, the peak, and the
    final trigger; ``background`` ``(C, H, W)`` is drawn under the map, ``truth`` (a box
    ``(row0, col0, row1, col1)``) is outlined when known (benchmarks). ``asr``: the final
    trigger's attack success measured on the caller's data, shown instead of the search's own
    figure (on its optimisation images), so that the picture and the printed text agree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
    ax = axes[0]
    if background is not None:
        bg = background.detach().float().cpu()
        ax.imshow(bg[0] if bg.shape[0] == 1 else bg[:3].permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    im = ax.imshow(result.heatmap.numpy(), cmap="inferno", alpha=0.75 if background is not None else 1.0)
    fig.colorbar(im, ax=ax, fraction=0.046)
    r0, c0, r1, c1 = result.bbox
    ax.add_patch(patches.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec="cyan", lw=1.5,
                                   label="hot region"))
    if truth is not None:
        t0, u0, t1, u1 = truth
        ax.add_patch(patches.Rectangle((u0 - 0.5, t0 - 0.5), u1 - u0, t1 - t0, fill=False, ec="lime", lw=1.2,
                                       ls="--", label="true trigger"))
    ax.plot([result.peak[1]], [result.peak[0]], "c+", ms=10)
    ax.set_title(f"heat map, target {result.target} ({result.window}x{result.window}, stride {result.stride})",
                 fontsize=8)
    ax.legend(fontsize=6, loc="lower left")
    t = result.trigger
    img = t.to_image(0.5)
    axes[1].imshow(img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    shown = f"ASR {100 * asr:.1f}%" if asr is not None else f"ASR {100 * result.trigger_asr:.1f}% (search images)"
    axes[1].set_title(f"final trigger: |a|={float(t.l1_norm):.1f}, {shown}", fontsize=8)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def save_distribution_grid(dist: "TriggerDistribution", path: str | Path, *, n_per_level: int = 10,
                           seed: int | None = 0, report: "DistributionReport | None" = None) -> Path:
    """Write a PNG grid of samples: one row per level (its beta, weight and, with a report,
    the share of valid samples), one column per sample; each cell shows the patch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dist._check_fitted()
    g = generator(seed)
    c, _, _ = dist.image_shape_
    s, (r, q) = dist.trigger_size, dist.position_
    fig, axes = plt.subplots(dist.n_levels, n_per_level, figsize=(n_per_level * 0.8 + 1.6, dist.n_levels * 0.8 + 0.4),
                             squeeze=False)
    for i in range(dist.n_levels):
        st = dist.sample_tensors(n_per_level, level=i, generator=g)
        for j in range(n_per_level):
            ax = axes[i, j]
            a = st.masks[j, r:r + s, q:q + s]
            p = st.patterns[j, :, r:r + s, q:q + s]
            img = (1 - a) * 0.5 + a * p                                   # on a grey background
            img = img[0] if c == 1 else img[:3].permute(1, 2, 0)
            ax.imshow(img.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        label = f"β={float(dist.betas_[i]):.2f}\nw={float(dist.weights_[i]):.2f}"
        if report is not None:
            label += f"\nvalid {100 * float(report.valid_share[i]):.0f}%"
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"MESA trigger samples, target {dist.target_}, {s}x{s} at {dist.position_}", fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


__all__ = ["save_distribution_grid", "save_heatmap_png"]
