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

from typing import Any, ClassVar

from torch import nn

from ..._utils.batching import DeviceLike, accuracy
from ..._utils.masking import frozen_channels, prune_dormant
from ..._utils.validation import Interval, Options, Types
from ...data.dataset import ImageDataset
from ..base import Monitor, Repair, RepairResult, ScanUse, register


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
    ``val_data`` (the accuracy rule; default ``clean_data``) and a ``monitor(model) -> dict``
    whose figures are added to every row of the curve. It uses no scan.

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

    uses_scan: ClassVar[ScanUse] = "never"
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

    def _repair(self, net: nn.Module, clean_data: ImageDataset, *, scan: Any, val_data: ImageDataset,
                monitor: Monitor | None) -> RepairResult:
        """Prune ``net``; the history is the curve (neurons pruned, accuracy, the monitor's figures)."""
        history, details = self._prune(net, clean_data, val_data, monitor)
        return RepairResult(model=net, history=history, details=details)

    def _prune(self, net: nn.Module, clean: ImageDataset, val: ImageDataset,
               monitor: Monitor | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Prune ``net`` in place; return the curve and the details."""
        return prune_dormant(net, clean.x, val, layer=self.layer, granularity=self.granularity, max_drop=self.max_drop,
                             ratio=self.ratio, step=self.step, batch_size=self.batch_size, device=self.device,
                             monitor=monitor)


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

    ``repair(model, clean_data, val_data=None, monitor=None)``: the history holds one row
    per stage (``"before"``, ``"pruned"``, ``"fine-tuned"``) with the validation accuracy and the
    monitor's figures; ``details["pruning_curve"]`` is the pruning stage's curve.

    References:
        Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
        Networks. RAID 2018. https://arxiv.org/abs/1805.12185
    """

    uses_scan: ClassVar[ScanUse] = "never"
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

    def _repair(self, net: nn.Module, clean_data: ImageDataset, *, scan: Any, val_data: ImageDataset,
                monitor: Monitor | None) -> RepairResult:
        """Prune and fine-tune ``net``; the history has the accuracy (and monitor's figures) per stage."""
        from ...training import train

        pruner = Pruning(layer=self.layer, granularity=self.granularity, max_drop=self.max_drop, ratio=self.ratio,
                         step=self.step, batch_size=max(self.batch_size, 256), device=self.device)
        pruner._validate_params()

        def stage(name: str) -> dict[str, Any]:
            row: dict[str, Any] = {"stage": name, "accuracy": accuracy(net, val_data, device=self.device)}
            return {**monitor(net), **row} if monitor is not None else row  # its own figures win

        history = [stage("before")]
        curve, pdetails = pruner._prune(net, clean_data, val_data, monitor)
        history.append(stage("pruned"))
        with frozen_channels(net, pdetails["pruned_params"], pdetails["pruned_dims"]):
            tr = train(net, clean_data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                       optimizer=self.optimizer, seed=self.seed, device=self.device)  # type: ignore[arg-type]
        history.append(stage("fine-tuned"))
        details = {**pdetails, "pruning_curve": curve, "fine_tune": tr.history,
                   "accuracy_after": history[-1]["accuracy"]}
        return RepairResult(model=net, history=history, details=details)
