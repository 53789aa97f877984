"""The one training loop: train from scratch, fine-tune, and retrain a fresh copy of a model's
architecture (:class:`Retrainer`, which the data sanitisers train their reclassification models
with, and :func:`retrain`, which trains one on the samples a sanitiser kept)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._utils.batching import DeviceLike, generator, model_device
from ._utils.results import Result
from .data.dataset import ImageDataset
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainResult(Result):
    """The loss and accuracy on the training data after each epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  #: wall time of the run
    images_per_second: float = 0.0  #: training images processed per second (epochs x N / seconds)


#: Named training recipes (keyword arguments of :func:`train`). ``adam`` is the small-model default
#: the MNIST figures were measured with; ``sgd`` is the standard CIFAR / GTSRB recipe for ResNets
#: and VGGs: SGD with Nesterov-free momentum 0.9, weight decay 5e-4, a one-cycle learning-rate
#: schedule peaking at 0.05, and random-crop augmentation (4-pixel zero padding) without flips,
#: since a mirrored sign or digit is another class.
RECIPES: dict[str, dict[str, Any]] = {
    "adam": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", augment=None),
    "sgd": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="onecycle", augment="crop"),
}
Augment = Literal["crop", "crop-flip", "flip"]


def random_crop_flip(x: torch.Tensor, g: torch.Generator, *, padding: int = 4, crop: bool = True,
                     flip: bool = False) -> torch.Tensor:
    """Random-crop (zero padding by ``padding``, then a random ``H x W`` window) and optionally
    mirror a batch ``(B, C, H, W)``; one random draw per image from ``g``."""
    b, _, h, w = x.shape
    if crop and padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (B, H)
        cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (B, W)
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        m = (torch.rand(b, generator=g) < 0.5).to(x.device)
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def _lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate's multiplier at ``step`` of ``total``: constant, cosine (to 0), or
    one-cycle (Smith 2018: linear warm-up over the first 30% from 1/25 to 1, then cosine to ~0)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    t = step / (total - 1)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":
        warm = 0.3
        if t < warm:
            return 0.04 + 0.96 * t / warm
        return 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm))) * (1 - 1e-4) + 1e-4
    raise ConfigError(f"schedule must be 'constant', 'cosine' or 'onecycle', got {schedule!r}")


def train(model: nn.Module, data: ImageDataset, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
          optimizer: Literal["adam", "sgd"] = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
          seed: int | None = 0, device: DeviceLike = None, progress: bool | str = False,
          batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
          trainable: Callable[[str], bool] | None = None, schedule: str = "constant",
          augment: Augment | None = None, threads: int | None = None,
          stop: Callable[[dict[str, float]], bool] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` with cross-entropy; restores its mode afterwards.

    Also the fine-tuning loop: pass a small ``lr`` and few ``epochs``.

    Args:
        model: the network (trained in place).
        data: the training set.
        epochs, lr, batch_size, optimizer, momentum, weight_decay: the usual.
        seed: seeds the shuffling and ``batch_transform``'s generator (None: fresh entropy).
        device: where to train (default: the model's device).
        progress: show a progress bar (tqdm on stderr, only at a terminal; see
            :mod:`trojanscope._utils.progress`); a string is the bar's label.
        batch_transform: ``f(x, y, generator) -> (x, y)`` applied to each batch before the step
            (on-the-fly poisoning, trigger stamping for unlearning...).
        trainable: ``f(param_name) -> bool``; parameters for which it is False are frozen.
        schedule: the learning rate over the run, per step: ``constant``, ``cosine`` or
            ``onecycle`` (see :func:`_lr_factor`).
        augment: ``crop`` (random crop after 4-pixel padding), ``crop-flip`` (and a horizontal
            flip), ``flip``, or None; applied after ``batch_transform``.
        threads: torch's CPU threads during training (restored afterwards); None leaves them.
        stop: ``f(history_row) -> bool``, asked after each epoch with that epoch's row (``epoch``,
            ``loss``, ``accuracy``); True ends the run early (``epochs`` is then the most it runs;
            the learning-rate schedule is still laid out over all of them).

    Returns:
        A :class:`TrainResult` with per-epoch loss and accuracy, the wall time and images per second.
    """
    _check_train_args(data, epochs, lr, batch_size, augment, threads, schedule)
    dev = model_device(model, device)
    g = generator(seed)
    opt, frozen = _optimizer(model, optimizer, lr, momentum, weight_decay, trainable)
    req = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.train()
    n = len(data)
    try:
        history, seconds = _epochs(model, data, opt, g, dev, epochs=epochs, batch_size=batch_size, lr=lr,
                                   schedule=schedule, batch_transform=batch_transform, augment=augment,
                                   progress=progress, threads=threads, stop=stop)
    finally:
        for p, r in zip(frozen, req):
            p.requires_grad_(r)
        model.train(was_training)
    ran = len(history)
    _summary_line(progress, ran, n, seconds)
    return TrainResult(history=history, seconds=seconds, images_per_second=ran * n / max(seconds, 1e-9),
                       params=dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                                   weight_decay=weight_decay, seed=seed, schedule=schedule, augment=augment))


def _check_train_args(data: ImageDataset, epochs: int, lr: float, batch_size: int, augment: Augment | None,
                      threads: int | None, schedule: str) -> None:
    if len(data) == 0:
        raise DataError("cannot train on an empty dataset")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(f"need epochs >= 0, lr > 0, batch_size >= 1; got {epochs}, {lr}, {batch_size}")
    if augment not in (None, "crop", "crop-flip", "flip"):
        raise ConfigError(f"augment must be 'crop', 'crop-flip', 'flip' or None, got {augment!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    _lr_factor(schedule, 0, 2)  # validates the name


def _optimizer(model: nn.Module, optimizer: str, lr: float, momentum: float, weight_decay: float,
               trainable: Callable[[str], bool] | None) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """The optimiser over the trainable parameters, and the parameters ``trainable`` freezes."""
    params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    return opt, [p for n, p in model.named_parameters() if trainable is not None and not trainable(n)]


def _epochs(model: nn.Module, data: ImageDataset, opt: torch.optim.Optimizer, g: torch.Generator, dev: torch.device,
            *, epochs: int, batch_size: int, lr: float, schedule: str,
            batch_transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None, augment: Augment | None,
            progress: bool | str, threads: int | None,
            stop: Callable[[dict[str, float]], bool] | None = None) -> tuple[list[dict[str, float]], float]:
    """The epochs of :func:`train` (progress bar, thread count, torch's global RNG forked and seeded
    from ``g``); ``(per-epoch history, wall seconds)``."""
    history: list[dict[str, float]] = []
    n = len(data)
    total_steps, step = epochs * ((n + batch_size - 1) // batch_size), 0
    bar = None
    if progress:
        from ._utils.progress import progress as progress_bar
        bar = progress_bar(total=total_steps, desc=progress if isinstance(progress, str) else "train", unit="batch")
    t_start = time.perf_counter()
    try:
        with torch_threads(threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            for epoch in range(epochs):
                t_epoch = time.perf_counter()
                total_loss, correct, step = _epoch(model, data, opt, g, dev, batch_size=batch_size, lr=lr,
                                                   schedule=schedule, step=step, total_steps=total_steps,
                                                   batch_transform=batch_transform, augment=augment, bar=bar)
                ips = n / max(time.perf_counter() - t_epoch, 1e-9)
                history.append({"epoch": epoch + 1, "loss": total_loss / n, "accuracy": correct / n})
                if bar is not None:
                    bar.set_postfix(loss=f"{total_loss / n:.3f}", acc=f"{correct / n:.3f}", img_s=f"{ips:.0f}")
                log.info("epoch %d: loss %.4f, accuracy %.4f, %.0f images/s", epoch + 1, total_loss / n,
                         correct / n, ips)
                if stop is not None and stop(history[-1]):
                    break
    finally:
        if bar is not None:
            bar.close()
    return history, time.perf_counter() - t_start


def _epoch(model: nn.Module, data: ImageDataset, opt: torch.optim.Optimizer, g: torch.Generator, dev: torch.device, *,
           batch_size: int, lr: float, schedule: str, step: int, total_steps: int,
           batch_transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None, augment: Augment | None,
           bar: Any) -> tuple[float, int, int]:
    """One pass over ``data`` in a fresh random order; ``(summed loss, correct, steps so far)``."""
    n = len(data)
    perm = torch.randperm(n, generator=g)
    total_loss, correct = 0.0, 0
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        xb, yb = data.x[idx], data.y[idx]
        if batch_transform is not None:
            xb, yb = batch_transform(xb, yb, g)
        if augment is not None:
            xb = random_crop_flip(xb, g, crop="crop" in augment, flip="flip" in augment)
        xb, yb = xb.to(dev), yb.to(dev)
        if schedule != "constant":
            f = _lr_factor(schedule, step, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr * f
        step += 1
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((out.argmax(1) == yb).sum())
        if bar is not None:
            bar.update(1)
    return total_loss, correct, step


def _summary_line(progress: bool | str, epochs: int, n: int, seconds: float) -> None:
    """The one summary line of a run with a progress bar, even without a TTY."""
    from ._utils import progress as _progress

    if progress and epochs and not _progress._quiet and _progress._sink is None:
        import sys
        print(f"trained {epochs} epoch(s) of {n} images in {seconds:.1f} s ({epochs * n / max(seconds, 1e-9):.0f} "
              "images/s)", file=sys.stderr)


def fine_tune(model: nn.Module, data: ImageDataset, *, epochs: int = 1, lr: float = 1e-4, **kwargs: Any) -> TrainResult:
    """:func:`train` with fine-tuning defaults (one epoch, small learning rate)."""
    return train(model, data, epochs=epochs, lr=lr, **kwargs)


def mean_loss(model: nn.Module, data: ImageDataset, *, batch_size: int = 256, device: DeviceLike = None) -> float:
    """The mean cross-entropy of ``model``'s eval-mode outputs on ``data`` (``inf`` when not finite)."""
    from ._utils.batching import logits

    loss = float(F.cross_entropy(logits(model, data.x, batch_size=batch_size, device=device), data.y))
    return loss if math.isfinite(loss) else math.inf


def stable_fine_tune(model: nn.Module, data: ImageDataset, *, lr: float, tries: int = 3, backoff: float = 0.1,
                     check: Callable[[nn.Module], str | None] | None = None, device: DeviceLike = None,
                     **kwargs: Any) -> tuple[TrainResult, list[dict[str, Any]]]:
    """:func:`fine_tune`, started again from the same weights at ``backoff`` x the learning rate
    while it fails, at most ``tries`` times.

    A run *fails* when it has diverged, leaving its own objective no lower than it found it (the
    mean cross-entropy on ``data`` in eval mode, :func:`mean_loss`, is not below the one before,
    or is not finite), or when ``check(model)`` returns a reason (the caller's test on data the
    run did not see). A learning rate that suits one model can blow up another: SGD at 0.01 with
    momentum turns the Adam-trained ``gtsrb_cnn`` into a constant classifier with NaN outputs. A
    run that does not fail is exactly :func:`fine_tune`'s.

    Returns:
        ``(the last run's TrainResult, attempts)``: one ``{"lr", "loss_before", "loss_after",
        "failed"}`` row per run (a loss that is not finite is None; ``failed`` is None or why the
        run failed). When every run failed, ``model`` is left with the weights it came with.
    """
    if tries < 1 or not 0 < backoff < 1:
        raise ConfigError(f"need tries >= 1 and 0 < backoff < 1; got {tries}, {backoff}")
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = mean_loss(model, data, device=device)
    attempts: list[dict[str, Any]] = []
    for i in range(tries):
        if i:
            model.load_state_dict(start)
        result = fine_tune(model, data, lr=lr, device=device, **kwargs)
        after = mean_loss(model, data, device=device)
        failed = None
        if not after < before:
            failed = f"diverged (loss {before:.4g} before, {after:.4g} after)"
        elif check is not None:
            failed = check(model)
        attempts.append({"lr": lr, "loss_before": before if math.isfinite(before) else None,
                         "loss_after": after if math.isfinite(after) else None, "failed": failed})
        if failed is None:
            break
        log.warning("fine-tuning at lr %g failed: %s%s", lr, failed,
                    f"; trying lr {lr * backoff:g}" if i + 1 < tries else "; the starting weights are kept")
        lr *= backoff
    else:
        model.load_state_dict(start)
    return result, attempts


def train_new(arch: str, data: ImageDataset, *, seed: int | None = 0, arch_kwargs: dict[str, Any] | None = None,
              device: DeviceLike = None, **train_kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` for ``data``'s shape and classes (weights from ``seed``) and train it.

    ``train_kwargs`` go to :func:`train` (``epochs``, ``lr``, ``batch_size``...); ``recipe``
    (a key of :data:`RECIPES`) fills in the ones not given.
    """
    from .models import create_model

    recipe = train_kwargs.pop("recipe", None)
    train_kwargs = {k: v for k, v in train_kwargs.items() if v is not None}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        train_kwargs = {**RECIPES[recipe], **train_kwargs}
    model = create_model(arch, input_shape=data.image_shape, num_classes=data.num_classes, seed=seed,
                         **(arch_kwargs or {}))
    if device is not None:
        model.to(device)
    train(model, data, seed=seed, device=device, **train_kwargs)
    return model.eval()


def architecture_of(model: nn.Module) -> str | None:
    """The registry name of ``model``'s architecture, when it is a trojanscope architecture."""
    from .models import MODELS

    for name, factory in MODELS.items():
        if isinstance(factory, type) and type(model) is factory:
            return name
    return None


#: A training from scratch whose last epoch's accuracy on its own data is at most this many times
#: chance (``1 / K``) has learnt nothing, and is run again (:func:`train_from_scratch`).
CHANCE_FACTOR = 2.0
#: The runs :func:`train_from_scratch` makes, in order, while the model stays at chance: the offset
#: added to the seed and the initialisation (None: the layers' own; ``"he"``: He-uniform, see
#: :func:`~trojanscope.models.surface.reinitialised_copy`). A received plain ReLU stack
#: (``gtsrb_cnn`` as TorchScript) under torch's default initialisation sat at chance on cmnist
#: after Spectral (CA 10.0%, ASR 100%; benchmarks/README.md, "Retraining that stays at chance").
SCRATCH_TRIES: tuple[tuple[int, str | None], ...] = ((0, None), (0, "he"), (1, "he"))


def last_accuracy(res: TrainResult) -> float:
    """The last epoch's running accuracy on the training data (0 for a run with no epochs)."""
    return float(res.history[-1]["accuracy"]) if res.history else 0.0


def stayed_at_chance(res: TrainResult, num_classes: int) -> bool:
    """Whether a training ended at most :data:`CHANCE_FACTOR` times chance on its own data."""
    return last_accuracy(res) <= CHANCE_FACTOR / max(int(num_classes), 1)


def train_from_scratch(fresh: Callable[[int | None, str | None], nn.Module],
                       fit: Callable[[nn.Module, int | None], TrainResult], *, seed: int | None, num_classes: int,
                       tries: tuple[tuple[int, str | None], ...] = SCRATCH_TRIES,
                       ) -> tuple[nn.Module, TrainResult, list[dict[str, Any]]]:
    """Train a fresh model, and again as ``tries`` says while it stays at chance.

    ``fresh(seed, init)`` builds an untrained model and ``fit(model, seed)`` trains it. Returns the
    first model that leaves chance (or, if none does, the one with the best training accuracy), its
    run, and one row per run (``seed``, ``init``, ``train_accuracy``). A training that works is the
    same as one run. The accuracy is the last epoch's running one, so a one-epoch run is judged
    on an epoch that starts untrained.
    """
    rows: list[dict[str, Any]] = []
    best: tuple[nn.Module, TrainResult] | None = None
    for offset, init in tries:
        s = None if seed is None else seed + offset
        net = fresh(s, init)
        res = fit(net, s)
        rows.append({"seed": s, "init": init or "default", "train_accuracy": last_accuracy(res)})
        if not stayed_at_chance(res, num_classes):
            return net, res, rows
        log.warning("a %s trained from scratch (seed %s, %s initialisation) stayed at chance: training accuracy "
                    "%.1f%% over %d labels", type(net).__name__, s, init or "default", 100 * last_accuracy(res),
                    num_classes)
        if best is None or last_accuracy(res) > last_accuracy(best[1]):
            best = (net, res)
    if best is None:
        raise ConfigError("train_from_scratch needs at least one try")
    return best[0], best[1], rows


@dataclass(frozen=True)
class Retrainer:
    """How to train a new model from scratch: same architecture as the model under test.

    A training that ends at chance is run again (:func:`train_from_scratch`: a copy with
    He-initialised weights, then the next seed; with ``arch``, the next seeds), and the run's
    ``params["chance_runs"]`` lists every run.

    Args:
        arch: a registered architecture name; None re-initialises a deep copy of the model under
            test (every layer's ``reset_parameters``, seeded:
            :func:`~trojanscope.models.surface.reinitialised_copy`), so any model built from
            standard layers can be retrained: trojanscope architectures and the graphs rebuilt
            from received ``.pt2`` / TorchScript / ONNX files alike.
        epochs: training epochs (with ``fit_target``: the fewest).
        lr: Adam learning rate.
        batch_size: training batch size.
        seed: seeds the initial weights and the shuffling (None: fresh entropy).
        device: where to train (default: the model's device).
        fit_target: when set, training goes on past ``epochs``, one epoch at a time, until an
            epoch's running accuracy on the training data reaches this share, or ``max_epochs``.
            A budget in epochs means very different numbers of steps on 600 and on 17,000
            images: the sanitisers' reclassification models need to *fit* their data before
            their verdicts mean anything, and this is how they get the steps a small or hard
            set needs without spending more where 3 epochs already fit (MNIST). A fresh copy of
            the model under test (no ``arch``) that does not reach the share is trained once more
            from He-initialised weights, and the better fit kept (the run's ``params`` say
            ``init`` and ``unfitted_run``): on the ONNX digits ResNet, whose BatchNorm the export
            folded away, the torch-initialised reclassifiers fitted 0.874 in 24 epochs and
            Spectral found none of the poison; He-initialised ones fitted 0.928 in 8, and it
            found all 126.
        max_epochs: the most epochs with ``fit_target`` (default: 8 x ``epochs``).
        threads: torch's CPU threads in each training (and the BatchNorm recalibration after
            it); None leaves the caller's. Fixed at 1 by default so that a retrained model, and
            every verdict drawn from it, is the same whatever the machine's or the caller's
            thread count: how a step's sums are split over threads changes their last bits, and
            over hundreds of steps the differences grow into a different model, and a verdict
            near a threshold with it (benchmarks/README.md, "Thread count, fixed").
        workers: how many independent trainings :meth:`train_many` runs at once, each in a
            forked process on one thread (None: as many as torch's threads in the caller, so a
            thread budget is spent on whole trainings instead of inside each; only with
            ``threads=1`` and on CPU, else one after the other). The results are the same for
            any value.
    """

    arch: str | None = None
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    seed: int | None = 0
    device: DeviceLike = None
    fit_target: float | None = None
    max_epochs: int | None = None
    threads: int | None = 1
    workers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"retraining epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ConfigError(f"retraining needs lr > 0 and batch_size >= 1, got {self.lr}, {self.batch_size}")
        if self.fit_target is not None and not 0 < self.fit_target <= 1:
            raise ConfigError(f"the retraining fit target must be in (0, 1], got {self.fit_target!r}")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int) or self.max_epochs < self.epochs):
            raise ConfigError(f"max_epochs must be an integer >= epochs ({self.epochs}), got {self.max_epochs!r}")
        for name in ("threads", "workers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"retraining {name} must be a positive integer or None, got {v!r}")

    @property
    def epoch_cap(self) -> int:
        """The most epochs one training runs."""
        if self.fit_target is None:
            return self.epochs
        return self.max_epochs if self.max_epochs is not None else 8 * self.epochs

    def fresh(self, model: nn.Module, data: ImageDataset, seed: int | None = None, *,
              init: str | None = None) -> nn.Module:
        """An untrained network with ``model``'s architecture, on ``model``'s device (``init``: see
        :func:`~trojanscope.models.surface.reinitialised_copy`; not used with ``arch``)."""
        from .errors import UnsupportedModelError

        seed = self.seed if seed is None else seed
        dev = model_device(model, self.device)
        if self.arch is not None:
            from .models import create_model

            return create_model(self.arch, input_shape=data.image_shape, num_classes=data.num_classes,
                                seed=seed).to(dev)
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError("cannot re-initialise a TorchScript model: give the architecture "
                                        "(arch=...) to retrain from scratch")
        from .models.surface import reinitialised_copy

        return reinitialised_copy(model, generator(seed).initial_seed(), init=init).to(dev)

    def train(self, model: nn.Module, data: ImageDataset, seed: int | None = None) -> nn.Module:
        """Train a fresh copy of ``model``'s architecture on ``data`` and return it (in eval mode)."""
        return self.train_with_history(model, data, seed)[0]

    def train_with_history(self, model: nn.Module, data: ImageDataset,
                           seed: int | None = None) -> tuple[nn.Module, TrainResult]:
        """:meth:`train`, and the run's :class:`TrainResult` (how many epochs it took, with ``fit_target``)."""
        with torch_threads(self.threads):
            return self._train_here(model, data, seed, progress=f"train ({len(data)} samples)")

    def _train_here(self, model: nn.Module, data: ImageDataset, seed: int | None,
                    progress: bool | str) -> tuple[nn.Module, TrainResult]:
        """One training on the caller's threads (:meth:`train_with_history` sets them)."""
        if len(data) == 0:
            raise DataError("nothing left to train on: every sample was removed")
        log.info("training a fresh copy of a %s model on %d samples (%d epochs)", type(model).__name__, len(data),
                 self.epochs)
        stop = None
        if self.fit_target is not None:
            least, target = self.epochs, self.fit_target

            def stop(row: dict[str, float]) -> bool:
                return row["epoch"] >= least and row["accuracy"] >= target

        base = self.seed if seed is None else seed
        # a run that stays at chance is tried again (He initialisation, then the next seed; a named
        # architecture has its own initialisation, so only the next seed)
        new, res, tries = train_from_scratch(
            lambda s, init: self.fresh(model, data, s, init=init),
            lambda net, s: self._fit(net, data, s, progress, stop), seed=base, num_classes=data.num_classes,
            tries=SCRATCH_TRIES if self.arch is None else ((0, None), (1, None)))
        if len(tries) > 1:
            res.params["chance_runs"] = tries
        if (self.fit_target is not None and self.arch is None and len(tries) == 1 and res.history
                and res.history[-1]["accuracy"] < self.fit_target):
            # it did not fit in epoch_cap epochs: a plain ReLU stack under torch's initialisation
            # (a received graph without normalisation, e.g. an ONNX ResNet whose BatchNorm was
            # folded) can learn too slowly; try again with He initialisation and keep the better fit
            he = self.fresh(model, data, seed, init="he")
            res_he = self._fit(he, data, seed, progress, stop)
            log.info("the %s model fitted %.3f of its %d samples in %d epochs; again with He initialisation: "
                     "%.3f in %d", type(new).__name__, res.history[-1]["accuracy"], len(data), len(res.history),
                     res_he.history[-1]["accuracy"], len(res_he.history))
            first = {"init": "default", "epochs": len(res.history), "accuracy": res.history[-1]["accuracy"]}
            if res_he.history[-1]["accuracy"] > res.history[-1]["accuracy"]:
                new, res = he, res_he
                res.params["init"] = "he"
            res.params["unfitted_run"] = first
        if len(res.history) > self.epochs:
            log.info("the %s model needed %d epochs to fit %.0f%% of its %d samples (%.3f)", type(new).__name__,
                     len(res.history), 100 * self.fit_target, len(data), res.history[-1]["accuracy"])
        return new.eval(), res

    def _fit(self, new: nn.Module, data: ImageDataset, seed: int | None, progress: bool | str,
             stop: Callable[[dict[str, float]], bool] | None) -> TrainResult:
        """Train the fresh ``new`` for up to ``epoch_cap`` epochs, then recompute its BatchNorm statistics."""
        res = train(new, data, epochs=self.epoch_cap, lr=self.lr, batch_size=self.batch_size,
                    seed=self.seed if seed is None else seed, device=model_device(new, self.device),
                    progress=progress, stop=stop)
        recalibrate_batchnorm(new, data, batch_size=self.batch_size, device=model_device(new, self.device))
        return res

    def train_many(self, model: nn.Module, datasets: list[ImageDataset],
                   seed: int | None = None) -> list[tuple[nn.Module, TrainResult]]:
        """:meth:`train_with_history` on each of ``datasets`` (independent trainings), up to
        ``workers`` at once in forked processes on CPU; the same models as one after the other."""
        from ._utils.forked import run_forked

        workers = self.workers if self.workers is not None else torch.get_num_threads()
        workers = min(workers, len(datasets), os.cpu_count() or 1)
        forked = (self.threads == 1 and workers > 1 and len(datasets) > 1
                  and model_device(model, self.device).type == "cpu")
        blobs: list[bytes | None] = [None] * len(datasets)
        if forked:
            log.info("training %d models at once in %d worker(s)", len(datasets), workers)

            def job(d: ImageDataset) -> Callable[[], bytes]:
                def run() -> bytes:
                    with torch_threads(self.threads):
                        new, res = self._train_here(model, d, seed, progress=f"train ({len(d)} samples)")
                    return _model_blob(new, res)
                return run

            sizes = "/".join(str(len(d)) for d in datasets)
            blobs = run_forked([job(d) for d in datasets], workers, desc=f"train ({sizes} samples, {workers} at once)")
        out = []
        for d, blob in zip(datasets, blobs):
            if blob is None:
                out.append(self.train_with_history(model, d, seed))
            else:
                out.append(_from_blob(self.fresh(model, d, seed), blob))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, torch.device) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``threads`` inside the block (None: unchanged)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(old)


def _model_blob(model: nn.Module, res: TrainResult) -> bytes:
    """A trained model's state and its run as bytes: the run as JSON (length-prefixed), then the
    state as safetensors."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    run = json.dumps({"history": res.history, "params": res.params, "seconds": res.seconds,
                      "images_per_second": res.images_per_second}).encode()
    return struct.pack("<Q", len(run)) + run + save(tensors)


def _from_blob(fresh: nn.Module, blob: bytes) -> tuple[nn.Module, TrainResult]:
    """The model and run that :func:`_model_blob` wrote, loaded into ``fresh`` (same architecture)."""
    from safetensors.torch import load

    (n,) = struct.unpack_from("<Q", blob)
    fresh.load_state_dict(load(blob[8 + n:]))
    return fresh.eval(), TrainResult(**json.loads(blob[8:8 + n]))


def recalibrate_batchnorm(model: nn.Module, data: ImageDataset, *, batch_size: int = 64,
                          device: DeviceLike = None) -> bool:
    """Recompute every BatchNorm layer's running statistics as the plain average over ``data``'s
    batches, in order, with the weights as they are (no gradient; the other layers in eval mode).

    After a few dozen steps a BatchNorm model's running statistics (an exponential average with
    momentum 0.1) still lag its weights: a reclassifier of 629 digits fitted 99% of them in train
    mode and 71% in eval mode. Averaging the batch statistics of the final weights ("precise
    BN", Wu & Johnson 2021) removes that gap. Returns whether the model has BatchNorm layers.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or len(data) == 0:
        return False
    dev = model_device(model, device)
    was_training = model.training
    model.eval()
    for m in bns:
        m.train()
    bns = [m for m in bns if m.training]  # a layer with frozen statistics stays in eval mode: untouched
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        n = len(data)
        edges = list(range(0, n, batch_size)) + [n]
        if len(edges) > 2 and edges[-1] - edges[-2] == 1:
            del edges[-2]  # a last batch of one image has no batch statistics: join it to the one before
        with torch.no_grad():
            for a, b in zip(edges[:-1], edges[1:]):
                model(data.x[a:b].to(dev))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return True


@dataclass(frozen=True, kw_only=True)
class RetrainResult(Result):
    """A model trained from scratch on the samples a sanitiser kept.

    Attributes:
        model: the new network.
        accuracy: clean accuracy on the test data (None without test data).
        n_removed: samples removed before training.
        n_kept: samples trained on.
        history: one row, ``{"accuracy": ...}``.
        params: the :class:`Retrainer`'s settings.
        seconds: wall time.
    """

    model: nn.Module = field(repr=False)
    accuracy: float | None = None
    n_removed: int = 0
    n_kept: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def retrain(model: nn.Module, dataset: ImageDataset, removed: Any, *, test: ImageDataset | None = None,
            arch: str | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int | None = 0,
            device: DeviceLike = None) -> RetrainResult:
    """Train a new model from scratch on the samples of ``dataset`` that were not removed.

    Args:
        model: the model whose architecture is retrained (its weights are not used nor edited).
        dataset: the training set that was inspected.
        removed: a sanitiser's result (its ``flagged`` samples are dropped) or an ``(N,)`` bool
            mask of the samples to drop.
        test: data to measure clean accuracy on (the caller scores attack success itself, with
            :func:`trojanscope.metrics.attack_success_rate` on the returned ``model``).
        arch, epochs, lr, batch_size, seed, device: the training (see :class:`Retrainer`).
    """
    from .metrics import clean_accuracy

    t0 = time.perf_counter()
    mask = torch.as_tensor(getattr(removed, "flagged", removed)).bool().cpu()
    if mask.shape != (len(dataset),):
        raise DataError(f"the removal mask has shape {tuple(mask.shape)}, the dataset {len(dataset)} samples")
    trainer = Retrainer(arch=arch, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
    kept = dataset.subset(~mask)
    new, res = trainer.train_with_history(model, kept)
    acc = clean_accuracy(new, test) if test is not None else None
    params = trainer.to_dict()
    if "chance_runs" in res.params:  # the first runs stayed at chance
        params["chance_runs"] = res.params["chance_runs"]
    return RetrainResult(model=new, accuracy=acc, n_removed=int(mask.sum()), n_kept=len(kept),
                         params=params, seconds=time.perf_counter() - t0, history=[{"accuracy": acc}])
