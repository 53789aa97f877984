"""MESA's repair: unlearn a backdoor against the whole distribution of valid triggers.

The distribution is :class:`~trojanscope.defenses.model.distribution.TriggerDistribution`; this
module only fine-tunes against its samples.

References:
    Qiao, Yang, Li. "Defending Neural Backdoors via Generative Distribution Modeling".
    NeurIPS 2019. https://arxiv.org/abs/1910.04749
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike
from ..._utils.validation import Interval, Types
from ...data.dataset import ImageDataset
from ...errors import ConfigError
from ...training import train
from ...triggers import stamp
from ..base import Monitor, Repair, RepairResult, ScanUse, register
from ..model.distribution import DistributionReport, TriggerDistribution

log = logging.getLogger("trojanscope.defenses.model.distribution")


@register("distribution-unlearn")
class DistributionUnlearning(Repair):
    """Unlearn a backdoor against the whole distribution of valid triggers (MESA's defence).

    Fits a :class:`TriggerDistribution` for the target, then fine-tunes the model on clean data
    where a share ``rate`` of every batch carries a trigger sampled from the distribution
    (levels with ``beta >= min_beta``) and keeps its true label.

    ``repair(model, clean_data, scan=...)`` takes, as ``scan``: a scan result (the target is its
    first flagged label; with none flagged, the constructor's ``target``, else its most
    suspicious label), or an already fitted :class:`TriggerDistribution` or the
    :class:`DistributionReport` its ``explain`` returned (reused as it is, no refit). Without a
    scan the constructor's ``target`` is used. ``val_data`` and ``monitor`` are not used (no
    stopping rule; the history is the fine-tuning's own, one row per epoch).

    Args:
        target: the target label, when no scan names one.
        n_levels, alpha, trigger_size, transparency, position, steps: the distribution's
            settings (see :class:`TriggerDistribution`).
        min_beta: the lowest staircase level whose triggers are used.
        shift: where the sampled triggers are stamped. None (default): at the places within
            ``trigger_size`` pixels of the located one where they stay valid (their mean attack
            success there exceeds ``min_beta``, :meth:`TriggerDistribution.place_success`), each
            drawn uniformly (the maximum-entropy choice over the valid set; the paper stamps at
            random places). An int: every place within ``shift`` pixels; 0: the located place only.
        rate: share of each fine-tuning batch stamped with a sampled trigger.
        epochs, lr, batch_size: the fine-tuning (Adam).
        seed: seeds the distribution and the fine-tuning (None: fresh entropy).
        device: where to compute.
    """

    uses_scan: ClassVar[ScanUse] = "optional"
    needs_gradients: ClassVar[bool] = True
    places_trigger: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "target": Types((int, type(None))), "min_beta": Interval(float, 0, 1), "shift": Types((int, type(None))),
        "rate": Interval(float, 0, 1, "right"), "epochs": Interval(int, 0, None),
        "lr": Interval(float, 0, None, "neither"), "batch_size": Interval(int, 1, None),
    }

    def __init__(self, *, target: int | None = None, n_levels: int = 10, alpha: float = 0.1, trigger_size: int = 3,
                 transparency: bool = False, position: tuple[int, int] | None = None, steps: int = 400,
                 min_beta: float = 0.5, shift: int | None = None, rate: float = 0.2, epochs: int = 2, lr: float = 1e-3,
                 batch_size: int = 64, seed: int | None = 0, device: DeviceLike = None) -> None:
        self.target = target
        self.n_levels = n_levels
        self.alpha = alpha
        self.trigger_size = trigger_size
        self.transparency = transparency
        self.position = position
        self.steps = steps
        self.min_beta = min_beta
        self.shift = shift
        self.rate = rate
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _repair(self, net: nn.Module, clean_data: ImageDataset, *, scan: Any, val_data: ImageDataset,
                monitor: Monitor | None) -> RepairResult:
        if self.shift is not None and self.shift < 0:
            raise ConfigError(f"shift must be None or an int >= 0, got {self.shift}")
        dist = self._distribution(net, clean_data, scan)
        places, cands, place_asr = self._places(net, clean_data, dist)
        log.info("fine-tuning on %d clean images, %.0f%% of each batch carrying a sampled trigger at one of %d "
                 "places (%d epochs)", len(clean_data), 100 * self.rate, len(places), self.epochs)
        tr = train(net, clean_data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                   device=self.device, batch_transform=_carrier(dist, self.rate, self.min_beta, places),
                   progress="fine-tune")
        details = {"target": int(dist.target_), "position": list(dist.position_), "trigger_size": dist.trigger_size,
                   "betas": dist.betas_.tolist(), "entropies": dist.entropies_.tolist(),
                   "weights": dist.weights_.tolist(), "places": places.tolist(),
                   "place_success": None if place_asr is None else
                   {f"{int(a)},{int(b)}": float(v) for (a, b), v in zip(cands.tolist(), place_asr)}}
        return RepairResult(model=net, history=tr.history, details=details)

    def _distribution(self, net: nn.Module, clean_data: ImageDataset, scan: Any) -> TriggerDistribution:
        """The fitted distribution: the scan's own, or one fitted here for the target."""
        if isinstance(scan, DistributionReport):
            if scan.distribution is None:
                raise ConfigError("this DistributionReport carries no fitted distribution; pass the "
                                  "TriggerDistribution itself")
            scan = scan.distribution
        if isinstance(scan, TriggerDistribution):
            scan._check_fitted()
            return scan
        t = _scan_target(scan, self.target)
        if t is None:
            raise ConfigError("distribution-unlearn needs the target label: from a scan (e.g. Neural Cleanse's "
                              "flagged label) or given by the user")
        dist = TriggerDistribution(n_levels=self.n_levels, alpha=self.alpha, trigger_size=self.trigger_size,
                                   transparency=self.transparency, position=self.position, steps=self.steps,
                                   seed=self.seed, device=self.device)
        dist.explain(net, clean_data, int(t))
        return dist

    def _places(self, net: nn.Module, clean_data: ImageDataset,
                dist: TriggerDistribution) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(places used, places tried, their success or None)`` for the sampled triggers."""
        if self.shift is not None:
            cands = dist.places_within(self.shift)
            return cands, cands, None
        log.info("testing the sampled triggers at the places near %s", tuple(dist.position_))
        cands = dist.places_within(dist.trigger_size)
        place_asr = dist.place_success(net, clean_data, cands, min_beta=self.min_beta, seed=self.seed)
        keep = place_asr > self.min_beta
        keep[0] = True                                              # the located place itself
        return cands[keep], cands, place_asr


def _scan_target(scan: Any, fallback: int | None) -> int | None:
    """The label a scan points at: its suspected target when it names one (the bench's shared
    scan), else its first flagged label, else ``fallback``, else its most suspicious label."""
    if scan is None:
        return fallback
    if hasattr(scan, "suspected_target"):
        return int(scan.suspected_target)
    flagged = list(getattr(scan, "flagged_labels", None) or [])
    if flagged:
        return int(flagged[0])
    if fallback is not None:
        return fallback
    scores = getattr(scan, "scores", None)
    if scores is None:
        raise ConfigError(f"distribution-unlearn cannot take a target from a {type(scan).__name__}")
    return int(torch.as_tensor(scores).argmax())


def _carrier(dist: TriggerDistribution, rate: float, min_beta: float, places: torch.Tensor) -> Any:
    """The fine-tuning's batch transform: stamp a share ``rate`` of the batch with sampled triggers."""

    def carry_triggers(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(round(rate * x.shape[0]))
        if k == 0:
            return x, y
        idx = torch.randperm(x.shape[0], generator=g)[:k]
        st = dist.sample_tensors(k, min_beta=min_beta, places=places, generator=g)
        x = x.clone()
        x[idx] = stamp(x[idx], st.masks[:, None], st.patterns)
        return x, y

    return carry_triggers


__all__ = ["DistributionUnlearning"]
