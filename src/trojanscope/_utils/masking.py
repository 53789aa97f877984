"""Channel and unit masking: the pieces pruning is made of (shared by the pruning repairs, the
pipeline's frozen channels and the pruning-aware attack).

A channel (an output feature map of a ``Conv2d``, ``Linear`` or ``BatchNorm``) is masked by
zeroing its parameters, so the architecture is kept; a unit (an input of a ``Linear``) by zeroing
that column of the weight. :func:`frozen_channels` keeps masked slices at zero while training.
:func:`prune_dormant` is the pruning loop itself: mask the neurons clean inputs leave dormant,
in increasing order of mean activation, until the validation accuracy falls too far.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batching import DeviceLike, accuracy, eval_mode, model_device
from ..errors import UnsupportedModelError
from .hooks import capture, resolve_layer

log = logging.getLogger(__name__)

_MASKABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def pruning_order(mean_activation: torch.Tensor) -> torch.Tensor:
    """Channels in increasing order of mean activation (ties by index): the pruning order.

    Example:
        >>> pruning_order(torch.tensor([0.5, 0.0, 2.0, 0.0])).tolist()
        [1, 3, 0, 2]
    """
    return torch.sort(mean_activation.double(), stable=True).indices


def mean_channel_activation(model: nn.Module, x: torch.Tensor, layer: str, *, batch_size: int = 256,
                            device: DeviceLike = None) -> torch.Tensor:
    """Mean of ``ReLU(activation)`` of each channel of ``layer`` over samples (and positions).

    Shape:
        ``x`` ``(N, C, H, W)`` -> ``(channels,)`` float64 on CPU.
    """
    dev = model_device(model, device)
    total: torch.Tensor | None = None
    count = 0
    with eval_mode(model), torch.inference_mode(), capture(model, layer) as acts:
        for i in range(0, x.shape[0], batch_size):
            model(x[i:i + batch_size].to(dev))
            a = acts.value.double().clamp_min(0)  # type: ignore[union-attr]
            dims = [d for d in range(a.ndim) if d != 1]
            s = a.sum(dims).cpu()
            total = s if total is None else total + s
            count += a.numel() // a.shape[1]
    assert total is not None
    return total / count


def prunable_modules(model: nn.Module, layer: str) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The layer to prune and every module whose parameters must be zeroed to mask its channels.

    Returns:
        ``(name, [(module_name, module), ...])``: the layer itself and, for a convolution or
        linear layer followed directly by a BatchNorm of the same width, that BatchNorm.
    """
    name, module, where = resolve_layer(model, layer)
    if where != "output" or not isinstance(module, _MASKABLE):
        raise UnsupportedModelError(
            f"pruning masks the output channels of a Conv2d, Linear or BatchNorm layer; {layer!r} "
            f"resolves to {type(module).__name__} {name!r}"
        )
    found: list[tuple[str, nn.Module]] = [(name, module)]
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        mods = list(model.named_modules())
        pos = next(i for i, (n, m) in enumerate(mods) if m is module)
        if pos + 1 < len(mods):
            nxt_name, nxt = mods[pos + 1]
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and nxt.num_features == width:
                found.append((nxt_name, nxt))
    for n, m in found:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.affine:
            raise UnsupportedModelError(f"BatchNorm {n!r} has no affine parameters, so its channels cannot be masked")
    return name, found


def unit_layer(model: nn.Module, layer: str) -> tuple[str, nn.Linear]:
    """The ``nn.Linear`` whose input units are the neurons of ``Pruning(granularity="unit")``.

    ``layer`` names a Linear layer, or is ``"last_conv"``: then the first Linear registered after
    the last convolution, i.e. the dense layer that reads the last convolutional block's flattened
    feature maps, one input unit per channel and position.
    """
    if layer == "last_conv":
        mods = list(model.named_modules())
        conv_pos = [i for i, (_, m) in enumerate(mods) if isinstance(m, nn.Conv2d)]
        if not conv_pos:
            raise UnsupportedModelError("the model has no Conv2d layer, so 'last_conv' is undefined")
        after = [(n, m) for n, m in mods[conv_pos[-1] + 1:] if isinstance(m, nn.Linear)]
        if not after:
            raise UnsupportedModelError("no nn.Linear follows the last convolution; name the Linear layer whose "
                                        "input units should be pruned")
        return after[0]  # type: ignore[return-value]
    name, module, _ = resolve_layer(model, layer)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(
            f"unit pruning masks the input units of an nn.Linear layer; {layer!r} resolves to "
            f"{type(module).__name__} {name!r}"
        )
    return name, module


def mean_unit_activation(model: nn.Module, x: torch.Tensor, linear: nn.Linear, *, batch_size: int = 256,
                         device: DeviceLike = None) -> torch.Tensor:
    """Mean of ``|input|`` of each input unit of ``linear`` over samples (float64, CPU).

    The absolute value measures how much a unit feeds the layer; when a ReLU precedes the layer
    (every built-in architecture) it is the paper's post-activation mean.
    """
    dev = model_device(model, device)
    total: torch.Tensor | None = None
    rows = 0
    box: dict[str, torch.Tensor] = {}
    handle = linear.register_forward_pre_hook(lambda _m, args: box.__setitem__("a", args[0].detach()))
    try:
        with eval_mode(model), torch.inference_mode():
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size].to(dev))
                a = box["a"].double().abs().reshape(-1, linear.in_features)
                rows += a.shape[0]
                total = a.sum(0).cpu() if total is None else total + a.sum(0).cpu()
    finally:
        handle.remove()
    assert total is not None
    return total / rows


def n_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.num_features  # type: ignore[return-value]


def channel_params(model: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Names (in ``model.named_parameters()``) of the parameters whose rows are channels."""
    names = []
    for mname, m in modules:
        for pname, p in m.named_parameters(recurse=False):
            if p is not None and pname in ("weight", "bias"):
                names.append(f"{mname}.{pname}" if mname else pname)
    return names


def zero_channels(model: nn.Module, param_names: Sequence[str], channels: Sequence[int] | torch.Tensor, *,
                  dim: int = 0) -> None:
    """Zero slices ``channels`` along ``dim`` of the named parameters of ``model``, in place (the mask).

    ``dim=0`` (rows) masks output channels; ``dim=1`` (columns of a Linear weight) masks input units.
    """
    idx = torch.as_tensor(channels, dtype=torch.long)
    if idx.numel() == 0:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in param_names:
            p = params[n]
            p.index_fill_(dim, idx.to(p.device), 0)


@contextlib.contextmanager
def frozen_channels(model: nn.Module, pruned: dict[str, Sequence[int]],
                    dims: dict[str, int] | None = None) -> Iterator[None]:
    """Inside the block, the gradients of the pruned slices are zero, so training keeps them pruned.

    With zero gradients and zero values, Adam and SGD (even with weight decay) leave them at 0.
    The gradient hooks are removed on exit.

    Args:
        model: the network being trained.
        pruned: ``{parameter name: channel indices}``.
        dims: ``{parameter name: dim}`` along which the indices run (default 0, rows; 1 for the
            input units of a Linear weight, see ``Pruning(granularity="unit")``).
    """
    params = dict(model.named_parameters())
    handles = []
    try:
        for n, chans in pruned.items():
            if not len(chans):
                continue
            p = params[n]
            d = (dims or {}).get(n, 0)
            shape = [1] * p.ndim
            shape[d] = p.shape[d]
            keep = torch.ones(shape, dtype=p.dtype, device=p.device)
            keep.index_fill_(d, torch.as_tensor(list(chans), dtype=torch.long, device=p.device), 0)
            handles.append(p.register_hook(lambda g, k=keep: g * k))
        yield
    finally:
        for h in handles:
            h.remove()


# --- the pruning loop -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Neurons:
    """The neurons of one layer a pruning run may mask.

    Attributes:
        name: the pruned layer (for units: the Linear layer whose inputs they are).
        modules: ``(name, module)`` whose parameters are zeroed.
        count: how many neurons.
        dim: the dimension of the parameters along which they run (0 rows, 1 input units).
        params: the names of those parameters.
        mean_activation: ``(count,)`` float64, on the clean data.
        step: neurons pruned between two accuracy checks.
    """

    name: str
    modules: list[tuple[str, nn.Module]]
    count: int
    dim: int
    params: list[str]
    mean_activation: torch.Tensor
    step: int


def dormant_neurons(net: nn.Module, x: torch.Tensor, layer: str, granularity: str, step: int | None, *,
                    batch_size: int, device: DeviceLike) -> Neurons:
    """The channels (``granularity="channel"``) or dense input units (``"unit"``) of ``layer``
    and their mean activation on ``x``; ``step`` defaults to 1 channel or 1% of the units."""
    if granularity == "unit":
        name, lin = unit_layer(net, layer)
        count = lin.in_features
        act = mean_unit_activation(net, x, lin, batch_size=batch_size, device=device)
        return Neurons(name, [(name, lin)], count, 1, [f"{name}.weight"], act, step or -(-count // 100))
    name, modules = prunable_modules(net, layer)
    act = mean_channel_activation(net, x, name, batch_size=batch_size, device=device)
    return Neurons(name, modules, n_channels(modules[0][1]), 0, channel_params(net, modules), act, step or 1)


def pruning_steps(count: int, step: int, ratio: float | None) -> list[int]:
    """How many neurons are pruned at each accuracy check: every ``step`` up to ``count`` (the
    accuracy rule), or up to ``round(ratio * count)`` exactly."""
    if ratio is not None:
        keep = int(round(ratio * count))
        return sorted(set(list(range(step, keep, step)) + [keep])) if keep else []
    steps = list(range(step, count + 1, step))
    if steps and steps[-1] != count:
        steps.append(count)
    return steps


def _restore(net: nn.Module, neurons: Neurons, idx: torch.Tensor, originals: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        params = dict(net.named_parameters())
        for n in neurons.params:
            i = idx.to(params[n].device)
            params[n].index_copy_(neurons.dim, i, originals[n].index_select(neurons.dim, i))


def prune_dormant(net: nn.Module, clean_x: torch.Tensor, val: Any, *, layer: str = "last_conv",
                  granularity: str = "channel", max_drop: float = 0.04, ratio: float | None = None,
                  step: int | None = None, batch_size: int = 256, device: DeviceLike = None,
                  monitor: Callable[[nn.Module], dict[str, float]] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prune ``net`` in place: mask the neurons of ``layer`` in increasing order of mean activation
    on ``clean_x`` until the accuracy on ``val`` has dropped by more than ``max_drop`` (the step
    that crossed it is undone), or exactly ``ratio`` of them.

    Returns:
        ``(curve, details)``: one row per check (``pruned``, ``ratio``, ``accuracy`` and
        ``monitor(net)``'s figures), and what was pruned (see :class:`~trojanscope.defenses.
        repair.pruning.Pruning`).
    """
    nr = dormant_neurons(net, clean_x, layer, granularity, step, batch_size=batch_size, device=device)
    order, count = pruning_order(nr.mean_activation), nr.count

    def point(k: int) -> dict[str, Any]:
        row: dict[str, Any] = {"pruned": k, "ratio": k / count,
                               "accuracy": accuracy(net, val, batch_size=batch_size, device=device)}
        return {**monitor(net), **row} if monitor is not None else row  # its own figures win

    history = [point(0)]
    acc0 = history[0]["accuracy"]
    originals = {n: p.detach().clone() for n, p in net.named_parameters() if n in nr.params}
    kept = 0
    for k in pruning_steps(count, nr.step, ratio):
        zero_channels(net, nr.params, order[kept:k], dim=nr.dim)
        history.append(point(k))
        acc = history[-1]["accuracy"]
        log.info("pruned %d/%d %ss of %s: accuracy %.4f", k, count, granularity, nr.name, acc)
        if ratio is None and acc0 - acc > max_drop + 1e-12:
            _restore(net, nr, order[kept:k], originals)  # undo the step that crossed the threshold
            break
        kept = k
    pruned = order[:kept].tolist()
    details = {
        "layer": nr.name, "granularity": granularity, "masked_modules": [n for n, _ in nr.modules],
        "n_neurons": count, "n_channels": count, "n_pruned": kept, "ratio": kept / count,
        "pruned_channels": pruned, "order": order.tolist(), "mean_activation": nr.mean_activation.float(),
        "accuracy_before": acc0, "accuracy_after": accuracy(net, val, batch_size=batch_size, device=device),
        "pruned_params": {n: pruned for n in nr.params}, "pruned_dims": {n: nr.dim for n in nr.params},
    }
    return history, details
