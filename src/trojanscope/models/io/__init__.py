"""Model files. The model under test is hostile: nothing in a model file is evaluated, unpickled
with arbitrary globals, spliced into generated code, or trusted for sizes.

Formats, detected from the file's content (never its name); each has its own module, so each
defence can be read on its own:

* **trojanscope** (what :func:`save_model` writes): a directory with ``model.safetensors`` and
  ``model.json``, or the ``.safetensors`` file alone (its spec in the header metadata, or, for a
  bare weights file, ``arch`` / ``input_shape`` / ``num_classes``). :mod:`._state_dict`.
* **state dict** (a ``torch.save`` zip of tensors) with a named architecture, read weights-only
  after its pickles are checked by :mod:`._pickle_guard`. :mod:`._state_dict`.
* **torch.export** program (``.pt2``), for architectures trojanscope has never seen: every string
  of the program's JSON is checked against a strict grammar (names are identifiers, symbolic sizes
  are parsed by :mod:`._symexpr` and re-emitted from the parse tree, operators come from
  :mod:`._ops`' allow-list) before torch's deserialiser sees it; weights are raw bytes. :mod:`._pt2`.
* **TorchScript**: every code file is parsed with :mod:`ast` and each call and attribute chain is
  allow-listed by what it resolves to, custom ``__setstate__`` is refused, and after loading (before
  any forward pass) every method's inlined graph is walked against the same allow-list.
  :mod:`._torchscript`. Hooks do not work on it.
* **ONNX** (protobuf, no code; needs the ``onnx`` extra): operators, opset, external data and
  initializer sizes checked, then rebuilt as a torch module from the allowed operators, so that
  every method, gradient-based ones included, runs on it. :mod:`._onnx`.
* Anything else, in particular a plain pickle of a model object, is refused.

Every zip-based format goes through :func:`~trojanscope._utils.archive.check_zip` first (no
duplicate, absolute, ``..``, linked, encrypted or bomb members), and the model path must be a
regular file or a directory (a FIFO or a device would block the reader).
"""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..._utils.archive import check_zip
from ..._utils.limits import require_regular_file, stat_input
from ...errors import DataError, ModelLoadError, TrojanscopeError, UnsafeModelError
from ._common import LoadedModel, ModelSpec, _check_weights, _first_line
from ._pickle_guard import SAFE_GLOBALS, check_archive_pickles, pickle_globals

__all__ = ["SAFE_GLOBALS", "LoadedModel", "ModelSpec", "check_archive_pickles", "detect_format", "load_model",
           "pickle_globals", "save_model"]


def save_model(model: nn.Module, path: str | Path, spec: ModelSpec) -> Path:
    """Write ``model`` as a trojanscope model directory (``model.safetensors`` + ``model.json``)."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"), metadata={"trojanscope_spec": json.dumps(spec.to_dict())})
    (d / "model.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return d


# --- format detection ---------------------------------------------------------------------

def detect_format(path: Path) -> str:
    """``"trojanscope"``, ``"safetensors"``, ``"export"``, ``"torchscript"``, ``"torch_zip"``,
    ``"onnx"``, ``"pickle"`` or ``"unknown"``, from the bytes of the file (a directory is
    ``"trojanscope"``; anything but a regular file is refused without being opened)."""
    path = Path(path)
    if path.is_dir():
        return "trojanscope"
    _regular(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "unknown"
        if any(n.endswith("models/model.json") or n.endswith("archive_format") for n in names):
            return "export"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch_zip"
        return "unknown"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"]", b"}", b"c"):
        return "pickle"
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ModelProto starts with ir_version (field 1)
        return "onnx"
    return "unknown"


def _regular(p: Path) -> None:
    try:
        require_regular_file(p, "model file")
    except DataError as e:
        raise ModelLoadError(str(e)) from None


# --- loading ------------------------------------------------------------------------------

_ZIP_KINDS = ("export", "torchscript", "torch_zip")


def load_model(path: str | Path, *, arch: str | None = None, input_shape: tuple[int, int, int] | None = None,
               num_classes: int | None = None, map_location: str | torch.device = "cpu",
               default_input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """Load a model safely from ``path`` (see the module docstring for the formats).

    Args:
        path: a trojanscope model directory or file, a bare ``.safetensors`` weights file or a
            state dict (both with ``arch``), a ``.pt2`` program, a TorchScript file, or ``.onnx``.
        arch, input_shape, num_classes: the architecture of a bare state dict; also used to give
            the spec of an exported, TorchScript or ONNX program.
        map_location: where to put the weights.
        default_input_shape: the input shape when neither ``input_shape`` nor the file gives one
            (the CLI passes the shape of the data the model is evaluated on).

    Raises:
        ModelLoadError: missing, corrupt or mismatched file.
        UnsafeModelError: the file would run code when loaded.
        ResourceLimitError: the file declares more memory than the budget.
    """
    p = Path(path)
    try:
        st = stat_input(p, "model")
    except DataError as e:
        raise ModelLoadError(str(e)) from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        _regular(p)
    try:
        kind = detect_format(p)
        if kind in _ZIP_KINDS:
            check_zip(p, what="model file")
        lm = _load_kind(kind, p, arch=arch, input_shape=input_shape, num_classes=num_classes,
                        default_input_shape=default_input_shape)
    except TrojanscopeError:
        raise
    except MemoryError:
        raise ModelLoadError(f"{p}: cannot load model: out of memory") from None
    except RecursionError:
        raise ModelLoadError(f"{p}: cannot load model: nested too deeply") from None
    except Exception as e:  # torch's own loaders raise many types; each is a bad file here
        raise ModelLoadError(f"{p}: cannot load model: {_first_line(e)}") from None
    lm.model.to(map_location)
    _check_weights(lm)
    return lm


def _load_kind(kind: str, p: Path, *, arch: str | None, input_shape: tuple[int, int, int] | None,
               num_classes: int | None, default_input_shape: tuple[int, int, int] | None) -> LoadedModel:
    """Read ``p`` with the reader of its detected format ``kind`` (see :func:`load_model`)."""
    shape = input_shape or default_input_shape
    if kind == "trojanscope":
        from ._state_dict import load_trojanscope_dir

        return load_trojanscope_dir(p)
    if kind == "safetensors":
        from ._state_dict import load_safetensors

        return load_safetensors(p, None, arch, shape, num_classes)
    if kind == "export":
        from ._pt2 import load_export

        return load_export(p, input_shape, num_classes, default_input_shape)
    if kind == "torchscript":
        from ._torchscript import load_torchscript

        return load_torchscript(p, shape, num_classes)
    if kind == "torch_zip":
        from ._state_dict import load_state_dict

        return load_state_dict(p, arch, shape, num_classes)
    if kind == "onnx":
        from ._onnx import load_onnx

        return load_onnx(p, input_shape, num_classes, default_input_shape)
    if kind == "pickle":
        raise UnsafeModelError(
            f"{p} is a plain pickle, which can run arbitrary code when loaded; refusing. Save the "
            f"weights as safetensors, a state dict, a torch.export .pt2 program, TorchScript or ONNX instead"
        )
    raise ModelLoadError(f"{p}: unknown model format (not a trojanscope model, safetensors, .pt2, "
                         f"TorchScript, ONNX or state dict)")
