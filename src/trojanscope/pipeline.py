"""Chains of defences: run defences of any family in order and record the figures after each step.

A :class:`Pipeline` holds the steps (defence objects, registry names, or ``(name, params)``) and
keeps three things as it goes: the current model, the current training set, and the input filters
standing in front of the model. What each family does to them:

==========  =========================================================================================
family      step
==========  =========================================================================================
``model``   ``scan(model, clean_data)``: the verdict is recorded; the model is unchanged.
``data``    ``inspect(model, train_data)``: the flagged samples are dropped from the training set and
            the model is retrained on what is left (``retrain="scratch"``: a fresh initialisation
            of the same architecture, the usual way after a sanitiser such as Activation
            Clustering; ``"continue"``: the current model trains on, with channels pruned by an
            earlier step held at zero, as in Milakovic's Fine-Pruning-then-Clustering order).
``repair``  ``repair(model, clean_data)``: the repaired model replaces the current one; channels it
            pruned (``details["pruned_params"]``) are remembered for ``"continue"`` retraining.
``input``   ``fit(model, clean_data)``: the filter joins the ones in front of the model; inputs any
            filter flags are rejected, the rest go to the model. Filters are refitted whenever a
            later step changes the model, so each one is calibrated on the model it guards.
==========  =========================================================================================

Figures come from an ``evaluate(model, filters) -> dict`` callback, called once before the first
step and after every step: the pipeline itself never sees a trigger or a target.
:func:`evaluator` builds the usual one (clean accuracy and attack success, on accepted inputs
when filters are present, and the rejection rates).

References:
    A. Milakovic. Backdoor defenses. Diploma thesis, TU Wien, 2021 (Activation Clustering and
    Fine-Pruning chained in both orders).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._utils.batching import DeviceLike, predict
from ._utils.results import Result, not_serialised
from .data.dataset import ImageDataset
from .defenses import DEFENSES, DataSanitizer, Defense, InputFilter, ModelDetector, Repair
from .errors import ConfigError, DataError
from .metrics import target_labels
from .triggers import Trigger

log = logging.getLogger(__name__)

StepSpec = Defense | str | tuple[str, dict[str, Any]]
Evaluate = Callable[[nn.Module, Sequence[InputFilter]], dict[str, Any]]


def rejected(filters: Sequence[InputFilter], x: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: inputs that at least one of ``filters`` flags (none: nothing is rejected)."""
    out = torch.zeros(x.shape[0], dtype=torch.bool)
    for f in filters:
        out |= f.flag(x).cpu()
    return out


def evaluator(test_data: ImageDataset, trigger: Trigger | None = None, target: int | Sequence[int] | None = None,
              *, batch_size: int = 256) -> Evaluate:
    """The usual figures of a defended model (for tests, benchmarks and the CLI).

    Returns a callback ``f(model, filters) -> dict`` with:

    * ``accuracy``: clean accuracy of the model on ``test_data``; with a trigger, ``attack_success``:
      share of stamped inputs (true label != target) classified as the target.
    * with filters in front: ``clean_rejected`` (the measured false-rejection rate),
      ``triggered_rejected`` (share of stamped inputs rejected, 1 - FAR), ``accuracy_accepted`` and
      ``attack_success_accepted`` (the same figures over accepted inputs only) and
      ``attack_success_end_to_end`` (stamped inputs both accepted and sent to the target, over all
      stamped inputs).
    """
    def evaluate(model: nn.Module, filters: Sequence[InputFilter]) -> dict[str, Any]:
        x, y = test_data.x, test_data.y
        correct = predict(model, x, batch_size=batch_size) == y
        out: dict[str, Any] = {"accuracy": float(correct.float().mean())}
        xt = hit = None
        if trigger is not None and target is not None:
            tgt = target_labels(y, target if isinstance(target, int) else torch.as_tensor(target), test_data.num_classes)
            keep = y != tgt
            if not bool(keep.any()):
                raise DataError("no test samples to measure attack success on")
            xt = trigger.apply(x[keep])
            hit = predict(model, xt, batch_size=batch_size) == tgt[keep]
            out["attack_success"] = float(hit.float().mean())
        if filters:
            rej = rejected(filters, x)
            acc = ~rej
            out["clean_rejected"] = float(rej.float().mean())
            out["accuracy_accepted"] = float(correct[acc].float().mean()) if bool(acc.any()) else None
            if xt is not None and hit is not None:
                rej_t = rejected(filters, xt)
                out["triggered_rejected"] = float(rej_t.float().mean())
                out["attack_success_accepted"] = float(hit[~rej_t].float().mean()) if bool((~rej_t).any()) else None
                out["attack_success_end_to_end"] = float((hit & ~rej_t).float().mean())
        return out
    return evaluate


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineResult(Result):
    """What a chain of defences produced.

    Attributes:
        model: the final model (a new object; the caller's is untouched).
        filters: the fitted input filters in front of it, in order.
        train_data: the training set after every sanitiser (None when none was given).
        history: one row before the first step (``"step": 0``) and one per step: the defence, its
            family, what it did (channels pruned, samples removed, verdict...) and the figures.
        results: each step's own result, as a dict.
        params: the pipeline's settings.
        seconds: wall time.
    """

    model: nn.Module = not_serialised()
    filters: list[InputFilter] = not_serialised(default_factory=list)
    train_data: ImageDataset | None = not_serialised(default=None)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def _build(step: StepSpec) -> Defense:
    if isinstance(step, Defense):
        return step
    if isinstance(step, str):
        return DEFENSES.create(step)
    if isinstance(step, tuple) and len(step) == 2 and isinstance(step[0], str) and isinstance(step[1], dict):
        return DEFENSES.create(step[0], **step[1])
    raise ConfigError(f"a pipeline step is a defence, a registered name or (name, params); got {step!r}")


def reinitialise(model: nn.Module, seed: int | None) -> nn.Module:
    """A deep copy of ``model`` with every layer's parameters re-initialised (seeded): the project's
    architectures and the graphs rebuilt from received files alike
    (:func:`~trojanscope.models.surface.reinitialised_copy`)."""
    from .models.surface import reinitialised_copy

    return reinitialised_copy(model, seed)


class Pipeline:
    """Run defences in order on a model (and its training set), recording figures after each step.

    Args:
        steps: defences (objects, registry names, or ``(name, params)``) in the order they run.
        retrain: after a data sanitiser, ``"scratch"`` trains a freshly initialised copy of the
            architecture on the kept samples; ``"continue"`` trains the current model on, keeping
            channels pruned by earlier steps at zero.
        epochs, lr, batch_size: the retraining (Adam).
        seed: seeds the re-initialisation and the retraining.
        device: where to retrain (default: the model's device).

    Example:
        >>> from trojanscope.data import load_digits
        >>> from trojanscope.training import train_new
        >>> train, val = load_digits("train"), load_digits("val")
        >>> net = train_new("mnist_cnn", train, epochs=1)
        >>> res = Pipeline(["prune", ("strip", {"n_overlays": 4})]).run(net, val)
        >>> [r["defense"] for r in res.history]
        ['(start)', 'prune', 'strip']
    """

    def __init__(self, steps: Sequence[StepSpec], *, retrain: Literal["scratch", "continue"] = "scratch",
                 epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.steps = list(steps)
        self.retrain = retrain
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def get_params(self) -> dict[str, Any]:
        return {"steps": [repr(_build(s)) for s in self.steps], "retrain": self.retrain, "epochs": self.epochs,
                "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def run(self, model: nn.Module, clean_data: ImageDataset, *, train_data: ImageDataset | None = None,
            evaluate: Evaluate | None = None) -> PipelineResult:
        """Run every step on a copy of ``model``.

        Args:
            model: the model under test (never edited).
            clean_data: the defender's clean data (fitting filters, detectors and repairs).
            train_data: the training set, needed by data sanitisers (which drop samples from it
                and retrain).
            evaluate: ``f(model, filters) -> dict`` of figures recorded after each step (see
                :func:`evaluator`).
        """
        from .defenses.repair.pruning import frozen_channels
        from .training import train

        t0 = time.perf_counter()
        if self.retrain not in ("scratch", "continue"):
            raise ConfigError(f"retrain must be 'scratch' or 'continue', got {self.retrain!r}")
        if not isinstance(clean_data, ImageDataset) or len(clean_data) == 0:
            raise DataError("the pipeline needs non-empty clean data (an ImageDataset)")
        defenses = [_build(s) for s in self.steps]
        if not defenses:
            raise ConfigError("a pipeline needs at least one step")
        if any(isinstance(d, DataSanitizer) for d in defenses) and train_data is None:
            raise ConfigError("a data sanitiser in the pipeline needs train_data")
        net = copy.deepcopy(model)
        filters: list[InputFilter] = []
        frozen: dict[str, list[int]] = {}
        frozen_dims: dict[str, int] = {}
        data = train_data
        history: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []

        def record(i: int, d: Defense | None, info: dict[str, Any], seconds: float) -> None:
            row: dict[str, Any] = {"step": i, "defense": getattr(type(d), "registry_name", type(d).__name__)
                                   if d is not None else "(start)", "family": d.family if d is not None else "",
                                   **info}
            if evaluate is not None:
                row.update(evaluate(net, filters))
            row["seconds"] = seconds
            history.append(row)

        record(0, None, {}, 0.0)
        for i, d in enumerate(defenses, 1):
            t_step = time.perf_counter()
            info: dict[str, Any] = {}
            changed = False
            if isinstance(d, InputFilter):
                d.fit(net, clean_data)
                filters.append(d)
                info["threshold"] = float(d.threshold_)
                results.append({"threshold": float(d.threshold_), "params": d.get_params()})
            elif isinstance(d, Repair):
                res = d.repair(net, clean_data)
                net, changed = res.model, True
                dims = res.details.get("pruned_dims") or {}
                for name, chans in (res.details.get("pruned_params") or {}).items():
                    if frozen_dims.get(name, dims.get(name, 0)) != dims.get(name, 0):
                        raise ConfigError(f"two pruning steps mask {name!r} along different dimensions; "
                                          "use one granularity in a pipeline")
                    frozen[name] = sorted(set(frozen.get(name, [])) | set(chans))
                    frozen_dims[name] = dims.get(name, 0)
                if "n_pruned" in res.details:
                    info["n_pruned"] = res.details["n_pruned"]
                results.append(res.to_dict())
            elif isinstance(d, DataSanitizer):
                assert data is not None
                res = d.inspect(net, data)
                keep = ~res.flagged.cpu().bool()
                if not bool(keep.any()):
                    raise DataError(f"{type(d).__name__} flagged every training sample; nothing left to retrain on")
                info.update(n_removed=int((~keep).sum()), n_kept=int(keep.sum()))
                data = data.subset(keep.nonzero().flatten())
                if self.retrain == "scratch":
                    net, frozen, frozen_dims = reinitialise(net, self.seed), {}, {}
                    train(net, data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                          device=self.device)
                else:
                    with frozen_channels(net, frozen, frozen_dims):
                        train(net, data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                              seed=self.seed, device=self.device)
                changed = True
                results.append({**res.to_dict(), "flagged_indices": res.flagged_indices.tolist()})
            elif isinstance(d, ModelDetector):
                res = d.scan(net, clean_data)
                info.update(infected=bool(res.infected), flagged_labels=list(res.flagged_labels))
                results.append(res.to_dict())
            else:
                raise ConfigError(f"{type(d).__name__} is not a defence of a known family")
            if changed and filters:  # each filter is calibrated on the model it guards
                for f in filters:
                    f.fit(net, clean_data)
                info["refitted_filters"] = len(filters)
            log.info("pipeline step %d (%s) done in %.1f s", i, type(d).__name__, time.perf_counter() - t_step)
            record(i, d, info, time.perf_counter() - t_step)
        return PipelineResult(model=net, filters=filters, train_data=data, history=history, results=results,
                              params=self.get_params(), seconds=time.perf_counter() - t0)
