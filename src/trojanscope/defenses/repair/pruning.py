"""Pruning and Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018; pruning after Gu et al. 2017).

A backdoor often lives in channels that clean inputs leave dormant. Pruning records the mean
activation of each channel of one layer (the last convolution by default) on clean data and
removes channels in increasing order of activation until the clean validation accuracy has
dropped by more than ``max_drop`` (4 points in the paper). Fine-Pruning then fine-tunes the pruned
network on the clean data with a small learning rate; the pruned channels stay pruned.

**How a channel is pruned.** The architecture is kept, so the repaired model is a plain state
dict of the same architecture (it saves and loads like the original): the channel's output is
forced to zero by zeroing its parameters,

* ``nn.Conv2d`` / ``nn.Linear``: the channel's weight slice and bias (the output is then exactly 0
  for every input, and stays 0 through a following ReLU or pooling);
* ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` (or a convolution followed directly by one, which is
  detected from the module order): the BatchNorm's affine weight and bias for that channel as
  well, since ``BN(0) = beta - gamma * mean / std`` is not 0. A BatchNorm without affine
  parameters cannot be masked this way and is refused.

Limits: "followed by" is read from the order in which modules are registered (true for the
built-in architectures and for ``nn.Sequential``); a layer whose output feeds a residual sum is
masked before the sum only. The activation that ranks channels is ``ReLU(output)`` averaged over
samples and positions: the paper's post-activation feature map when a ReLU follows the layer
(for a Conv-BN-ReLU block, name the BatchNorm as ``layer``). During fine-tuning the gradients of
the zeroed slices are masked, so the pruned channels stay exactly zero.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike, eval_mode, model_device, predict
from ..._utils.hooks import capture, resolve_layer
from ..._utils.validation import Interval, Options, Types
from ...data.dataset import ImageDataset
from ...errors import DataError, UnsupportedModelError
from ..base import Repair, RepairResult, register

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], dict[str, float]]
_MASKABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


# --- pure pieces --------------------------------------------------------------------------------

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


def accuracy(model: nn.Module, data: ImageDataset, *, batch_size: int = 256, device: DeviceLike = None) -> float:
    pred = predict(model, data.x, batch_size=batch_size, device=device)
    return float((pred == data.y).float().mean())


def attack_evaluator(test_data: ImageDataset, trigger: Any = None, target: Any = None, *,
                     batch_size: int = 256) -> Evaluate:
    """An evaluation callback for the curves: test accuracy and, with a trigger, attack success.

    Used by tests, benchmarks and the CLI; the ground truth stays outside the defence, which only
    calls the callback to record figures.
    """
    from ...metrics import attack_success_rate, clean_accuracy

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = {"test_accuracy": clean_accuracy(model, test_data, batch_size=batch_size)}
        if trigger is not None and target is not None:
            out["attack_success"] = attack_success_rate(model, test_data, trigger, target, batch_size=batch_size)
        return out
    return evaluate


def _evaluator(evaluate: Evaluate | None, trigger: Any, target: Any, test_data: ImageDataset | None,
               batch_size: int) -> Evaluate | None:
    if evaluate is not None:
        return evaluate
    if trigger is not None or test_data is not None:
        if test_data is None:
            raise DataError("an evaluation trigger needs test_data to be stamped on")
        return attack_evaluator(test_data, trigger, target, batch_size=batch_size)
    return None


def _check_data(data: Any, name: str) -> ImageDataset:
    if not isinstance(data, ImageDataset):
        raise DataError(f"{name} must be an ImageDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{name} is empty")
    return data


# --- Pruning ------------------------------------------------------------------------------------

@register("prune")
class Pruning(Repair):
    """Prune the channels clean inputs leave dormant, until clean accuracy falls too far.

    Args:
        layer: the layer whose output channels are pruned: a dotted module name (Conv2d, Linear or
            BatchNorm) or ``"last_conv"`` (the paper's choice: the last convolutional layer). With
            ``granularity="unit"``: a Linear layer whose input units are pruned, or ``"last_conv"``
            for the dense layer reading the last convolutional block.
        granularity: what one neuron is. ``"channel"`` (the paper): a whole output channel (feature
            map). ``"unit"``: one input unit of a dense layer; after the last convolutional block
            that is one channel *at one position*. A patch trigger in a fixed corner is often
            carried by ordinary edge-detecting channels at the corner's positions, which clean
            inputs leave dark there: channel pruning cannot see it, unit pruning can.
        max_drop: stop when the clean validation accuracy has dropped by more than this (a
            fraction; the paper's 4% is 0.04). The neurons pruned before the step that crossed it
            are kept pruned.
        ratio: prune exactly this share of the neurons instead (``None``: the accuracy rule).
        step: neurons pruned between two accuracy checks (default: 1, the paper's one at a time,
            for channels; 1% of the units, rounded up, for units).
        batch_size: inference batch (results do not depend on it).
        device: where to compute (default: the model's device).

    The ``repair`` verb takes ``clean_data`` (activations are recorded on it) and, optionally,
    ``val_data`` (the accuracy rule; default ``clean_data``) and, for the curve only, an
    ``evaluate(model) -> dict`` callback or ``trigger`` + ``target`` + ``test_data``.

    Example:
        >>> from trojanscope.data import load_digits
        >>> from trojanscope.training import train_new
        >>> train, val = load_digits("train"), load_digits("val")
        >>> net = train_new("mnist_cnn", train, epochs=2)
        >>> res = Pruning().repair(net, val)
        >>> res.details["n_pruned"] >= 0 and res.model is not net
        True

    References:
        Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
        Networks. RAID 2018. https://arxiv.org/abs/1805.12185
    """

    needs_hooks: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "layer": Types((str,)),
        "granularity": Options(("channel", "unit")),
        "max_drop": Interval(float, 0, 1),
        "ratio": [Types((type(None),)), Interval(float, 0, 1, "right")],
        "step": [Types((type(None),)), Interval(int, 1, None)],
        "batch_size": Interval(int, 1, None),
    }

    def __init__(self, *, layer: str = "last_conv", granularity: str = "channel", max_drop: float = 0.04,
                 ratio: float | None = None, step: int | None = None, batch_size: int = 256,
                 device: DeviceLike = None) -> None:
        self.layer = layer
        self.granularity = granularity
        self.max_drop = max_drop
        self.ratio = ratio
        self.step = step
        self.batch_size = batch_size
        self.device = device

    def repair(self, model: nn.Module, clean_data: Any, *, val_data: ImageDataset | None = None,
               evaluate: Evaluate | None = None, trigger: Any = None, target: Any = None,
               test_data: ImageDataset | None = None, **kwargs: Any) -> RepairResult:
        """Return a pruned copy of ``model`` and the curve (channels pruned, accuracy, figures)."""
        t0 = time.perf_counter()
        self._validate_params()
        clean = _check_data(clean_data, "clean data")
        ev = _evaluator(evaluate, trigger, target, test_data, self.batch_size)
        net = copy.deepcopy(model)
        history, details = self._prune(net, clean, val_data or clean, ev)
        return RepairResult(model=net, history=history, details=details, params=self.get_params(),
                            seconds=time.perf_counter() - t0)

    def _prune(self, net: nn.Module, clean: ImageDataset, val: ImageDataset,
               ev: Evaluate | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Prune ``net`` in place; return the curve and the details."""
        val = _check_data(val, "validation data")
        if self.granularity == "unit":
            name, lin = unit_layer(net, self.layer)
            modules: list[tuple[str, nn.Module]] = [(name, lin)]
            C, dim = lin.in_features, 1
            pnames = [f"{name}.weight"]
            mean_act = mean_unit_activation(net, clean.x, lin, batch_size=self.batch_size, device=self.device)
            step = self.step or -(-C // 100)
        else:
            name, modules = prunable_modules(net, self.layer)
            C, dim = n_channels(modules[0][1]), 0
            pnames = channel_params(net, modules)
            mean_act = mean_channel_activation(net, clean.x, name, batch_size=self.batch_size, device=self.device)
            step = self.step or 1
        order = pruning_order(mean_act)
        acc0 = accuracy(net, val, batch_size=self.batch_size, device=self.device)

        def point(k: int, acc: float) -> dict[str, Any]:
            row: dict[str, Any] = {"pruned": k, "ratio": k / C, "accuracy": acc}
            if ev is not None:
                row.update(ev(net))
            return row

        history = [point(0, acc0)]
        originals = {n: p.detach().clone() for n, p in net.named_parameters() if n in pnames}
        if self.ratio is not None:
            keep = int(round(self.ratio * C))
            steps = sorted(set(list(range(step, keep, step)) + [keep])) if keep else []
        else:
            steps = list(range(step, C + 1, step))
            if steps and steps[-1] != C:
                steps.append(C)
        kept = 0
        for k in steps:
            zero_channels(net, pnames, order[kept:k], dim=dim)
            acc = accuracy(net, val, batch_size=self.batch_size, device=self.device)
            history.append(point(k, acc))
            log.info("pruned %d/%d %ss of %s: accuracy %.4f", k, C, self.granularity, name, acc)
            if self.ratio is None and acc0 - acc > self.max_drop + 1e-12:
                with torch.no_grad():  # undo the step that crossed the threshold
                    params = dict(net.named_parameters())
                    idx = order[kept:k]
                    for n in pnames:
                        i = idx.to(params[n].device)
                        params[n].index_copy_(dim, i, originals[n].index_select(dim, i))
                break
            kept = k
        pruned = order[:kept]
        acc_final = accuracy(net, val, batch_size=self.batch_size, device=self.device)
        details = {
            "layer": name, "granularity": self.granularity, "masked_modules": [n for n, _ in modules],
            "n_neurons": C, "n_channels": C, "n_pruned": kept,
            "ratio": kept / C, "pruned_channels": pruned.tolist(), "order": order.tolist(),
            "mean_activation": mean_act.float(), "accuracy_before": acc0, "accuracy_after": acc_final,
            "pruned_params": {n: pruned.tolist() for n in pnames},
            "pruned_dims": {n: dim for n in pnames},
        }
        return history, details


# --- Fine-Pruning -------------------------------------------------------------------------------

@register("fine-prune")
class FinePruning(Repair):
    """Prune (as :class:`Pruning`), then fine-tune the pruned network on clean data.

    Args:
        layer, granularity, max_drop, ratio, step: the pruning stage (see :class:`Pruning`; paper:
            channels of the last convolutional layer, 4 points).
        epochs: fine-tuning epochs over ``clean_data``.
        lr: the fine-tuning learning rate (small: the network starts from trained weights).
        optimizer: ``"adam"`` or ``"sgd"``.
        batch_size: training and inference batch.
        seed: seeds the fine-tuning's shuffling.
        device: where to compute (default: the model's device).

    ``repair(model, clean_data, val_data=None, evaluate=None, ...)``: the history holds one row
    per stage (``"before"``, ``"pruned"``, ``"fine-tuned"``) with the validation accuracy and the
    callback's figures; ``details["pruning_curve"]`` is the pruning stage's curve.

    References:
        Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
        Networks. RAID 2018. https://arxiv.org/abs/1805.12185
    """

    needs_hooks: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        **Pruning._constraints,
        "epochs": Interval(int, 0, None),
        "lr": Interval(float, 0, None, "neither"),
        "optimizer": Options(("adam", "sgd")),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, layer: str = "last_conv", granularity: str = "channel", max_drop: float = 0.04,
                 ratio: float | None = None, step: int | None = None, epochs: int = 10, lr: float = 1e-4,
                 optimizer: str = "adam", batch_size: int = 64, seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.layer = layer
        self.granularity = granularity
        self.max_drop = max_drop
        self.ratio = ratio
        self.step = step
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def repair(self, model: nn.Module, clean_data: Any, *, val_data: ImageDataset | None = None,
               evaluate: Evaluate | None = None, trigger: Any = None, target: Any = None,
               test_data: ImageDataset | None = None, **kwargs: Any) -> RepairResult:
        """Return a pruned and fine-tuned copy of ``model`` with CA (and figures) per stage."""
        from ...training import train

        t0 = time.perf_counter()
        self._validate_params()
        clean = _check_data(clean_data, "clean data")
        val = val_data or clean
        ev = _evaluator(evaluate, trigger, target, test_data, max(self.batch_size, 256))
        pruner = Pruning(layer=self.layer, granularity=self.granularity, max_drop=self.max_drop, ratio=self.ratio,
                         step=self.step, batch_size=max(self.batch_size, 256), device=self.device)
        pruner._validate_params()
        net = copy.deepcopy(model)

        def stage(name: str) -> dict[str, Any]:
            row: dict[str, Any] = {"stage": name, "accuracy": accuracy(net, val, device=self.device)}
            if ev is not None:
                row.update(ev(net))
            return row

        history = [stage("before")]
        curve, pdetails = pruner._prune(net, clean, val, ev)
        history.append(stage("pruned"))
        with frozen_channels(net, pdetails["pruned_params"], pdetails["pruned_dims"]):
            tr = train(net, clean, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                       optimizer=self.optimizer, seed=self.seed, device=self.device)  # type: ignore[arg-type]
        history.append(stage("fine-tuned"))
        details = {**pdetails, "pruning_curve": curve, "fine_tune": tr.history,
                   "accuracy_after": history[-1]["accuracy"]}
        return RepairResult(model=net, history=history, details=details, params=self.get_params(),
                            seconds=time.perf_counter() - t0)
