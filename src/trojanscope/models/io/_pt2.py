"""``torch.export`` programs (``.pt2``), read without running anything from the file.

``torch.export.load`` is not used: it unpickles weights and constants without restriction,
``pickle.loads`` opaque constants, dlopens AOTInductor libraries, and hands text from the archive
to ``sympy.sympify`` (which evaluates it) and to ``torch.fx``'s code generator (which splices names
into Python source it then runs). This reader takes the archive apart itself:

1. The archive is checked by ``check_zip`` (by the caller) and must be one folder with one program.
2. Every string of the program's JSON is validated by :func:`check_program` *before* torch's
   deserialiser sees it, by the field it sits in: value, argument and module names must be
   identifiers (or dotted identifier paths), symbolic sizes are parsed by :mod:`._symexpr` and
   replaced by the text re-emitted from their parse tree, operator names must be aten / prims
   operators of :mod:`._ops`' allow-list, tree specs are parsed and re-emitted as JSON of known
   container types, and node metadata other than the (validated) module stack is dropped. A string
   in any other field (a field a newer torch added, a custom object, a kernel) is refused with the
   field named. Guards (Python source) are dropped.
3. Weights and constants are raw tensor bytes whose declared sizes are checked against the payload
   and the memory budget before anything is allocated; tensor pickles are checked against the
   pickle allow-list and read weights-only; Python / TorchScript objects and native code are
   refused.
4. The rebuilt graph is walked once more: every call must be an allowed aten / prims operator or a
   symbolic-shape helper.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._utils.limits import check_alloc, human
from ...errors import ModelLoadError, UnsafeModelError
from . import _symexpr
from ._common import LoadedModel, _infer_spec
from ._ops import ALLOWED_PRIMS, aten_allowed
from ._pickle_guard import _load_tensor_pickle

#: Archive folders holding native code or formats this reader never loads.
_REFUSED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
#: Largest program JSON read (a real program of a small classifier is tens of KB).
MAX_PROGRAM_JSON = 64 << 20

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_FQN = re.compile(r"(?:[A-Za-z0-9_]{1,200}(?:@[0-9]{1,6})?)(?:\.[A-Za-z0-9_]{1,200}(?:@[0-9]{1,6})?){0,63}\Z")
#: A Python type's qualified name as torch records it (classes defined in functions have ``<locals>``).
_TYPE = re.compile(r"[A-Za-z0-9_<>]{1,200}(?:\.[A-Za-z0-9_<>]{1,200}){0,63}\Z")
_WORD = re.compile(r"[A-Za-z0-9_.\-]{0,64}\Z")
_VERSION = re.compile(r"[A-Za-z0-9_.+\-]{1,64}\Z")
_OPERATOR_HELPERS = frozenset({"getitem", "add", "sub", "mul", "floordiv", "mod", "truediv", "neg", "eq", "ne",
                               "lt", "le", "gt", "ge", "pow", "and_", "or_", "not_", "abs"})
_SYM_HELPERS = frozenset({"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum"})
_MATH_HELPERS = frozenset({"ceil", "floor", "trunc", "sqrt"})
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                             "torch.fx.immutable_collections.immutable_list",
                             "torch.fx.immutable_collections.immutable_dict"})
_DEVICES = frozenset({"cpu", "cuda", "meta", "mps", "xpu"})


def _pt2_api() -> Any:
    try:
        from torch._export.serde import schema, serialize
    except ImportError:  # pragma: no cover - torch < 2.8
        raise ModelLoadError("loading torch.export programs needs torch >= 2.8") from None
    return schema, serialize


# --- 2. every string of the program, by field ----------------------------------------------

class _Refused(Exception):
    """A string that fits no grammar of its field (path, reason)."""


def check_target(target: str) -> str:
    """An operator name of a node: ``torch.ops.aten.<op>.<overload>`` with an allowed op,
    ``torch.ops.prims.<op>.<overload>``, or a symbolic-shape helper."""
    parts = target.split(".") if isinstance(target, str) else []
    if not all(_IDENT.match(x) for x in parts):
        raise _Refused("not a dotted operator name")
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"] and aten_allowed(parts[3]):
        return target
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "prims"] and parts[3] in ALLOWED_PRIMS:
        return target
    if len(parts) == 2 and ((parts[0] == "_operator" and parts[1] in _OPERATOR_HELPERS)
                            or (parts[0] == "torch" and parts[1] in _SYM_HELPERS)
                            or (parts[0] == "math" and parts[1] in _MATH_HELPERS)):
        return target
    raise _Refused("not an allowed aten / prims tensor operator")


def _treespec(text: str) -> str:
    """A pytree spec (JSON of container types and keys), re-emitted from its parsed form."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise _Refused("not a JSON tree spec") from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], int)):
        raise _Refused("not a [version, tree] spec")

    def node(n: Any, depth: int) -> dict:
        if depth > 64 or not isinstance(n, dict) or set(n) != {"type", "context", "children_spec"}:
            raise _Refused("tree spec node is not {type, context, children_spec}")
        if n["type"] not in _TREESPEC_TYPES:
            raise _Refused(f"tree spec container type {str(n['type'])[:60]!r} is not a plain container")
        ctx = n["context"]
        if ctx is not None:
            try:
                val = json.loads(ctx) if isinstance(ctx, str) else object()
            except json.JSONDecodeError:
                raise _Refused("tree spec context is not JSON") from None
            ok = val is None or (isinstance(val, list) and all(
                isinstance(k, int) or (isinstance(k, str) and _IDENT.match(k)) for k in val))
            if not ok:
                raise _Refused("tree spec context must be null or a list of identifier keys")
            ctx = json.dumps(val)
        kids = n["children_spec"]
        if not isinstance(kids, list):
            raise _Refused("tree spec children are not a list")
        return {"type": n["type"], "context": ctx, "children_spec": [node(k, depth + 1) for k in kids]}

    return json.dumps([data[0], node(data[1], 0)])


def _module_stack(text: str) -> str:
    """``key,path,type;...`` with identifier keys, dotted paths and dotted type names."""
    entries = []
    for item in text.split(";"):
        parts = item.split(",")
        if len(parts) != 3:
            raise _Refused("module stack entry is not key,path,type")
        key, path, ty = parts
        if not _FQN.match(key) or (path and not _FQN.match(path)) or not _TYPE.match(ty):
            raise _Refused("module stack entry has a key, path or type that is not a dotted identifier")
        entries.append(",".join(parts))
    return ";".join(entries)


#: (dataclass, field) -> the grammar of its strings. ``"*"`` as the class: any class.
_RULES: dict[tuple[str, str], str] = {
    **{(c, "name"): "ident" for c in ("TensorArgument", "TokenArgument", "NamedArgument", "GraphArgument",
                                       "InputToConstantInputSpec", "Node")},
    **{(c, "as_name"): "ident" for c in ("SymIntArgument", "SymBoolArgument", "SymFloatArgument")},
    ("Node", "target"): "target",
    ("Argument", "as_operator"): "target",
    ("Argument", "as_string"): "word", ("Argument", "as_strings"): "word", ("ConstantValue", "as_string"): "word",
    ("Argument", "as_string_to_argument[key]"): "ident",
    ("Device", "type"): "device",
    ("SymExpr", "expr_str"): "symexpr",
    ("ExportedProgram", "torch_version"): "version", ("ExportedProgram", "verifiers"): "ident",
    ("ExportedProgram", "opset_version[key]"): "ident", ("ExportedProgram", "range_constraints[key]"): "symbol",
    **{("Graph", f"{m}[key]"): "ident" for m in ("tensor_values", "sym_int_values", "sym_bool_values",
                                                  "sym_float_values")},
    **{(c, "parameter_name"): "fqn" for c in ("InputToParameterSpec", "GradientToParameterSpec",
                                               "ParameterMutationSpec")},
    **{(c, "buffer_name"): "fqn" for c in ("InputToBufferSpec", "BufferMutationSpec")},
    ("InputToTensorConstantSpec", "tensor_constant_name"): "fqn",
    **{(c, "user_input_name"): "ident" for c in ("GradientToUserInputSpec", "UserInputMutationSpec")},
    ("ModuleCallEntry", "fqn"): "fqn_or_empty",
    ("ModuleCallSignature", "in_spec"): "treespec", ("ModuleCallSignature", "out_spec"): "treespec",
    ("ModuleCallSignature", "forward_arg_names"): "ident",
    ("PayloadConfig", "config[key]"): "fqn", ("PayloadMeta", "path_name"): "ident",
}


def _checked(kind: str, s: str) -> str:
    """``s`` if it fits grammar ``kind`` (re-emitted where the grammar has a parse tree)."""
    if not isinstance(s, str):
        raise _Refused("not a string")
    if kind == "ident" and _IDENT.match(s):
        return s
    if kind == "fqn" and _FQN.match(s):
        return s
    if kind == "fqn_or_empty" and (s == "" or _FQN.match(s)):
        return s
    if kind == "word" and _WORD.match(s):
        return s
    if kind == "version" and _VERSION.match(s):
        return s
    if kind == "device" and s in _DEVICES:
        return s
    if kind == "target":
        return check_target(s)
    if kind == "treespec":
        return _treespec(s)
    if kind in ("symexpr", "symbol"):
        try:
            return _symexpr.canonical(s) if kind == "symexpr" else _symexpr.symbol_name(s)
        except _symexpr.SymExprError as e:
            raise _Refused(f"not a symbolic size expression ({e})") from None
    raise _Refused({"ident": "not an identifier", "fqn": "not a dotted identifier path",
                    "fqn_or_empty": "not a dotted identifier path", "word": "not a plain word",
                    "version": "not a version", "device": "not a device type"}.get(kind, "unexpected"))


def _replace_special_field(dc: Any, name: str, field: str, cur: Any, sub: str) -> bool:
    """Handle the fields of a program dataclass (of type ``name``) that are not walked string by
    string: drop metadata but a validated module stack, drop the guards' Python source, refuse
    custom objects and named-tuple outputs. True when ``field`` was handled (set on ``dc``)."""
    if name == "Node" and field == "metadata":  # only the module stack is kept, validated
        keep = {}
        if isinstance(cur, dict) and "nn_module_stack" in cur:
            try:
                keep["nn_module_stack"] = _module_stack(cur["nn_module_stack"])
            except _Refused as e:
                raise _Refused(f"{sub}['nn_module_stack']: {e}") from None
        setattr(dc, field, keep)
        return True
    if name == "GraphModule" and field == "metadata":
        setattr(dc, field, {})
        return True
    if name == "ExportedProgram" and field == "guards_code":  # Python source; the program runs without it
        setattr(dc, field, [])
        return True
    if name == "Graph" and field == "custom_obj_values" and cur:
        raise _Refused(f"{sub}: custom objects, which this reader does not load")
    if name == "GraphModule" and field == "treespec_namedtuple_fields" and cur:
        raise _Refused(f"{sub}: named-tuple outputs, which this reader does not load")
    return False


def check_program(obj: Any, where: str = "program") -> Any:
    """Validate (and canonicalise in place) every string of a deserialized program dataclass
    tree; raises ``_Refused`` with the field's path. Returns ``obj``."""
    from torch._export.serde.union import _Union

    def rule(owner: str, field: str, s: Any, path: str) -> str:
        kind = _RULES.get((owner, field))
        if kind is None:
            raise _Refused(f"{path}: a string in a field this reader does not accept")
        try:
            return _checked(kind, s)
        except _Refused as e:
            raise _Refused(f"{path} = {str(s)[:60]!r}: {e}") from None

    def value(v: Any, owner: str, field: str, path: str, depth: int) -> Any:
        if depth > 200:
            raise _Refused(f"{path}: nested too deeply")
        if isinstance(v, str):
            return rule(owner, field, v, path)
        if isinstance(v, list):
            return [value(x, owner, field, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                key = rule(owner, f"{field}[key]", k, f"{path}[{str(k)[:40]!r}]") if isinstance(k, str) else k
                out[key] = value(x, owner, field, f"{path}[{str(k)[:40]!r}]", depth + 1)
            return out
        if isinstance(v, _Union):
            tag = str.__str__(v.type)
            inner = value(v.value, type(v).__name__, tag, f"{path}.{tag}", depth + 1)
            setattr(v, tag, inner) if inner is not v.value else None
            return v
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            walk(v, path, depth + 1)
            return v
        return v  # int, float, bool, None, enums

    def walk(dc: Any, path: str, depth: int) -> None:
        name = type(dc).__name__
        if name in ("CustomObjArgument", "ExternKernelNode", "NamedTupleDef", "AOTInductorModelPickleData"):
            raise _Refused(f"{path}: a {name}, which this reader does not load")
        for f in dataclasses.fields(dc):
            cur = getattr(dc, f.name)
            sub = f"{path}.{f.name}"
            if _replace_special_field(dc, name, f.name, cur, sub):
                continue
            new = value(cur, name, f.name, sub, depth)
            if new is not cur:
                setattr(dc, f.name, new)

    walk(obj, where, 0)
    return obj


# --- 1, 3. the archive and its payloads -----------------------------------------------------

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

        def read(rel: str, limit: int | None = None) -> bytes:
            if rel not in files:
                raise ModelLoadError(f"{p}: the archive has no {rel!r}")
            if limit is not None and z.getinfo(files[rel]).file_size > limit:
                raise ModelLoadError(f"{p}: {rel!r} is larger than {human(limit)}")
            return z.read(files[rel])

        if read("archive_format", 64).strip() != b"pt2":
            raise ModelLoadError(f"{p}: not a torch.export .pt2 archive")
        native = sorted(r for r in files if r.startswith(_REFUSED_DIRS))
        if native:
            raise UnsafeModelError(f"{p}: refusing to load: the archive holds compiled code or foreign payloads "
                                   f"({native[0]}), which loading would run; only exported programs are accepted")
        if "byteorder" in files and read("byteorder", 64).decode(errors="replace").strip() not in ("", sys.byteorder):
            raise ModelLoadError(f"{p}: the archive was written on a machine of another byte order")
        programs = sorted(r for r in files if r.startswith("models/") and r.endswith(".json"))
        if programs != ["models/model.json"]:
            raise ModelLoadError(f"{p}: expected one program 'models/model.json', found {programs[:5]}")
        for legacy in ("data/weights/model.pt", "data/constants/model.pt"):
            if legacy in files:
                raise UnsafeModelError(f"{p}: refusing to load: {legacy!r} is a pickle of the legacy .pt2 format; "
                                       f"re-export the model with a recent torch")
        try:
            serialized = serde._bytes_to_dataclass(schema.ExportedProgram, read("models/model.json", MAX_PROGRAM_JSON))
        except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as e:
            raise ModelLoadError(f"{p}: the program is not a valid torch.export program ({str(e)[:120]})") from None
        try:
            check_program(serialized)
        except _Refused as e:
            raise UnsafeModelError(f"{p}: refusing to load: {e}") from None
        state_dict = _payloads(p, read, files, "data/weights/", "data/weights/model_weights_config.json", schema, serde)
        constants = _payloads(p, read, files, "data/constants/", "data/constants/model_constants_config.json",
                              schema, serde, constants=True)
        sample = files.get("data/sample_inputs/model.pt")
        example_inputs = None
        if sample is not None and z.getinfo(sample).file_size > 0:
            example_inputs = _load_tensor_pickle(z.read(sample), "data/sample_inputs/model.pt", p)
            if not isinstance(example_inputs, tuple):
                raise ModelLoadError(f"{p}: sample inputs must be a tuple (args, kwargs)")
    ep = serde.ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)
    _check_graph(ep, p)
    return ep


def _static_ints(sym_ints: Any, what: str, p: Path) -> list[int]:
    out = []
    for s in sym_ints:
        if getattr(s, "type", None) != "as_int" or not isinstance(s.value, int) or s.value < 0:
            raise ModelLoadError(f"{p}: {what} must have static, non-negative sizes")
        out.append(int(s.value))
    return out


def _payloads(p: Path, read: Any, files: dict[str, str], base: str, config_name: str, schema: Any, serde: Any,
              *, constants: bool = False) -> dict[str, torch.Tensor]:
    """Weights or constants of a program: raw tensor bytes whose declared extent is checked against
    the payload and the memory budget first, or tensor pickles read weights-only."""
    if config_name not in files:
        raise ModelLoadError(f"{p}: the archive has no {config_name!r}")
    try:
        config = serde._dict_to_dataclass(schema.PayloadConfig, json.loads(read(config_name, MAX_PROGRAM_JSON)))
        check_program(config, "payload config")
    except _Refused as e:
        raise UnsafeModelError(f"{p}: refusing to load: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as e:
        raise ModelLoadError(f"{p}: bad payload config {config_name!r} ({str(e)[:120]})") from None
    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        path_name = meta.path_name
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
        try:
            dtype = serde.deserialize_scalar_type(tm.dtype)
        except (KeyError, TypeError):
            raise ModelLoadError(f"{p}: {fqn!r} has an unknown dtype") from None
        sizes = _static_ints(tm.sizes, f"weight {fqn!r}", p)
        strides = _static_ints(tm.strides, f"weight {fqn!r}", p)
        offset = tm.storage_offset.value if getattr(tm.storage_offset, "type", None) == "as_int" else -1
        if len(sizes) != len(strides) or not isinstance(offset, int) or offset < 0:
            raise ModelLoadError(f"{p}: weight {fqn!r} has inconsistent sizes, strides or offset")
        elem = torch.empty(0, dtype=dtype).element_size()
        numel = math.prod(sizes)
        extent = 0 if numel == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
        check_alloc(numel * elem, f"{p.name}: weight {fqn!r} ({'x'.join(map(str, sizes))})")
        member = base + path_name
        if member not in files:
            raise ModelLoadError(f"{p}: the archive has no {member!r}")
        if path_name not in flat:
            data = read(member)
            if len(data) % elem:
                raise ModelLoadError(f"{p}: payload {path_name!r} has a size that does not fit {dtype}")
            flat[path_name] = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if extent > flat[path_name].numel():
            raise ModelLoadError(f"{p}: weight {fqn!r} declares {'x'.join(map(str, sizes))} ({human(extent * elem)}) "
                                 f"but its payload {path_name!r} holds {human(flat[path_name].numel() * elem)}")
        t = torch.as_strided(flat[path_name], sizes, strides, offset)
        out[fqn] = nn.Parameter(t, requires_grad=bool(tm.requires_grad)) if meta.is_param else t
    return out


# --- 4. the rebuilt graph -------------------------------------------------------------------

def _check_graph(ep: Any, p: Path) -> None:
    """Every call in the program (and its sub-graphs) must be an allowed aten / prims operator or a
    symbolic-shape helper."""
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
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and (
                    (target.namespace == "aten" and aten_allowed(target._opname))
                    or (target.namespace == "prims" and target._opname in ALLOWED_PRIMS)):
                continue
            raise UnsafeModelError(f"{p}: refusing to load: the program calls {target!r} ({node.op}); only aten "
                                   f"and prims tensor operators are accepted")


# --- the loaded program -----------------------------------------------------------------------

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


def load_export(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None,
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

