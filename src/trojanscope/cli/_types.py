"""The CLI's argument types: every numeric option is range-checked by click (one ``error:`` line,
exit 2), a device is checked to exist, a memory size is parsed."""

from __future__ import annotations

import math
from typing import Any

import click
import torch

from .._utils import limits

POSITIVE_INT = click.IntRange(min=1)
"""A count that must be at least 1 (``--batch-size``, ``--epochs``, ``--n-samples`` ...)."""
NON_NEGATIVE_INT = click.IntRange(min=0)
"""A label, a seed, a count that may be 0 (``--show``)."""
SEED = click.IntRange(min=0, max=2**63 - 1)


class FiniteFloat(click.ParamType):
    """A float that is finite and inside ``(low, high)``, each end open or closed."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _range(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)) or \
                self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            self.fail(f"{value!r} is not in {self._range()}", param, ctx)
        return v


PROBABILITY = FiniteFloat(0.0, 1.0, low_open=True)
"""A share in (0, 1] (``--rate``)."""
OPEN_UNIT = FiniteFloat(0.0, 1.0, low_open=True, high_open=True)
"""A rate in (0, 1) (``--frr``, ``--epsilon``)."""
POSITIVE_FLOAT = FiniteFloat(0.0, None, low_open=True)
"""A step size (``--lr``)."""


class MemorySize(click.ParamType):
    """``512M``, ``4G``, ``1000000`` -> bytes (``--max-memory``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return limits.parse_size(value)
        except Exception as e:  # ResourceLimitError: one sentence
            self.fail(str(e), param, ctx)


MEMORY_SIZE = MemorySize()


class Device(click.ParamType):
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to exist on this machine."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, torch.device):
            value = str(value)
        try:
            dev = torch.device(str(value))
        except (RuntimeError, ValueError, TypeError):
            self.fail(f"{value!r} is not a device; use cpu, cuda, cuda:N or mps", param, ctx)
        if dev.type == "cpu":
            return str(dev)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                self.fail(f"{value!r}: CUDA is not available on this machine (use --device cpu)", param, ctx)
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", param, ctx)
            return str(dev)
        if dev.type == "mps":
            if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
                self.fail(f"{value!r}: MPS is not available on this machine (use --device cpu)", param, ctx)
            return str(dev)
        self.fail(f"{value!r}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps", param, ctx)


DEVICE = Device()


def pick_device(device: str | None) -> torch.device:
    """The CLI alone picks CUDA when present (the library follows the model)."""
    if device:
        return torch.device(DEVICE.convert(device, None, None))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

