"""Pickles inside model archives, checked without unpickling them.

A pickle names the globals it will import; :func:`pickle_globals` lists them by walking the opcode
stream (never executing it), and :func:`check_archive_pickles` refuses an archive whose pickles
name anything outside :data:`SAFE_GLOBALS` (tensor and storage rebuilding). Payloads that pass are
then read by ``torch.load(weights_only=True)``, never by a full unpickler.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import UnsafeModelError
from ..._utils.limits import check_alloc
from ._common import _first_line

#: Globals a pickle inside a model archive may name: tensor and storage rebuilding only.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
    ("torch.nn.parameter", "Parameter"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("builtins", "complex"),
}) | frozenset(("torch", n) for n in (
    "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "ComplexFloatStorage", "ComplexDoubleStorage",
    "UntypedStorage", "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex64", "complex128",
))


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """The ``(module, name)`` globals a pickle would import, found without unpickling it.

    ``STACK_GLOBAL`` must take its two operands from string literals pushed just before it
    (memoisation aside); operands fetched from the memo or computed otherwise are reported as
    ``("?", "STACK_GLOBAL")``, so that a decoy string cannot hide the real global.
    """
    found: list[tuple[str, str]] = []
    recent: list[tuple[str, Any]] = []  # the last opcodes, memo writes left out
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                mod, _, attr = str(arg).partition(" ")
                found.append((mod, attr))
            elif name == "STACK_GLOBAL":
                a, b = recent[-2:] if len(recent) >= 2 else (("", None), ("", None))
                if a[0] in _STRING_OPS and b[0] in _STRING_OPS:
                    found.append((str(a[1]), str(b[1])))
                else:
                    found.append(("?", "STACK_GLOBAL"))
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.append(("copyreg-extension", str(arg)))
            elif name in ("REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "OBJ") and not found:
                found.append(("?", name))
            if name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                recent = (recent + [(name, arg)])[-2:]
    except Exception as e:  # a malformed pickle is itself a reason to refuse
        raise UnsafeModelError(f"a pickle inside the model file is malformed ({e}); refusing to load it") from None
    return found


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                         "BINSTRING", "STRING"})


def _is_pickle(data: bytes) -> bool:
    """Whether ``data`` parses as one complete pickle (any protocol, text ones included)."""
    if not data or data[-1:] != b".":
        return False
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:
        return False
    return True


def check_archive_pickles(path: Path, extra_safe: frozenset[tuple[str, str]] = frozenset(),
                          safe_prefixes: tuple[str, ...] = ()) -> None:
    """Raise :class:`UnsafeModelError` if a pickle inside the zip ``path`` names a global outside
    :data:`SAFE_GLOBALS` (checked before anything is unpickled).

    Members named ``*.pkl`` / ``*.pt`` are pickles (or nested ``torch.save`` zips); any other member
    that parses as a complete pickle, of any protocol, is checked too. ``safe_prefixes`` allows
    module prefixes that the reader resolves without importing Python (TorchScript's ``__torch__``).
    """
    allowed = SAFE_GLOBALS | extra_safe
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            data = z.read(info)
            if name.endswith(".debug_pkl"):  # TorchScript debug info, read by no unpickler that imports
                continue
            if name.endswith((".pkl", ".pt")):
                if data[:2] == b"PK":  # a nested torch.save zip
                    with _inner_zip(data, name, path) as inner:
                        for n2 in inner.namelist():
                            if n2.endswith(".pkl"):
                                _check_pickle_bytes(inner.read(n2), f"{name}/{n2}", allowed, safe_prefixes, path)
                    continue
                _check_pickle_bytes(data, name, allowed, safe_prefixes, path)
            elif _is_pickle(data):
                _check_pickle_bytes(data, name, allowed, safe_prefixes, path)


def _check_pickle_bytes(data: bytes, member: str, allowed: frozenset, safe_prefixes: tuple[str, ...],
                        path: Path) -> None:
    bad = sorted({f"{m}.{n}" for m, n in pickle_globals(data)
                  if (m, n) not in allowed and not (safe_prefixes and f"{m}.{n}".startswith(safe_prefixes))})
    if bad:
        raise UnsafeModelError(
            f"{path}: refusing to load: the pickle {member!r} inside would import {', '.join(bad[:5])}, which "
            f"could run arbitrary code (only tensor data is allowed)"
        )


def _load_tensor_pickle(data: bytes, member: str, path: Path) -> Any:
    """``torch.load`` of one ``torch.save`` payload, after the allow-list check, with weights-only
    unpickling (never a fallback)."""
    if data[:2] == b"PK":
        with _inner_zip(data, member, path) as inner:
            for n2 in inner.namelist():
                if n2.endswith(".pkl"):
                    _check_pickle_bytes(inner.read(n2), f"{member}/{n2}", SAFE_GLOBALS, (), path)
    else:
        _check_pickle_bytes(data, member, SAFE_GLOBALS, (), path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsafeModelError(f"{path}: refusing to load {member!r}: not plain tensor data "
                               f"({_first_line(e)})") from None



def _inner_zip(data: bytes, member: str, path: Path) -> zipfile.ZipFile:
    """A zip nested in a member (``torch.save`` of sample inputs), held to the rules of
    :func:`~trojanscope._utils.archive.check_zip`: no duplicate names, no bomb."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise UnsafeModelError(f"{path}: the member {member!r} is not a readable zip ({e})") from None
    names = [i.filename for i in z.infolist()]
    if len(set(names)) != len(names):
        raise UnsafeModelError(f"{path}: the member {member!r} holds two entries of the same name "
                               f"(readers disagree on which one counts)")
    check_alloc(sum(i.file_size for i in z.infolist()), f"{path.name} member {member!r} (unpacked)")
    return z
