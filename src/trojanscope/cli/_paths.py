"""Output paths, checked writable before anything is computed; nothing is created."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ..errors import ConfigError

def _first_existing(p: Path) -> Path:
    q = p.absolute()
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def _probe_dir(d: Path, option: str, target: Path) -> None:
    """Create and remove a file in ``d``: the only check that holds for root, read-only mounts and
    pseudo file systems alike."""
    try:
        fd, name = tempfile.mkstemp(prefix=".trojanscope-write-check-", dir=d)
    except OSError as e:
        raise ConfigError(f"{option} {target}: cannot write in {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _existing(p: Path, option: str) -> os.stat_result | None:
    """The status of output path ``p`` (after following links) if it exists, even as a dangling
    link (which is refused); None when nothing is there yet."""
    if not os.path.lexists(p):
        return None
    try:
        return p.stat()
    except OSError as e:
        raise ConfigError(f"{option} {p}: {e.strerror or e}") from None


def check_output_file(path: Path | str | None, option: str) -> None:
    """Refuse an output file (``--json``, ``--report``, ``--heatmap``) that cannot be written, before
    anything is computed: a directory, a device, a path under a regular file, an unwritable folder.
    ``-`` (stdout) and None pass. Nothing is created."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    st = _existing(p, option)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{option} {p} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            if os.path.realpath(p) == os.devnull:
                return
            raise ConfigError(f"{option} {p} is not a regular file (a device, FIFO or socket); give a file name"
                              + (" or '-' for stdout" if option == "--json" else ""))
        try:
            with open(p, "ab"):
                pass
        except OSError as e:
            raise ConfigError(f"{option} {p}: cannot write ({e.strerror or e})") from None
        return
    _check_parent(p, option)


def check_output_dir(path: Path | str | None, option: str = "--out") -> None:
    """Refuse an output directory that is a file, sits under a file or cannot be written, before
    anything is computed. Nothing is created."""
    if path is None:
        return
    p = Path(path)
    st = _existing(p, option)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{option} {p} exists and is not a directory")
        _probe_dir(p, option, p)
        return
    _check_parent(p, option)


def _check_parent(p: Path, option: str) -> None:
    anc = _first_existing(p.parent if str(p.parent) else Path("."))
    try:
        st = anc.stat()
    except OSError as e:
        raise ConfigError(f"{option} {p}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{option} {p} lies under {anc}, which is not a directory")
    _probe_dir(anc, option, p)

