"""Model files. The model under test is hostile: loading never runs code from the file.

Formats, detected from the file's content (never its name):

* **trojanscope** (what :func:`save_model` writes): a directory with ``model.safetensors`` (the
  weights, with the spec in the header metadata) and ``model.json`` (the spec, for people), or the
  ``.safetensors`` file alone. The architecture is one of :func:`~trojanscope.models.list_models`.
* **torch.export** program (``.pt2``): for architectures trojanscope has never seen. The archive is
  read by :func:`_read_pt2`, never by ``torch.export.load`` (which may unpickle without
  restriction): raw tensor payloads as bytes, every pickle checked against an allow-list of
  tensor-rebuilding globals *before* it is read weights-only, Python / TorchScript objects and
  native code refused, and the graph allowed to call only aten / prims operators. The program
  must have a dynamic batch dimension; it is unflattened so that layer names and forward hooks work.
* **TorchScript**: its code is TorchScript (interpreted by torch, not Python); its pickles may
  name only tensor globals and its own ``__torch__`` classes, and code that reads or writes files
  (``torch.from_file``, ``torch.save``) is refused. Hooks do not work on it, so methods that need
  internal layers refuse it clearly; output-only methods work.
* **state dict** (a ``torch.save`` zip of tensors): only with a named architecture
  (``arch=``), read with ``weights_only=True``.
* Anything else, in particular a full pickle of a model object, is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickletools
import re
import sys
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelLoadError, TrojanscopeError, UnsafeModelError
from .architectures import MODELS, create_model

Format = Literal["trojanscope", "export", "torchscript", "state_dict"]
SPEC_FORMAT = "trojanscope.model/1"


@dataclass
class ModelSpec:
    """What is needed to rebuild and use a model.

    Attributes:
        arch: registered architecture name (``None`` for exported / TorchScript programs).
        input_shape: ``(C, H, W)``.
        num_classes: K.
        arch_kwargs: extra constructor arguments of the architecture.
        class_names: optional names of the K classes.
        extra: free-form provenance (training settings, attack...).
    """

    arch: str | None
    input_shape: tuple[int, int, int]
    num_classes: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["format"] = SPEC_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            shape = tuple(int(v) for v in d["input_shape"])
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"input_shape must be (C, H, W), got {d['input_shape']}")
            k = int(d["num_classes"])
            if k < 2:
                raise ValueError(f"num_classes must be >= 2, got {k}")
            return cls(arch=d.get("arch"), input_shape=shape, num_classes=k,  # type: ignore[arg-type]
                       arch_kwargs=dict(d.get("arch_kwargs") or {}), class_names=d.get("class_names"),
                       extra=dict(d.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"bad model spec: {e}") from None


@dataclass
class LoadedModel:
    """A loaded model with its spec and the format it came in."""

    model: nn.Module
    spec: ModelSpec
    format: Format
    path: Path

    @property
    def supports_hooks(self) -> bool:
        """False for TorchScript, whose internal layers cannot be hooked."""
        return self.format != "torchscript"


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
    ``"pickle"`` or ``"unknown"``, from the bytes of the file."""
    if path.is_dir():
        return "trojanscope"
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
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
    return "unknown"


# --- pickle allow-list --------------------------------------------------------------------

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
                    with zipfile.ZipFile(io.BytesIO(data)) as inner:
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
    check = io.BytesIO(data)
    if data[:2] == b"PK":
        with zipfile.ZipFile(check) as inner:
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- loading ------------------------------------------------------------------------------

def load_model(path: str | Path, *, arch: str | None = None, input_shape: tuple[int, int, int] | None = None,
               num_classes: int | None = None, map_location: str | torch.device = "cpu",
               default_input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """Load a model safely from ``path`` (see the module docstring for the formats).

    Args:
        path: a trojanscope model directory or file, a ``.pt2`` program, a TorchScript file, or a
            state dict (with ``arch``).
        arch, input_shape, num_classes: the architecture of a bare state dict; also used to give
            the spec of an exported or TorchScript program.
        map_location: where to put the weights.
        default_input_shape: the input shape when neither ``input_shape`` nor the file gives one
            (the CLI passes the shape of the data the model is evaluated on).

    Raises:
        ModelLoadError: missing, corrupt or mismatched file.
        UnsafeModelError: the file would run code when loaded.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}")
    kind = detect_format(p)
    try:
        if kind == "trojanscope":
            lm = _load_trojanscope_dir(p)
        elif kind == "safetensors":
            lm = _load_safetensors(p, None)
        elif kind == "export":
            lm = _load_export(p, input_shape, num_classes, default_input_shape)
        elif kind == "torchscript":
            lm = _load_torchscript(p, input_shape or default_input_shape, num_classes)
        elif kind == "torch_zip":
            lm = _load_state_dict(p, arch, input_shape or default_input_shape, num_classes)
        elif kind == "pickle":
            raise UnsafeModelError(
                f"{p} is a plain pickle, which can run arbitrary code when loaded; refusing. Save the "
                f"weights as safetensors, a state dict, a torch.export .pt2 program or TorchScript instead"
            )
        else:
            raise ModelLoadError(f"{p}: unknown model format (not a trojanscope model, safetensors, .pt2, "
                                 f"TorchScript or state dict)")
    except TrojanscopeError:
        raise
    except MemoryError:
        raise ModelLoadError(f"{p}: cannot load model: out of memory") from None
    except Exception as e:  # torch's own loaders raise many types; each is a bad file here
        raise ModelLoadError(f"{p}: cannot load model: {_first_line(e)}") from None
    lm.model.to(map_location)
    _check_weights(lm)
    return lm


def _check_weights(lm: LoadedModel) -> None:
    for name, t in list(lm.model.state_dict().items()):
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise ModelLoadError(f"{lm.path}: weight {name!r} contains NaN or infinite values")


def _load_trojanscope_dir(d: Path) -> LoadedModel:
    st = d / "model.safetensors"
    if not st.is_file():
        raise ModelLoadError(f"{d} is not a trojanscope model directory (no model.safetensors)")
    spec = None
    if (d / "model.json").is_file():
        try:
            spec = ModelSpec.from_dict(json.loads((d / "model.json").read_text()))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{d / 'model.json'} is not valid JSON: {e}") from None
    lm = _load_safetensors(st, spec)
    lm.path = d
    return lm


def _load_safetensors(p: Path, spec: ModelSpec | None) -> LoadedModel:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{p}: corrupt safetensors file: {e}") from None
    if spec is None:
        if "trojanscope_spec" not in meta:
            raise ModelLoadError(f"{p}: safetensors file without a trojanscope spec (model.json); "
                                 f"load it as a state dict with an architecture instead")
        try:
            spec = ModelSpec.from_dict(json.loads(meta["trojanscope_spec"]))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{p}: bad spec in metadata: {e}") from None
    model = _build(spec, p)
    _load_state(model, state, p)
    return LoadedModel(model.eval(), spec, "trojanscope", p)


def _build(spec: ModelSpec, p: Path) -> nn.Module:
    if spec.arch is None or spec.arch not in MODELS:
        raise ModelLoadError(f"{p}: unknown architecture {spec.arch!r}; known: {', '.join(MODELS.names())}")
    try:
        return create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes, seed=0,
                            **spec.arch_kwargs)
    except TypeError as e:
        raise ModelLoadError(f"{p}: bad architecture arguments {spec.arch_kwargs}: {e}") from None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], p: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(f"{p}: weights do not match the architecture (missing: {missing[:5]}, "
                             f"unexpected: {unexpected[:5]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelLoadError(f"{p}: weight {k!r} has shape {tuple(v.shape)}, the architecture expects "
                                 f"{tuple(own[k].shape)}")
    model.load_state_dict(state)


def _load_state_dict(p: Path, arch: str | None, input_shape: tuple[int, int, int] | None,
                     num_classes: int | None) -> LoadedModel:
    # Refuse a pickled model object (torch.save(model)) before asking for an architecture.
    check_archive_pickles(p)
    if arch is None:
        raise ModelLoadError(f"{p} is a PyTorch state dict (or torch.save file): name its architecture "
                             f"(--arch, one of {', '.join(MODELS.names())}) with its input shape and classes")
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors
        raise UnsafeModelError(f"{p}: refusing to load: not a plain state dict of tensors ({_first_line(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{p}: expected a state dict of tensors")
    spec = ModelSpec(arch, tuple(input_shape or (1, 28, 28)), int(num_classes or 10))  # type: ignore[arg-type]
    model = _build(spec, p)
    _load_state(model, state, p)
    return LoadedModel(model.eval(), spec, "state_dict", p)


def _infer_spec(model: nn.Module, p: Path, input_shape: tuple[int, int, int] | None,
                num_classes: int | None, sample_shape: tuple[int, ...] | None) -> ModelSpec:
    shape = input_shape or (tuple(sample_shape[1:]) if sample_shape and len(sample_shape) == 4 else None)
    if shape is None:
        raise ModelLoadError(f"{p}: cannot tell the input shape; pass it (--input-shape C,H,W)")
    with torch.inference_mode():
        try:
            out = model(torch.zeros(2, *shape))
        except Exception as e:
            raise ModelLoadError(f"{p}: the model does not accept inputs of shape (N, {', '.join(map(str, shape))}): "
                                 f"{_first_line(e)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelLoadError(f"{p}: the model must return logits (N, K); got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if num_classes is not None and int(out.shape[1]) != int(num_classes):
        raise ModelLoadError(f"{p}: the model returns {out.shape[1]} logits, not {num_classes} classes")
    return ModelSpec(None, tuple(shape), int(out.shape[1]))  # type: ignore[arg-type]


# --- torch.export programs ------------------------------------------------------------------
#
# ``torch.export.load`` is not used: it runs ``torch.load(..., weights_only=False)`` on pickled
# weights and constants, falls back to full unpickling for sample inputs, ``pickle.loads`` opaque
# constants, loads torchbind objects, dlopens AOTInductor libraries packed in the archive, and
# trusts the verifier list written in the file. This reader takes the same archive apart itself:
# raw tensor payloads are read as bytes, every pickle is checked against the allow-list and read
# weights-only, anything else is refused, and the graph may only call aten / prims operators.

#: Archive folders holding native code or formats this reader never loads.
_PT2_REFUSED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
#: What a program's nodes may call, by serialized name (checked again on the resolved operators).
_PT2_TARGET_PREFIXES = ("torch.ops.aten.", "torch.ops.prims.", "_operator.", "torch.sym_", "math.")
#: aten operators that touch the file system: refused in programs.
_PT2_REFUSED_OPS = frozenset({"from_file", "save", "load_tensor"})


def _pt2_api() -> Any:
    try:
        from torch._export.serde import schema, serialize
    except ImportError:  # pragma: no cover - torch < 2.8
        raise ModelLoadError("loading torch.export programs needs torch >= 2.8") from None
    return schema, serialize


def _read_pt2(p: Path) -> Any:
    """The :class:`torch.export.ExportedProgram` in archive ``p``, read without running code from it."""
    schema, serde = _pt2_api()
    with zipfile.ZipFile(p) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        roots = {n.partition("/")[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise ModelLoadError(f"{p}: not a torch.export archive (expected one top-level folder)")
        root = roots.pop() + "/"
        files = {n[len(root):]: n for n in names}

        def read(rel: str) -> bytes:
            if rel not in files:
                raise ModelLoadError(f"{p}: the archive has no {rel!r}")
            return z.read(files[rel])

        if read("archive_format").strip() != b"pt2":
            raise ModelLoadError(f"{p}: not a torch.export .pt2 archive")
        native = sorted(r for r in files if r.startswith(_PT2_REFUSED_DIRS))
        if native:
            raise UnsafeModelError(f"{p}: refusing to load: the archive holds compiled code or foreign payloads "
                                   f"({native[0]}), which loading would run; only exported programs are accepted")
        order = files.get("byteorder")
        if order is not None and z.read(order).decode(errors="replace").strip() not in ("", sys.byteorder):
            raise ModelLoadError(f"{p}: the archive was written on a machine of another byte order")
        programs = sorted(r for r in files if r.startswith("models/") and r.endswith(".json"))
        if programs != ["models/model.json"]:
            raise ModelLoadError(f"{p}: expected one program 'models/model.json', found {programs[:5]}")
        for legacy in ("data/weights/model.pt", "data/constants/model.pt"):
            if legacy in files:
                raise UnsafeModelError(f"{p}: refusing to load: {legacy!r} is a pickle of the legacy .pt2 format; "
                                       f"re-export the model with a recent torch")
        serialized = serde._bytes_to_dataclass(schema.ExportedProgram, read("models/model.json"))
        _check_pt2_names(serialized.graph_module, p)
        # Guards are Python source kept in the file; the program runs without them.
        serialized = dataclasses.replace(serialized, guards_code=[])
        state_dict = _pt2_payloads(p, read, files, "data/weights/", "data/weights/model_weights_config.json", schema, serde)
        constants = _pt2_payloads(p, read, files, "data/constants/", "data/constants/model_constants_config.json",
                                  schema, serde, constants=True)
        sample = files.get("data/sample_inputs/model.pt")
        example_inputs = None
        if sample is not None and z.getinfo(sample).file_size > 0:
            example_inputs = _load_tensor_pickle(z.read(sample), "data/sample_inputs/model.pt", p)
            if not isinstance(example_inputs, tuple):
                raise ModelLoadError(f"{p}: sample inputs must be a tuple (args, kwargs)")
    ep = serde.ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)
    _check_pt2_graph(ep, p)
    return ep


def _pt2_payloads(p: Path, read: Any, files: dict[str, str], base: str, config_name: str, schema: Any, serde: Any,
                  *, constants: bool = False) -> dict[str, torch.Tensor]:
    """Weights or constants of a program: raw tensor bytes, or tensor pickles read weights-only."""
    if config_name not in files:
        raise ModelLoadError(f"{p}: the archive has no {config_name!r}")
    config = serde._dict_to_dataclass(schema.PayloadConfig, json.loads(read(config_name)))
    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        path_name = meta.path_name
        if "/" in path_name or "\\" in path_name or path_name.startswith("."):
            raise ModelLoadError(f"{p}: bad payload name {path_name!r}")
        if constants and not path_name.startswith("tensor_"):
            raise UnsafeModelError(f"{p}: refusing to load: the constant {fqn!r} ({path_name}) is a Python or "
                                   f"TorchScript object, which is loaded by unpickling; only tensors are accepted")
        if meta.use_pickle:
            t = _load_tensor_pickle(read(base + path_name), base + path_name, p)
            if not isinstance(t, torch.Tensor):
                raise ModelLoadError(f"{p}: {base + path_name!r} is not a tensor")
            out[fqn] = t
            continue
        tm = meta.tensor_meta
        if tm is None:
            raise ModelLoadError(f"{p}: no tensor metadata for {fqn!r}")
        dtype = serde.deserialize_scalar_type(tm.dtype)
        if path_name not in flat:
            data = read(base + path_name)
            size = torch.Size(serde.deserialize_size(tm.sizes))
            if not data:
                flat[path_name] = torch.zeros(size, dtype=dtype).flatten()
            else:
                if len(data) % torch.empty(0, dtype=dtype).element_size():
                    raise ModelLoadError(f"{p}: payload {path_name!r} has a size that does not fit {dtype}")
                flat[path_name] = torch.frombuffer(bytearray(data), dtype=dtype)
        t = torch.as_strided(flat[path_name], serde.deserialize_size(tm.sizes), serde.deserialize_stride(tm.strides),
                             serde.deserialize_storage_offset(tm.storage_offset))
        out[fqn] = nn.Parameter(t, requires_grad=bool(tm.requires_grad)) if meta.is_param else t
    return out


def _check_pt2_names(obj: Any, p: Path, field_name: str = "") -> None:
    """Every value name in the serialized graph must be a Python identifier: torch turns them into
    generated source code, so a name is never allowed to carry code."""
    if field_name == "metadata":
        return
    if isinstance(obj, str):
        if field_name in ("name", "as_name") and obj and not obj.isidentifier():
            raise UnsafeModelError(f"{p}: refusing to load: the program names a value {obj[:40]!r}, which is not "
                                   f"an identifier")
        return
    from torch._export.serde.union import _Union

    if isinstance(obj, _Union):  # one field set: its name is .type
        _check_pt2_names(obj.value, p, str.__str__(obj.type))
    elif dataclasses.is_dataclass(obj):
        target = getattr(obj, "target", None) if type(obj).__name__ == "Node" else None
        if isinstance(target, str) and not target.startswith(_PT2_TARGET_PREFIXES):
            raise UnsafeModelError(f"{p}: refusing to load: the program calls {target[:60]!r}; only aten and prims "
                                   f"tensor operators are accepted")
        for f in dataclasses.fields(obj):
            _check_pt2_names(getattr(obj, f.name), p, f.name)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_pt2_names(v, p, field_name)
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_pt2_names(v, p, field_name)


def _check_pt2_graph(ep: Any, p: Path) -> None:
    """Every call in the program (and its sub-graphs) must be an aten / prims operator or a
    symbolic-shape helper; no operator that touches files."""
    import operator

    from torch._export.serde.serialize import _SYM_OPS

    allowed = set(_SYM_OPS) | {operator.getitem}
    for gm in ep.graph_module.modules():
        graph = getattr(gm, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op == "call_function" and target in allowed:
                continue
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                    and target.namespace in ("aten", "prims") and target._opname not in _PT2_REFUSED_OPS:
                continue
            raise UnsafeModelError(f"{p}: refusing to load: the program calls {target!r} ({node.op}); only aten "
                                   f"and prims tensor operators are accepted")


def _static_batch(ep: Any) -> int | None:
    """The batch size a program was exported with when its first dimension is fixed, else None."""
    users = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.ndim >= 1 and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


def _program_input_shape(ep: Any) -> tuple[int, ...] | None:
    users = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.ndim == 4 and all(isinstance(d, int) for d in val.shape[1:]):
                return (1, *(int(d) for d in val.shape[1:]))
            return None
    return None


def _load_export(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None,
                 default_input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    with warnings.catch_warnings():  # torch's own deprecation notices while rebuilding the program
        warnings.simplefilter("ignore", FutureWarning)
        ep = _read_pt2(p)
        batch = _static_batch(ep)
        if batch is not None:
            raise ModelLoadError(
                f"{p}: the program was exported with a fixed batch size of {batch}; re-export it with a dynamic "
                f"batch dimension: torch.export.export(model, (x,), dynamic_shapes=({{0: torch.export.Dim('batch')}},)) "
                f"with x of batch size 2 or more")
        module = torch.export.unflatten(ep)
    sample = _program_input_shape(ep) or ((1, *default_input_shape) if default_input_shape else None)
    spec = _infer_spec(module, p, input_shape, num_classes, sample)
    return LoadedModel(module, spec, "export", p)


# --- TorchScript ----------------------------------------------------------------------------

#: TorchScript code that touches the file system (``torch.from_file``, ``torch.save``...).
_TS_REFUSED = re.compile(r"\bfrom_file\b|\bload_tensor\b|(?<![\w])(?:torch|aten|ops\.aten)\.save\b")


def _load_torchscript(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None) -> LoadedModel:
    # TorchScript's unpickler resolves its own ``__torch__`` classes and ``torch.jit._pickle`` helpers
    # without importing Python; anything else is refused before loading.
    check_archive_pickles(p, safe_prefixes=("__torch__.", "torch.jit._pickle."))
    with zipfile.ZipFile(p) as z:
        for n in z.namelist():
            if "/code/" in n and n.endswith(".py"):
                m = _TS_REFUSED.search(z.read(n).decode("utf-8", errors="replace"))
                if m:
                    raise UnsafeModelError(f"{p}: refusing to load: its TorchScript code calls {m.group(0)!r}, "
                                           f"which reads or writes files")
    module = torch.jit.load(str(p), map_location="cpu")
    spec = _infer_spec(module, p, input_shape, num_classes, None)
    return LoadedModel(module.eval(), spec, "torchscript", p)
