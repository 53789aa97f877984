"""Fixtures shared by the defence tests."""

from __future__ import annotations

import pytest

import trojanscope as ts
from trojanscope.defenses import NeuralCleanse

from _models import CORNER_TARGET, NC_FAST, CornerPatchNet


@pytest.fixture(scope="session")
def setup(digits):
    """A CornerPatchNet with its backdoor to ``CORNER_TARGET``, its Neural Cleanse scan (which must
    flag that label) and, for scoring only, the true trigger."""
    tr = digits["train"]
    planted = CornerPatchNet(tr.x, tr.y, 10, target=CORNER_TARGET)
    scan = NeuralCleanse(**NC_FAST).scan(planted, digits["val"])
    assert scan.flagged_labels == [CORNER_TARGET]
    trigger = ts.Trigger.square(tr.image_shape, 2, "white", "bottom-right", margin=0)  # ground truth: metrics only
    return planted, scan, trigger
