"""In-memory image datasets: ``x`` (N, C, H, W) float in [0, 1], ``y`` (N,) int64."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._utils.validation import MAX_CLASSES, check_images, check_labels, check_num_classes
from ..errors import DataError


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set held in memory.

    Args:
        x: images ``(N, C, H, W)``, float in [0, 1].
        y: labels ``(N,)``, integers in ``[0, num_classes)``.
        num_classes: K; inferred as ``max(y) + 1`` when omitted.
        class_names: optional names of the K classes.
        name: where the data came from (for reports).
        groups: optional ``(N,)`` integer provenance / source of each sample.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 0
    class_names: list[str] | None = None
    name: str = "data"
    groups: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        x = check_images(self.x, name=f"{self.name} images")
        if self.num_classes and not 0 < int(self.num_classes) <= MAX_CLASSES:
            raise DataError(f"num_classes must be in [1, {MAX_CLASSES}], got {self.num_classes}")
        y = check_labels(self.y, x.shape[0], self.num_classes or None, name=f"{self.name} labels")
        k = self.num_classes or check_num_classes(y, name=f"{self.name} labels")
        object.__setattr__(self, "x", x.float())
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "num_classes", int(k))
        if self.class_names is not None and len(self.class_names) != k:
            raise DataError(f"{len(self.class_names)} class names given for {k} classes")
        if self.groups is not None:
            g = check_labels(self.groups, x.shape[0], None, name=f"{self.name} provenance groups")
            object.__setattr__(self, "groups", g)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | slice | list[int], name: str | None = None) -> "ImageDataset":
        """The samples at ``index`` (indices or a boolean mask), as a new dataset."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        return ImageDataset(self.x[index], self.y[index], self.num_classes, self.class_names,
                            name or self.name, None if self.groups is None else self.groups[index])

    def split(self, fraction: float, *, seed: int = 0, stratify: bool = True) -> tuple["ImageDataset", "ImageDataset"]:
        """Split into ``(first, rest)`` with about ``fraction`` of each label in ``first``."""
        a, b = stratified_split(self.y, [fraction, 1 - fraction], seed=seed) if stratify else _random_split(len(self), fraction, seed)
        return self.subset(a), self.subset(b)

    def with_labels(self, y: torch.Tensor) -> "ImageDataset":
        return ImageDataset(self.x, y, self.num_classes, self.class_names, self.name, self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self), "image_shape": list(self.image_shape),
                "num_classes": self.num_classes}


def _random_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(fraction * n))
    return perm[:k].sort().values, perm[k:].sort().values


def stratified_split(y: torch.Tensor, fractions: list[float], *, seed: int = 0) -> list[torch.Tensor]:
    """Split indices into parts with the given fractions of every label (seeded, sorted)."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    cum = torch.tensor([0.0] + list(fractions)).cumsum(0)
    cum = cum / cum[-1]
    for label in torch.unique(y).tolist():
        idx = (y == label).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        bounds = (cum * idx.numel()).round().long().tolist()
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i]:bounds[i + 1]])
    return [torch.cat(p).sort().values for p in parts]


def fit_to_model(data: ImageDataset, model: Any) -> ImageDataset:
    """``data`` checked against a loaded model's spec (``model.spec``: ``input_shape``,
    ``num_classes``, ``class_names``): the same image shape, no label past the model's classes.

    A set with fewer labels than the model is widened to the model's ``num_classes`` (and class
    names); one clear :class:`~trojanscope.errors.DataError` otherwise.
    """
    spec = model.spec
    if data.image_shape != tuple(spec.input_shape):
        raise DataError(f"the data's images are {data.image_shape} but the model expects "
                        f"{tuple(spec.input_shape)}")
    if data.num_classes > spec.num_classes:
        raise DataError(f"the data has label {data.num_classes - 1}, out of range for a model with "
                        f"{spec.num_classes} classes")
    if data.num_classes < spec.num_classes:
        data = ImageDataset(data.x, data.y, spec.num_classes, spec.class_names, data.name, data.groups)
    return data
