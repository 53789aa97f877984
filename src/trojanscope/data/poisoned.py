"""A dataset that remembers which of its samples an attack touched."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .dataset import ImageDataset

_D = TypeVar("_D", bound=ImageDataset)


@dataclass(frozen=True, eq=False)
class PoisonedDataset(ImageDataset):
    """An :class:`ImageDataset` produced by an attack, with ground truth for evaluation.

    Attributes:
        poison_indices: indices of the samples stamped and relabelled to a target.
        cover_indices: indices stamped but keeping their true label (source-specific attacks).
        original_y: the labels before poisoning.
        attack: a description of the attack (``to_dict`` of the attack object).
    """

    poison_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)
    cover_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)
    original_y: torch.Tensor | None = field(default=None, repr=False)
    attack: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_poison(self) -> torch.Tensor:
        """``(N,)`` bool: True for the relabelled (poisoned) samples."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[self.poison_indices] = True
        return mask

    @property
    def clean(self) -> ImageDataset:
        """The dataset as a plain :class:`ImageDataset` (ground truth dropped)."""
        return ImageDataset(self.x, self.y, self.num_classes, self.class_names, self.name, self.groups)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(n_poison=int(self.poison_indices.numel()), n_cover=int(self.cover_indices.numel()),
                 attack=self.attack)
        return d

    def subset(self, index: Any, name: str | None = None) -> "PoisonedDataset":
        """The samples at ``index`` with the ground truth remapped to their new positions."""
        idx = torch.arange(len(self))[index]
        if idx.ndim == 0:
            idx = idx[None]
        new_pos = torch.full((len(self),), -1, dtype=torch.long)
        new_pos[idx] = torch.arange(idx.numel())
        def remap(ix: torch.Tensor) -> torch.Tensor:
            p = new_pos[ix]
            return p[p >= 0].sort().values
        return PoisonedDataset(self.x[idx], self.y[idx], self.num_classes, self.class_names, name or self.name,
                               None if self.groups is None else self.groups[idx],
                               poison_indices=remap(self.poison_indices), cover_indices=remap(self.cover_indices),
                               original_y=None if self.original_y is None else self.original_y[idx],
                               attack=self.attack)


def assign_sources(data: _D, sources: int, seed: int = 0) -> _D:
    """Give ``data`` provenance groups when it has none: the clean samples spread over ``sources``
    groups at random (seeded), the poisoned ones (of a :class:`PoisonedDataset`) all in group 0,
    as from one compromised source."""
    import dataclasses

    if data.groups is not None:
        return data
    g = torch.randint(0, sources, (len(data),), generator=torch.Generator().manual_seed(7919 + seed))
    if isinstance(data, PoisonedDataset):
        g[data.is_poison] = 0
    return dataclasses.replace(data, groups=g)
