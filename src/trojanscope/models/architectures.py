"""Small image classifiers with stable, named layers.

Each architecture is registered by name; ``create_model(name, input_shape=..., num_classes=...)``
builds it. Layers have fixed names so defences can ask for them: every model's last hidden
representation is the input of its last ``nn.Linear`` (``"penultimate"``) and ``"last_conv"`` is
its last ``nn.Conv2d``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._utils.registry import Registry
from ..errors import ConfigError

MODELS: Registry[Callable[..., nn.Module]] = Registry("architecture")
register_model = MODELS.register


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return MODELS.names()


def create_model(name: str, *, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 seed: int | None = 0, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` for inputs ``(C, H, W)`` and ``num_classes`` outputs.

    The weights are initialised from ``seed`` (the global RNG state is left as it was).
    """
    factory = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        return factory(input_shape=tuple(input_shape), num_classes=int(num_classes), **kwargs)


def _flat_dim(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


def he_init(module: nn.Module) -> None:
    """He-uniform weights and zero biases for every convolution and linear layer of ``module``,
    Glorot-uniform weights for its last linear layer (the output layer), in place."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    last = next((m for m in reversed(layers) if isinstance(m, nn.Linear)), None)
    with torch.no_grad():
        for m in layers:
            if m is last:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_model("mnist_cnn")
class MNISTCNN(nn.Module):
    """2 convolutions + 2 dense layers (the Neural Cleanse / BadNets MNIST model).

    conv1 (16, 5x5) - relu1 - pool1 - conv2 (32, 5x5) - relu2 - pool2 - fc1 (``hidden``) - relu3 - fc2.
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 hidden: int = 512) -> None:
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, 16, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        d = _flat_dim(self.forward_features_conv, input_shape)
        self.fc1 = nn.Linear(d, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward_features_conv(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool2(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flatten(self.forward_features_conv(x))
        return self.fc2(self.relu3(self.fc1(h)))


@register_model("gtsrb_cnn")
class GTSRBCNN(nn.Module):
    """6 convolutions + 2 dense layers (the Neural Cleanse GTSRB model, 32x32x3 inputs).

    Three stages of two 3x3 convolutions (32, 64, 128 channels), each followed by a 2x2 max-pool,
    then ``fc1`` (``hidden``) and ``fc2``. On inputs too small for three pools, a pool is left out
    once the map is 1 pixel wide.

    The weights start as the paper's Keras model did (``init="glorot"``): Glorot-uniform kernels
    and zero biases. With PyTorch's default initialisation this plain 8-layer ReLU stack (no
    normalisation) sits at chance on a 43-label set: its logits start near zero and the loss does
    not move. Glorot is still at the edge: Glorot keeps a linear layer's variance, and each ReLU
    halves it, so the logits start about 2^7 smaller than the input; on cmnist's 3,600 clean
    training images Adam left it at loss ln 10 for 3 epochs in 5 of 6 seeded runs. ``init="he"``
    (He-uniform for the ReLU layers, Glorot for the output layer) left chance in all 3 runs.
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 43,
                 hidden: int = 512, init: str = "glorot") -> None:
        super().__init__()
        if init not in ("glorot", "he"):
            raise ConfigError(f"gtsrb_cnn: init must be 'glorot' or 'he', got {init!r}")
        self.init = init
        c, h, w = input_shape
        widths = [(c, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
        layers: list[tuple[str, nn.Module]] = []
        for i, (a, b) in enumerate(widths, 1):
            layers += [(f"conv{i}", nn.Conv2d(a, b, 3, padding=1)), (f"relu{i}", nn.ReLU())]
            if i % 2 == 0 and min(h, w) >= 2:  # pool while the map is at least 2 wide (any input size)
                layers.append((f"pool{i // 2}", nn.MaxPool2d(2)))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(OrderedDict(layers))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(_flat_dim(self.features, input_shape), hidden)
        self.relu_fc = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero biases and Glorot-uniform kernels (Keras' defaults, the paper's model), or with
        ``init="he"`` He-uniform kernels before each ReLU (:func:`he_init`); also run by
        :func:`~trojanscope.models.surface.reinitialised_copy`."""
        if self.init == "he":
            he_init(self)
            return
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu_fc(self.fc1(self.flatten(self.features(x)))))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


@register_model("resnet18")
class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), ``width`` channels in the first stage."""

    def __init__(self, *, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes, layers = width, []
        in_planes = width
        for i, stride in enumerate((1, 2, 2, 2)):
            p = width * 2 ** i
            layers.append(nn.Sequential(BasicBlock(in_planes, p, stride), BasicBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_planes, num_classes)
        del planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))


@register_model("bn_resnet")
class SmallBNResNet(nn.Module):
    """A small BatchNorm ResNet: 3x3 stem, three stride-2 basic blocks, one dense layer.

    The blocks have ``width``, 2 x ``width`` and 4 x ``width`` channels; global average pooling
    feeds ``linear``. One of the architectures of a :mod:`~trojanscope.rounds` round.
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 width: int = 8) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(input_shape[0], w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(w, w, 2)
        self.layer2 = BasicBlock(w, 2 * w, 2)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.linear(self.flatten(self.pool(out)))


@register_model("vgg_dropout")
class SmallVGG(nn.Module):
    """A VGG-style net: two stages of two 3x3 convolutions and a max-pool, two dense layers with dropout.

    The stages have ``width`` and 2 x ``width`` channels; ``fc1`` has ``hidden`` units; each dense
    layer's input is dropped with probability ``dropout`` in training. One of the architectures
    of a :mod:`~trojanscope.rounds` round.
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 width: int = 8, hidden: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        c, w = input_shape[0], width
        self.features = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        d = _flat_dim(self.features, input_shape)
        self.flatten = nn.Flatten()
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(d, hidden)
        self.relu = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop2(self.relu(self.fc1(self.drop1(self.flatten(self.features(x)))))))


@register_model("deepid")
class DeepID(nn.Module):
    """DeepID (Sun et al. 2014), the Neural Cleanse YouTube Face model (55x47x3 inputs).

    conv1 (20, 4x4) - pool1 - conv2 (40, 3x3) - pool2 - conv3 (60, 3x3) - pool3 - conv4 (80, 2x2);
    the 160-d ``deepid`` layer merges the flattened pool3 and conv4 features
    (``deepid = relu(fc_pool3(pool3) + fc_conv4(conv4))``); ``fc`` gives the logits.
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (3, 55, 47), num_classes: int = 1283,
                 hidden: int = 160) -> None:
        super().__init__()
        c = input_shape[0]
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(c, 20, 4), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(20, 40, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)
        self.conv3, self.relu3, self.pool3 = nn.Conv2d(40, 60, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)
        self.conv4, self.relu4 = nn.Conv2d(60, 80, 2), nn.ReLU()
        self.flatten = nn.Flatten()
        with torch.no_grad():
            p3 = self._pool3(torch.zeros(1, *input_shape))
            d3, d4 = p3.flatten(1).shape[1], self.relu4(self.conv4(p3)).flatten(1).shape[1]
        self.fc_pool3 = nn.Linear(d3, hidden)
        self.fc_conv4 = nn.Linear(d4, hidden)
        self.merge = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)

    def _pool3(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.pool3(self.relu3(self.conv3(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self._pool3(x)
        c4 = self.relu4(self.conv4(p3))
        deepid = self.merge(self.fc_pool3(self.flatten(p3)) + self.fc_conv4(self.flatten(c4)))
        return self.fc(deepid)


class PreActBlock(nn.Module):
    """The pre-activation basic block (He et al. 2016, "Identity mappings"): BN-ReLU-conv twice."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + short


@register_model("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (the BackdoorBench model), CIFAR variant: 3x3 stem, no max-pool, [2, 2, 2, 2]
    pre-activation blocks of ``width``, 2, 4, 8 x ``width`` channels, a final BN-ReLU, global
    average pooling and ``linear``."""

    def __init__(self, *, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        in_planes, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            p = width * 2 ** i
            layers.append(nn.Sequential(PreActBlock(in_planes, p, stride), PreActBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.flatten(self.pool(self.relu(self.bn(out)))))


#: VGG-11 ("A" of Simonyan & Zisserman 2015): channel counts, "M" a 2x2 max-pool
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_model("vgg11_bn")
class VGG11BN(nn.Module):
    """VGG-11 with batch norm, CIFAR style: the 8 convolutions of configuration A (scaled by
    ``width / 64``), a max-pool after each stage while the map is at least 2 pixels wide (so any
    input size works), global average pooling to 1x1, and ``classifier`` (one ``nn.Linear``)."""

    def __init__(self, *, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[tuple[str, nn.Module]] = []
        n_conv = n_pool = 0
        for v in _VGG11:
            if v == "M":
                if min(h, w) >= 2:
                    n_pool += 1
                    layers.append((f"pool{n_pool}", nn.MaxPool2d(2)))
                    h, w = h // 2, w // 2
                continue
            n_conv += 1
            out = max(1, int(v) * width // 64)
            layers += [(f"conv{n_conv}", nn.Conv2d(c, out, 3, padding=1)), (f"bn{n_conv}", nn.BatchNorm2d(out)),
                       (f"relu{n_conv}", nn.ReLU())]
            c = out
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))
