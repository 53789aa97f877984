"""Training from scratch on what a sanitiser left, and the trainer the sanitisers use inside.

Exclusionary reclassification (Activation Clustering) and provenance filtering both train new
models on parts of the data; :class:`Retrainer` holds how (architecture, epochs, seed) and builds
a fresh network shaped like the model under test. :func:`retrain` trains one on the samples a
:class:`~trojanscope.defenses.base.SanitizeResult` kept and reports its clean accuracy and, when
the caller (a test, a benchmark, the CLI) supplies the attack's trigger and target, its attack
success rate.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._utils.batching import DeviceLike, model_device
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError, UnsupportedModelError
from ...metrics import attack_success_rate, clean_accuracy
from ...triggers import Trigger
from ..base import RepairResult, SanitizeResult

log = logging.getLogger(__name__)


def architecture_of(model: nn.Module) -> str | None:
    """The registry name of ``model``'s architecture, when it is a trojanscope architecture."""
    from ...models import MODELS

    for name, factory in MODELS.items():
        if isinstance(factory, type) and type(model) is factory:
            return name
    return None


@dataclass(frozen=True)
class Retrainer:
    """How to train a new model from scratch: same architecture as the model under test.

    Args:
        arch: a registered architecture name; None re-initialises a deep copy of the model under
            test (every module's ``reset_parameters``, seeded), so any model built from standard
            layers can be retrained, trojanscope architectures included.
        epochs: training epochs.
        lr: Adam learning rate.
        batch_size: training batch size.
        seed: seeds the initial weights and the shuffling.
        device: where to train (default: the model's device).
    """

    arch: str | None = None
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    seed: int | None = 0
    device: DeviceLike = None

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"retraining epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ConfigError(f"retraining needs lr > 0 and batch_size >= 1, got {self.lr}, {self.batch_size}")

    def fresh(self, model: nn.Module, data: ImageDataset, seed: int | None = None) -> nn.Module:
        """An untrained network with ``model``'s architecture, on ``model``'s device."""
        seed = self.seed if seed is None else seed
        dev = model_device(model, self.device)
        if self.arch is not None:
            from ...models import create_model

            return create_model(self.arch, input_shape=data.image_shape, num_classes=data.num_classes,
                                seed=seed).to(dev)
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError("cannot re-initialise a TorchScript model: give the architecture "
                                        "(arch=...) to retrain from scratch")
        new = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(0 if seed is None else int(seed))
            for name, module in new.named_modules():
                if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                    reset = getattr(module, "reset_parameters", None) or getattr(module, "reset_running_stats", None)
                    if reset is None:
                        raise UnsupportedModelError(
                            f"layer {name or type(module).__name__!r} cannot be re-initialised (no reset_parameters); "
                            f"give the architecture (arch=...) to retrain from scratch")
                    reset()
        return new.to(dev)

    def train(self, model: nn.Module, data: ImageDataset, seed: int | None = None) -> nn.Module:
        """Train a fresh copy of ``model``'s architecture on ``data`` and return it (in eval mode)."""
        from ...training import train

        if len(data) == 0:
            raise DataError("nothing left to train on: every sample was removed")
        new = self.fresh(model, data, seed)
        log.info("training a %s model on %d samples (%d epochs)", type(new).__name__, len(data), self.epochs)
        train(new, data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
              seed=self.seed if seed is None else seed, device=model_device(new, self.device),
              progress=f"train ({len(data)} samples)")
        return new

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, torch.device) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


@dataclass(frozen=True, kw_only=True)
class RetrainResult(RepairResult):
    """A model trained from scratch on the samples a sanitiser kept.

    Attributes:
        accuracy: clean accuracy on the test data (None without test data).
        attack_success: attack success rate of the caller's trigger (None without one).
        n_removed: samples removed before training.
        n_kept: samples trained on.
    """

    accuracy: float | None = None
    attack_success: float | None = None
    n_removed: int = 0
    n_kept: int = 0


def retrain(model: nn.Module, dataset: ImageDataset, removed: SanitizeResult | torch.Tensor, *,
            test: ImageDataset | None = None, trigger: Trigger | None = None, target: int | None = None,
            arch: str | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int | None = 0,
            device: DeviceLike = None) -> RetrainResult:
    """Train a new model from scratch on the samples of ``dataset`` that were not removed.

    Args:
        model: the model whose architecture is retrained (its weights are not used nor edited).
        dataset: the training set that was inspected.
        removed: a :class:`SanitizeResult` (its ``flagged`` samples are dropped) or an ``(N,)``
            bool mask of the samples to drop.
        test: data to measure clean accuracy on.
        trigger, target: the attack's trigger and target label, to measure attack success on
            ``test`` (evaluation only: ground truth from the caller, never from a sanitiser).
        arch, epochs, lr, batch_size, seed, device: the training (see :class:`Retrainer`).

    Returns:
        A :class:`RetrainResult` with the new model, ``accuracy`` and ``attack_success``.
    """
    t0 = time.perf_counter()
    mask = removed.flagged if isinstance(removed, SanitizeResult) else torch.as_tensor(removed)
    mask = mask.bool().cpu()
    if mask.shape != (len(dataset),):
        raise DataError(f"the removal mask has shape {tuple(mask.shape)}, the dataset {len(dataset)} samples")
    if (trigger is None) != (target is None):
        raise ConfigError("attack success needs both the trigger and the target label")
    trainer = Retrainer(arch=arch, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
    kept = dataset.subset(~mask)
    new = trainer.train(model, kept)
    acc = clean_accuracy(new, test) if test is not None else None
    asr = attack_success_rate(new, test, trigger, int(target)) if (test is not None and trigger is not None) else None  # type: ignore[arg-type]
    return RetrainResult(model=new, accuracy=acc, attack_success=asr, n_removed=int(mask.sum()), n_kept=len(kept),
                         params=trainer.to_dict(), seconds=time.perf_counter() - t0,
                         history=[{"accuracy": acc, "attack_success": asr}])
