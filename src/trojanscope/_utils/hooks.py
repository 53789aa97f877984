"""Layer lookup and activation capture with forward hooks that are always removed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import UnsupportedModelError

#: Symbolic layer names understood everywhere a layer is asked for.
PENULTIMATE = "penultimate"  #: the input of the last ``nn.Linear`` (the last hidden representation)
LAST_CONV = "last_conv"  #: the output of the last ``nn.Conv2d``
POOL_INPUT = "pool_input"  #: the input of the last global average pooling (``nn.AdaptiveAvgPool2d(1)``)


def _check_hookable(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "this method needs the model's internal layers (forward hooks), which a TorchScript "
            "file does not support; give a trojanscope model directory or a torch.export .pt2 program"
        )


def _is_a(module: nn.Module, kind: type) -> bool:
    """``isinstance``, or for a layer of an unflattened ``torch.export`` program, the type it was
    exported from (``type_name()``)."""
    if isinstance(module, kind):
        return True
    type_name = getattr(module, "type_name", None)
    return callable(type_name) and type_name() == f"{kind.__module__}.{kind.__qualname__}"


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module, str]:
    """Find a layer by dotted name or symbolic name.

    Args:
        model: the network.
        layer: a dotted module name (``"features.3"``, its output), the same with ``":input"``
            (``"fc1:input"``, what the module receives), ``"penultimate"`` (the input of the
            last ``nn.Linear``), ``"last_conv"`` (the output of the last ``nn.Conv2d``) or
            ``"pool_input"`` (the input of the last ``nn.AdaptiveAvgPool2d`` to 1x1: the feature
            map a ResNet averages into its penultimate representation).

    Returns:
        ``(name, module, where)`` with ``where`` in ``{"input", "output"}``: which side of the
        module holds the requested activations.
    """
    _check_hookable(model)
    if layer == PENULTIMATE:
        found_in_graph = output_layer(model)
        if found_in_graph is not None:
            return found_in_graph[0], found_in_graph[1], "input"
    if layer == POOL_INPUT:
        found = global_pool(model)
        if found is None:
            raise UnsupportedModelError("the model has no global average pooling layer, so 'pool_input' is undefined")
        return found[0], found[1], "input"
    if layer in (PENULTIMATE, LAST_CONV):
        kind = nn.Linear if layer == PENULTIMATE else nn.Conv2d
        found = [(n, m) for n, m in model.named_modules() if _is_a(m, kind)]
        if not found:
            raise UnsupportedModelError(f"the model has no {kind.__name__} layer, so {layer!r} is undefined")
        name, module = found[-1]
        return name, module, ("input" if layer == PENULTIMATE else "output")
    side = "output"
    if layer.endswith(":input"):
        layer, side = layer[: -len(":input")], "input"
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise UnsupportedModelError(
            f"the model has no layer named {layer!r}; layers: {', '.join(names[:40])}"
        ) from None
    return layer, module, side


def global_pool(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The last ``nn.AdaptiveAvgPool2d`` with output size 1 (a global average pooling), or None.
    A received graph has one where its program pooled globally: the rebuild turns that operator
    into this layer (:mod:`~trojanscope.models._rebuild`, ONNX ``GlobalAveragePool``)."""
    found = [(n, m) for n, m in model.named_modules() if _is_a(m, nn.AdaptiveAvgPool2d)
             and getattr(m, "output_size", None) in (1, (1, 1))]
    return found[-1] if found else None


def output_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """For a ``torch.fx`` graph (a received model's rebuilt graph), the layer that computes the
    logits, found by graph structure: from the output, back through operators without weights
    (reshapes, casts), to the first module call. Its input is the penultimate representation.
    None when ``model`` is not a graph or no such module is found."""
    from torch import fx

    if not isinstance(model, fx.GraphModule):
        return None
    out = next((n for n in reversed(model.graph.nodes) if n.op == "output"), None)
    node = out.args[0] if out is not None else None
    seen = 0
    while node is not None and seen < 64:
        seen += 1
        while isinstance(node, (tuple, list)) and len(node) == 1:
            node = node[0]
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if any(True for _ in module.parameters(recurse=False)):
                return str(node.target), module
            return None
        if node.op not in ("call_function", "call_method"):
            return None
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:  # a sum or product of branches: no single output layer
            return None
        node = tensors[0]
    return None


class Captured:
    """Holds the activations recorded by :func:`capture` (``.value`` is the last batch's)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


@contextlib.contextmanager
def capture(model: nn.Module, layer: str, *, detach: bool = True) -> Iterator[Captured]:
    """Record the activations of ``layer`` during forward passes inside the ``with`` block.

    The hook is removed on exit, even when the block raises.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> with capture(net, "penultimate") as acts:
        ...     _ = net(torch.zeros(5, 1, 2, 2))
        >>> tuple(acts.value.shape)
        (5, 3)
    """
    _, module, where = resolve_layer(model, layer)
    box = Captured()

    if where == "input":
        def pre_hook(_m, args):
            t = args[0]
            box.value = t.detach() if detach else t
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        def hook(_m, _args, out):
            box.value = out.detach() if detach else out
        handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
