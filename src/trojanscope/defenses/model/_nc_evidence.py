"""Neural Cleanse's evidence: the MAD outlier test, the attack success of the reversed triggers
and the calibrated trojan probability (pure functions over one scan's per-label figures).

References:
    Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. "Neural Cleanse: Identifying and Mitigating
    Backdoor Attacks in Neural Networks". IEEE S&P 2019. https://doi.org/10.1109/SP.2019.00031
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..._utils.batching import DeviceLike
from ...data.dataset import ImageDataset
from ...errors import DataError
from ...triggers import TriggerBatch, stamped_predictions

#: Consistency constant that makes the MAD estimate the standard deviation of a normal law.
CONSISTENCY_CONSTANT = 1.4826


# --- outlier detection ----------------------------------------------------------------------

def mad_anomaly_index(norms: torch.Tensor | Sequence[float] | np.ndarray) -> torch.Tensor:
    """Anomaly index of each value: ``|norm - median| / (1.4826 * MAD)``.

    The median is numpy's (:func:`numpy.median`: the mean of the two middle values for an even
    count), both for the centre and for the MAD, ``MAD = median(|norm - median(norm)|)``, as in
    the authors' ``mad_outlier_detection.py``. Computed in float64.

    When the MAD is 0 (more than half of the values equal), a value equal to the median gets
    index 0 and any other value an infinite index.

    Args:
        norms: ``(K,)`` the L1 norms of the K reversed masks.

    Returns:
        ``(K,)`` float32 anomaly indices (non-negative). A label is flagged (see
        :func:`flag_outliers`) when its norm is below the median and its index exceeds 2.

    Example:
        >>> [round(v, 3) for v in mad_anomaly_index([1.0, 2.0, 3.0, 4.0, 100.0]).tolist()]
        [1.349, 0.674, 0.0, 0.674, 65.426]
    """
    n = np.asarray(torch.as_tensor(norms, dtype=torch.float64).detach().cpu(), dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise DataError(f"anomaly index needs a non-empty (K,) vector of norms, got shape {n.shape}")
    if not np.isfinite(n).all():
        raise DataError("anomaly index needs finite norms")
    median = np.median(n)
    dev = np.abs(n - median)
    mad = CONSISTENCY_CONSTANT * np.median(dev)
    if mad > 0:
        index = dev / mad
    else:
        index = np.where(dev == 0, 0.0, np.inf)
    return torch.from_numpy(index).float()


def flag_outliers(norms: torch.Tensor | Sequence[float], threshold: float = 2.0) -> torch.Tensor:
    """``(K,)`` bool: the norm is below the median **and** its anomaly index exceeds ``threshold``.

    Example:
        >>> flag_outliers([1.0, 10.0, 10.5, 11.0, 11.5, 12.0]).tolist()  # 1.0: index 8.8
        [True, False, False, False, False, False]
    """
    n = torch.as_tensor(norms, dtype=torch.float64)
    median = float(np.median(n.numpy()))
    return (n < median) & (mad_anomaly_index(n).double() > threshold)


def flag_labels(norms: torch.Tensor | Sequence[float], *, scale: str = "log", threshold: float = 3.0,
                min_ratio: float = 1.5) -> torch.Tensor:
    """``(K,)`` bool: Neural Cleanse's decision rule on the L1 norms of the reversed masks (the
    defaults are :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanse`'s; the paper's
    rule is ``scale="l1", threshold=2.0, min_ratio=1.0``).

    A label is flagged when :func:`flag_outliers` flags its norm on ``scale`` (``"l1"``: the
    norms, the paper; ``"log"``: their logarithms) at ``threshold``, **and** its norm is at least
    ``min_ratio`` times below the median norm. The second condition guards against a tight
    cluster of clean norms: when they agree within a few per cent the MAD is tiny, and a label
    only 1.2x below the median gets a large index.

    Example:
        >>> norms = [2.46, 48.0, 50.0, 52.0, 60.0, 100.0, 110.0, 120.0, 125.0, 131.0]
        >>> flag_labels(norms, scale="l1", threshold=2.0, min_ratio=1.0).nonzero().flatten().tolist()  # index 1.69
        []
        >>> flag_labels(norms).nonzero().flatten().tolist()  # log index 5.3, 32x below the median
        [0]
        >>> tight = [8.0, 9.9, 10.0, 10.0, 10.1, 10.2]  # log index 14.5, but only 1.25x below the median
        >>> flag_labels(tight, min_ratio=1.0).tolist()[0], flag_labels(tight).tolist()[0]
        (True, False)
    """
    n = torch.as_tensor(norms, dtype=torch.float64)
    median = float(np.median(n.numpy()))
    return flag_outliers(outlier_statistic(n, scale), threshold) & (n * float(min_ratio) <= median)


def outlier_statistic(norms: torch.Tensor | Sequence[float], scale: str) -> torch.Tensor:
    """The values the MAD test runs on: the L1 norms (``"l1"``) or their logarithms (``"log"``)."""
    if scale not in ("l1", "log"):
        raise ValueError(f"scale must be 'l1' or 'log', got {scale!r}")
    n = torch.as_tensor(norms, dtype=torch.float64)
    return n.clamp_min(1e-12).log() if scale == "log" else n


# --- the trojan probability ------------------------------------------------------------------

#: The evidence the probability is computed from (see :func:`scan_evidence`).
EVIDENCE = ("log_gap", "log_index", "log_ratio", "holdout_asr")
#: The pair scan's evidence (see :func:`pair_evidence`), with ``NeuralCleanse(pairs=True)``.
PAIR_EVIDENCE = ("pair_log_index", "pair_log_ratio", "pair_row_ratio")

#: Logistic calibration of :func:`trojan_probability` for each label schedule: ``p = sigmoid(
#: intercept + sum(coef[f] * evidence[f]))``. Fitted by ``benchmarks/population.py --calibrate``
#: (logistic regression, C=10, features with a negative coefficient dropped) on two training
#: rounds, 48 models of digits and MNIST (``trojanscope bench round --seed 1`` on each), and
#: checked on held-out rounds (seeds 2 and 3); see ``benchmarks/README.md``. On other data or
#: much larger models, recalibrate with that script. Every coefficient is non-negative, so the
#: probability never falls when the evidence grows.
CALIBRATION: dict[str, dict[str, Any]] = {
    "halving": {"intercept": -1.836,
                "coef": {"log_gap": 2.7613, "log_index": 0.0, "log_ratio": 0.0, "holdout_asr": 0.2576}},
    "all": {"intercept": -1.8588,
            "coef": {"log_gap": 2.694, "log_index": 0.1744, "log_ratio": 0.0, "holdout_asr": 0.2439}},
}


#: The calibration of a population's probability (:func:`trojanscope.population.add_population_probability`):
#: :data:`CALIBRATION`'s evidence plus ``pop_z``, the per-label population normalisation of the norms
#: (:func:`trojanscope.population.population_label_z`), fitted the same way on the same training rounds
#: (``benchmarks/population.py --calibrate runs/digits1 runs/mnist1 --population``, with the
#: per-architecture populations of :data:`~trojanscope.population.MIN_STRUCTURE_POPULATION` models); on the held-out
#: rounds under ``schedule="all"`` it raised ROC-AUC from 0.66 to 0.85 (benchmarks/README.md).
POPULATION_CALIBRATION: dict[str, dict[str, Any]] = {
    "halving": {"intercept": -1.676,
                "coef": {"log_gap": 2.5536, "log_index": 0.1589, "log_ratio": 0.0, "holdout_asr": 0.0, "pop_z": 0.0086}},
    "all": {"intercept": -2.031,
            "coef": {"log_gap": 1.5926, "log_index": 0.012, "log_ratio": 0.0, "holdout_asr": 0.2489, "pop_z": 0.4127}},
    # NeuralCleanse(pairs=True): the K x K pairs normalised the same way (pair_pop_z, and
    # pair_rows_pop_z, the mean over sources of each one's most anomalous pair), fitted by
    # ``--configs all+pairs --calibrate runs/digits1 runs/mnist1 --population``
    "all+pairs": {"intercept": -6.9735,
                  "coef": {"log_gap": 0.0, "log_index": 0.0, "log_ratio": 0.0, "holdout_asr": 0.0,
                           "pair_log_index": 0.0, "pair_log_ratio": 0.0, "pair_row_ratio": 0.0,
                           "pop_z": 0.1283, "pair_pop_z": 0.0, "pair_rows_pop_z": 2.945}},
}


def matched_norms(norms: torch.Tensor, trace: torch.Tensor | None, stop_epochs: torch.Tensor) -> torch.Tensor:
    """Each label's norm as if it had run as long as the smallest-norm label ``k``.

    A label that stopped early (dropped by the schedule, or the early stop) kept a larger mask
    than it would have reached; comparing it with ``k``'s final norm would make ``k`` look
    anomalous in a clean model. Its norm is scaled by ``k``'s own shrink over the epochs it
    missed: ``norm_j * norm_k(final) / norm_k(epoch_j)``, with ``norm_k(e)`` from ``trace``
    (:attr:`ReversedTriggers.norm_trace`). A backdoor target shrinks faster than a clean
    label, so the correction can only make it look *less* anomalous. Without a trace, the
    norms are returned as they are.
    """
    n = torch.as_tensor(norms, dtype=torch.float64).clone()
    if trace is None or trace.numel() == 0:
        return n
    k = int(torch.argmin(n))
    tk = trace[:, k]
    last = float(tk[-1]) if math.isfinite(float(tk[-1])) else float(n[k])
    for j in range(n.numel()):
        e = int(stop_epochs[j]) - 1
        if j == k or e < 0 or e >= trace.shape[0] - 1:
            continue
        at = float(tk[e])
        if math.isfinite(at) and at > 0 and last > 0:
            n[j] = n[j] * min(1.0, last / at)
    return n


def scan_evidence(norms: torch.Tensor | Sequence[float], holdout_asr: torch.Tensor | Sequence[float],
                  raw_norms: torch.Tensor | Sequence[float] | None = None) -> dict[str, Any]:
    """The evidence of a backdoor in one scan's per-label results.

    * ``log_gap``: ``log(second smallest / smallest)`` of the ``raw_norms`` (default: ``norms``),
      the smallest trigger against the runner-up. Some labels are naturally easy to reach (on
      digits, 2 and 4 take a trigger about 3x smaller than the others in every clean model), so
      a clean model's smallest norm is often far below the median but close to the runner-up,
      while a backdoor target is far below both. Under the halving schedule the two are the
      last labels kept, which ran the same budget;

    * ``log_index``: the anomaly index (:func:`mad_anomaly_index`) of the smallest norm on the
      log scale, i.e. of norm *ratios*, which the spread of the clean labels' norms inflates
      far less than the L1 scale (a single-pixel trigger 20x below every other label gets a
      large index even when the clean norms spread from 48 to 131); 0 when the smallest
      norm is the median;
    * ``log_ratio``: ``log(median norm / smallest norm)``;
    * ``holdout_asr``: the smallest-norm label's reversed trigger's attack success on held-out
      clean images (its transfer to images it was not optimised on);
    * ``label``: the smallest-norm label.
    """
    n = torch.as_tensor(norms, dtype=torch.float64).clamp_min(1e-6)
    logn = n.log()
    k = int(torch.argmin(n))
    med = float(np.median(logn.numpy()))
    idx = float(mad_anomaly_index(logn)[k])
    if not math.isfinite(idx):
        idx = 50.0
    raw = (torch.as_tensor(raw_norms, dtype=torch.float64) if raw_norms is not None else n).clamp_min(1e-6)
    two = torch.sort(raw).values
    gap = float((two[1] / two[0]).log()) if two.numel() > 1 else 0.0
    return {"label": k, "log_gap": gap, "log_index": min(idx, 50.0) if float(logn[k]) < med else 0.0,
            "log_ratio": max(0.0, med - float(logn[k])),
            "holdout_asr": float(torch.as_tensor(holdout_asr, dtype=torch.float64)[k])}


def pair_evidence(pair_norms: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """The evidence of a source-specific or all-to-all backdoor in a pair scan's norms.

    ``pair_norms[s, t]`` is the norm of the smallest trigger sending the clean images of label
    ``s`` to ``t`` (:func:`~trojanscope.defenses.model._nc_optimise.reverse_pairs`), NaN on the
    diagonal and for pairs not run. Everything is computed on ``log n`` of the finite
    off-diagonal norms ``n`` (clamped to at least 1e-6), i.e. on norm ratios, as
    :func:`scan_evidence`'s ``log_index``:

    * ``pair_log_index``: the anomaly index (:func:`mad_anomaly_index`) of the smallest pair's
      log norm among all pairs' (the largest on the low side), 0 when it is not below the
      median, at most 50 (also when the MAD is 0);
    * ``pair_source``, ``pair_target``: the smallest pair ``(s, t)`` (the first in row-major
      order on a tie);
    * ``pair_log_ratio``: ``log(median pair norm / smallest pair norm)`` (>= 0);
    * ``pair_row_ratio``: ``max_s log(median_t n[s, t] / min_t n[s, t])``, each source's
      smallest pair against that source's own median (a source whose images are easy to move
      anywhere lowers all its pairs alike and does not count), and ``pair_row_source`` the
      source ``s`` reaching it. The medians are numpy's of the log norms.

    Example:
        >>> n = torch.full((3, 3), 8.0).fill_diagonal_(float("nan"))
        >>> n[1, 2] = 1.0
        >>> ev = pair_evidence(n)
        >>> (ev["pair_source"], ev["pair_target"], ev["pair_log_index"])  # 5 of 6 pairs equal: MAD 0
        (1, 2, 50.0)
        >>> round(ev["pair_log_ratio"], 4), round(ev["pair_row_ratio"], 4)  # log 8, log(sqrt(8) / 1)
        (2.0794, 1.0397)
    """
    n = torch.as_tensor(pair_norms, dtype=torch.float64).detach().cpu()
    if n.ndim != 2 or n.shape[0] != n.shape[1] or n.shape[0] < 2:
        raise DataError(f"pair evidence needs a (K, K) matrix of pair norms, got shape {tuple(n.shape)}")
    k = n.shape[0]
    ok = torch.isfinite(n) & ~torch.eye(k, dtype=torch.bool)
    if not bool(ok.any()):
        raise DataError("pair evidence needs at least one finite off-diagonal pair norm")
    logn = torch.where(ok, n.clamp_min(1e-6).log(), torch.tensor(math.inf, dtype=torch.float64))
    flat = logn[ok]
    j = int(torch.argmin(logn.flatten()))
    s, t = divmod(j, k)
    low = float(logn[s, t])
    med = float(np.median(flat.numpy()))
    idx = float(mad_anomaly_index(flat)[int(torch.argmin(flat))])
    if not math.isfinite(idx):
        idx = 50.0
    rows = [(float(np.median(logn[r][ok[r]].numpy())) - float(logn[r][ok[r]].min()), r)
            for r in range(k) if bool(ok[r].any())]
    row_ratio, row_source = max(rows, key=lambda v: (v[0], -v[1]))
    return {"pair_log_index": min(idx, 50.0) if low < med else 0.0, "pair_source": s, "pair_target": t,
            "pair_log_ratio": max(0.0, med - low), "pair_row_ratio": max(0.0, row_ratio),
            "pair_row_source": row_source}


def trojan_probability(evidence: dict[str, float], calibration: dict[str, Any]) -> float:
    """``sigmoid(intercept + sum_f coef[f] * evidence[f])``, in [0, 1]; non-decreasing in each
    piece of evidence whose coefficient is non-negative (all of :data:`CALIBRATION`'s are)."""
    z = float(calibration["intercept"]) + sum(float(c) * float(evidence[f]) for f, c in calibration["coef"].items())
    return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0


def per_source_attack_success(model: nn.Module, masks: torch.Tensor, patterns: torch.Tensor, data: ImageDataset,
                              num_classes: int, *, targets: torch.Tensor | Sequence[int] | None = None,
                              batch_size: int = 4096, device: DeviceLike = None) -> torch.Tensor:
    """``(J, K)`` share of ``data``'s inputs of each true label sent to each trigger's label.

    Trigger ``j`` (mask ``masks[j]``, pattern ``patterns[j]``) targets label ``targets[j]``
    (default: ``j``). Entry ``[j, s]`` is the share of inputs of true label ``s`` stamped with
    trigger ``j`` that the model classifies as ``targets[j]``; NaN where ``data`` holds no input of
    label ``s`` and where ``s`` is the trigger's own target. All triggers are applied in one
    batched pass (chunked by ``batch_size``).
    """
    jn = masks.shape[0]
    tgt = torch.arange(jn) if targets is None else torch.as_tensor(targets, dtype=torch.long)
    batch = TriggerBatch(masks, patterns, tgt)
    hits = stamped_predictions(model, data.x, batch, batch_size=batch_size, device=device) == tgt[:, None]
    onehot = F.one_hot(data.y, num_classes).double()                    # (N, K)
    counts = onehot.sum(0)                                              # (K,)
    rate = (hits.double() @ onehot) / counts.clamp_min(1)               # (J, K)
    rate[:, counts == 0] = float("nan")
    rate[torch.arange(jn), tgt] = float("nan")
    return rate.float()


def overall_attack_success(per_source: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(J,)`` attack success over all inputs of other labels, from the per-source rates."""
    counts = torch.bincount(y, minlength=num_classes).double()
    r = per_source.double()
    ok = ~torch.isnan(r)
    w = counts[None].expand_as(r) * ok
    return ((torch.nan_to_num(r) * w).sum(1) / w.sum(1).clamp_min(1)).float()


def signed_anomaly_index(norms: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``(K,)`` float32 :func:`mad_anomaly_index`, positive for values below the median (the
    suspicious side: a smaller trigger) and negative above it, so higher means more suspicious."""
    n = torch.as_tensor(norms, dtype=torch.float64)
    index = mad_anomaly_index(n).double()
    median = float(np.median(n.numpy()))
    return torch.where(n < median, index, -index).float()
