"""The one training loop: train from scratch, fine-tune, and evaluate."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._utils.batching import DeviceLike, model_device
from ._utils.results import Result
from .data.dataset import ImageDataset
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainResult(Result):
    """The loss and accuracy on the training data after each epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


def train(model: nn.Module, data: ImageDataset, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
          optimizer: Literal["adam", "sgd"] = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
          seed: int | None = 0, device: DeviceLike = None, progress: bool | str = False,
          batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
          trainable: Callable[[str], bool] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` with cross-entropy; restores its mode afterwards.

    Also the fine-tuning loop: pass a small ``lr`` and few ``epochs``.

    Args:
        model: the network (trained in place).
        data: the training set.
        epochs, lr, batch_size, optimizer, momentum, weight_decay: the usual.
        seed: seeds the shuffling and ``batch_transform``'s generator.
        device: where to train (default: the model's device).
        progress: show a progress bar (tqdm on stderr, only at a terminal; see
            :mod:`trojanscope._utils.progress`); a string is the bar's label.
        batch_transform: ``f(x, y, generator) -> (x, y)`` applied to each batch before the step
            (on-the-fly poisoning, trigger stamping for unlearning...).
        trainable: ``f(param_name) -> bool``; parameters for which it is False are frozen.

    Returns:
        A :class:`TrainResult` with per-epoch loss and accuracy.
    """
    if len(data) == 0:
        raise DataError("cannot train on an empty dataset")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(f"need epochs >= 0, lr > 0, batch_size >= 1; got {epochs}, {lr}, {batch_size}")
    dev = model_device(model, device)
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    frozen = [p for n, p in model.named_parameters() if trainable is not None and not trainable(n)]
    req = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.train()
    history: list[dict[str, float]] = []
    n = len(data)
    bar = None
    if progress:
        from ._utils.progress import progress as progress_bar
        bar = progress_bar(total=epochs * ((n + batch_size - 1) // batch_size), desc=progress if isinstance(progress, str) else "train", unit="batch")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=g)
                total_loss, correct = 0.0, 0
                for i in range(0, n, batch_size):
                    idx = perm[i:i + batch_size]
                    xb, yb = data.x[idx], data.y[idx]
                    if batch_transform is not None:
                        xb, yb = batch_transform(xb, yb, g)
                    xb, yb = xb.to(dev), yb.to(dev)
                    out = model(xb)
                    loss = F.cross_entropy(out, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total_loss += float(loss.detach()) * len(idx)
                    correct += int((out.argmax(1) == yb).sum())
                    if bar is not None:
                        bar.update(1)
                history.append({"epoch": epoch + 1, "loss": total_loss / n, "accuracy": correct / n})
                log.info("epoch %d: loss %.4f, accuracy %.4f", epoch + 1, total_loss / n, correct / n)
    finally:
        if bar is not None:
            bar.close()
        for p, r in zip(frozen, req):
            p.requires_grad_(r)
        model.train(was_training)
    return TrainResult(history=history, params=dict(epochs=epochs, lr=lr, batch_size=batch_size,
                                                    optimizer=optimizer, weight_decay=weight_decay, seed=seed))


def fine_tune(model: nn.Module, data: ImageDataset, *, epochs: int = 1, lr: float = 1e-4, **kwargs: Any) -> TrainResult:
    """:func:`train` with fine-tuning defaults (one epoch, small learning rate)."""
    return train(model, data, epochs=epochs, lr=lr, **kwargs)


def train_new(arch: str, data: ImageDataset, *, seed: int | None = 0, arch_kwargs: dict[str, Any] | None = None,
              device: DeviceLike = None, **train_kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` for ``data``'s shape and classes (weights from ``seed``) and train it.

    ``train_kwargs`` go to :func:`train` (``epochs``, ``lr``, ``batch_size``...).
    """
    from .models import create_model

    model = create_model(arch, input_shape=data.image_shape, num_classes=data.num_classes, seed=seed,
                         **(arch_kwargs or {}))
    if device is not None:
        model.to(device)
    train(model, data, seed=seed, device=device, **train_kwargs)
    return model.eval()
