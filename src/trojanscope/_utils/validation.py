"""Input validation shared by the whole package (one message per bad input)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, DataError

MAX_CLASSES = 100_000
"""Most classes a dataset or a model may have (a hostile label file saying 10**12 would otherwise
size a one-hot or a classifier layer from it)."""

_LABEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_images(x: Any, *, name: str = "images") -> torch.Tensor:
    """Check that ``x`` is a non-empty float tensor ``(N, C, H, W)`` in [0, 1] without NaN."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise DataError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 samples)")
    if not torch.is_floating_point(x):
        raise DataError(f"{name} must be floating point in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise DataError(f"{name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return x


def check_labels(y: Any, n: int, num_classes: int | None = None, *, name: str = "labels") -> torch.Tensor:
    """Check that ``y`` is an integer tensor ``(n,)`` with values in ``[0, num_classes)``."""
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if torch.is_floating_point(y):
        if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
            raise DataError(f"{name} must be integers, got non-integer values")
        if y.numel() and float(y.abs().max()) > 2**53:
            raise DataError(f"{name} hold a value too large to be a label ({float(y.abs().max()):.3g})")
        y = y.long()
    elif y.dtype not in _LABEL_DTYPES:
        raise DataError(f"{name} must be integers (int8 to int64 or uint8), got dtype {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{name} contain a negative label ({int(y.min())})")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise DataError(
            f"{name} contain label {int(y.max())}, out of range for {num_classes} classes"
        )
    return y.long()


def check_num_classes(y: torch.Tensor, *, name: str = "labels") -> int:
    """``max(y) + 1`` for checked labels, refused above :data:`MAX_CLASSES`."""
    k = int(y.max()) + 1 if y.numel() else 0
    if k > MAX_CLASSES:
        raise DataError(f"{name} contain label {k - 1}: more than {MAX_CLASSES} classes is not supported")
    return k


@dataclass(frozen=True)
class Interval:
    """A numeric constraint ``low <= value <= high`` (either bound may be None)."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right", "neither"

    def check(self, name: str, value: Any) -> None:
        ok_type = isinstance(value, self.kind) and not isinstance(value, bool)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok_type = True
        if not ok_type:
            raise ConfigError(f"{name} must be {self.kind.__name__}, got {value!r}")
        lo_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        hi_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        if not (lo_ok and hi_ok):
            lb = "[" if self.closed in ("both", "left") else "("
            rb = "]" if self.closed in ("both", "right") else ")"
            lo = "-inf" if self.low is None else self.low
            hi = "inf" if self.high is None else self.high
            raise ConfigError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


@dataclass(frozen=True)
class OrNone:
    """A constraint: None, or a value that meets ``inner``."""

    inner: Any

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.inner.check(name, value)


@dataclass(frozen=True)
class Options:
    """A constraint: the value is one of ``values``."""

    values: tuple

    def check(self, name: str, value: Any) -> None:
        if value not in self.values:
            raise ConfigError(f"{name} must be one of {list(self.values)}, got {value!r}")


@dataclass(frozen=True)
class Types:
    """A constraint: the value is an instance of one of ``types`` (None allowed if listed)."""

    types: tuple

    def check(self, name: str, value: Any) -> None:
        if value is None and type(None) in self.types:
            return
        if not isinstance(value, tuple(t for t in self.types if t is not type(None))):
            names = ", ".join("None" if t is type(None) else t.__name__ for t in self.types)
            raise ConfigError(f"{name} must be of type {names}, got {value!r}")


def check_params(obj: Any, constraints: dict[str, Any]) -> None:
    """Check every constrained attribute of ``obj`` (called by verbs, never in ``__init__``)."""
    for name, constraint in constraints.items():
        value = getattr(obj, name)
        if isinstance(constraint, (list, tuple)):  # any of several constraints may hold
            errors = []
            for c in constraint:
                try:
                    c.check(name, value)
                    break
                except ConfigError as e:
                    errors.append(str(e))
            else:
                raise ConfigError(" or ".join(errors))
        else:
            constraint.check(name, value)
