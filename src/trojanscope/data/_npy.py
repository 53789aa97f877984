"""Reading ``.npy`` / ``.npz`` files without pickle: every header read and checked before any array is.

A hostile file states its own sizes and types: each member's declared shape and dtype are
checked (no Python objects, within the memory budget, consistent with the bytes the member
holds) before its data is read.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .._utils.archive import check_zip
from .._utils.limits import check_alloc, require_regular_file
from .._utils.validation import MAX_CLASSES
from ..errors import DataError

__all__ = ["NPZ_MEMBERS", "ArrayHeader", "check_label_array", "load_npy", "read_npy_header", "read_npz"]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: Members an ``.npz`` dataset may hold.
NPZ_MEMBERS = ("x", "y", "groups", "triggered", "is_poison", "is_cover", "original_y")
_LABEL_KINDS = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16)}


@dataclass(frozen=True)
class ArrayHeader:
    """What an ``.npy`` header declares: shape, dtype, order, and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def read_npy_header(fp: BinaryIO, where: str) -> ArrayHeader:
    """The header of the ``.npy`` stream ``fp`` (numpy's own parser: a literal, never code), refused
    with ``where`` named when it is not an array file or declares Python objects."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp)
        else:
            shape, fortran, dtype = npformat._read_array_header(fp, version)  # (3, 0): utf-8 field names
    except Exception as e:  # numpy raises ValueError / SyntaxError / EOFError ... on a bad header
        raise DataError(f"{where} is not a numpy array file ({type(e).__name__}: {str(e)[:120]})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype {dtype}), which would need pickle; refused")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{where} has a structured dtype {dtype}; a plain numeric array is needed")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataError(f"{where} declares an invalid shape {shape}")
    return ArrayHeader(tuple(int(d) for d in shape), dtype, bool(fortran), fp.tell())


def _read_body(fp: BinaryIO, h: ArrayHeader, where: str) -> np.ndarray:
    """The array after a checked header (``allow_pickle`` never applies: objects were refused)."""
    buf = bytearray(h.nbytes)
    view = memoryview(buf)
    got = 0
    while got < h.nbytes:
        n = fp.readinto(view[got:]) if hasattr(fp, "readinto") else 0
        if not n:
            break
        got += n
    if got != h.nbytes:
        raise DataError(f"{where} is truncated: its header declares {h.shape} {h.dtype} ({h.nbytes} bytes), "
                        f"the file holds {got}")
    a = np.frombuffer(buf, dtype=h.dtype)
    if h.fortran_order:
        return a.reshape(h.shape[::-1]).transpose()
    return a.reshape(h.shape)


def load_npy(path: str | Path, what: str = "array file") -> np.ndarray:
    """One ``.npy`` array, its header checked against the memory budget before it is read."""
    p = require_regular_file(path, what)
    with open(p, "rb") as fp:
        h = read_npy_header(fp, f"{what} {p.name}")
        check_alloc(h.nbytes, f"{what} {p.name} ({h.shape} {h.dtype})")
        if p.stat().st_size < h.data_offset + h.nbytes:
            raise DataError(f"{what} {p.name} is truncated: its header declares {h.shape} {h.dtype} "
                            f"({h.nbytes} bytes), the file holds {p.stat().st_size - h.data_offset}")
        return _read_body(fp, h, f"{what} {p.name}")


def read_npz(path: str | Path, *, what: str = "data file", allowed: tuple[str, ...] = NPZ_MEMBERS,
             wanted: tuple[str, ...] | None = None, extra_bytes_per_item: dict[str, int] | None = None
             ) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` named in ``wanted`` (default: all), read without pickle.

    The archive is checked by :func:`~trojanscope._utils.archive.check_zip` (duplicates, unsafe
    paths, bombs); then every member's ``.npy`` header is read and its declared shape and dtype
    checked (no Python objects, size within the memory budget plus ``extra_bytes_per_item`` per
    element for the conversion that follows, consistent with the member's size) before any array
    is read. A member outside ``allowed`` or not an array file is refused, named.
    """
    p = require_regular_file(path, what)
    infos = _checked_archive(p, what)
    extra = extra_bytes_per_item or {}
    with zipfile.ZipFile(p) as zf:
        headers = dict(_member_header(zf, info, f"{what} {p.name}", allowed, extra) for info in infos)
        total = sum(h.nbytes + h.count * extra.get(k, 0) for k, (_, h) in headers.items()
                    if wanted is None or k in wanted)
        check_alloc(total, f"{what} {p.name} (all arrays)")
        out: dict[str, np.ndarray] = {}
        for key, (info, h) in headers.items():
            if wanted is not None and key not in wanted:
                continue
            where = f"{what} {p.name}: member {info.filename!r}"
            try:
                with zf.open(info) as fp:
                    fp.read(h.data_offset)
                    out[key] = _read_body(fp, h, where)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{where} cannot be read ({e})") from None
    return out


def _checked_archive(p: Path, what: str) -> list[zipfile.ZipInfo]:
    """The members of ``.npz`` file ``p`` once it is known to be a safe zip (not a lone ``.npy``)."""
    with open(p, "rb") as fp:
        head = fp.read(8)
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"{what} {p.name} is a single .npy array, not an .npz archive; save the arrays with "
                        f"numpy.savez({p.stem}.npz, x=..., y=...)")
    if not head.startswith(_ZIP_MAGIC):
        raise DataError(f"{what} {p.name} is not an .npz archive (no zip signature)")
    try:
        zipfile.ZipFile(p).close()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read {what} {p.name} as .npz: {e}") from None
    return check_zip(p, what=what, error=DataError)


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str, allowed: tuple[str, ...],
                   extra: dict[str, int]) -> tuple[str, tuple[zipfile.ZipInfo, ArrayHeader]]:
    """``(key, (info, header))`` of one member of ``archive``, its header read and checked: an
    allowed ``.npy`` within the budget (plus ``extra`` bytes per element) that holds its bytes."""
    name = info.filename
    if info.is_dir():
        raise DataError(f"{archive}: member {name!r} is a folder, not an array file")
    key = name[:-4] if name.endswith(".npy") else name
    where = f"{archive}: member {name!r}"
    if not name.endswith(".npy"):
        raise DataError(f"{where} is not an array file (.npy); {_holds(allowed)}")
    if key not in allowed:
        raise DataError(f"{where} is not an array the data may hold; {_holds(allowed)}")
    try:
        with zf.open(info) as fp:
            h = read_npy_header(fp, where)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where} cannot be read ({e})") from None
    check_alloc(h.nbytes + h.count * extra.get(key, 0), f"{where} ({'x'.join(map(str, h.shape))} {h.dtype})")
    if info.file_size != h.data_offset + h.nbytes:
        raise DataError(f"{where} declares {h.shape} {h.dtype} ({h.nbytes} bytes) but holds "
                        f"{info.file_size - h.data_offset} bytes of data")
    return key, (info, h)


def _holds(allowed: tuple[str, ...]) -> str:
    if allowed[:2] == ("x", "y"):
        return f"an .npz dataset holds arrays 'x' and 'y' (optionally {', '.join(allowed[2:])})"
    return f"it may hold {', '.join(repr(a) for a in allowed)}"


def check_label_array(y: np.ndarray, n: int | None, where: str, *, what: str = "labels") -> np.ndarray:
    """``y`` as int64 if it is 1-D integer labels (int8..int64, uint8, uint16), non-negative, below
    :data:`~trojanscope._utils.validation.MAX_CLASSES`, of length ``n``; else one error naming it."""
    if y.ndim != 1:
        raise DataError(f"{where}: {what} must be a 1-D array, got shape {y.shape}")
    if y.dtype not in _LABEL_KINDS:
        raise DataError(f"{where}: {what} must be integers (int8 to int64, uint8, uint16), got dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise DataError(f"{where}: x has {n} samples but {what} has {y.shape[0]}")
    if y.size and int(y.min()) < 0:
        raise DataError(f"{where}: {what} contain a negative {'label' if what == 'labels' else 'value'} "
                        f"({int(y.min())})")
    if y.size and int(y.max()) >= MAX_CLASSES:
        raise DataError(f"{where}: {what} contain {int(y.max())}, out of range (at most {MAX_CLASSES} classes)")
    return y.astype(np.int64)
