"""Figures written as PNG files beside a command's output (``inspect-data --out``), as opposed to
the data URIs of :mod:`trojanscope.report.plots` that the HTML page embeds.

The figure follows the sanitiser's result type: provenance segments for a
:class:`~trojanscope.defenses.data.provenance.ProvenanceResult`, the two clusters of each attacked
label for a :class:`~trojanscope.defenses.data.clustering.ClusteringResult`, and the score
histogram of each attacked label for any other sanitiser result (Spectral Signatures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def sanitizer_pngs(result: Any, labels: torch.Tensor, out: Path, *, name: str) -> list[str]:
    """One PNG per attacked label (``label_<k>_<name>.png``), or the segments' scores of a
    provenance result (``provenance_segments.png``), in ``out``; returns the files written.

    Args:
        result: a sanitiser's result (``attacked_labels``, ``flagged``, ``scores``).
        labels: ``(N,)`` the training labels the result's samples carry.
        out: the folder (created).
        name: the method's name, for the file names.
    """
    from ..defenses.data.clustering import ClusteringResult
    from ..defenses.data.provenance import ProvenanceResult

    out.mkdir(parents=True, exist_ok=True)
    if isinstance(result, ProvenanceResult):
        return [_save(_provenance_segments(result), out / "provenance_segments.png")]
    files: list[str] = []
    for k in result.attacked_labels:
        idx = (labels == k).nonzero().flatten()
        flagged = result.flagged[idx].numpy()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if isinstance(result, ClusteringResult):
            _clusters(ax, result, idx, flagged)
        else:
            _score_histogram(ax, result, idx, flagged)
        ax.set_title(f"label {k}: {int(flagged.sum())} of {len(idx)} flagged")
        ax.legend(fontsize=7)
        files.append(_save(fig, out / f"label_{k}_{name}.png"))
    return files


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _provenance_segments(result: Any) -> plt.Figure:
    """Each provenance segment's score, the flagged ones in red."""
    segs = sorted(result.per_segment)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(s) for s in segs], [result.per_segment[s]["score"] for s in segs],
           color=["tab:red" if s in result.flagged_segments else "tab:blue" for s in segs])
    ax.set_xlabel("provenance segment")
    ax.set_ylabel("score")
    ax.set_title("provenance segments (red: flagged)")
    return fig


def _score_histogram(ax: plt.Axes, result: Any, idx: torch.Tensor, flagged: np.ndarray) -> None:
    """The label's scores (Spectral Signatures': the paper's score), kept vs flagged."""
    s = result.scores[idx].numpy()
    bins = np.histogram_bin_edges(s, bins=40)
    ax.hist(s[~flagged], bins=bins, color="tab:blue", alpha=0.7, label="kept")
    ax.hist(s[flagged], bins=bins, color="tab:red", alpha=0.7, label="flagged")
    ax.set_xlabel("spectral score")
    ax.set_ylabel("samples")


def _clusters(ax: plt.Axes, result: Any, idx: torch.Tensor, flagged: np.ndarray) -> None:
    """The label's samples on the first two principal components of their reduced activations,
    coloured by k-means cluster, the flagged ones ringed."""
    r = result.reduced[idx].double()
    r = r - r.mean(0)
    _, _, vh = torch.linalg.svd(r, full_matrices=False)
    xy = (r @ vh[:2].T).numpy() if vh.shape[0] >= 2 else np.c_[r[:, 0].numpy(), np.zeros(len(r))]
    c = result.clusters[idx].numpy()
    for cid, colour in ((0, "tab:blue"), (1, "tab:orange")):
        sel = c == cid
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, c=colour, label=f"cluster {cid} ({int(sel.sum())})")
    ax.scatter(xy[flagged, 0], xy[flagged, 1], s=14, facecolors="none", edgecolors="tab:red", linewidths=0.5,
               label="flagged")
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
