"""Figures: clean accuracy, attack success rate, detection metrics.

Ground truth (which samples were poisoned, which label is the target) enters here and only
here: defences never see it; tests and the benchmark use these functions to score them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils.batching import DeviceLike, accuracy, predict  # noqa: F401  (predict: callers reach it as metrics.predict)
from ._utils.results import Result
from .data.dataset import ImageDataset
from .errors import DataError
from .triggers import Trigger, success_rate


def clean_accuracy(model: nn.Module, data: ImageDataset, *, batch_size: int = 256, device: DeviceLike = None) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        raise DataError("cannot compute accuracy on an empty dataset")
    return accuracy(model, data, batch_size=batch_size, device=device)


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


def attack_inputs(data: ImageDataset, target: int | torch.Tensor | Sequence[int], *,
                  source_labels: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)``: which inputs of ``data`` an attack's success is counted over (true label
    not its target and, for a source-specific attack, one of ``source_labels``), and the ``(N,)``
    target of each input (see :func:`target_labels`)."""
    tgt = target_labels(data.y, target, data.num_classes)
    keep = data.y != tgt
    if source_labels is not None:
        keep &= torch.isin(data.y, torch.as_tensor(list(source_labels), dtype=torch.long))
    return keep, tgt


def attack_success_rate(model: nn.Module, data: ImageDataset, trigger: Trigger, target: int | torch.Tensor | Sequence[int],
                        *, source_labels: Sequence[int] | None = None, batch_size: int = 256,
                        device: DeviceLike = None) -> float:
    """Share of stamped test inputs classified as the attacker's target.

    Counted over the inputs :func:`attack_inputs` keeps; the kernel is
    :func:`trojanscope.triggers.success_rate`.
    """
    keep, tgt = attack_inputs(data, target, source_labels=source_labels)
    if not bool(keep.any()):
        raise DataError("no test samples to measure attack success on (all are of the target or non-source labels)")
    return float(success_rate(model, data.x, data.y, trigger, tgt, where=keep, batch_size=batch_size,
                              device=device)[0])


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
        with ``flagged``, ``precision``, ``recall``, ``f1``, ``fpr``, ``fnr``, ``n_flagged`` and
        ``n_flagged_poison`` / ``n_flagged_clean`` (the flagged samples that are poisoned / clean).
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
        out.update(n_flagged=int(f.sum()), n_flagged_poison=tp, n_flagged_clean=fp, precision=precision, recall=recall,
                   f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                   fpr=fp / (fp + tn) if fp + tn else 0.0, fnr=fn / (tp + fn) if tp + fn else 0.0)
    return out


def filter_rates(scores: torch.Tensor | np.ndarray, is_triggered: torch.Tensor | np.ndarray,
                 flagged: torch.Tensor | np.ndarray) -> dict[str, float | None]:
    """An input filter's decisions against the truth (:func:`detection_metrics`, in a filter's words).

    Returns:
        ``far``: false acceptance rate, the share of triggered inputs not flagged (None without
        one); ``frr``: false rejection rate, the share of clean inputs flagged (None without
        one); ``auroc`` of the scores.

    Example:
        >>> filter_rates(torch.tensor([0., 3., 1., 2.]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0]))
        {'far': 0.5, 'frr': 0.5, 'auroc': 1.0}
    """
    m = detection_metrics(scores, is_triggered, flagged)
    return {"far": m["fnr"] if m["n_poison"] else None, "frr": m["fpr"] if m["n"] > m["n_poison"] else None,
            "auroc": m["auroc"]}


def attack_evaluator(trigger: Trigger | None, target: int | torch.Tensor | Sequence[int] | None, test_data: ImageDataset,
                     *, batch_size: int = 256) -> Callable[[nn.Module], dict[str, float]]:
    """A repair's ``monitor``: ``monitor(model) -> {"test_accuracy": ..., "attack_success": ...}``.

    The test accuracy on ``test_data`` and, with a trigger and a target, the attack success rate
    of that trigger on it. Built by the caller (a test, the bench, the CLI), which holds the
    ground truth; the repair only records what the callable returns.
    """
    def monitor(model: nn.Module) -> dict[str, float]:
        out = {"test_accuracy": clean_accuracy(model, test_data, batch_size=batch_size)}
        if trigger is not None and target is not None:
            out["attack_success"] = attack_success_rate(model, test_data, trigger, target, batch_size=batch_size)
        return out
    return monitor


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterCurve(Result):
    """False-positive and false-negative rates of ``score > threshold`` for each threshold.

    Attributes:
        thresholds: ``(T,)`` increasing.
        fpr: ``(T,)`` share of clean scores above the threshold.
        fnr: ``(T,)`` share of triggered scores at or below the threshold.
    """

    thresholds: torch.Tensor
    fpr: torch.Tensor
    fnr: torch.Tensor

    def fnr_at(self, fpr: float) -> float:
        """The lowest FNR among thresholds whose FPR is at most ``fpr``."""
        ok = self.fpr <= fpr + 1e-12
        return float(self.fnr[ok].min()) if bool(ok.any()) else 1.0


def fpr_fnr_curve(clean_scores: torch.Tensor, triggered_scores: torch.Tensor,
                  thresholds: torch.Tensor | None = None) -> FilterCurve:
    """FPR and FNR of the rule ``score > threshold`` against the threshold.

    Args:
        clean_scores: ``(N,)`` scores of clean inputs (negatives).
        triggered_scores: ``(M,)`` scores of triggered inputs (positives).
        thresholds: ``(T,)``; default every distinct score, plus one below them all.

    Returns:
        :class:`FilterCurve` with ``fpr = mean(clean > t)`` and ``fnr = mean(triggered <= t)``.

    Example:
        >>> c = fpr_fnr_curve(torch.tensor([0., 1., 2.]), torch.tensor([1.5, 3.]), torch.tensor([1., 2.]))
        >>> c.fpr.tolist(), c.fnr.tolist()
        ([0.3333333432674408, 0.0], [0.0, 0.5])
    """
    c = torch.as_tensor(clean_scores, dtype=torch.float64).flatten()
    t = torch.as_tensor(triggered_scores, dtype=torch.float64).flatten()
    if c.numel() == 0 or t.numel() == 0:
        raise DataError("the FPR/FNR curve needs clean and triggered scores")
    if thresholds is None:
        allv = torch.cat([c, t]).unique()
        thresholds = torch.cat([allv[:1] - 1.0, allv])
    th = torch.as_tensor(thresholds, dtype=torch.float64).flatten().sort().values
    fpr = (c[None] > th[:, None]).double().mean(1)
    fnr = (t[None] <= th[:, None]).double().mean(1)
    return FilterCurve(thresholds=th.float(), fpr=fpr.float(), fnr=fnr.float())
