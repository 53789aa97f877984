"""The pruning-aware attack (Liu, Dolan-Gavitt, Garg, RAID 2018, Section 4.2).

An attacker who expects the defender to prune dormant channels hides the backdoor in the channels
clean inputs *use*, and leaves decoys for the pruner:

1. train the network on clean data (the caller does, with :func:`trojanscope.training.train_new`);
2. prune the channels of the last convolutional layer that clean inputs leave dormant (in
   increasing order of mean activation, until clean accuracy has dropped by ``max_drop``);
3. train the pruned network on the poisoned data: the backdoor must now live in the channels
   that remain, the ones clean inputs activate;
4. reinstate the pruned channels with their clean weights but with their biases lowered so that
   they stay dormant (never positive before the ReLU) on the training data: the model has its
   full width again, and the defender's pruner removes these decoys first, to no effect.

The attack needs the layer's output to go through a ReLU (or any function that maps negative
inputs to 0), as in the paper's networks and in ``mnist_cnn``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._utils.batching import DeviceLike, eval_mode, model_device
from .._utils.hooks import capture
from .._utils.results import Result, not_serialised
from .._utils.validation import Interval, check_params
from ..data.dataset import ImageDataset
from ..data.poisoned import PoisonedDataset
from ..errors import ConfigError, UnsupportedModelError
from ..triggers import Trigger
from .badnets import BadNets
from .base import Attack, register_attack


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplantResult(Result):
    """A backdoored copy of a clean-trained model (the caller's is untouched) and how it was made.

    Attributes:
        model: the backdoored network.
        details: the pruned channels, the bias shifts and the attacker's pruning curve.
        params: the attack's settings.
        seconds: wall time.
    """

    model: nn.Module = not_serialised()
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@register_attack("pruning-aware")
class PruningAware(Attack):
    """BadNets poisoning hidden from pruning by decoy channels.

    Args:
        trigger: the trigger stamped on the poisoned samples.
        target: the target label t (all-to-one).
        rate: the share of the training set poisoned (BadNets).
        layer: the layer the attacker expects the defender to prune (the paper: the last
            convolutional layer).
        max_drop: the attacker prunes dormant channels until clean accuracy has dropped by more than
            this (the defender's default rule, 4 points).
        ratio: prune exactly this share of the channels instead (``None``: the accuracy rule).
        epochs: epochs of step 3, training the pruned network on poisoned data.
        lr: learning rate of step 3 (Adam).
        margin: the reinstated channels' biases are lowered until their pre-activation is at most
            ``-margin`` on every training input (clean and poisoned).
        batch_size: training and inference batch.
        seed: seeds the poisoning and the training.
        kind: ``"model"``: this attack returns a trained model, not only poisoned data.

    Example:
        >>> from trojanscope.data import load_digits
        >>> from trojanscope.training import train_new
        >>> train = load_digits("train")
        >>> atk = PruningAware(Trigger.square(train.image_shape, 2), target=0, epochs=1)
        >>> clean = train_new("mnist_cnn", train, epochs=1)
        >>> bad = atk.implant(clean, train)
        >>> bad is not clean
        True

    References:
        Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
        Networks. RAID 2018. https://arxiv.org/abs/1805.12185
    """

    kind = "model"
    _constraints = {"rate": Interval(float, 0, 1, "right"), "max_drop": Interval(float, 0, 1),
                    "epochs": Interval(int, 0, None), "lr": Interval(float, 0, None, "neither"),
                    "margin": Interval(float, 0, None)}

    def __init__(self, trigger: Trigger, target: int = 0, rate: float = 0.1, layer: str = "last_conv",
                 max_drop: float = 0.04, ratio: float | None = None, epochs: int = 10, lr: float = 1e-3,
                 margin: float = 0.1, batch_size: int = 64, seed: int = 0) -> None:
        self.trigger = trigger
        self.target = target
        self.rate = rate
        self.layer = layer
        self.max_drop = max_drop
        self.ratio = ratio
        self.epochs = epochs
        self.lr = lr
        self.margin = margin
        self.batch_size = batch_size
        self.seed = seed

    @property
    def badnets(self) -> BadNets:
        return BadNets(self.trigger, self.target, rate=self.rate, seed=self.seed)

    @property
    def triggers(self) -> list[Trigger]:
        return [self.trigger]

    def poison(self, dataset: ImageDataset) -> PoisonedDataset:
        """The poisoned training set of step 3 (BadNets with this attack's trigger and rate)."""
        return self.badnets.poison(dataset)

    def attack(self, model: nn.Module, clean_data: ImageDataset) -> "ImplantResult":
        """The model-level attack verb: :meth:`implant` on ``clean_data`` (also the pruning rule's
        validation data), with the pruned channels and bias shifts as ``details``."""
        t0 = time.perf_counter()
        details: dict[str, Any] = {}
        net = self.implant(model, clean_data, details=details)
        return ImplantResult(model=net, details=details, params=self.to_dict(), seconds=time.perf_counter() - t0)

    def implant(self, model: nn.Module, train_data: ImageDataset, *, val_data: ImageDataset | None = None,
                device: DeviceLike = None, details: dict[str, Any] | None = None) -> nn.Module:
        """Steps 2-4 on a copy of the clean-trained ``model``; returns the backdoored copy.

        Args:
            model: the network trained on clean data (step 1); it is not modified.
            train_data: the clean training set (poisoned here with :meth:`poison`).
            val_data: clean data for the attacker's pruning rule (default ``train_data``).
            device: where to compute (default: the model's device).
            details: if given, filled with the pruned channels and the bias shifts.
        """
        from .._utils.masking import frozen_channels, prunable_modules, prune_dormant
        from ..training import train

        check_params(self, self._constraints)
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        name, modules = prunable_modules(model, self.layer)
        layer = modules[0][1]
        if not isinstance(layer, nn.Conv2d) or len(modules) > 1:
            raise UnsupportedModelError("the pruning-aware attack needs a Conv2d layer followed by a ReLU (no BatchNorm)")
        # step 2: prune the dormant channels, as the defender would
        net = copy.deepcopy(model)
        val = val_data if val_data is not None else train_data
        curve, pruning = prune_dormant(net, val.x, val, layer=name, max_drop=self.max_drop, ratio=self.ratio,
                                       device=device)
        pruned = pruning["pruned_channels"]
        # step 3: train the pruned network on poisoned data, the pruned channels held at zero
        poisoned = self.poison(train_data)
        with frozen_channels(net, pruning["pruned_params"]):
            train(net, poisoned, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                  device=device)
        # step 4: reinstate the pruned channels with the clean weights, biases lowered to stay dormant
        shifts = self._reinstate(net, model, name, pruned, poisoned, device)
        if details is not None:
            details.update(layer=name, pruned_channels=list(pruned), bias_shift=shifts,
                           pruning_curve=curve)
        return net

    def _reinstate(self, net: nn.Module, clean_model: nn.Module, name: str, pruned: Sequence[int],
                   data: ImageDataset, device: DeviceLike) -> list[float]:
        if not pruned:
            return []
        idx = torch.as_tensor(list(pruned), dtype=torch.long)
        src = clean_model.get_submodule(name)
        dst = net.get_submodule(name)
        with torch.no_grad():
            dst.weight[idx] = src.weight[idx].to(dst.weight.device)
            if dst.bias is None:
                raise UnsupportedModelError(f"layer {name!r} has no bias to lower")
            dst.bias[idx] = src.bias[idx].to(dst.bias.device)
        # the largest pre-activation of each reinstated channel over the training data (clean + poisoned)
        dev = model_device(net, device)
        peak = torch.full((idx.numel(),), -float("inf"), dtype=torch.float64)
        xs = torch.cat([data.x, self.trigger.apply(data.x)])
        with eval_mode(net), torch.inference_mode(), capture(net, name) as acts:
            for i in range(0, xs.shape[0], 512):
                net(xs[i:i + 512].to(dev))
                a = acts.value[:, idx.to(dev)].double()  # type: ignore[index]
                peak = torch.maximum(peak, a.amax(dim=(0, 2, 3)).cpu())
        shift = (peak + self.margin).clamp_min(0)
        with torch.no_grad():
            dst.bias[idx] -= shift.to(dst.bias.dtype).to(dst.bias.device)
        return shift.tolist()

    def success_rate(self, model: nn.Module, data: ImageDataset) -> float:
        return self.badnets.success_rate(model, data)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["trigger"] = self.trigger.name
        return d
