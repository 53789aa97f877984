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


class PlantedPatchNet(nn.Module):
    """A nearest-class-mean classifier with a planted backdoor.

    A ``patch x patch`` white square anywhere in the image lights up a detector (a convolution
    with constant weights, then ReLU and a global max-pool; 1 on an all-white patch, 0 as soon as
    the patch loses ``eps`` of total brightness), which adds ``strength`` to the logit of ``target``. Layers: ``detect`` (the conv), ``relu``, ``pool``, ``flatten`` and ``fc``,
    whose input (the penultimate representation) is ``[flattened image, detector output]``.

    With ``target=None`` the detector is disconnected: a clean model of the same shape.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, target: int | None = 0,
                 patch: int = 3, strength: float = 1000.0, eps: float = 0.05) -> None:
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
            # (sum - (p^2 - eps)) / eps: 1 on an all-white patch, <= 0 once the patch loses eps of brightness
            self.detect.weight.fill_(1.0 / (c * eps))
            self.detect.bias.fill_(-(patch * patch - eps) / eps)
            self.fc.weight.zero_()
            self.fc.weight[:, :-1] = 2 * mu
            if target is not None:
                self.fc.weight[target, -1] = strength
            self.fc.bias.copy_(-(mu ** 2).sum(1))

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
