"""The provider's scan: one model detector's finding on a model, shared with the defences of the
same column that build on a scan (repairs and filters that take ``scan=``, explainers that need a
suspected target), instead of each running its own.

:func:`mask_box` (where a reversed mask sits) stays here, beside its user :class:`SharedScan`,
rather than in :mod:`trojanscope.triggers`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ..defenses import DEFENSES
from ..errors import DataError
from ..triggers import Trigger
from .spec import CHAIN, DefenseSpec

log = logging.getLogger(__name__)

#: The model detector whose scan other defences may build on (a chain): the repairs and filters
#: that take reversed ``triggers`` / a ``trigger``, and the explainers that need a suspected
#: ``target``, get this detector's scan of the same model instead of running their own.
SCAN_PROVIDER = "neural-cleanse"


def _window_sums(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """``(sums, largest)``: the sum of ``mask`` (H, W) in every ``size x size`` window."""
    sums = torch.nn.functional.avg_pool2d(mask.double()[None, None], size, stride=1)[0, 0] * size * size
    return sums, float(sums.max())


def mask_box(mask: torch.Tensor, size: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the ``size x size`` window with the largest sum of ``mask`` (H, W)."""
    h, w = mask.shape
    sums, _ = _window_sums(mask, max(1, min(int(size), h, w)))
    r, c = divmod(int(sums.flatten().argmax()), sums.shape[1])
    return r, c


@dataclasses.dataclass(frozen=True)
class SharedScan:
    """The provider's scan of one model, as the defences that build on it read it (duck-typed
    like a Neural Cleanse result: ``flagged_labels``, ``scores``, ``triggers``)."""

    flagged_labels: list[int]
    scores: torch.Tensor
    triggers: list[Trigger]
    infected: bool = False
    #: the provider's own result, when the scan came from one (what ``scan=`` of a repair takes)
    result: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def suspected_target(self) -> int:
        """The first flagged label, else the most anomalous one."""
        return int(self.flagged_labels[0]) if self.flagged_labels else int(self.scores.argmax())

    def suspected_size(self, share: float = 0.8) -> int | None:
        """Side of the smallest square window holding ``share`` of the suspected target's reversed
        mask (the scan's guess at the trigger's size), or None when no window up to half the
        image side does (a trigger spread over the image, e.g. a blend)."""
        mask = self.triggers[self.suspected_target].mask.double()
        total = float(mask.sum())
        if total <= 0:
            return None
        for size in range(1, min(mask.shape) // 2 + 1):
            _, best = _window_sums(mask, size)
            if best >= share * total:
                return size
        return None

    def suspected_position(self, size: int) -> tuple[int, int]:
        """Top-left ``(row, col)`` of the ``size x size`` box holding most of the suspected
        target's reversed mask: where the scan saw the trigger."""
        return mask_box(self.triggers[self.suspected_target].mask, size)

    @classmethod
    def from_result(cls, result: Any) -> "SharedScan":
        """The shared view of a Neural Cleanse result (every label's reversed trigger)."""
        return cls([int(v) for v in result.flagged_labels], result.scores.float(), list(result.triggers),
                   bool(result.infected), result)

    @classmethod
    def load(cls, directory: str | Path) -> "SharedScan":
        """A scan written by :meth:`NeuralCleanseResult.save` (``scan --out``, the bench's provider cells)."""
        from ..defenses.model.neural_cleanse import NeuralCleanseResult

        return cls.from_result(NeuralCleanseResult.load(directory))


def stored_scan(directory: Path) -> SharedScan | None:
    """The provider's stored scan of a reused cell, or None (not there, or unreadable: the
    defences that build on it then fail in their own cells, as for a failed scan)."""
    if not (directory / "scan.json").is_file():
        return None
    try:
        return SharedScan.load(directory)
    except DataError as e:
        log.warning("cannot read the stored scan %s: %s", directory, e)
        return None


def consumes_scan(spec: DefenseSpec) -> bool:
    """True when the defence of ``spec`` builds on the provider's scan (see :data:`SCAN_PROVIDER`):
    an explainer (it explains the label the scan suspects), a defence whose ``uses_scan`` is
    ``"required"``, or ``"optional"`` unless the config sets its own ``target``."""
    if spec.defense in (SCAN_PROVIDER, CHAIN):
        return False
    cls = DEFENSES.get(spec.defense)
    if cls.family == "explain" or cls.uses_scan == "required":
        return True
    return cls.uses_scan == "optional" and spec.params.get("target") is None
