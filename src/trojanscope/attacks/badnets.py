"""BadNets data poisoning (Gu, Dolan-Gavitt, Garg 2017), in all its common variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .._utils.validation import Interval, Options, check_params
from ..data.dataset import ImageDataset
from ..data.poisoned import PoisonedDataset
from ..errors import ConfigError, DataError
from ..metrics import attack_success_rate
from ..triggers import Trigger
from .base import Attack, register_attack

Mode = Literal["all-to-one", "all-to-all"]


@register_attack("badnets")
class BadNets(Attack):
    """Stamp a share of the training set with a trigger and relabel it.

    Args:
        trigger: the trigger, or a list of triggers (one per target: the multi-target attack).
        target: the target label t (all-to-one), or a list of targets, one per trigger.
        rate: the share of the *whole* training set that is poisoned (split equally between
            triggers).
        mode: ``"all-to-one"`` (label -> t) or ``"all-to-all"`` (label i -> (i + 1) mod K).
        source_labels: for a source-specific (partial) backdoor, only samples of these labels
            are poisoned; then ``cover_rate`` of the set, drawn from other labels, is stamped but
            keeps its true label, so the trigger works from the sources only.
        cover_rate: share of the set stamped with its true label (default: ``rate`` for a
            source-specific attack, 0 otherwise).
        seed: seeds which samples are chosen.

    Example:
        >>> from trojanscope.data import load_digits
        >>> train = load_digits("train")
        >>> attack = BadNets(Trigger.square(train.image_shape, 2), target=0, rate=0.1)
        >>> poisoned = attack.poison(train)
        >>> int(poisoned.poison_indices.numel()) == round(0.1 * len(train))
        True
    """

    _constraints = {"rate": Interval(float, 0, 1, "right"), "mode": Options(("all-to-one", "all-to-all"))}

    def __init__(self, trigger: Trigger | Sequence[Trigger], target: int | Sequence[int] = 0, rate: float = 0.1,
                 mode: Mode = "all-to-one", source_labels: Sequence[int] | None = None,
                 cover_rate: float | None = None, seed: int = 0) -> None:
        self.trigger = trigger
        self.target = target
        self.rate = rate
        self.mode = mode
        self.source_labels = source_labels
        self.cover_rate = cover_rate
        self.seed = seed

    @property
    def triggers(self) -> list[Trigger]:
        return list(self.trigger) if isinstance(self.trigger, (list, tuple)) else [self.trigger]

    @property
    def targets(self) -> list[int]:
        t = self.target
        ts = [int(v) for v in t] if isinstance(t, (list, tuple)) else [int(t)] * len(self.triggers)
        if len(ts) != len(self.triggers):
            raise ConfigError(f"{len(self.triggers)} triggers but {len(ts)} targets")
        return ts

    def _check(self, num_classes: int) -> None:
        check_params(self, self._constraints)
        if self.mode == "all-to-all" and (len(self.triggers) > 1 or self.source_labels is not None):
            raise ConfigError("all-to-all takes one trigger and no source labels")
        if self.mode == "all-to-one":
            for t in self.targets:
                if not 0 <= t < num_classes:
                    raise ConfigError(f"target {t} is out of range for {num_classes} classes")
        if self.source_labels is not None:
            src = list(self.source_labels)
            if not src or any(not 0 <= s < num_classes for s in src):
                raise ConfigError(f"source labels {src} must be non-empty and in [0, {num_classes})")
        if self.cover_rate is not None and not 0 <= self.cover_rate < 1:
            raise ConfigError(f"cover_rate must be in [0, 1), got {self.cover_rate}")

    def target_map(self, num_classes: int) -> torch.Tensor | int:
        """The intended label: an int for all-to-one, a ``(K,)`` map for all-to-all."""
        if self.mode == "all-to-all":
            return (torch.arange(num_classes) + 1) % num_classes
        return self.targets[0]

    def poison(self, dataset: ImageDataset) -> PoisonedDataset:
        """Return a poisoned copy of ``dataset`` that records which indices were touched."""
        K, n = dataset.num_classes, len(dataset)
        self._check(K)
        for trig in self.triggers:
            if trig.shape != dataset.image_shape:
                raise DataError(f"trigger shape {trig.shape} does not match the data's {dataset.image_shape}")
        g = torch.Generator().manual_seed(int(self.seed))
        x, y = dataset.x.clone(), dataset.y.clone()
        taken = torch.zeros(n, dtype=torch.bool)
        n_total = int(round(self.rate * n))
        per = [n_total // len(self.triggers) + (1 if j < n_total % len(self.triggers) else 0)
               for j in range(len(self.triggers))]
        src = None if self.source_labels is None else torch.as_tensor(list(self.source_labels), dtype=torch.long)
        poison_idx: list[torch.Tensor] = []
        for trig, tgt, k in zip(self.triggers, self.targets, per):
            eligible = ~taken
            if self.mode == "all-to-one":
                eligible &= dataset.y != tgt
            if src is not None:
                eligible &= torch.isin(dataset.y, src)
            cand = eligible.nonzero().flatten()
            if k > cand.numel():
                raise DataError(f"cannot poison {k} samples: only {cand.numel()} are eligible")
            idx = cand[torch.randperm(cand.numel(), generator=g)[:k]].sort().values
            x[idx] = trig.apply(x[idx])
            y[idx] = (dataset.y[idx] + 1) % K if self.mode == "all-to-all" else tgt
            taken[idx] = True
            poison_idx.append(idx)
        cover_rate = self.cover_rate if self.cover_rate is not None else (self.rate if src is not None else 0.0)
        cover = torch.empty(0, dtype=torch.long)
        if cover_rate > 0:
            eligible = ~taken
            if src is not None:
                eligible &= ~torch.isin(dataset.y, src)
            cand = eligible.nonzero().flatten()
            k = min(int(round(cover_rate * n)), cand.numel())
            cover = cand[torch.randperm(cand.numel(), generator=g)[:k]].sort().values
            for j, trig in enumerate(self.triggers):  # share the cover set between the triggers
                part = cover[j::len(self.triggers)]
                x[part] = trig.apply(x[part])
        return PoisonedDataset(x, y, K, dataset.class_names, f"{dataset.name}+badnets", dataset.groups,
                               poison_indices=torch.cat(poison_idx).sort().values, cover_indices=cover,
                               original_y=dataset.y.clone(), attack=self.to_dict())

    def success_rates(self, model: nn.Module, data: ImageDataset, *, batch_size: int = 256) -> list[float]:
        """Attack success of each trigger on ``data`` (see :func:`~trojanscope.metrics.attack_success_rate`)."""
        self._check(data.num_classes)
        out = []
        for trig, tgt in zip(self.triggers, self.targets):
            target = self.target_map(data.num_classes) if self.mode == "all-to-all" else tgt
            out.append(attack_success_rate(model, data, trig, target, source_labels=self.source_labels,
                                           batch_size=batch_size))
        return out

    def success_rate(self, model: nn.Module, data: ImageDataset, *, batch_size: int = 256) -> float:
        """Mean attack success over the triggers."""
        r = self.success_rates(model, data, batch_size=batch_size)
        return float(sum(r) / len(r))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["trigger"] = [t.name for t in self.triggers]
        return d
