"""Tiny defences of each family, for testing the bench and the report without the real (slow) ones.

They are real, if simple, methods (so the glue is exercised on meaningful numbers), registered only
for the duration of a test through :func:`registered`, so the global registry (and the conformance
tests that run over it) never sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trojanscope._utils.batching import activations, logits
from trojanscope.defenses import DEFENSES, DataSanitizer, InputFilter, ModelDetector, Repair
from trojanscope.defenses.base import RepairResult, SanitizeResult, ScanResult, threshold_for_rate
from trojanscope.training import fine_tune
from trojanscope.triggers import Trigger


class LogitShiftDetector(ModelDetector):
    """Flags labels whose mean logit on clean data of *other* labels is an outlier (z-score)."""

    def __init__(self, *, threshold: float = 2.0) -> None:
        self.threshold = threshold

    def _scan(self, model: nn.Module, clean_data: Any, *, callback: Any) -> ScanResult:
        z = logits(model, clean_data.x)
        k = z.shape[1]
        other = torch.stack([z[clean_data.y != j, j].mean() for j in range(k)])
        score = (other - other.median()) / (other.std() + 1e-8)
        flagged = (score > self.threshold).nonzero().flatten().tolist()
        trig = [Trigger(torch.full(clean_data.image_shape[1:], 0.1 * j / k), torch.ones(clean_data.image_shape))
                for j in range(k)]
        return ScanResult(infected=bool(flagged), flagged_labels=flagged, scores=score.float(),
                          details={"triggers": trig})


class DistanceSanitizer(DataSanitizer):
    """Scores each sample by the distance of its penultimate activation to its label's mean;
    flags the top ``rate`` share."""

    def __init__(self, *, rate: float = 0.1) -> None:
        self.rate = rate

    def _inspect(self, model: nn.Module, dataset: Any, *, trusted: Any) -> SanitizeResult:
        a = activations(model, dataset.x, "penultimate")
        mu = torch.zeros(dataset.num_classes, a.shape[1]).index_add_(0, dataset.y, a)
        mu /= torch.bincount(dataset.y, minlength=dataset.num_classes).clamp(min=1)[:, None]
        s = (a - mu[dataset.y]).norm(dim=1)
        flagged = s > torch.quantile(s, 1 - self.rate)
        return SanitizeResult(scores=s, flagged=flagged)


class ConfidenceFilter(InputFilter):
    """Scores an input by the model's top softmax probability (over-confident inputs are suspicious)."""

    def __init__(self, *, frr: float = 0.05) -> None:
        self.frr = frr

    def _fit(self, model: nn.Module, clean_data: Any, *, scan: Any) -> None:
        self.model_ = model
        self.clean_scores_ = self._score(clean_data.x)
        self.threshold_ = threshold_for_rate(self.clean_scores_, self.frr)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return logits(self.model_, x).softmax(1).max(1).values


class FineTuneRepair(Repair):
    """Fine-tunes a copy of the model on the clean data for ``epochs`` epochs."""

    def __init__(self, *, epochs: int = 1, lr: float = 1e-3) -> None:
        self.epochs = epochs
        self.lr = lr

    def _repair(self, net: nn.Module, clean_data: Any, *, scan: Any, val_data: Any, monitor: Any) -> RepairResult:
        hist = [{"epoch": 0, **(monitor(net) if monitor else {})}]
        for e in range(self.epochs):
            fine_tune(net, clean_data, epochs=1, lr=self.lr, seed=e)
            hist.append({"epoch": e + 1, **(monitor(net) if monitor else {})})
        return RepairResult(model=net, history=hist)


TEST_DEFENSES = {"_t-logit": LogitShiftDetector, "_t-distance": DistanceSanitizer, "_t-confidence": ConfidenceFilter,
                 "_t-finetune": FineTuneRepair}


@contextlib.contextmanager
def registered(names: list[str] | None = None) -> Iterator[list[str]]:
    """Register the test defences (all, or ``names``) for the duration of the block."""
    chosen = {n: c for n, c in TEST_DEFENSES.items() if names is None or n in names}
    for n, c in chosen.items():
        DEFENSES.register(n)(c)
    try:
        yield list(chosen)
    finally:
        for n in chosen:
            DEFENSES._items.pop(n, None)
