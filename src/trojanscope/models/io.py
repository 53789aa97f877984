"""Model files. The model under test is hostile: loading never runs code from the file.

Formats, detected from the file's content (never its name):

* **trojanscope** (what :func:`save_model` writes): a directory with ``model.safetensors`` (the
  weights, with the spec in the header metadata) and ``model.json`` (the spec, for people), or the
  ``.safetensors`` file alone. The architecture is one of :func:`~trojanscope.models.list_models`.
* **torch.export** program (``.pt2``): for architectures trojanscope has never seen. Every pickle
  inside the archive is checked against an allow-list of tensor-rebuilding globals *before*
  anything is unpickled; the program is then unflattened so that layer names and forward hooks work.
* **TorchScript**: its code is TorchScript (interpreted by torch, not Python); its pickles are
  checked the same way. Hooks do not work on it, so methods that need internal layers refuse it
  clearly; output-only methods work.
* **state dict** (a ``torch.save`` zip of tensors): only with a named architecture
  (``arch=``), read with ``weights_only=True``.
* Anything else, in particular a full pickle of a model object, is refused.
"""

from __future__ import annotations

import io
import json
import pickletools
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelLoadError, UnsafeModelError
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
    """The ``(module, name)`` globals a pickle would import, found without unpickling it."""
    found: list[tuple[str, str]] = []
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif op.name in ("GLOBAL", "INST"):
                mod, _, name = str(arg).partition(" ")
                found.append((mod, name))
            elif op.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    found.append(("?", "?"))
                else:
                    found.append((strings[-2], strings[-1]))
            elif op.name in ("REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "OBJ") and not found:
                found.append(("?", op.name))
            elif op.name == "EXT1" or op.name == "EXT2" or op.name == "EXT4":
                found.append(("copyreg-extension", str(arg)))
    except Exception as e:  # a malformed pickle is itself a reason to refuse
        raise UnsafeModelError(f"a pickle inside the model file is malformed ({e}); refusing to load it") from None
    return found


def check_archive_pickles(path: Path, extra_safe: frozenset[tuple[str, str]] = frozenset()) -> None:
    """Raise :class:`UnsafeModelError` if any ``.pkl`` / ``.pt`` pickle in the zip ``path`` names a
    global outside :data:`SAFE_GLOBALS` (checked before anything is unpickled)."""
    allowed = SAFE_GLOBALS | extra_safe
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            data = z.read(info)
            if name.endswith((".pkl", ".pt")) and not name.endswith(".debug_pkl"):
                if data[:2] == b"PK":  # a nested torch.save zip
                    with zipfile.ZipFile(io.BytesIO(data)) as inner:
                        for n2 in inner.namelist():
                            if n2.endswith(".pkl"):
                                _check_pickle_bytes(inner.read(n2), f"{name}/{n2}", allowed, path)
                    continue
                _check_pickle_bytes(data, name, allowed, path)
            elif data[:1] == b"\x80" and len(data) > 2 and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                # any other member that looks like a pickle is checked too
                try:
                    _check_pickle_bytes(data, name, allowed, path)
                except UnsafeModelError as e:
                    if "malformed" not in str(e):
                        raise


def _check_pickle_bytes(data: bytes, member: str, allowed: frozenset, path: Path) -> None:
    bad = sorted({f"{m}.{n}" for m, n in pickle_globals(data) if (m, n) not in allowed})
    if bad:
        raise UnsafeModelError(
            f"{path}: refusing to load: the pickle {member!r} inside would import {', '.join(bad[:5])}, which "
            f"could run arbitrary code (only tensor data is allowed)"
        )


# --- loading ------------------------------------------------------------------------------

def load_model(path: str | Path, *, arch: str | None = None, input_shape: tuple[int, int, int] | None = None,
               num_classes: int | None = None, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a model safely from ``path`` (see the module docstring for the formats).

    Args:
        path: a trojanscope model directory or file, a ``.pt2`` program, a TorchScript file, or a
            state dict (with ``arch``).
        arch, input_shape, num_classes: the architecture of a bare state dict; also used to give
            the spec of an exported or TorchScript program.
        map_location: where to put the weights.

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
            lm = _load_export(p, input_shape, num_classes)
        elif kind == "torchscript":
            lm = _load_torchscript(p, input_shape, num_classes, map_location)
        elif kind == "torch_zip":
            lm = _load_state_dict(p, arch, input_shape, num_classes)
        elif kind == "pickle":
            raise UnsafeModelError(
                f"{p} is a plain pickle, which can run arbitrary code when loaded; refusing. Save the "
                f"weights as safetensors, a state dict, a torch.export .pt2 program or TorchScript instead"
            )
        else:
            raise ModelLoadError(f"{p}: unknown model format (not a trojanscope model, safetensors, .pt2, "
                                 f"TorchScript or state dict)")
    except (ModelLoadError, UnsafeModelError):
        raise
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError, AttributeError,
            TypeError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{p}: cannot load model: {msg}") from None
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
    if arch is None:
        raise ModelLoadError(f"{p} is a PyTorch state dict (or torch.save file): name its architecture "
                             f"(--arch, one of {', '.join(MODELS.names())}) with its input shape and classes")
    check_archive_pickles(p)
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors
        raise UnsafeModelError(f"{p}: refusing to load: not a plain state dict of tensors ({str(e).splitlines()[0]})") from None
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
    if num_classes is None:
        with torch.inference_mode():
            out = model(torch.zeros(1, *shape))
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise ModelLoadError(f"{p}: the model must return logits (N, K); got {type(out).__name__}")
        num_classes = int(out.shape[1])
    return ModelSpec(None, tuple(shape), int(num_classes))  # type: ignore[arg-type]


def _load_export(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None) -> LoadedModel:
    check_archive_pickles(p)
    # Every pickle inside has been checked above; in addition, load with weights-only
    # unpickling forced so that a fallback to full unpickling cannot happen.
    import torch.serialization as ser

    orig_load = torch.load

    def _weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return orig_load(*args, **kwargs)

    torch.load = _weights_only_load  # type: ignore[assignment]
    try:
        ep = torch.export.load(str(p))
    finally:
        torch.load = orig_load  # type: ignore[assignment]
    del ser
    module = torch.export.unflatten(ep)
    sample_shape = None
    try:
        args = ep.example_inputs[0] if ep.example_inputs else ()
        if args and isinstance(args[0], torch.Tensor):
            sample_shape = tuple(args[0].shape)
    except Exception:
        sample_shape = None
    spec = _infer_spec(module, p, input_shape, num_classes, sample_shape)
    return LoadedModel(module, spec, "export", p)


def _load_torchscript(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None,
                      map_location: str | torch.device) -> LoadedModel:
    check_archive_pickles(p)
    module = torch.jit.load(str(p), map_location=map_location)
    spec = _infer_spec(module, p, input_shape, num_classes, None)
    return LoadedModel(module.eval(), spec, "torchscript", p)
