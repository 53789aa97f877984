"""Rebuilding a program's aten graph with standard layers (used by :mod:`~trojanscope.models.surface`).

:func:`rebuild_graph` replaces each convolution, dense and BatchNorm call of an
``ExportedProgram.module()`` graph by a real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm{1,2}d``
sharing the program's weights and named after them, and each global average pooling by an
``nn.AdaptiveAvgPool2d(1)``; every other operator stays as it was.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError


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


#: what a layer maker returns: the layer, the graph inputs it replaces, its name; None: not a layer
_Made = tuple[nn.Module, list[fx.Node], str] | None


def _weight_and_bias(gm: nn.Module, w: Any, b: Any, ndim: int) -> tuple[str, torch.Tensor, Any] | None:
    """A conv / dense call's weight (its attribute name and tensor, of ``ndim`` dimensions) and
    its bias tensor (None when the call has none); None when either is not a plain attribute."""
    wname = _attr_name(w)
    if wname is None or (b is not None and _attr_name(b) is None):
        return None
    weight = _fetch(gm, wname)
    if weight.ndim != ndim:
        return None
    return wname, weight, (_fetch(gm, _attr_name(b)) if b is not None else None)  # type: ignore[arg-type]


def _with_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    layer.weight = _as_param(weight)
    layer.bias = _as_param(bias) if bias is not None else None  # type: ignore[assignment]
    return layer


def _make_conv(kind: str, args: list[Any], kw: dict[str, Any], gm: nn.Module) -> _Made:
    w, b = args[1], args[2]
    found = _weight_and_bias(gm, w, b, 4)
    if found is None:
        return None
    wname, weight, bias = found
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
    return _with_params(conv, weight, bias), [w] + ([b] if b is not None else []), wname.rpartition(".")[0] or wname


def _make_linear(args: list[Any], kw: dict[str, Any], gm: nn.Module) -> _Made:
    w, b = args[1], args[2] if args[2] is not None else kw.get("bias")
    found = _weight_and_bias(gm, w, b, 2)
    if found is None:
        return None
    wname, weight, bias = found
    lin = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=b is not None, device="meta")
    return _with_params(lin, weight, bias), [w] + ([b] if b is not None else []), wname.rpartition(".")[0] or wname


def _make_batch_norm(kind: str, args: list[Any], gm: nn.Module) -> _Made:
    # batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn) or
    # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
    x, w, b, mean, var = args[0], args[1], args[2], args[3], args[4]
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


def _make_layer(kind: str, node: fx.Node, gm: nn.Module) -> _Made:
    """The standard layer a call node computes, the inputs it replaces, and its name (or None)."""
    args = list(node.args) + [None] * 10
    kw = dict(node.kwargs)
    if kind in ("conv2d", "convolution"):
        return _make_conv(kind, args, kw, gm)
    if kind == "linear":
        return _make_linear(args, kw, gm)
    return _make_batch_norm(kind, args, gm)


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
    if not final.replace(".", "").replace("_", "").isalnum():  # a stable name, not str's salted hash
        final = f"layer_{hashlib.sha256(final.encode()).hexdigest()[:8]}"
    elif final[0].isdigit():  # "0.weight" of an nn.Sequential: layer_0
        final = f"layer_{final.replace('.', '_')}"
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


def _call_module(gm: fx.GraphModule, target: str, module: nn.Module, arg: Any) -> fx.Node:
    """A ``call_module`` node for ``target`` (a module under the new root), inserted where the
    graph's insertion point is. fx checks that the graph's own module has ``target``; a renamed
    layer (``0.weight`` of an ``nn.Sequential`` becomes ``layer_...``) or a new one
    (``global_pool``) is added to it too (the rebuilt module is made from the new root)."""
    try:
        gm.get_submodule(target)
    except AttributeError:
        gm.add_submodule(target, module)
    return gm.graph.call_module(target, (arg,))


def _replace_layers(gm: fx.GraphModule, root: nn.Module, taken: set[str]) -> dict[str, str]:
    """Replace each conv / dense / BatchNorm call of ``gm``'s graph by a call of a standard module
    put under ``root``; returns ``{layer name: kind}``."""
    graph = gm.graph
    ops = _layer_ops()
    layers: dict[str, str] = {}
    by_weight: dict[str, str] = {}
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
            new = _call_module(gm, target, layer, node.args[0])
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
    return layers


def _replace_global_pools(gm: fx.GraphModule, root: nn.Module, taken: set[str]) -> None:
    """Replace each ``adaptive_avg_pool2d(x, [1, 1])`` call by an ``nn.AdaptiveAvgPool2d(1)``
    module (``global_pool``), so that the map it averages can be hooked (the sanitisers' "auto"
    layer, :func:`~trojanscope._utils.hooks.global_pool`). Same computation, by construction."""
    graph, op = gm.graph, _aten("adaptive_avg_pool2d")
    for node in list(graph.nodes):
        if op is None or node.op != "call_function" or node.target is not op or len(node.args) < 2:
            continue
        if not isinstance(node.args[1], (list, tuple)) or [int(v) for v in node.args[1]] not in ([1, 1], [1]):
            continue
        pool = nn.AdaptiveAvgPool2d(1)
        target = _set_path(root, "global_pool", pool, taken)
        with graph.inserting_before(node):
            new = _call_module(gm, target, pool, node.args[0])
        node.replace_all_uses_with(new)
        new.meta = dict(node.meta)
        graph.erase_node(node)


def _move_attributes(gm: fx.GraphModule, root: nn.Module, taken: set[str]) -> None:
    """Move the tensors the graph still reads under ``root`` (dropping unused ones); refuse any
    other attribute or module call."""
    graph = gm.graph
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


def rebuild_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """A copy of the aten graph ``gm`` (``ExportedProgram.module()``) with its convolutions, dense
    layers and BatchNorms as standard modules named after their weights (``"stem.weight"`` ->
    ``"stem"``). Returns ``(module, {layer name: kind})``."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    root = nn.Module()
    taken: set[str] = set()
    # drop export's runtime guard call (a module that checks input shapes)
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    layers = _replace_layers(gm, root, taken)
    _replace_global_pools(gm, root, taken)
    _move_attributes(gm, root, taken)
    graph.eliminate_dead_code()
    new_graph = fx.Graph()
    new_graph._codegen = copy.deepcopy(graph._codegen)  # export's pytree calling convention
    new_graph.output(new_graph.graph_copy(graph, {}))
    out = fx.GraphModule(root, new_graph, class_name="ReceivedModel")
    out.graph.lint()
    return out, layers
