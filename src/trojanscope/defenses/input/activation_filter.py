"""Neural Cleanse's input filter: reject inputs that light up the reversed trigger's neurons.

The neurons of a layer (the penultimate one by default) that the reverse-engineered trigger
activates most, compared with clean inputs, form a profile; an input's score is its mean
activation on them. The threshold is calibrated on clean data for a chosen false-rejection rate.

References:
    Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
    Networks", IEEE S&P 2019, Section VI-B ("Filter for Detecting Adversarial Inputs").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike, activations
from ..._utils.validation import Interval, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError
from ...triggers import Trigger
from .._triggers import resolve_triggers
from ..base import InputFilter, ScanUse, register, threshold_for_rate

def _as_triggers(scan: Any) -> list[Trigger]:
    """The reversed triggers in ``scan`` (:func:`~trojanscope.defenses._triggers.resolve_triggers`;
    for a scan that flagged no label, the most anomalous label's)."""
    triggers = [t for _, t in resolve_triggers(scan, most_anomalous=True)]
    if not triggers:
        raise ConfigError("scan= holds no reversed trigger")
    return triggers


@register("activation-filter")
class ActivationFilter(InputFilter):
    """Neural Cleanse's neuron-activation filter for triggered inputs.

    ``fit`` stamps the clean data with the reverse-engineered trigger(s), ranks the neurons of
    ``layer`` by their mean activation gap (triggered minus clean), keeps the top ``top_ratio``
    as the profile and sets ``threshold_`` so that a share ``frr`` of the clean scores lies
    above it. ``score(x)`` is the mean activation of ``x`` on the profile (higher = more
    suspicious).

    Which trigger: the filter never sees the attacker's trigger. Pass the reversed one as
    ``fit(..., scan=...)`` (a :class:`Trigger`, a list, a ``{label: Trigger}`` dict or a
    :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanseResult`, whose flagged
    labels' triggers are used, or the most anomalous label's when none is flagged); when it is
    None, ``fit`` runs a Neural Cleanse scan (default settings, this filter's ``seed`` and
    ``device``) on the clean data. ``scan_`` keeps that scan.

    Args:
        top_ratio: share of the layer's neurons in the profile (paper: top 1%).
        frr: target false-rejection rate on clean data (the share of clean inputs flagged;
            paper: 5%).
        layer: ``"penultimate"`` (paper: second-to-last layer), ``"last_conv"`` or a name.
        batch_size: memory knob.
        seed: seed of the scan run when ``scan`` is None.
        device: where to compute (default: the model's).

    References:
        Wang et al., IEEE S&P 2019, Section VI-B.
    """

    uses_scan: ClassVar[ScanUse] = "optional"
    needs_hooks: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "top_ratio": Interval(float, 0.0, 1.0, "right"),
        "frr": Interval(float, 0.0, 1.0, "left"),
        "layer": Types((str,)),
        "batch_size": Interval(int, 1),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, top_ratio: float = 0.01, frr: float = 0.05, layer: str = "penultimate",
                 batch_size: int = 256, seed: int | None = 0, device: DeviceLike = None) -> None:
        self.top_ratio = top_ratio
        self.frr = frr
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _fit(self, model: nn.Module, clean_data: ImageDataset, *, scan: Any) -> None:
        if scan is None:
            from ..model.neural_cleanse import NeuralCleanse

            self.scan_ = NeuralCleanse(seed=self.seed, device=self.device).scan(model, clean_data)
            scan = self.scan_
        triggers = _as_triggers(scan)
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
        self.threshold_ = threshold_for_rate(self.clean_scores_, self.frr)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x, name="inputs")
        acts = activations(self.model_, x, self.layer, batch_size=self.batch_size, device=self.device)
        return acts[:, self.neurons_].mean(1)

