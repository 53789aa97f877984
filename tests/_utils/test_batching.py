"""activations(): a layer that never runs is an error about the model, not a crash."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trojanscope._utils.batching import activations
from trojanscope.errors import UnsupportedModelError


class _Skips(nn.Module):
    """A model whose ``unused`` block is registered but not called (as the containers of a
    received graph whose forward calls the layers inside them directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Sequential(nn.Linear(4, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_layer_that_does_not_run_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="did not run"):
        activations(_Skips(), torch.zeros(3, 1, 2, 2), "unused")


def test_a_layer_that_runs_gives_one_row_per_input():
    assert activations(_Skips(), torch.zeros(5, 1, 2, 2), "fc", batch_size=2).shape == (5, 2)
