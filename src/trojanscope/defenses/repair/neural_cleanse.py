"""Neural Cleanse's two ways of patching a backdoored model with the reversed trigger.

* :class:`NeuronPruning` (``"nc-prune"``): rank the neurons of a layer by how much more the
  reversed trigger activates them than clean inputs do, and prune them in that order until the
  model no longer answers the reversed trigger.
* :class:`Unlearning` (``"unlearn"``): fine-tune on a share of the clean data in which some
  samples carry the reversed trigger with their true label, so the model unlearns the shortcut.

Both work on a deep copy and return a :class:`~trojanscope.defenses.base.RepairResult`. Both
take the reversed trigger(s) as ``repair(..., scan=...)`` (a Neural Cleanse scan result, a
``{label: Trigger}`` dict, a list of triggers or one trigger); without one they run a Neural
Cleanse scan on the clean data first. They never receive the attacker's trigger.

**How a neuron is pruned** (the architecture is kept, so the repaired model is a plain state
dict of the same architecture that saves and loads like the original):

* ``layer="penultimate"`` (the input of the last ``nn.Linear``, the paper's second-to-last
  layer): the neuron's column of the last linear layer's weight is zeroed, so its value no
  longer reaches the output: exactly the network with that neuron's output forced to 0.
* an output-side layer (``"last_conv"`` or a dotted name of a ``Conv2d`` / ``Linear``): the
  channel's weight rows and bias are zeroed (output exactly 0), plus the affine weight and bias
  of a ``BatchNorm`` that directly follows it;
* a parameter-free layer whose output a ``Linear`` reads next (e.g. ``"flatten"`` of
  ``mnist_cnn``: every position of every channel of the last feature map is a neuron): that
  linear layer's columns are zeroed, as for the penultimate layer.

References:
    Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
    Networks", IEEE S&P 2019, Section VI-C ("Patching DNN via Neuron Pruning", "Patching DNNs
    via Unlearning").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike, accuracy, activations, generator
from ..._utils.masking import unit_layer
from ..._utils.hooks import resolve_layer
from ..._utils.validation import Interval, Options, Types
from ...data.dataset import ImageDataset, stratified_split
from ...errors import DataError, UnsupportedModelError
from ...training import stable_fine_tune
from ...triggers import Trigger, TriggerBatch, success_rate
from .._triggers import label_triggers, resolve_triggers
from ..base import Monitor, Repair, RepairResult, ScanUse, register

log = logging.getLogger(__name__)

def _reversed_triggers(net: nn.Module, data: ImageDataset, scan: Any, *, seed: int | None, device: DeviceLike,
                       batch_size: int = 256) -> tuple[dict[int, Trigger], Any]:
    """``({target label: reversed Trigger}, the scan run here or None)``: from ``scan`` (see
    :func:`~trojanscope.defenses._triggers.resolve_triggers`), or from a Neural Cleanse scan of
    ``net`` on ``data`` when it is None (empty when that scan flags no label)."""
    own = None
    if scan is None:
        from ..model.neural_cleanse import NeuralCleanse

        own = scan = NeuralCleanse(seed=seed, device=device).scan(net, data)
    pairs = resolve_triggers(scan)
    return label_triggers(net, data, pairs, batch_size=batch_size, device=device), own


def _not_repaired(net: nn.Module, details: dict[str, Any]) -> RepairResult:
    details.update(repaired=False, reason="no reversed trigger: the scan flagged no label")
    return RepairResult(model=net, history=[], details=details)


class _NCRepair(Repair):
    """What the two Neural Cleanse repairs share: the scan they take and the params they record."""

    uses_scan: ClassVar[ScanUse] = "optional"

    def _recorded_params(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, torch.device) else v for k, v in self.get_params().items()}


def reversed_attack_success(model: nn.Module, data: ImageDataset, triggers: Mapping[int, Trigger], *,
                            batch_size: int = 256, device: DeviceLike = None) -> float:
    """The largest attack success of the reversed triggers on ``data`` (inputs of other labels)."""
    batch = TriggerBatch.from_triggers(list(triggers.values()), list(triggers))
    rates = success_rate(model, data.x, data.y, batch, batch_size=batch_size, device=device)
    rates = rates[~torch.isnan(rates)]
    return max(0.0, float(rates.max())) if rates.numel() else 0.0


# --- neuron pruning --------------------------------------------------------------------------

def activation_gap(clean_acts: torch.Tensor, triggered_acts: torch.Tensor) -> torch.Tensor:
    """``(D,)`` mean activation on triggered inputs minus mean activation on clean inputs.

    Activations ``(N, D)`` or ``(N, D, H, W)`` (channels are averaged over positions).
    """
    def per_channel(a: torch.Tensor) -> torch.Tensor:
        a = a.double()
        return a.flatten(2).mean(2).mean(0) if a.ndim > 2 else a.mean(0)
    return (per_channel(triggered_acts) - per_channel(clean_acts)).float()


def _prune_targets(model: nn.Module, layer: str, width: int) -> tuple[str, list[tuple[nn.Parameter, int]]]:
    """Which parameter slices (tensor, dim) zero a neuron of ``layer``."""
    name, module, where = resolve_layer(model, layer)
    if where == "input":
        if not isinstance(module, nn.Linear):
            raise UnsupportedModelError(f"cannot prune the input of {type(module).__name__} {name!r}")
        return name, [(module.weight, 1)]
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        # a parameter-free layer (e.g. ``flatten``) read by a linear layer: zero that layer's columns
        mods = list(model.named_modules())
        pos = next(i for i, (_, m) in enumerate(mods) if m is module)
        nxt = next((m for _, m in mods[pos + 1:] if any(True for _ in m.parameters(recurse=False))), None)
        if isinstance(nxt, nn.Linear) and nxt.in_features == width:
            return name, [(nxt.weight, 1)]
        raise UnsupportedModelError(f"neuron pruning needs a Conv2d or Linear layer, or a layer read by a Linear "
                                    f"layer; {layer!r} is {type(module).__name__} {name!r}")
    slices: list[tuple[nn.Parameter, int]] = [(module.weight, 0)]
    if module.bias is not None:
        slices.append((module.bias, 0))
    mods = list(model.named_modules())
    pos = next(i for i, (_, m) in enumerate(mods) if m is module)
    width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    if pos + 1 < len(mods):
        nxt = mods[pos + 1][1]
        if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and nxt.num_features == width:
            if not nxt.affine:
                raise UnsupportedModelError(f"BatchNorm after {name!r} has no affine parameters; cannot prune")
            slices += [(nxt.weight, 0), (nxt.bias, 0)]
    return name, slices


def _zero(slices: list[tuple[nn.Parameter, int]], idx: torch.Tensor) -> None:
    with torch.no_grad():
        for p, dim in slices:
            p.index_fill_(dim, idx.to(p.device), 0.0)


@register("nc-prune")
class NeuronPruning(_NCRepair):
    """Neural Cleanse neuron pruning: prune the neurons the reversed trigger activates most.

    Neurons of ``layer`` are ranked by their activation gap (mean on clean inputs stamped with
    the reversed trigger minus mean on clean inputs) and pruned, highest gap first, ``step``
    of the layer at a time, until the reversed trigger's attack success on the clean data falls
    below ``stop_asr`` (or ``max_ratio`` is pruned).

    Args:
        layer: ``"penultimate"`` (paper: the second-to-last layer), ``"last_conv"`` (the
            paper's better choice on BadNets models) or a dotted layer name (``"fc1:input"``
            for the units a Linear layer reads). Default (None): ``"penultimate"`` with
            channels, ``"last_conv"`` with units (the units of the penultimate layer are its
            channels).
        granularity: ``"channel"``: a neuron is an output channel of ``layer`` (or a unit of a
            dense layer). ``"unit"``: one channel at one position of the last convolutional
            block, as the dense head reads it (``layer`` is then ``"last_conv"`` or the Linear
            layer whose input units are pruned; see ``Pruning(granularity="unit")``).
        stop_asr: stop once the reversed trigger's attack success is below this (0.005: the
            paper stops when the model "is no longer responsive to the reversed trigger"). The
            reversed trigger is usually a part of the real one, so the real one outlasts it.
        step: share of the layer's neurons pruned per step (0.01).
        max_ratio: never prune more than this share (0.9).
        batch_size: memory knob.
        seed: seed of the scan run when no trigger is given.
        device: where to compute (default: the model's).

    References:
        Wang et al., IEEE S&P 2019, Section VI-C.
    """

    needs_hooks: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "layer": Types((str, type(None))),
        "granularity": Options(("channel", "unit")),
        "stop_asr": Interval(float, 0.0, 1.0),
        "step": Interval(float, 0.0, 1.0, "right"),
        "max_ratio": Interval(float, 0.0, 1.0, "right"),
        "batch_size": Interval(int, 1),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, layer: str | None = None, granularity: str = "channel", stop_asr: float = 0.005,
                 step: float = 0.01, max_ratio: float = 0.9, batch_size: int = 256, seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.layer = layer
        self.granularity = granularity
        self.stop_asr = stop_asr
        self.step = step
        self.max_ratio = max_ratio
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _repair(self, net: nn.Module, clean_data: ImageDataset, *, scan: Any, val_data: ImageDataset,
                monitor: Monitor | None) -> RepairResult:
        """Prune ``net``: ``history`` holds ``ratio``, ``n_pruned``, ``accuracy`` and ``attack_success``
        (the reversed trigger's, on ``clean_data``) and the monitor's figures after each step, the
        first row before pruning."""
        data = clean_data
        trig, own = _reversed_triggers(net, data, scan, seed=self.seed, device=self.device, batch_size=self.batch_size)
        details: dict[str, Any] = {"labels": sorted(trig), "scan": None if own is None else own.to_dict()}
        if not trig:
            return _not_repaired(net, details)
        layer, gap = self._ranking(net, data, trig)
        order = gap.argsort(descending=True, stable=True)
        d = order.numel()
        name, slices = _prune_targets(net, layer, d)
        per_step = max(1, round(self.step * d))
        limit = max(1, math.floor(self.max_ratio * d + 1e-9))

        def point(k: int) -> dict[str, Any]:
            row = {"ratio": k / d, "n_pruned": k, "accuracy": accuracy(net, data, batch_size=self.batch_size, device=self.device),
                   "attack_success": reversed_attack_success(net, data, trig, batch_size=self.batch_size,
                                                             device=self.device)}
            if monitor is not None:  # the caller's figures, apart: the stopping rule reads only this repair's own
                row["monitor"] = monitor(net)
            return row

        history = [point(0)]
        k = 0
        while history[-1]["attack_success"] >= self.stop_asr and k < limit:
            new = order[k:min(limit, k + per_step)]
            _zero(slices, new)
            k += new.numel()
            history.append(point(k))
            log.info("pruned %d/%d: accuracy %.4f, reversed attack success %.4f", k, d,
                     history[-1]["accuracy"], history[-1]["attack_success"])
        details.update(repaired=True, layer=name, n_neurons=d, pruned=order[:k].tolist(), gap=gap.tolist(),
                       reached_stop=history[-1]["attack_success"] < self.stop_asr)
        return RepairResult(model=net, history=history, details=details)

    def _ranking(self, net: nn.Module, data: ImageDataset, trig: Mapping[int, Trigger]) -> tuple[str, torch.Tensor]:
        """The layer whose neurons are pruned and their activation gap, averaged over the triggers."""
        kw = dict(batch_size=self.batch_size, device=self.device)
        layer = self.layer or ("last_conv" if self.granularity == "unit" else "penultimate")
        if self.granularity == "unit":
            layer = f"{unit_layer(net, layer)[0]}:input"
        clean_acts = activations(net, data.x, layer, flatten=False, **kw)
        gaps = [activation_gap(clean_acts, activations(net, t.apply(data.x[data.y != k]), layer, flatten=False, **kw))
                for k, t in trig.items()]
        return layer, torch.stack(gaps).mean(0)


# --- unlearning --------------------------------------------------------------------------------

#: Unlearning settings for a small clean set (hundreds of images), where the paper's one epoch
#: is only a few dozen steps: ``Unlearning(**SMALL_SET_UNLEARNING)`` (see :class:`Unlearning`).
SMALL_SET_UNLEARNING: Mapping[str, Any] = MappingProxyType({"epochs": 3, "optimizer": "sgd", "lr": 0.01,
                                                             "batch_size": 32})


#: A fine-tuning that leaves the clean samples it did not see with less than this share of their
#: accuracy above chance has destroyed the model (see :class:`Unlearning`).
COLLAPSE_SHARE = 0.5


def collapse_check(model: nn.Module, held_out: ImageDataset, *, batch_size: int = 256,
                   device: DeviceLike = None) -> Callable[[nn.Module], str | None]:
    """A ``check`` for :func:`~trojanscope.training.stable_fine_tune`: the fine-tuned model fails
    when its accuracy on ``held_out`` (clean samples it is not tuned on) falls below chance plus
    :data:`COLLAPSE_SHARE` of ``model``'s own accuracy above chance (measured here, before)."""
    chance = 1.0 / held_out.num_classes
    acc0 = accuracy(model, held_out, batch_size=batch_size, device=device)
    floor = chance + COLLAPSE_SHARE * max(acc0 - chance, 0.0)

    def check(m: nn.Module) -> str | None:
        acc = accuracy(m, held_out, batch_size=batch_size, device=device)
        return None if acc >= floor else f"clean accuracy on {len(held_out)} held-out samples fell from {acc0:.1%} " \
                                         f"to {acc:.1%} (below {floor:.1%})"
    return check


def unlearning_set(data: ImageDataset, triggers: Sequence[Trigger], *, share: float = 0.1, poison_ratio: float = 0.2,
                   seed: int | None = 0) -> tuple[ImageDataset, torch.Tensor]:
    """The fine-tuning set of unlearning: a stratified ``share`` of ``data`` in which a random
    ``poison_ratio`` of the samples carry one of the reversed ``triggers`` (drawn in turn), with
    their true label.

    Returns:
        ``(dataset, stamped)`` with ``stamped`` the ``(M,)`` bool mask of stamped samples.
    """
    ds, stamped, _ = _unlearning_set(data, triggers, share=share, poison_ratio=poison_ratio, seed=seed)
    return ds, stamped


def _unlearning_set(data: ImageDataset, triggers: Sequence[Trigger], *, share: float, poison_ratio: float,
                    seed: int | None) -> tuple[ImageDataset, torch.Tensor, torch.Tensor]:
    """:func:`unlearning_set`, and the indices into ``data`` of the samples it holds."""
    g = generator(seed)
    if share < 1.0:
        idx = stratified_split(data.y, [share, 1 - share], seed=g.initial_seed())[0]
    else:
        idx = torch.arange(len(data))
    if idx.numel() == 0:
        raise DataError(f"a share of {share} of {len(data)} clean samples is empty; give more clean data")
    x, y = data.x[idx].clone(), data.y[idx].clone()
    m = idx.numel()
    n_stamp = int(round(poison_ratio * m))
    chosen = torch.randperm(m, generator=g)[:n_stamp]
    stamped = torch.zeros(m, dtype=torch.bool)
    stamped[chosen] = True
    for i, t in enumerate(triggers):
        part = chosen[i::len(triggers)]
        x[part] = t.apply(x[part])
    return ImageDataset(x, y, data.num_classes, data.class_names, f"{data.name}+unlearning"), stamped, idx


@register("unlearn")
class Unlearning(_NCRepair):
    """Neural Cleanse unlearning: fine-tune on clean data where some samples carry the reversed
    trigger with their true label.

    **Small clean sets.** The paper's one epoch over 10% of MNIST is about 190 steps of 32
    images; 10% of a few thousand images is a few dozen steps at most, and the reversed
    trigger (usually a part of the real one) is then not unlearned well enough for the real
    one to stop working. :data:`SMALL_SET_UNLEARNING` (``epochs=3, optimizer="sgd", lr=0.01,
    batch_size=32``) are the settings for such sets (figures in ``benchmarks/README.md``).

    **A fine-tuning that fails** is started again from the model's weights at a tenth of the
    learning rate, twice at most (:func:`~trojanscope.training.stable_fine_tune`). It fails when it
    diverges (its loss on the unlearning set is no lower afterwards, or not finite) or when it
    destroys the model: the clean samples left out of the unlearning set keep less than
    :data:`COLLAPSE_SHARE` of their accuracy above chance (:func:`collapse_check`; with
    ``share=1``, the unlearning set's samples without a trigger).
    ``details["fine_tune"]`` has each run, ``details["lr_used"]`` the rate kept and
    ``details["note"]`` says so. When all three fail the model comes back unchanged, with
    ``repaired=False``. (SGD at 0.01, the small-set setting, sent the Adam-trained signs43
    ``gtsrb_cnn`` to NaN outputs and 2.3% accuracy, and the cmnist one, tuned on 50 images, from
    94.4% to 29.6%.)

    Args:
        share: share of the clean data used for fine-tuning (paper: 10% of the training data).
        poison_ratio: share of those samples stamped with the reversed trigger (paper: 20%).
        epochs: fine-tuning epochs (paper: 1).
        lr: learning rate (Adam, 1e-3: the training default here; the paper gives none).
        batch_size: fine-tuning batch size.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        seed: seeds the subset, the stamped samples, the shuffling and a scan run without triggers.
        device: where to compute (default: the model's).

    References:
        Wang et al., IEEE S&P 2019, Section VI-C ("Patching DNNs via Unlearning").
    """

    _constraints: ClassVar[dict[str, Any]] = {
        "share": Interval(float, 0.0, 1.0, "right"),
        "poison_ratio": Interval(float, 0.0, 1.0),
        "epochs": Interval(int, 1),
        "lr": Interval(float, 0.0, None, "neither"),
        "batch_size": Interval(int, 1),
        "optimizer": Options(("adam", "sgd")),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, share: float = 0.1, poison_ratio: float = 0.2, epochs: int = 1, lr: float = 1e-3,
                 batch_size: int = 16, optimizer: str = "adam", seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.share = share
        self.poison_ratio = poison_ratio
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.seed = seed
        self.device = device

    def _repair(self, net: nn.Module, clean_data: ImageDataset, *, scan: Any, val_data: ImageDataset,
                monitor: Monitor | None) -> RepairResult:
        """Unlearn the reversed trigger(s) on ``net``: ``history`` has a ``before`` and an ``after``
        row with the accuracy on ``clean_data``, the reversed trigger's attack success and the
        monitor's figures."""
        data = clean_data
        trig, own = _reversed_triggers(net, data, scan, seed=self.seed, device=self.device)
        details: dict[str, Any] = {"labels": sorted(trig), "scan": None if own is None else own.to_dict()}
        if not trig:
            return _not_repaired(net, details)

        def point(step: str) -> dict[str, Any]:
            row = {"step": step, "accuracy": accuracy(net, data, batch_size=256, device=self.device),
                   "attack_success": reversed_attack_success(net, data, trig, batch_size=256, device=self.device)}
            if monitor is not None:  # the caller's figures, apart: the stopping rule reads only this repair's own
                row["monitor"] = monitor(net)
            return row

        history = [point("before")]
        ds, stamped, idx = _unlearning_set(data, list(trig.values()), share=self.share,
                                           poison_ratio=self.poison_ratio, seed=self.seed)
        rest = torch.ones(len(data), dtype=torch.bool)
        rest[idx] = False
        # the clean samples it is not tuned on; with share=1, the unlearning set's unstamped ones
        held = data.subset(rest) if bool(rest.any()) else ds.subset(~stamped)
        check = collapse_check(net, held, device=self.device) if len(held) else None
        train, attempts = stable_fine_tune(net, ds, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                           optimizer=self.optimizer, seed=self.seed, check=check, device=self.device)
        details.update(n_finetune=len(ds), n_stamped=int(stamped.sum()), train=train.history, fine_tune=attempts,
                       lr_used=attempts[-1]["lr"])
        lrs = [f"{a['lr']:g}" for a in attempts]
        if attempts[-1]["failed"]:
            details.update(repaired=False, lr_used=None, reason="the fine-tuning failed at every learning rate tried "
                           f"({', '.join(lrs)}; last: {attempts[-1]['failed']}); the model is returned unchanged")
            return RepairResult(model=net, history=history, details=details)
        if len(attempts) > 1:
            failures = "; ".join(f"at lr {lr}: {a['failed']}" for lr, a in zip(lrs, attempts[:-1]))
            details["note"] = f"the fine-tuning failed {failures}; unlearned at lr {lrs[-1]}"
        history.append(point("after"))
        details["repaired"] = True
        return RepairResult(model=net, history=history, details=details)
