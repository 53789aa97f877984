"""Progress bars for long steps: tqdm on stderr, shown only to a person at a terminal.

A bar is off when stderr is not a TTY (a log file, a pipe, a CI job) or after ``set_quiet(True)``
(the CLI's ``--quiet``). ``TROJANSCOPE_PROGRESS=1`` forces bars on and ``=0`` forces them off,
whatever the terminal. In a forked worker (:mod:`trojanscope._utils.forked`) bars are not drawn
but reported to the parent, which draws them (:func:`set_sink`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_quiet = False
#: where this process's bars report to instead of drawing (a forked worker's pipe to its parent)
_sink: Callable[[str, int], None] | None = None


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (``True``) or back to the default (``False``)."""
    global _quiet
    _quiet = bool(quiet)


def set_sink(sink: Callable[[str, int], None] | None) -> None:
    """Report bars to ``sink(kind, n)`` instead of drawing them: ``("total", n)`` when a bar is
    made, ``("update", n)`` as it advances (None: draw them again)."""
    global _sink
    _sink = sink


class _ReportedBar:
    """A bar that reports its total and its updates to the sink instead of drawing itself."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, sink: Callable[[str, int], None]):
        self.iterable, self.sink = iterable, sink
        sink("total", int(total or 0))

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.sink("update", int(n))

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def enabled() -> bool:
    """Whether a bar made now would be shown."""
    env = os.environ.get("TROJANSCOPE_PROGRESS", "").strip().lower()
    if env in ("1", "true", "yes", "always"):
        return True
    if env in ("0", "false", "no", "never") or _quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", leave: bool = False, **kwargs: Any):
    """A ``tqdm`` bar on stderr (a no-op bar when :func:`enabled` is False)."""
    from tqdm import tqdm

    if _sink is not None:
        return _ReportedBar(iterable, total, _sink)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=not enabled(),
                dynamic_ncols=True, **kwargs)
