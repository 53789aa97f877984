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
from .metrics import attack_inputs
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
            keep, tgt = attack_inputs(test_data, target if isinstance(target, int) else torch.as_tensor(target))
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


def reinitialise(model: nn.Module, seed: int | None, init: str | None = None) -> nn.Module:
    """A deep copy of ``model`` with every layer's parameters re-initialised (seeded): the project's
    architectures and the graphs rebuilt from received files alike
    (:func:`~trojanscope.models.surface.reinitialised_copy`; ``init="he"``: He-uniform)."""
    from .models.surface import reinitialised_copy

    return reinitialised_copy(model, seed, init=init)


class Pipeline:
    """Run defences in order on a model (and its training set), recording figures after each step.

    Args:
        steps: defences (objects, registry names, or ``(name, params)``) in the order they run.
        retrain: after a data sanitiser, ``"scratch"`` trains a freshly initialised copy of the
            architecture on the kept samples; ``"continue"`` trains the current model on, keeping
            channels pruned by earlier steps at zero. A scratch run that stays at chance is tried
            again (:func:`~trojanscope.training.train_from_scratch`: He initialisation, then the
            next seed); the step's row has ``retrain_tries`` and its result each run.
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
        st = _State(net=copy.deepcopy(model), data=train_data)
        history: list[dict[str, Any]] = []

        def record(i: int, d: Defense | None, info: dict[str, Any], seconds: float) -> None:
            row: dict[str, Any] = {"step": i, "defense": getattr(type(d), "registry_name", type(d).__name__)
                                   if d is not None else "(start)", "family": d.family if d is not None else "",
                                   **info}
            if evaluate is not None:
                row.update(evaluate(st.net, st.filters))
            row["seconds"] = seconds
            history.append(row)

        record(0, None, {}, 0.0)
        for i, d in enumerate(defenses, 1):
            t_step = time.perf_counter()
            info, changed = self._step(d, st, clean_data)
            if changed and st.filters:  # each filter is calibrated on the model it guards
                for f in st.filters:
                    f.fit(st.net, clean_data)
                info["refitted_filters"] = len(st.filters)
            log.info("pipeline step %d (%s) done in %.1f s", i, type(d).__name__, time.perf_counter() - t_step)
            record(i, d, info, time.perf_counter() - t_step)
        return PipelineResult(model=st.net, filters=st.filters, train_data=st.data, history=history, results=st.results,
                              params=self.get_params(), seconds=time.perf_counter() - t0)

    def _step(self, d: Defense, st: "_State", clean_data: ImageDataset) -> tuple[dict[str, Any], bool]:
        """Run one defence on the state; ``(figures for the history, whether the model changed)``."""
        info: dict[str, Any] = {}
        if isinstance(d, InputFilter):
            d.fit(st.net, clean_data)
            st.filters.append(d)
            info["threshold"] = float(d.threshold_)
            st.results.append({"threshold": float(d.threshold_), "params": d.get_params()})
            return info, False
        if isinstance(d, Repair):
            res = d.repair(st.net, clean_data)
            st.net = res.model
            st.freeze(res.details)
            if "n_pruned" in res.details:
                info["n_pruned"] = res.details["n_pruned"]
            st.results.append(res.to_dict())
            return info, True
        if isinstance(d, DataSanitizer):
            return self._sanitize(d, st), True
        if isinstance(d, ModelDetector):
            res = d.scan(st.net, clean_data)
            info.update(infected=bool(res.infected), flagged_labels=list(res.flagged_labels))
            st.results.append(res.to_dict())
            return info, False
        raise ConfigError(f"{type(d).__name__} is not a defence of a known family")

    def _sanitize(self, d: DataSanitizer, st: "_State") -> dict[str, Any]:
        """Drop the flagged samples and retrain (from scratch, or on with pruned channels held)."""
        from ._utils.masking import frozen_channels
        from .training import train, train_from_scratch

        assert st.data is not None
        res = d.inspect(st.net, st.data)
        keep = ~res.flagged.cpu().bool()
        if not bool(keep.any()):
            raise DataError(f"{type(d).__name__} flagged every training sample; nothing left to retrain on")
        info = {"n_removed": int((~keep).sum()), "n_kept": int(keep.sum())}
        st.data = st.data.subset(keep.nonzero().flatten())
        if self.retrain == "scratch":
            template, kept = st.net, st.data
            st.net, _, tries = train_from_scratch(
                lambda seed, init: reinitialise(template, seed, init),
                lambda net, seed: train(net, kept, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                        seed=seed, device=self.device),
                seed=self.seed, num_classes=kept.num_classes)
            st.frozen, st.frozen_dims = {}, {}
            info["retrain_tries"] = len(tries)
        else:
            tries = []
            with frozen_channels(st.net, st.frozen, st.frozen_dims):
                train(st.net, st.data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                      seed=self.seed, device=self.device)
        st.results.append({**res.to_dict(), "flagged_indices": res.flagged_indices.tolist(), "retrain": tries})
        return info


@dataclasses.dataclass
class _State:
    """What a pipeline carries from step to step."""

    net: nn.Module
    data: ImageDataset | None
    filters: list[InputFilter] = dataclasses.field(default_factory=list)
    frozen: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    frozen_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def freeze(self, details: dict[str, Any]) -> None:
        """Remember the channels a repair pruned (``details["pruned_params"]``)."""
        dims = details.get("pruned_dims") or {}
        for name, chans in (details.get("pruned_params") or {}).items():
            if self.frozen_dims.get(name, dims.get(name, 0)) != dims.get(name, 0):
                raise ConfigError(f"two pruning steps mask {name!r} along different dimensions; "
                                  "use one granularity in a pipeline")
            self.frozen[name] = sorted(set(self.frozen.get(name, [])) | set(chans))
            self.frozen_dims[name] = dims.get(name, 0)
