"""One trainable model surface for every format a user may hold.

Defences need more than a callable: forward hooks on named layers (sanitisers, pruning), parameter
slices to zero (pruning masks) and gradients (fine-tuning, unlearning). A trojanscope model
directory or a state dict already is such a module. A received program is not: an unflattened
``torch.export`` program has interpreter modules instead of layers, a TorchScript module cannot be
hooked. :func:`model_surface` turns every :class:`~trojanscope.models.io.LoadedModel` into a
:class:`ModelSurface`, whose ``module`` is a plain ``torch.fx.GraphModule`` whose convolutions,
dense layers and BatchNorms are real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm{1,2}d`` modules
sharing the file's weights, named after the layers of the program (``stem``, ``layer1.0.conv1``...).
Everything else in the graph (activations, pooling, residual sums, reshapes) stays as the aten
operators the program already had.

How each format becomes a graph:

* ``.pt2`` (``torch.export``): the program, re-read by the project's safe reader
  (never ``torch.export.load``), gives its flat aten graph (``ExportedProgram.module()``).
* TorchScript: torch's TorchScript-to-export converter (``TS2EPConverter``) turns the scripted
  module's graph (already checked by the safe loader) into an exported program; then as for ``.pt2``.
* ONNX: the safe loader's rebuilt module is already made of standard layers; it is used as it is
  (a copy, BatchNorm statistics frozen).

Each rebuilt graph is checked against the loaded model on random inputs before it is used; a
mismatch is refused rather than silently repaired wrong.

**BatchNorm of received models.** Their running statistics are frozen during fine-tuning (the layers
stay in eval mode when the model is put in training mode; their affine weights still train), since a
defender's small clean set would otherwise overwrite statistics the vendor estimated on the full
training set. ``freeze_bn_stats=False`` (``repair --train-bn-stats``) lets them update. The project's
own models (trojanscope directories, state dicts) keep their usual BatchNorm behaviour.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError
from .io import LoadedModel, ModelSpec

#: Formats that come from outside the project (written back by :mod:`~trojanscope.models.writeback`).
RECEIVED_FORMATS = ("export", "torchscript", "onnx")


class FrozenStatsBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose running statistics never update: it stays in eval mode."""

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm1d":
        return super().train(False)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics never update: it stays in eval mode."""

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm2d":
        return super().train(False)


_FROZEN = {nn.BatchNorm1d: FrozenStatsBatchNorm1d, nn.BatchNorm2d: FrozenStatsBatchNorm2d}


def freeze_bn_stats(module: nn.Module) -> nn.Module:
    """Make every ``BatchNorm1d`` / ``BatchNorm2d`` of ``module`` keep its running statistics (in place).

    The layers keep their class for ``isinstance`` (they become subclasses) and their parameters.
    """
    for m in module.modules():
        frozen = _FROZEN.get(type(m))
        if frozen is not None:
            m.__class__ = frozen
            m.eval()
    return module


def unfreeze_bn_stats(module: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn_stats` (in place)."""
    back = {v: k for k, v in _FROZEN.items()}
    for m in module.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
    return module


@dataclass
class ModelSurface:
    """A model in any format, as a trainable module with named layers, and how to write it back.

    Attributes:
        module: the trainable ``nn.Module`` (standard layers, hookable, on the loaded model's device).
        format: the input's format (``"trojanscope"``, ``"state_dict"``, ``"export"``,
            ``"torchscript"``, ``"onnx"``); a repair is written back in it.
        spec: input shape and class count.
        path: the file it came from.
        rebuilt: True when ``module`` is a graph rebuilt from a program (not the loader's module).
        bn_stats_frozen: whether BatchNorm running statistics are frozen during training.
        layers: the named layers found in the graph, in graph order (``{name: kind}``).
    """

    module: nn.Module
    format: str
    spec: ModelSpec
    path: Path
    rebuilt: bool = False
    bn_stats_frozen: bool = False
    layers: dict[str, str] = field(default_factory=dict)

    @property
    def received(self) -> bool:
        """Whether the model came from outside the project (a program, not a trojanscope architecture)."""
        return self.format in RECEIVED_FORMATS

    def reinitialised(self, seed: int | None = 0) -> nn.Module:
        """A copy of the graph with every layer re-initialised (see :func:`reinitialised_copy`)."""
        return reinitialised_copy(self.module, seed)

    def write(self, model: nn.Module, out: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model`` (this surface's module or a repaired copy of it) to directory ``out`` in
        the input's format; returns the file written (see :func:`~trojanscope.models.writeback.write_back`)."""
        from .writeback import write_back

        return write_back(self, model, out, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.path), "rebuilt": self.rebuilt,
                "bn_stats_frozen": self.bn_stats_frozen, "layers": dict(self.layers)}


# --- graph rebuilding ---------------------------------------------------------------------------

def _aten(name: str, overload: str = "default") -> Any:
    op = getattr(torch.ops.aten, name, None)
    return None if op is None else getattr(op, overload, None)


def _layer_ops() -> dict[Any, str]:
    ops = {_aten("conv2d"): "conv2d", _aten("linear"): "linear", _aten("batch_norm"): "batch_norm",
           _aten("_native_batch_norm_legit_no_training"): "bn_no_training", _aten("convolution"): "convolution"}
    return {k: v for k, v in ops.items() if k is not None}


def _attr_name(node: Any) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach().clone(), requires_grad=True)


def _ints(v: Any, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(a) for a in v)


def _make_layer(kind: str, node: fx.Node, gm: nn.Module) -> tuple[nn.Module, list[fx.Node], str] | None:
    """The standard layer a call node computes, the inputs it replaces, and its name (or None)."""
    args = list(node.args) + [None] * 10
    kw = dict(node.kwargs)
    x = args[0]
    if kind in ("conv2d", "convolution"):
        w, b = args[1], args[2]
        wname = _attr_name(w)
        if wname is None or (b is not None and _attr_name(b) is None):
            return None
        weight = _fetch(gm, wname)
        if weight.ndim != 4:
            return None
        if kind == "conv2d":
            stride, padding, dilation, groups = (args[3] or kw.get("stride", [1, 1]), args[4] or kw.get("padding", [0, 0]),
                                                 args[5] or kw.get("dilation", [1, 1]), args[6] or kw.get("groups", 1))
            if isinstance(padding, str):
                return None
        else:  # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
            if args[6]:
                return None
            stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
        groups = int(groups)
        conv = nn.Conv2d(int(weight.shape[1]) * groups, int(weight.shape[0]), tuple(weight.shape[2:]),
                         stride=_ints(stride), padding=_ints(padding), dilation=_ints(dilation), groups=groups,
                         bias=b is not None, device="meta")
        conv.weight = _as_param(weight)
        conv.bias = _as_param(_fetch(gm, _attr_name(b))) if b is not None else None  # type: ignore[arg-type]
        return conv, [w] + ([b] if b is not None else []), wname.rpartition(".")[0] or wname
    if kind == "linear":
        w, b = args[1], args[2] if args[2] is not None else kw.get("bias")
        wname = _attr_name(w)
        if wname is None or (b is not None and _attr_name(b) is None):
            return None
        weight = _fetch(gm, wname)
        if weight.ndim != 2:
            return None
        lin = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=b is not None, device="meta")
        lin.weight = _as_param(weight)
        lin.bias = _as_param(_fetch(gm, _attr_name(b))) if b is not None else None  # type: ignore[arg-type]
        return lin, [w] + ([b] if b is not None else []), wname.rpartition(".")[0] or wname
    # batch norm: batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn) or
    # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
    w, b, mean, var = args[1], args[2], args[3], args[4]
    if kind == "batch_norm":
        if args[5]:
            return None
        momentum, eps = args[6], args[7]
    else:
        momentum, eps = args[5], args[6]
    names = [_attr_name(v) for v in (mean, var)]
    if None in names or (w is not None and _attr_name(w) is None) or (b is not None and _attr_name(b) is None):
        return None
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    ndim = getattr(val, "ndim", None)
    if ndim not in (2, 3, 4):
        return None
    rm, rv = _fetch(gm, names[0]), _fetch(gm, names[1])
    cls = nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d
    affine = w is not None and b is not None
    bn = cls(int(rm.shape[0]), eps=float(eps), momentum=float(momentum) if momentum is not None else 0.1, affine=affine)
    if affine:
        bn.weight = _as_param(_fetch(gm, _attr_name(w)))
        bn.bias = _as_param(_fetch(gm, _attr_name(b)))
    bn.running_mean = rm.detach().clone()
    bn.running_var = rv.detach().clone()
    base = names[0].rpartition(".")[0] or names[0]
    return bn, [v for v in (w, b, mean, var) if v is not None], base


def _set_path(root: nn.Module, name: str, value: Any, taken: set[str]) -> str:
    """Put ``value`` (a module or tensor) at dotted ``name`` under ``root``, renaming on clashes."""
    def clash(n: str) -> bool:
        parts = n.split(".")
        obj: Any = root
        for i, part in enumerate(parts):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
            if i < len(parts) - 1 and not (isinstance(obj, nn.Module) and type(obj) is nn.Module):
                return True  # a leaf layer or tensor where a container is needed
        return True  # the name itself is taken

    ok = all(p.isidentifier() or p.isdigit() for p in name.split("."))
    final = name if ok else "_".join(p for p in name.replace(".", "_").split("_") if p) or "layer"
    if not final.replace(".", "").replace("_", "").isalnum() or final[0].isdigit():
        final = f"layer_{abs(hash(final)) % 10**8}"
    if clash(final) or final in taken:
        base = final.replace(".", "_")
        final, i = base, 1
        while clash(final) or final in taken:
            final, i = f"{base}_{i}", i + 1
    parts = final.split(".")
    obj = root
    for part in parts[:-1]:
        if not hasattr(obj, part):
            obj.add_module(part, nn.Module())
        obj = getattr(obj, part)
    leaf = parts[-1]
    if isinstance(value, nn.Module):
        obj.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        obj.register_parameter(leaf, value)
    else:
        obj.register_buffer(leaf, value)
    taken.add(final)
    return final


def rebuild_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """A copy of the aten graph ``gm`` (``ExportedProgram.module()``) with its convolutions, dense
    layers and BatchNorms as standard modules named after their weights (``"stem.weight"`` ->
    ``"stem"``). Returns ``(module, {layer name: kind})``."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    ops = _layer_ops()
    root = nn.Module()
    taken: set[str] = set()
    layers: dict[str, str] = {}
    by_weight: dict[str, str] = {}
    # drop export's runtime guard call (a module that checks input shapes) and unused attributes
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        made = _make_layer(ops[node.target], node, gm)
        if made is None:
            continue
        layer, replaced, name = made
        key = replaced[0].target
        if key in by_weight:  # a layer called twice (shared weights): one module, called twice
            target = by_weight[key]
        else:
            target = _set_path(root, name, layer, taken)
            by_weight[key] = target
            layers[target] = type(layer).__name__
        with graph.inserting_before(node):
            new = graph.call_module(target, (node.args[0],))
        if ops[node.target] == "bn_no_training":  # returns (out, mean, rstd): users take [0]
            for user in list(node.users):
                if user.op == "call_function" and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
            if node.users:
                raise UnsupportedModelError("a BatchNorm's saved statistics are used by the program; cannot rebuild it")
        else:
            node.replace_all_uses_with(new)
        new.meta = dict(node.meta)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if not node.users:
                graph.erase_node(node)
                continue
            value = _fetch(gm, node.target)
            if isinstance(value, torch.Tensor):
                node.target = _set_path(root, node.target, value, taken)
            else:
                raise UnsupportedModelError(f"the program holds a non-tensor attribute {node.target!r}; cannot rebuild it")
        elif node.op == "call_module":
            if node.target not in taken:
                raise UnsupportedModelError(f"the program calls a module {node.target!r}; cannot rebuild it")
    graph.eliminate_dead_code()
    new_graph = fx.Graph()
    new_graph._codegen = copy.deepcopy(graph._codegen)  # export's pytree calling convention
    new_graph.output(new_graph.graph_copy(graph, {}))
    out = fx.GraphModule(root, new_graph, class_name="ReceivedModel")
    out.graph.lint()
    return out, layers


def _program_of(lm: LoadedModel) -> Any:
    """The ``ExportedProgram`` behind a ``.pt2`` or TorchScript model."""
    shape = tuple(lm.spec.input_shape)
    if lm.format == "export":
        try:  # the safe reader (never torch.export.load)
            from .io._pt2 import _read_pt2 as reader
        except ImportError:
            from .io import _read_pt2 as reader
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return reader(lm.path)
    if lm.format == "torchscript":
        from torch._export.converter import TS2EPConverter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return TS2EPConverter(lm.model.cpu(), (torch.zeros(2, *shape),)).convert()
            except Exception as e:  # the converter covers most but not all TorchScript
                raise UnsupportedModelError(
                    f"{lm.path}: this TorchScript model cannot be turned into a trainable graph "
                    f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); output-only verbs "
                    f"(evaluate, scan, filter) still work on it") from None
    raise UnsupportedModelError(f"{lm.path}: no program behind a {lm.format} model")


def _check_same(a: nn.Module, b: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, *shape, generator=g)
    dev = next((p.device for p in b.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        ya = a(x.to(dev)).float().cpu()
        yb = b(x.to(dev)).float().cpu()
    if ya.shape != yb.shape or not torch.allclose(ya, yb, rtol=1e-3, atol=1e-4 * (1 + float(ya.abs().max()))):
        raise UnsupportedModelError(f"{path}: the trainable graph rebuilt from the program does not compute what the "
                                    f"program does (max difference {float((ya - yb).abs().max()):.3g}); refusing to use it")


def model_surface(lm: LoadedModel, *, freeze_bn: bool = True) -> ModelSurface:
    """The trainable surface of a loaded model (see the module docstring).

    Args:
        lm: what :func:`~trojanscope.models.load_model` returned.
        freeze_bn: for a received model, keep BatchNorm running statistics frozen during training.

    Raises:
        UnsupportedModelError: a program that cannot be turned into a graph of standard layers.
    """
    fmt = lm.format
    if fmt not in RECEIVED_FORMATS:
        return ModelSurface(lm.model, fmt, lm.spec, lm.path, rebuilt=False, bn_stats_frozen=False,
                            layers={n: type(m).__name__ for n, m in lm.model.named_modules()
                                    if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))})
    dev = next((p.device for p in lm.model.parameters()), torch.device("cpu"))
    if fmt == "onnx":
        module = copy.deepcopy(lm.model)
        layers = {n: type(m).__name__ for n, m in module.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))}
        rebuilt = False
    else:
        ep = _program_of(lm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                flat = ep.module()
                module, layers = rebuild_graph(flat)  # type: ignore[arg-type]
            except UnsupportedModelError:
                raise
            except Exception as e:
                raise UnsupportedModelError(f"{lm.path}: cannot turn the program into a trainable graph "
                                            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
                                            ) from None
        rebuilt = True
        module = module.to(dev).eval()
        _check_same(lm.model.eval(), module, tuple(lm.spec.input_shape), lm.path)
    if not layers:
        raise UnsupportedModelError(f"{lm.path}: the model has no convolution or dense layer with its own weights")
    for p in module.parameters():
        p.requires_grad_(True)
    if freeze_bn:
        freeze_bn_stats(module)
    return ModelSurface(module.eval(), fmt, lm.spec, lm.path, rebuilt=rebuilt, bn_stats_frozen=freeze_bn, layers=layers)


def reinitialised_copy(module: nn.Module, seed: int | None = 0) -> nn.Module:
    """A deep copy of ``module`` with every conv / linear / norm layer re-initialised by torch's
    default initialisers (``reset_parameters``, running statistics reset), seeded by ``seed``.

    The graph (what calls what) is the received one: this is the "fresh model of the same
    architecture" that exclusionary reclassification, provenance filtering and retraining need.
    BatchNorm layers of the copy update their running statistics again (frozen statistics are for
    fine-tuning a received model, not for training one from scratch). Parameters held outside such
    layers (rare: a learned scale used by a bare operator) keep their values; their names are
    listed in ``kept`` of the copy's ``reinit_report``.

    Raises:
        UnsupportedModelError: a TorchScript module (not a graph of layers).
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedModelError("cannot re-initialise a TorchScript module; rebuild its graph first "
                                    "(trojanscope.models.model_surface)")
    new = unfreeze_bn_stats(copy.deepcopy(module))  # a model trained from scratch learns its statistics
    dev = next((p.device for p in new.parameters()), torch.device("cpu"))
    kept: list[str] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0 if seed is None else int(seed))
        for name, m in new.named_modules():
            own = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
            if not own:
                continue
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                kept += [f"{name}.{n}" if name else n for n in own]
    new.reinit_report = {"reinitialised": True, "kept": kept}  # type: ignore[assignment]
    return new
