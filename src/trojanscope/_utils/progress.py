"""Progress bars for long steps: tqdm on stderr, shown only to a person at a terminal.

A bar is off when stderr is not a TTY (a log file, a pipe, a CI job) or after ``set_quiet(True)``
(the CLI's ``--quiet``). ``TROJANSCOPE_PROGRESS=1`` forces bars on and ``=0`` forces them off,
whatever the terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (``True``) or back to the default (``False``)."""
    global _quiet
    _quiet = bool(quiet)


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

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=not enabled(),
                dynamic_ncols=True, **kwargs)
