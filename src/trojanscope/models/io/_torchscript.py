"""TorchScript archives, gated by structure before and after ``torch.jit.load``.

``torch.jit.load`` compiles the archive's code and runs any scripted ``__setstate__`` while
unpickling, and a forward pass runs whatever the code calls (``torch.save`` writes files). A filter
over the source *text* cannot be complete (``torch .save(`` is valid TorchScript), so the gate
works on the code's *structure*, twice:

1. **Before loading**, every ``.py`` member is parsed with :mod:`ast` (TorchScript code is Python
   syntax; files outside printable ASCII, with tabs, carriage returns, line continuations or
   triple quotes are refused, so that Python's parser and TorchScript's see the same tokens).
   Each attribute chain rooted at ``torch`` / ``ops`` must resolve to an allowed operator of
   :mod:`._ops` (whatever the whitespace, and whether it is called or only named: ``s =
   torch.save`` is refused), ``getattr`` may only read a literal attribute of a local value,
   every bare name must be a parameter, a local, a name defined in the archive or an allowed
   builtin, every method call must name a method of the archive, an allowed tensor operator or
   a container method, and a class may not define ``__setstate__`` (which would run on load).
   Pickles may name only tensor globals and the archive's own ``__torch__`` classes.
2. **After loading, before any forward pass**, every method of every submodule is inlined and
   each node of its graph (nested blocks included) must be an allowed aten operator or an
   interpreter node of :data:`._ops.ALLOWED_PRIM_NODES` (no ``prim::PythonOp``, no calls to
   unknown functions, no fork / wait, no print, no file operators).
"""

from __future__ import annotations

import ast
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError, UnsafeModelError
from ._common import LoadedModel, _infer_spec
from ._ops import ALLOWED_PRIM_NODES, aten_allowed
from ._pickle_guard import check_archive_pickles

MAX_CODE_BYTES = 16 << 20
_PRINTABLE = re.compile(rb"[\x20-\x7e\n]*\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: Bare names TorchScript code may use besides its own locals and the archive's names.
_BUILTINS = frozenset("""
self torch ops __torch__ annotate uninitialized unchecked_cast isinstance getattr hasattr range len int
float bool str complex min max abs round list tuple dict enumerate zip divmod sum all any ord chr
Tensor Optional List Dict Tuple Union NoneType Any Device number Module Enum NamedTuple True False None Final
__annotations__ __parameters__ __buffers__ __constants__ __torch_mangle__ training _is_full_backward_hook
inf nan
""".split())
#: Methods of TorchScript's containers and strings.
_CONTAINER_METHODS = frozenset("""
append extend insert pop remove clear keys values items get setdefault copy index count format
startswith endswith join split strip lower upper update reverse sort isdigit
""".split())


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]`` when rooted at a bare name, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _chain_ok(parts: list[str]) -> bool:
    """Whether an attribute chain rooted at ``torch`` / ``ops`` / ``__torch__`` resolves to
    something allowed."""
    root = parts[0]
    if root == "__torch__":  # the archive's own classes and functions (checked here too)
        return not (len(parts) > 2 and parts[1] == "torch" and parts[2] == "classes")  # native torchbind classes
    if root == "torch":
        if len(parts) == 2:
            return aten_allowed(parts[1])
        if len(parts) == 4 and parts[1] == "ops":
            return (parts[2] == "aten" and aten_allowed(parts[3])) or (parts[2] == "prim"
                                                                         and parts[3] in ALLOWED_PRIM_NODES)
        return False
    if root == "ops":
        return len(parts) == 3 and ((parts[1] == "aten" and aten_allowed(parts[2]))
                                    or (parts[1] == "prim" and (parts[2] in ALLOWED_PRIM_NODES)))
    return True


class _Gate(ast.NodeVisitor):
    def __init__(self, member: str, defined: frozenset[str], methods: frozenset[str]) -> None:
        self.member = member
        self.defined = defined
        self.methods = methods
        self.locals: list[set[str]] = []

    def refuse(self, node: ast.AST, why: str) -> None:
        line = getattr(node, "lineno", "?")
        raise UnsafeModelError(f"{self.member}:{line}: {why}")

    # statements
    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef)):
                self.visit(stmt)
            elif isinstance(stmt, ast.Assign) and [_chain(t) for t in stmt.targets] == [["op_version_set"]] \
                    and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, int):
                continue
            else:
                self.refuse(stmt, f"a top-level {type(stmt).__name__} statement, which TorchScript code never has")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if node.decorator_list or node.keywords:
            self.refuse(node, "a decorated class")
        for b in node.bases:
            if not (isinstance(b, ast.Name) and b.id in ("Module", "NamedTuple", "Enum")):
                self.refuse(b, "a class with a base other than Module / NamedTuple / Enum")
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef):
                if stmt.name == "__setstate__":
                    self.refuse(stmt, f"class {node.name} defines __setstate__, which runs while the file is loaded")
                self.visit(stmt)
            elif isinstance(stmt, (ast.AnnAssign, ast.Assign, ast.Pass)):
                self.locals.append(set())
                self.generic_visit(stmt)
                self.locals.pop()
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue
            else:
                self.refuse(stmt, f"a {type(stmt).__name__} statement in a class body")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.decorator_list:
            self.refuse(node, f"a decorated function {node.name}")
        scope = {a.arg for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs}
        for sub in ast.walk(node):  # every name the function binds
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                scope.add(sub.id)
        self.locals.append(scope)
        for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
            if a.annotation is not None:
                self.visit(a.annotation)
        for d in node.args.defaults + node.args.kw_defaults:
            if d is not None:
                self.visit(d)
        if node.returns is not None:
            self.visit(node.returns)
        for stmt in node.body:
            self.visit(stmt)
        self.locals.pop()

    def _refused_kind(self, node: ast.AST) -> None:
        self.refuse(node, f"{type(node).__name__} is not TorchScript this reader accepts")

    visit_Import = visit_ImportFrom = visit_Global = visit_Nonlocal = visit_Lambda = _refused_kind
    visit_Yield = visit_YieldFrom = visit_Await = visit_AsyncFunctionDef = visit_AsyncFor = _refused_kind
    visit_AsyncWith = visit_With = visit_Try = visit_TryStar = visit_NamedExpr = _refused_kind
    visit_GeneratorExp = visit_SetComp = visit_DictComp = _refused_kind

    # expressions
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and node.id not in _BUILTINS and node.id not in self.defined \
                and not any(node.id in s for s in self.locals):
            self.refuse(node, f"the name {node.id!r} is neither local, defined in the archive nor an allowed builtin")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = _chain(node)
        if parts is not None and parts[0] in ("torch", "ops", "__torch__") and not any(
                parts[0] in s for s in self.locals):
            if not _chain_ok(parts):
                self.refuse(node, f"its code uses {'.'.join(parts)!r}, which is not an allowed tensor operator")
            return  # the whole chain is checked; its inner Attribute nodes are prefixes of it
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr"):
            obj = node.args[0] if node.args else None
            key = node.args[1] if len(node.args) > 1 else None
            if len(node.args) != 2 or node.keywords or not (isinstance(key, ast.Constant) and isinstance(key.value, str)
                                                            and re.fullmatch(r"[A-Za-z0-9_]+", key.value)):
                self.refuse(node, f"{f.id}() with anything but an object and a literal attribute name")
            if isinstance(obj, ast.Name) and obj.id in ("torch", "ops", "__torch__"):
                self.refuse(node, f"{f.id}() on {obj.id!r}, which could reach any operator")
        elif isinstance(f, ast.Attribute):
            parts = _chain(f)
            rooted = parts is not None and parts[0] in ("torch", "ops", "__torch__") and not any(
                parts[0] in s for s in self.locals)
            if not rooted and f.attr not in self.methods and not aten_allowed(f.attr) \
                    and f.attr not in _CONTAINER_METHODS:
                self.refuse(node, f"its code calls the method {f.attr!r}, which is neither defined in the archive "
                                  f"nor an allowed tensor operator")
        elif not isinstance(f, ast.Name):
            if not isinstance(f, (ast.Subscript,)):
                self.refuse(node, "a call of a computed value")
        self.generic_visit(node)


def _code_members(z: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    return [i for i in z.infolist() if i.filename.endswith(".py")]


def check_code(p: Path) -> None:
    """Gate 1: parse and allow-list every code file of the archive (see the module docstring)."""
    with zipfile.ZipFile(p) as z:
        members = _code_members(z)
        if sum(i.file_size for i in members) > MAX_CODE_BYTES:
            raise ModelLoadError(f"{p}: the archive holds more than {MAX_CODE_BYTES >> 20} MiB of code")
        sources: dict[str, str] = {}
        for info in members:
            data = z.read(info)
            if not _PRINTABLE.match(data):
                raise UnsafeModelError(f"{p}: refusing to load: {info.filename} has characters outside printable "
                                       f"ASCII (tabs, carriage returns, other bytes), which TorchScript code never has")
            text = data.decode("ascii")
            if "\\\n" in text or '"""' in text or "'''" in text:
                raise UnsafeModelError(f"{p}: refusing to load: {info.filename} has line continuations or "
                                       f"triple-quoted strings, which TorchScript code never has")
            sources[info.filename] = text
    trees: dict[str, ast.Module] = {}
    for name, text in sources.items():
        try:
            trees[name] = ast.parse(text, filename=name)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            raise UnsafeModelError(f"{p}: refusing to load: {name} is not valid TorchScript code "
                                   f"({type(e).__name__})") from None
    defined: set[str] = set()
    methods: set[str] = set()
    for tree in trees.values():
        for stmt in tree.body:
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef)):
                defined.add(stmt.name)
            if isinstance(stmt, ast.ClassDef):
                methods.update(s.name for s in stmt.body if isinstance(s, ast.FunctionDef))
    methods.add("forward")
    for name, tree in trees.items():
        try:
            _Gate(name, frozenset(defined), frozenset(methods)).visit(tree)
        except UnsafeModelError as e:
            raise UnsafeModelError(f"{p}: refusing to load: {e}") from None
        except RecursionError:
            raise UnsafeModelError(f"{p}: refusing to load: {name} is nested too deeply") from None


def _script_methods(module: torch.jit.ScriptModule) -> list[tuple[str, Any]]:
    out = []
    for qual, sub in module.named_modules():
        c = getattr(sub, "_c", None)
        if c is None:
            continue
        for name in c._method_names():
            out.append((f"{qual or '<root>'}.{name}", c._get_method(name)))
    return out


def check_graphs(module: torch.jit.ScriptModule, p: Path) -> None:
    """Gate 2: every node of every method's inlined graph is an allowed operator."""
    def walk(block: Any, where: str) -> None:
        for node in block.nodes():
            kind = node.kind()
            ns, _, op = kind.partition("::")
            ok = (ns == "aten" and aten_allowed(op)) or (ns == "prim" and op in ALLOWED_PRIM_NODES)
            if not ok:
                raise UnsafeModelError(f"{p}: refusing to load: the method {where} runs {kind}, which is not an "
                                       f"allowed tensor operator")
            for b in node.blocks():
                walk(b, where)

    for where, method in _script_methods(module):
        graph = getattr(method, "inlined_graph", None) or method.graph
        walk(graph, where)


def load_torchscript(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None) -> LoadedModel:
    # TorchScript's unpickler resolves its own ``__torch__`` classes and ``torch.jit._pickle`` helpers
    # without importing Python; anything else is refused before loading.
    check_archive_pickles(p, safe_prefixes=("__torch__.", "torch.jit._pickle."))
    check_code(p)
    module = torch.jit.load(str(p), map_location="cpu")
    check_graphs(module, p)
    spec = _infer_spec(module, p, input_shape, num_classes, None)
    return LoadedModel(module.eval(), spec, "torchscript", p)
