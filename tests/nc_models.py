"""A hand-weighted backdoored net for the Neural Cleanse tests (no training needed).

:class:`tests.models.PlantedPatchNet` fires only on an almost perfectly white patch (a cliff with
no gradient around it), which gradient-based trigger reverse-engineering cannot climb from a
random start. :class:`CornerPatchNet` plants a backdoor with a ramp instead: the brightness of
the bottom-right ``size x size`` corner above ``bias`` adds ``strength`` per unit to the target's
logit. Clean digits have almost no ink there, so clean accuracy is kept.
"""

from __future__ import annotations

import torch
from torch import nn


class CornerPatchNet(nn.Module):
    """Nearest-class-mean classifier plus a corner detector wired to ``target`` (None: clean twin).

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
            self.fc.weight.zero_()
            self.fc.weight[:, :-1] = 2 * mu
            if target is not None:
                self.fc.weight[target, -1] = strength
            self.fc.bias.copy_(-(mu ** 2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        d = self.relu(self.detect(x[..., -s:, -s:])).flatten(1)
        return self.fc(torch.cat([self.flatten(x), d], 1))
