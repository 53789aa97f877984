"""What a defence may be given as ``scan=`` when it works from reversed triggers.

One reading for every such defence (the Neural Cleanse repairs, the activation filter): a model
scan result that carries reversed triggers (its flagged labels' triggers), a ``{label: Trigger}``
dict, a list of triggers or one :class:`~trojanscope.triggers.Trigger`. These are the defender's
own findings, never the attack's trigger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils.batching import DeviceLike
from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..triggers import Trigger, stamped_predictions


def resolve_triggers(scan: Any, *, most_anomalous: bool = False) -> list[tuple[int | None, Trigger]]:
    """The reversed triggers in ``scan``, as ``(label, trigger)`` pairs (label None for a bare trigger).

    Args:
        scan: a scan result with ``triggers`` and ``flagged_labels`` (e.g. a Neural Cleanse
            result), a ``{label: Trigger}`` dict, a sequence of triggers or one trigger.
        most_anomalous: for a scan result that flagged no label, take the most anomalous label's
            trigger (the highest ``scores``) rather than none.
    """
    if hasattr(scan, "flagged_labels") and hasattr(scan, "triggers"):
        labels = [int(k) for k in scan.flagged_labels]
        if not labels and most_anomalous:
            labels = [int(torch.as_tensor(scan.scores).argmax())]
        return [(k, scan.triggers[k]) for k in labels]
    if isinstance(scan, Trigger):
        return [(None, scan)]
    if isinstance(scan, Mapping):
        for k, t in scan.items():
            if not isinstance(t, Trigger):
                raise ConfigError(f"triggers[{k!r}] must be a Trigger, got {type(t).__name__}")
        return [(int(k), t) for k, t in scan.items()]
    if isinstance(scan, Sequence) and not isinstance(scan, str) and all(isinstance(t, Trigger) for t in scan):
        return [(None, t) for t in scan]
    raise ConfigError("scan must be a scan result with reversed triggers (Neural Cleanse), a {label: Trigger} dict, "
                      f"a list of triggers or a Trigger; got {type(scan).__name__}")


def label_triggers(model: nn.Module, clean_data: ImageDataset, pairs: list[tuple[int | None, Trigger]], *,
                   batch_size: int = 256, device: DeviceLike = None) -> dict[int, Trigger]:
    """``{target label: Trigger}``; a bare trigger's label is the one ``model`` gives most often to
    ``clean_data`` stamped with it."""
    out: dict[int, Trigger] = {}
    for k, t in pairs:
        if k is None:
            pred = stamped_predictions(model, clean_data.x, t, batch_size=batch_size, device=device)[0]
            k = int(torch.bincount(pred).argmax())
        out[int(k)] = t
    return out
