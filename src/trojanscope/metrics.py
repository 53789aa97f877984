"""Figures: clean accuracy, attack success rate, detection metrics.

Ground truth (which samples were poisoned, which label is the target) enters here and only
here: defences never see it; tests and the benchmark use these functions to score them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils.batching import DeviceLike, predict
from .data.dataset import ImageDataset
from .errors import DataError
from .triggers import Trigger


def clean_accuracy(model: nn.Module, data: ImageDataset, *, batch_size: int = 256, device: DeviceLike = None) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        raise DataError("cannot compute accuracy on an empty dataset")
    pred = predict(model, data.x, batch_size=batch_size, device=device)
    return float((pred == data.y).float().mean())


def target_labels(y: torch.Tensor, target: int | torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """The attacker's intended label for each true label ``y``.

    ``target`` is an int (all-to-one) or a ``(K,)`` map from true label to target
    (all-to-all: ``(i + 1) mod K``).
    """
    tmap = torch.as_tensor(target, dtype=torch.long)
    if tmap.ndim == 0:  # an int, a numpy integer or a 0-d tensor: all-to-one
        return torch.full_like(y, int(tmap))
    if tmap.numel() != num_classes:
        raise DataError(f"a target map needs {num_classes} entries, got {tmap.numel()}")
    return tmap[y]


def attack_success_rate(model: nn.Module, data: ImageDataset, trigger: Trigger, target: int | torch.Tensor | Sequence[int],
                        *, source_labels: Sequence[int] | None = None, batch_size: int = 256,
                        device: DeviceLike = None) -> float:
    """Share of stamped test inputs classified as the attacker's target.

    Counted over samples whose true label differs from their target and, for a source-specific
    attack, whose true label is one of ``source_labels``.
    """
    tgt = target_labels(data.y, target, data.num_classes)
    keep = data.y != tgt
    if source_labels is not None:
        keep &= torch.isin(data.y, torch.as_tensor(list(source_labels), dtype=torch.long))
    if not bool(keep.any()):
        raise DataError("no test samples to measure attack success on (all are of the target or non-source labels)")
    x = trigger.apply(data.x[keep])
    pred = predict(model, x, batch_size=batch_size, device=device)
    return float((pred == tgt[keep]).float().mean())


def detection_metrics(scores: torch.Tensor | np.ndarray, is_poison: torch.Tensor | np.ndarray,
                      flagged: torch.Tensor | np.ndarray | None = None) -> dict[str, Any]:
    """Score a detector against the ground truth.

    Args:
        scores: ``(N,)`` suspicion scores (higher = more suspicious); used for AUROC.
        is_poison: ``(N,)`` bool ground truth.
        flagged: ``(N,)`` bool decisions; precision, recall (share of poison removed), FPR (share
            of clean flagged), FNR and F1 are reported when given.

    Returns:
        A dict with ``auroc`` (None when only one class is present), ``n``, ``n_poison`` and,
        with ``flagged``, ``precision``, ``recall``, ``f1``, ``fpr``, ``fnr``, ``n_flagged``.
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    t = np.asarray(torch.as_tensor(is_poison)).astype(bool)
    if s.shape != t.shape:
        raise DataError(f"scores {s.shape} and ground truth {t.shape} differ in shape")
    out: dict[str, Any] = {"n": int(t.size), "n_poison": int(t.sum())}
    finite = np.isfinite(s)
    out["auroc"] = float(roc_auc_score(t[finite], s[finite])) if 0 < t[finite].sum() < finite.sum() else None
    if flagged is not None:
        f = np.asarray(torch.as_tensor(flagged)).astype(bool)
        tp, fp = int((f & t).sum()), int((f & ~t).sum())
        fn, tn = int((~f & t).sum()), int((~f & ~t).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update(n_flagged=int(f.sum()), precision=precision, recall=recall,
                   f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                   fpr=fp / (fp + tn) if fp + tn else 0.0, fnr=fn / (tp + fn) if tp + fn else 0.0)
    return out
