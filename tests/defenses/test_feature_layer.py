"""The sanitisers' ``layer="auto"``: the feature map a global average pooling turns into the
penultimate representation, when the model has one (``resolve_feature_layer``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trojanscope._utils.batching import activations
from trojanscope.defenses import ActivationClustering, SpectralSignatures
from trojanscope.defenses.data._common import resolve_feature_layer
from trojanscope.errors import UnsupportedModelError


def gap_net(hidden: bool = False, size: int = 8) -> nn.Module:
    """conv -> ReLU -> global average pooling -> [dense -> ReLU] -> dense."""
    torch.manual_seed(0)
    head = [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)] if hidden else [nn.Linear(4, 3)]
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, stride=1 if size > 1 else 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), *head)


def flat_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))


X = torch.rand(5, 1, 8, 8)


def test_auto_reads_the_map_a_global_pooling_averages():
    net = gap_net()
    assert resolve_feature_layer(net, X, "auto", device=None) == "pool_input"
    fmap = activations(net, X, "pool_input", flatten=False)
    assert fmap.shape == (5, 4, 8, 8)
    # the penultimate representation is that map's spatial mean: what "averages" means
    torch.testing.assert_close(fmap.mean((2, 3)), activations(net, X, "penultimate"))


@pytest.mark.parametrize("net", [gap_net(hidden=True), gap_net(size=1), flat_net()],
                         ids=["pool-then-hidden-layer", "1x1-map", "no-pooling"])
def test_auto_keeps_the_penultimate_layer_otherwise(net):
    assert resolve_feature_layer(net, X, "auto", device=None) == "penultimate"


def test_an_explicit_layer_is_kept_and_pool_input_needs_a_pooling():
    assert resolve_feature_layer(gap_net(), X, "penultimate", device=None) == "penultimate"
    assert resolve_feature_layer(gap_net(), X, "0", device=None) == "0"
    with pytest.raises(UnsupportedModelError):
        activations(flat_net(), X, "pool_input")


@pytest.mark.parametrize("cls", [ActivationClustering, SpectralSignatures])
def test_sanitisers_default_to_auto(cls):
    assert cls().layer == "auto"
