"""Neural Cleanse's input filter: reject inputs that light up the reversed trigger's neurons.

The neurons of a layer (the penultimate one by default) that the reverse-engineered trigger
activates most, compared with clean inputs, form a profile; an input's score is its mean
activation on them. The threshold is calibrated on clean data for a chosen false-positive rate.

References:
    Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
    Networks", IEEE S&P 2019, Section VI-B ("Filter for Detecting Adversarial Inputs").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike, activations
from ..._utils.results import Result
from ..._utils.validation import Interval, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError
from ...triggers import Trigger
from ..base import InputFilter, register, threshold_for_rate

TriggerArg = Trigger | Sequence[Trigger] | Any | None


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


def _as_triggers(trigger: Any) -> list[Trigger]:
    """A trigger, a list of them or a Neural Cleanse result (its flagged labels' triggers,
    or the most anomalous label's when none is flagged)."""
    if trigger is None:
        return []
    if isinstance(trigger, Trigger):
        return [trigger]
    if hasattr(trigger, "triggers") and hasattr(trigger, "flagged_labels"):
        labels = list(trigger.flagged_labels) or [int(torch.as_tensor(trigger.scores).argmax())]
        return [trigger.triggers[k] for k in labels]
    if isinstance(trigger, dict):
        trigger = list(trigger.values())
    if isinstance(trigger, Sequence) and trigger and all(isinstance(t, Trigger) for t in trigger):
        return list(trigger)
    raise ConfigError("trigger must be a Trigger, a list of triggers, a {label: Trigger} dict or a Neural Cleanse "
                      f"result; got {type(trigger).__name__}")


@register("activation-filter")
class ActivationFilter(InputFilter):
    """Neural Cleanse's neuron-activation filter for triggered inputs.

    ``fit`` stamps the clean data with the reverse-engineered trigger(s), ranks the neurons of
    ``layer`` by their mean activation gap (triggered minus clean), keeps the top ``top_ratio``
    as the profile and sets ``threshold_`` so that a share ``fpr`` of the clean scores lies
    above it. ``score(x)`` is the mean activation of ``x`` on the profile (higher = more
    suspicious).

    Which trigger: the filter never sees the attacker's trigger. Pass the reversed one as
    ``trigger`` (a :class:`Trigger`, a list, a ``{label: Trigger}`` dict or a
    :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanseResult`, whose flagged
    labels' triggers are used); when it is None, ``fit`` runs a Neural Cleanse scan (default
    settings, this filter's ``seed`` and ``device``) on the clean data and uses the flagged
    labels' triggers, or the most anomalous label's when none is flagged. ``scan_`` keeps that
    scan.

    Args:
        trigger: the reversed trigger(s), or None to run the scan in ``fit``.
        top_ratio: share of the layer's neurons in the profile (paper: top 1%).
        fpr: target false-positive rate on clean data (paper: 5%).
        layer: ``"penultimate"`` (paper: second-to-last layer), ``"last_conv"`` or a name.
        batch_size: memory knob.
        seed: seed of the scan run when ``trigger`` is None.
        device: where to compute (default: the model's).

    References:
        Wang et al., IEEE S&P 2019, Section VI-B.
    """

    needs_hooks: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "top_ratio": Interval(float, 0.0, 1.0, "right"),
        "fpr": Interval(float, 0.0, 1.0, "left"),
        "layer": Types((str,)),
        "batch_size": Interval(int, 1),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, trigger: TriggerArg = None, top_ratio: float = 0.01, fpr: float = 0.05,
                 layer: str = "penultimate", batch_size: int = 256, seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.trigger = trigger
        self.top_ratio = top_ratio
        self.fpr = fpr
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _fit(self, model: nn.Module, clean_data: ImageDataset) -> None:
        if not isinstance(clean_data, ImageDataset):
            raise DataError(f"clean_data must be an ImageDataset, got {type(clean_data).__name__}")
        triggers = _as_triggers(self.trigger)
        if not triggers:
            from ..model.neural_cleanse import NeuralCleanse

            self.scan_ = NeuralCleanse(seed=self.seed, device=self.device).scan(model, clean_data)
            triggers = _as_triggers(self.scan_)
        x = clean_data.x
        for t in triggers:
            if t.shape != clean_data.image_shape:
                raise DataError(f"trigger of shape {t.shape} does not fit images of shape {clean_data.image_shape}")
        clean_acts = activations(model, x, self.layer, batch_size=self.batch_size, device=self.device)
        trig_mean = torch.stack([
            activations(model, t.apply(x), self.layer, batch_size=self.batch_size, device=self.device).mean(0)
            for t in triggers]).mean(0)
        gap = trig_mean - clean_acts.mean(0)
        d = gap.numel()
        n_top = max(1, math.ceil(self.top_ratio * d - 1e-9))
        self.model_ = model
        self.triggers_ = triggers
        self.gap_ = gap
        self.neurons_ = gap.topk(n_top).indices.sort().values
        self.clean_scores_ = clean_acts[:, self.neurons_].mean(1)
        self.threshold_ = threshold_for_rate(self.clean_scores_, self.fpr)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x, name="inputs")
        acts = activations(self.model_, x, self.layer, batch_size=self.batch_size, device=self.device)
        return acts[:, self.neurons_].mean(1)

    def curve(self, triggered_x: torch.Tensor, clean_x: torch.Tensor | None = None) -> FilterCurve:
        """FPR / FNR against the threshold, for triggered inputs and clean ones (default: the
        fitting data's scores)."""
        clean = self.clean_scores_ if clean_x is None else self.score(clean_x)
        return fpr_fnr_curve(clean, self.score(triggered_x))
