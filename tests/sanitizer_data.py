"""Synthetic "feature" data for the data sanitisers' tests.

Each sample is a D-dimensional feature vector stored as a (1, 1, D) image in [0, 1]; the model
is a linear softmax classifier, so its "penultimate" representation (the input of its last Linear
layer) is the synthetic feature vector itself. Poisoned samples carry one source label's content
plus a trigger (a fixed pattern in dimensions that are noise for every class) and the target label.
"""

from __future__ import annotations

import torch
from torch import nn

from trojanscope.data import ImageDataset, PoisonedDataset
from trojanscope.training import train

D = 16
K = 4
T = 4  #: the trigger's dimensions
TRIGGER = torch.tensor([0.5, 0.0, 0.5, 0.0])


def centres(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = 0.2 + 0.6 * torch.rand(K, D, generator=g)
    return c


def make(n_per: int = 150, poison_share: float = 0.0, *, target: int = 0, seed: int = 0,
         groups: int | None = None, poison_group: int | None = None) -> PoisonedDataset:
    """``n_per`` clean samples per label; ``poison_share`` of label ``target`` is poison.

    With ``groups``, samples get a provenance segment in ``[0, groups)``; the poison all comes
    from ``poison_group``.
    """
    g = torch.Generator().manual_seed(seed + 1)
    c = centres()
    y = torch.arange(K).repeat_interleave(n_per)
    x = c[y] + 0.04 * torch.randn(len(y), D, generator=g)
    x[:, :T] = 0.5 * torch.rand(len(y), T, generator=g)  # the trigger's dimensions: noise in every class
    n_poison = int(round(poison_share * n_per / (1 - poison_share))) if poison_share > 0 else 0
    src = torch.full((n_poison,), (target + 1) % K)  # one source label: a tight planted group
    xp = c[src] + 0.04 * torch.randn(n_poison, D, generator=g)
    xp[:, :T] = TRIGGER  # the trigger: a fixed pattern in those dimensions
    x = torch.cat([x, xp]).clamp(0, 1)
    y_all = torch.cat([y, torch.full((n_poison,), target)])
    gr = None
    if groups is not None:
        gr = torch.randint(0, groups, (len(y_all),), generator=g)
        if poison_group is not None:
            gr[len(y):] = poison_group
            clean_in = (gr[:len(y)] == poison_group).nonzero().flatten()
            gr[clean_in[: len(clean_in) // 2]] = (poison_group + 1) % groups
    idx = torch.arange(len(y), len(y_all))
    return PoisonedDataset(x.reshape(-1, 1, 1, D), y_all, K, None, "synthetic", gr, poison_indices=idx,
                           original_y=torch.cat([y, src]))


def linear_model(data: ImageDataset, seed: int = 0, epochs: int = 20) -> nn.Module:
    """A linear softmax classifier trained on ``data``: its penultimate representation (the input
    of its last Linear layer) *is* the synthetic feature vector."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(D, K))
    train(model, data, epochs=epochs, lr=0.05, batch_size=64, seed=seed)
    return model
