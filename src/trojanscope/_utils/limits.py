"""Resource limits checked *before* anything is allocated or opened.

A hostile file states its own sizes: a 22 KB program can declare a 22000 x 22000 weight, a 300 KB
``.npz`` a 4 GB array. Every reader compares what a file declares with :func:`max_memory` (one
budget for the process, set by ``--max-memory`` or ``TROJANSCOPE_MAX_MEMORY``) through
:func:`check_alloc` before it allocates, and opens only regular files
(:func:`require_regular_file`): a FIFO would block the reader forever, a device file never ends.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import DataError, ResourceLimitError

DEFAULT_MAX_MEMORY = 4 << 30
"""Bytes one input (a tensor, an array, a decoded image set) may declare, unless told otherwise."""

MAX_IMAGE_PIXELS = 40_000_000
"""Pixels one decoded image may have (a 12000 x 12000 PNG is 144 Mpx; real photos are < 40 Mpx)."""

_budget: int | None = None
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``'512M'``, ``'4G'``, ``'1.5g'``, ``'1000000'`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise ResourceLimitError(f"cannot read memory size {text!r}; use e.g. 512M or 4G")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ResourceLimitError(f"memory size must be positive, got {text!r}")
    return n


def max_memory() -> int:
    """The budget in bytes: :func:`set_max_memory`, else ``TROJANSCOPE_MAX_MEMORY``, else the default."""
    if _budget is not None:
        return _budget
    env = os.environ.get("TROJANSCOPE_MAX_MEMORY")
    return parse_size(env) if env else DEFAULT_MAX_MEMORY


def set_max_memory(nbytes: int | str | None) -> None:
    """Set the process-wide budget (``None``: back to the environment / default)."""
    global _budget
    _budget = None if nbytes is None else (parse_size(nbytes) if isinstance(nbytes, str) else int(nbytes))


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover


def check_alloc(nbytes: int, what: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it exceeds the budget."""
    if nbytes < 0:
        raise ResourceLimitError(f"{what} declares a negative size")
    if nbytes > max_memory():
        raise ResourceLimitError(f"{what} declares {human(nbytes)}, over the memory budget of "
                                 f"{human(max_memory())} (raise it with --max-memory)")


def stat_input(path: str | Path, what: str = "input") -> os.stat_result:
    """The status of ``path`` (after following links), read without opening it; a missing or
    unreadable path is refused, named as ``what``."""
    p = Path(path)
    try:
        return p.stat()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {p}") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {p}: {e.strerror}") from None


def require_regular_file(path: str | Path, what: str = "input") -> Path:
    """``path`` as a Path if it is a regular file (after following links); FIFOs, sockets and
    device files are refused without being opened."""
    p = Path(path)
    st = stat_input(p, what)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device file")
        raise DataError(f"{what} {p} is {kind}, not a regular file")
    return p


MAX_JSON_BYTES = 256 << 20
"""The largest JSON document read (a scan row is a few KiB, a pair scan's about 10 KiB)."""


def read_json_file(path: str | Path, what: str = "JSON file", *, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The parsed JSON of ``path``, a regular UTF-8 file of at most ``max_bytes``; a FIFO, an
    oversized file, bytes that are not UTF-8, text that is not JSON or nests too deeply for the
    parser are each refused with one :class:`DataError` naming ``what``. The caller checks the
    document's shape."""
    import json

    p = require_regular_file(path, what)
    size = p.stat().st_size
    if size <= max_bytes:
        with open(p, "rb") as f:  # at most one byte past the cap, should the file grow meanwhile
            raw = f.read(max_bytes + 1)
        size = len(raw)
    if size > max_bytes:
        raise DataError(f"{what} {p} is {human(size)}, more than the {human(max_bytes)} it may be")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{what} {p} is not UTF-8 text") from None
    except ValueError as e:
        raise DataError(f"{what} {p} is not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{what} {p} nests too deeply") from None
