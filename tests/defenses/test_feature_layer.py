"""The sanitisers' ``layer="auto"``: the feature map a global average pooling turns into the
penultimate representation, when the model has one (``resolve_feature_layer``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trojanscope._utils.batching import activations
from trojanscope.defenses import ActivationClustering, SpectralSignatures
from trojanscope.defenses.data._common import last_stage_input, resolve_feature_layer
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


def test_a_1x1_pool_input_moves_auto_to_the_map_before_the_last_stage():
    """resnet18 on 8x8 images pools a 1x1 map: "auto" reads the input of the last stage's first
    convolution, which is the previous stage's output (a 2x2 map); on 32x32 images it keeps the
    pooled 4x4 map."""
    from trojanscope.models import create_model

    net = create_model("resnet18", input_shape=(1, 8, 8), num_classes=10, seed=0, width=4).eval()
    x = torch.rand(4, 1, 8, 8)
    assert activations(net, x, "pool_input", flatten=False).shape[2:] == (1, 1)
    layer = resolve_feature_layer(net, x, "auto", device=None)
    assert layer == "layer4.0.conv1:input"
    torch.testing.assert_close(activations(net, x, layer, flatten=False), activations(net, x, "layer3", flatten=False))
    assert activations(net, x, layer, flatten=False).shape[2:] == (2, 2)
    big = create_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0, width=4).eval()
    assert resolve_feature_layer(big, torch.rand(2, 3, 32, 32), "auto", device=None) == "pool_input"


def test_a_dense_head_on_a_1x1_map_moves_auto_to_the_map_before_the_last_stage():
    """gtsrb_cnn on 8x8 images flattens a 1x1 map (its third max-pool) into its dense head: "auto"
    reads the input of the last stage's first convolution, the second pool's 2x2 output. On 16x16
    and 32x32 images it flattens a larger map and keeps the penultimate layer; so does mnist_cnn."""
    from trojanscope.models import create_model

    net = create_model("gtsrb_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0).eval()
    x = torch.rand(4, 1, 8, 8)
    layer = resolve_feature_layer(net, x, "auto", device=None)
    assert layer == "features.conv5:input"
    fmap = activations(net, x, layer, flatten=False)
    assert fmap.shape == (4, 64, 2, 2)
    torch.testing.assert_close(fmap, activations(net, x, "features.pool2", flatten=False))
    for arch, shape in [("gtsrb_cnn", (3, 16, 16)), ("gtsrb_cnn", (3, 32, 32)), ("mnist_cnn", (1, 28, 28))]:
        m = create_model(arch, input_shape=shape, num_classes=10, seed=0).eval()
        assert resolve_feature_layer(m, torch.rand(2, *shape), "auto", device=None) == "penultimate"


def test_last_stage_input_by_hand():
    """``(name, input H*W, output H*W, channels)`` in run order: the first convolution that
    returns the last one's size, unless it reads the image or a 1x1 map."""
    gtsrb_8x8 = [("c1", 64, 64, 32), ("c2", 64, 64, 32), ("c3", 16, 16, 64), ("c4", 16, 16, 64),
                 ("c5", 4, 4, 128), ("c6", 4, 4, 128)]
    assert last_stage_input(gtsrb_8x8) == "c5"
    resnet_8x8 = [("stem", 64, 64, 8), ("l3.conv1", 16, 4, 32), ("l3.conv2", 4, 4, 32), ("l4.conv1", 4, 1, 64),
                  ("l4.conv2", 1, 1, 64), ("l4.shortcut", 4, 1, 64)]
    assert last_stage_input(resnet_8x8) == "l4.conv1"
    assert last_stage_input([("only", 64, 1, 4)]) is None  # the image's convolution
    assert last_stage_input([("c1", 16, 4, 8), ("c2", 1, 1, 8)]) is None  # reads 1x1
    assert last_stage_input([]) is None


def test_an_explicit_layer_is_kept_and_pool_input_needs_a_pooling():
    assert resolve_feature_layer(gap_net(), X, "penultimate", device=None) == "penultimate"
    assert resolve_feature_layer(gap_net(), X, "0", device=None) == "0"
    with pytest.raises(UnsupportedModelError):
        activations(flat_net(), X, "pool_input")


@pytest.mark.parametrize("cls", [ActivationClustering, SpectralSignatures])
def test_sanitisers_default_to_auto(cls):
    assert cls().layer == "auto"
