"""Zip archives (``torch.save`` state dicts, TorchScript, ``.pt2``, ``.npz``) checked from their
central directory before any member is read.

Readers disagree about malformed zips: Python's :mod:`zipfile` returns the *last* entry of a
duplicated name, torch's reader the *first*, so a check done through one reader can be shown a
different member than the one the other loads. :func:`check_zip` therefore refuses the
ambiguity itself: duplicate names, absolute or ``..`` paths, symlinks, and members whose
declared size or compression ratio is absurd.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import ResourceLimitError, UnsafeModelError
from .limits import check_alloc, human, require_regular_file

MAX_RATIO = 250
"""Largest uncompressed / compressed size accepted for a member over :data:`RATIO_FLOOR` bytes."""
RATIO_FLOOR = 1 << 20
MAX_MEMBERS = 100_000


def check_zip(path: str | Path, *, what: str = "archive", error: type[Exception] = UnsafeModelError
              ) -> list[zipfile.ZipInfo]:
    """The members of a zip, refused with one sentence (naming the member) if the archive is
    ambiguous or a bomb. ``error`` is the exception class for structural problems."""
    p = require_regular_file(path, what)
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise error(f"{what} {p.name} is not a readable zip archive ({e})") from None
    if len(infos) > MAX_MEMBERS:
        raise ResourceLimitError(f"{what} {p.name} holds {len(infos)} members (at most {MAX_MEMBERS})")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if name in seen:
            raise error(f"{what} {p.name} holds two members named {name!r} (readers disagree on which one counts)")
        seen.add(name)
        pure = PurePosixPath(name.replace("\\", "/"))
        if "\x00" in name or pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
            raise error(f"{what} {p.name} has a member with an unsafe path: {name!r}")
        mode = info.external_attr >> 16
        if mode and stat.S_ISLNK(mode):
            raise error(f"{what} {p.name} has a symbolic link member: {name!r}")
        if info.flag_bits & 0x1:
            raise error(f"{what} {p.name} has an encrypted member: {name!r}")
        size = info.file_size
        check_alloc(size, f"{what} member {name!r}")
        if size > RATIO_FLOOR and size > MAX_RATIO * max(info.compress_size, 1):
            raise ResourceLimitError(f"{what} member {name!r} expands {human(info.compress_size)} to "
                                     f"{human(size)} (ratio over {MAX_RATIO}: a zip bomb?)")
        total += size
    check_alloc(total, f"{what} {p.name} (all members)")
    return infos
