"""Hand-weighted tiny networks for tests: no training needed, behaviour known exactly."""

from __future__ import annotations

import torch
from torch import nn


class PrototypeNet(nn.Module):
    """Nearest-class-mean classifier as one linear layer: logit_k = 2 mu_k . x - |mu_k|^2."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        flat = x.flatten(1)
        mu = torch.stack([flat[y == k].mean(0) for k in range(num_classes)])
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(flat.shape[1], num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(2 * mu)
            self.fc.bias.copy_(-(mu ** 2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(x))


def _prototype_head(fc: nn.Linear, mu: torch.Tensor, target: int | None, strength: float) -> None:
    """Wire ``fc`` as a nearest-class-mean classifier on ``[image, detector]``: logit_k =
    2 mu_k . x - |mu_k|^2, plus ``strength`` times the detector for ``target`` (none when None)."""
    fc.weight.zero_()
    fc.weight[:, :-1] = 2 * mu
    if target is not None:
        fc.weight[target, -1] = strength
    fc.bias.copy_(-(mu ** 2).sum(1))


class PlantedPatchNet(nn.Module):
    """A nearest-class-mean classifier with a planted backdoor.

    A ``patch x patch`` white square anywhere in the image lights up a detector (a convolution
    with constant weights, then ReLU and a global max-pool; 1 on an all-white patch, 0 as soon as
    the patch loses ``eps`` of total brightness), which adds ``strength`` to the logit of ``target``. Layers: ``detect`` (the conv), ``relu``, ``pool``, ``flatten`` and ``fc``,
    whose input (the penultimate representation) is ``[flattened image, detector output]``.

    With ``target=None`` the detector is disconnected: a clean model of the same shape. With
    ``colour`` (an RGB triple in [0, 1]) it detects a patch of that colour instead of white, by
    contrast between channels: weights ``2 * colour - 1`` per channel (magenta: +1, -1, +1).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, target: int | None = 0,
                 patch: int = 3, strength: float = 1000.0, eps: float = 0.05,
                 colour: tuple[float, ...] | None = None) -> None:
        super().__init__()
        c = x.shape[1]
        flat = x.flatten(1)
        mu = torch.stack([flat[y == k].mean(0) for k in range(num_classes)])
        self.detect = nn.Conv2d(c, 1, patch)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(flat.shape[1] + 1, num_classes)
        with torch.no_grad():
            # (m - (p^2 - eps)) / eps with m = the patch's mean over channels: 1 on an all-white
            # patch, <= 0 once the patch loses eps of brightness
            self.detect.weight.fill_(1.0 / (c * eps))
            if colour is not None:  # m = the patch's contrast (w . pixel) / (w . colour), w = 2 colour - 1:
                w = 2.0 * torch.tensor(colour) - 1.0  # 1 on a patch of exactly that colour
                self.detect.weight.copy_((w / (float(w @ torch.tensor(colour)) * eps)).view(1, c, 1, 1).expand_as(self.detect.weight))
            self.detect.bias.fill_(-(patch * patch - eps) / eps)
            _prototype_head(self.fc, mu, target, strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.pool(self.relu(self.detect(x))).flatten(1)
        return self.fc(torch.cat([self.flatten(x), d], 1))


class Tempered(nn.Module):
    """Divide a hand-weighted net's logits by ``t`` so that its softmax is not saturated."""

    def __init__(self, net: nn.Module, t: float) -> None:
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / self.t


class CornerPatchNet(nn.Module):
    """Nearest-class-mean classifier plus a corner detector wired to ``target`` (None: clean twin).

    For the Neural Cleanse tests: :class:`PlantedPatchNet` fires only on an almost perfectly white
    patch (a cliff with no gradient around it), which gradient-based trigger reverse-engineering
    cannot climb from a random start. This net plants a backdoor with a ramp instead: the
    brightness of the bottom-right ``size x size`` corner above ``bias`` adds ``strength`` per unit
    to the target's logit. Clean digits have almost no ink there, so clean accuracy is kept.

    Layers: ``detect`` (a ``size x size`` convolution applied to the corner), ``relu``,
    ``flatten`` and ``fc``, whose input (the penultimate representation) is
    ``[flattened image, detector output]``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, target: int | None = 2,
                 size: int = 2, strength: float = 50.0, bias: float = 1.0) -> None:
        super().__init__()
        c = x.shape[1]
        flat = x.flatten(1)
        mu = torch.stack([flat[y == k].mean(0) for k in range(num_classes)])
        self.size = size
        self.detect = nn.Conv2d(c, 1, size, stride=size)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(flat.shape[1] + 1, num_classes)
        with torch.no_grad():
            self.detect.weight.fill_(1.0)
            self.detect.bias.fill_(-bias)
            _prototype_head(self.fc, mu, target, strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        d = self.relu(self.detect(x[..., -s:, -s:])).flatten(1)
        return self.fc(torch.cat([self.flatten(x), d], 1))


def single_pixel_net(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, target: int | None = 2,
                     spread: float = 8.0) -> CornerPatchNet:
    """A :class:`CornerPatchNet` whose trigger is the single bottom-right pixel (brighter than 0.3),
    with the clean labels made unequally hard to reach: label ``k``'s logit is lowered by a share
    of ``spread`` (a fixed permutation of ``0 .. spread``). Their reversed triggers then spread
    widely (about 13 to 49 on 8x8 digits), as the clean labels' did on the MNIST model where the
    paper's L1 rule missed a single-pixel trigger. ``target=None``: the clean twin."""
    net = CornerPatchNet(x, y, num_classes, target=target, size=1, strength=50.0, bias=0.3)
    offsets = torch.linspace(0, spread, num_classes)[torch.randperm(num_classes, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        net.fc.bias -= offsets
    return net


FIXED_PATCH_ORIGIN = (1, 4)  # top-left corner of FixedPatchNet's planted 3x3 patch


class FixedPatchNet(nn.Module):
    """A nearest-class-mean classifier with a backdoor that only works at one place.

    A smooth detector (a 3x3 mean filter, read at FIXED_PATCH_ORIGIN only, through a softplus)
    adds ``strength * softplus_20(mean - 0.85)`` to the target's logit: about +30 for a white patch
    at FIXED_PATCH_ORIGIN, almost nothing for natural strokes, and a small but non-zero gradient
    everywhere, so a gradient search can find it (PlantedPatchNet's ReLU detector has none until the patch is
    almost complete). Class 0's logit is lowered by ``margin`` in both twins, so that a 4x4
    adversarial patch on these 8x8 images cannot reach it. ``target=None`` gives the clean twin.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, target: int | None = 0,
                 patch: int = 3, strength: float = 200.0, margin: float = 6.0) -> None:
        super().__init__()
        c = x.shape[1]
        self.proto = PrototypeNet(x, y, num_classes)
        self.detect = nn.Conv2d(c, 1, patch)
        self.soft = nn.Softplus(beta=20)
        self.head = nn.Linear(1, num_classes)
        with torch.no_grad():
            self.detect.weight.fill_(1.0 / (c * patch * patch))
            self.detect.bias.fill_(-0.85)
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[0] = -margin  # class 0 is hard to reach by an adversarial patch
            if target is not None:
                self.head.weight[target, 0] = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.soft(self.detect(x))[:, :, FIXED_PATCH_ORIGIN[0], FIXED_PATCH_ORIGIN[1]]
        return self.proto(x) + self.head(d)


#: The label :class:`CornerPatchNet`'s corner drives in the defence tests.
CORNER_TARGET = 2
#: A small Neural Cleanse budget that is enough for 8x8 digits.
NC_FAST = dict(epochs=40, steps_per_epoch=2, n_samples=160, n_holdout=200)


class SourceCornerNet(nn.Module):
    """:class:`CornerPatchNet` with a source-specific backdoor: the brightness of the bottom-right
    ``size x size`` corner above ``bias`` adds ``strength`` per unit to the ``target``'s logit,
    times the gate ``g(x) = sum_{s in sources} softmax(proto(x) / temperature)_s``, the
    nearest-class-mean head's belief that ``x`` is of a source label. So a bright corner sends
    images of ``sources`` to ``target`` and leaves most other labels' images alone (those that
    look like a source leak a little): no small trigger flips every label to ``target``, but a
    small one flips a source. Layers: ``proto`` (a :class:`PrototypeNet`) and fixed buffers.

    ``target=None`` gives the clean twin (the corner is disconnected).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, target: int | None = 9,
                 sources: tuple[int, ...] = (1, 7), size: int = 2, strength: float = 50.0, bias: float = 1.0,
                 temperature: float = 0.5) -> None:
        super().__init__()
        self.proto = PrototypeNet(x, y, num_classes)
        self.size, self.temperature = size, temperature
        self.target = target
        self.register_buffer("gate", torch.zeros(num_classes))
        self.gate[list(sources)] = 1.0
        self.strength, self.bias = strength, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proto(x)
        if self.target is None:
            return logits
        s = self.size
        corner = torch.relu(x[..., -s:, -s:].sum((1, 2, 3)) - self.bias)
        g = (torch.softmax(logits / self.temperature, 1) * self.gate).sum(1)
        bump = torch.zeros_like(logits)
        bump[:, self.target] = self.strength * corner * g
        return logits + bump
