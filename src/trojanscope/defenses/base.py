"""The defence families, their verbs and their typed results.

Every defence is a small class: hyperparameters (the paper's names and defaults) go into the
constructor and are stored verbatim; data goes into the verb. Each family's verb is a *template
method* on its base: the base checks the settings (from the class's ``_constraints``), checks the
data, times the call, protects the caller's model and records the settings in the result; a
subclass writes only the private step (``_scan``, ``_inspect``, ``_fit``/``_score``, ``_repair``,
``_explain``). One signature per family, no ``**kwargs``: generic code (the bench, the pipeline,
the CLI) calls every member of a family the same way and never reads parameter names.

============  ==========================================================  ===================
family        verb                                                        result
============  ==========================================================  ===================
``model``     ``scan(model, clean_data, *, callback=None)``               :class:`ScanResult`
``data``      ``inspect(model, dataset, *, trusted=None)``                :class:`SanitizeResult`
``input``     ``fit(model, clean_data, *, scan=None)`` / ``score(x)`` /   tensors ``(N,)``
              ``flag(x)``
``repair``    ``repair(model, clean_data, *, scan=None, val_data=None,    :class:`RepairResult`
              monitor=None)``
``explain``   ``explain(model, clean_data, target, *, callback=None)``    a :class:`Result`
============  ==========================================================  ===================

What a verb may receive is declared by class attributes, which generic code reads:

* ``uses_scan``: whether the defence consumes a model-level finding (``scan=``: a
  :class:`ScanResult`, or what the family documents, such as reversed triggers): ``"never"``,
  ``"optional"`` (without one it runs its own) or ``"required"``.
* ``uses_trusted``: whether a data sanitiser takes a trusted clean set (``trusted=``).
* ``places_trigger``: whether the constructor takes a trigger ``position`` / ``trigger_size``
  that a caller may fill from a scan's reversed mask.
* ``needs_hooks`` / ``needs_gradients``: whether it reads internal layers / back-propagates
  through the model (the conformance suite checks that hooks are gone and gradients untouched).

A defence never receives the attack, its trigger or its target label. A repair's ``monitor`` is an
opaque callable ``monitor(model) -> {name: float}`` built by the *caller* (for instance
:func:`trojanscope.metrics.attack_evaluator`); the repair only records what it returns in its
history.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import inspect
import time
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
from torch import nn

from .._utils.registry import Registry
from .._utils.results import Result, not_serialised
from .._utils.validation import check_params
from ..data.dataset import ImageDataset
from ..errors import ConfigError, DataError, NotFittedError

#: Every defence, by name; ``defenses/__init__.py`` imports each module explicitly.
DEFENSES: Registry[type["Defense"]] = Registry("defence")
register = DEFENSES.register

ScanUse = Literal["never", "optional", "required"]
#: ``monitor(model) -> {figure: value}``: figures a caller wants recorded after each repair step.
Monitor = Callable[[nn.Module], dict[str, float]]


@contextlib.contextmanager
def protected(model: nn.Module) -> Iterator[nn.Module]:
    """Run a verb on ``model`` and give it back as it came: the ``training`` flag, every
    parameter's ``requires_grad`` and ``.grad`` are restored on exit, even when the verb raises."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield model
    finally:
        model.train(was_training)
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g


def check_clean_data(data: Any, what: str = "clean data") -> ImageDataset:
    """``data`` as a non-empty :class:`ImageDataset`, or a :class:`DataError`."""
    if not isinstance(data, ImageDataset):
        raise DataError(f"{what} must be an ImageDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{what} is empty")
    return data


class Defense(abc.ABC):
    """Base class: ``get_params`` and ``__repr__`` come from the constructor's signature.

    ``_param_names`` is the one place a parameter name is read from a signature; generic code
    uses ``get_params()`` and the class attributes below.
    """

    family: ClassVar[str] = ""
    uses_scan: ClassVar[ScanUse] = "never"
    needs_gradients: ClassVar[bool] = False
    needs_hooks: ClassVar[bool] = False  #: True when the method reads internal layers
    #: True when the constructor takes a trigger ``position`` and ``trigger_size`` that a scan's
    #: reversed mask can supply (the trigger-distribution tools)
    places_trigger: ClassVar[bool] = False
    _constraints: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """The constructor's defaults, by parameter name (what generic code shows or overrides)."""
        sig = inspect.signature(cls.__init__)
        return {p.name: p.default for p in sig.parameters.values()
                if p.name in cls._param_names() and p.default is not p.empty}

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as stored."""
        return {name: getattr(self, name) for name in self._param_names()}

    def _recorded_params(self) -> dict[str, Any]:
        """The settings a result records (default: :meth:`get_params`)."""
        return self.get_params()

    def _validate_params(self) -> None:
        check_params(self, self._constraints)

    def _check_scan(self, scan: Any) -> None:
        name = type(self).__name__
        if scan is not None and self.uses_scan == "never":
            raise ConfigError(f"{name} does not use a scan (scan= must be None)")
        if scan is None and self.uses_scan == "required":
            raise ConfigError(f"{name} needs a scan (scan=): run a model-level detector first")

    def _finish(self, result: Any, t0: float) -> Any:
        return dataclasses.replace(result, params=self._recorded_params(), seconds=time.perf_counter() - t0)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class ModelDetector(Defense):
    """Model-level detection: ``scan(model, clean_data) -> ScanResult``."""

    family: ClassVar[str] = "model"

    def scan(self, model: nn.Module, clean_data: ImageDataset, *,
             callback: Callable[[dict[str, Any]], None] | None = None) -> "ScanResult":
        """Decide whether ``model`` is backdoored, using only ``clean_data``.

        ``callback`` (optional) receives progress records; the model comes back unchanged.
        """
        self._validate_params()
        data = check_clean_data(clean_data)
        t0 = time.perf_counter()
        with protected(model):
            result = self._scan(model, data, callback=callback)
        return self._finish(result, t0)

    @abc.abstractmethod
    def _scan(self, model: nn.Module, clean_data: ImageDataset, *,
              callback: Callable[[dict[str, Any]], None] | None) -> "ScanResult":
        """The detector itself (data already checked)."""


class DataSanitizer(Defense):
    """Data-level sanitising: ``inspect(model, dataset, *, trusted=None) -> SanitizeResult``."""

    family: ClassVar[str] = "data"
    uses_trusted: ClassVar[bool] = False  #: True when ``inspect`` takes a trusted clean set

    @property
    def trains_models(self) -> bool:
        """Whether ``inspect``, with these settings, trains models of its own (re-initialised copies
        of the given one, e.g. for exclusionary reclassification); False unless a sanitiser says so."""
        return False

    def inspect(self, model: nn.Module, dataset: ImageDataset, *,
                trusted: ImageDataset | None = None) -> "SanitizeResult":
        """Score every sample of ``dataset`` and flag the ones judged poisoned."""
        self._validate_params()
        data = check_clean_data(dataset, "the dataset")
        if trusted is not None:
            if not self.uses_trusted:
                raise ConfigError(f"{type(self).__name__} does not use a trusted set (trusted= must be None)")
            trusted = check_clean_data(trusted, "the trusted set")
        t0 = time.perf_counter()
        with protected(model):
            result = self._inspect(model, data, trusted=trusted)
        return self._finish(result, t0)

    @abc.abstractmethod
    def _inspect(self, model: nn.Module, dataset: ImageDataset, *,
                 trusted: ImageDataset | None) -> "SanitizeResult":
        """The sanitiser itself (data already checked)."""


class InputFilter(Defense):
    """Input-level filtering at run time.

    ``fit(model, clean_data, *, scan=None)`` calibrates ``threshold_`` from a target
    false-rejection rate on clean data and returns ``self``; ``score(x)`` returns one score per
    input, **higher meaning more suspicious** (the one sign convention of every input filter);
    ``flag(x)`` returns ``score(x) > threshold_``. Learned state ends in ``_``; ``score`` before
    ``fit`` raises :class:`~trojanscope.errors.NotFittedError`.
    """

    family: ClassVar[str] = "input"

    def fit(self, model: nn.Module, clean_data: ImageDataset, *, scan: Any = None) -> "InputFilter":
        self._validate_params()
        self._check_scan(scan)
        data = check_clean_data(clean_data)
        with protected(model):
            self._fit(model, data, scan=scan)
        return self

    def score(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self._score(x)

    def flag(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > self.threshold_

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(model, clean_data) first")

    @abc.abstractmethod
    def _fit(self, model: nn.Module, clean_data: ImageDataset, *, scan: Any) -> None:
        """Learn the filter's state from clean data and set ``threshold_``."""

    @abc.abstractmethod
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """One score per input, higher = more suspicious."""


class Repair(Defense):
    """Repair: ``repair(model, clean_data, *, scan=None, val_data=None, monitor=None) -> RepairResult``.

    The base deep-copies ``model`` and hands the copy to ``_repair``, which edits it in place;
    the caller's model is never touched.
    """

    family: ClassVar[str] = "repair"

    def repair(self, model: nn.Module, clean_data: ImageDataset, *, scan: Any = None,
               val_data: ImageDataset | None = None, monitor: Monitor | None = None) -> "RepairResult":
        """Return a repaired copy of ``model``.

        Args:
            model: the model to repair (left untouched).
            clean_data: the defender's clean data.
            scan: a model-level finding, when the class's ``uses_scan`` allows one.
            val_data: held-out clean data for the repair's own stopping rule (default: ``clean_data``).
            monitor: ``monitor(model) -> {figure: value}``, recorded in the history after each step.
        """
        self._validate_params()
        self._check_scan(scan)
        data = check_clean_data(clean_data)
        val = data if val_data is None else check_clean_data(val_data, "validation data")
        t0 = time.perf_counter()
        with protected(model):
            net = copy.deepcopy(model)
        result = self._repair(net, data, scan=scan, val_data=val, monitor=monitor)
        return self._finish(result, t0)

    @abc.abstractmethod
    def _repair(self, net: nn.Module, clean_data: ImageDataset, *, scan: Any, val_data: ImageDataset,
                monitor: Monitor | None) -> "RepairResult":
        """Repair ``net`` (already a private copy) in place and return the result."""


class Explainer(Defense):
    """Explanation of a suspected backdoor: ``explain(model, clean_data, target) -> Result``.

    ``target`` is the label to explain: a scan's flagged label or the user's suspicion, never the
    attack's ground truth.
    """

    family: ClassVar[str] = "explain"

    def explain(self, model: nn.Module, clean_data: ImageDataset, target: int, *,
                callback: Callable[[dict[str, Any]], None] | None = None) -> Any:
        self._validate_params()
        data = check_clean_data(clean_data)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= int(target):
            raise ConfigError(f"target must be a label (an int >= 0), got {target!r}")
        t0 = time.perf_counter()
        with protected(model):
            result = self._explain(model, data, int(target), callback=callback)
        return self._finish(result, t0)

    @abc.abstractmethod
    def _explain(self, model: nn.Module, clean_data: ImageDataset, target: int, *,
                 callback: Callable[[dict[str, Any]], None] | None) -> Any:
        """The explanation itself (data already checked)."""


def threshold_for_rate(clean_scores: torch.Tensor, rate: float) -> float:
    """The threshold above which a fraction ``rate`` of ``clean_scores`` lies.

    Inputs with ``score > threshold`` are flagged, so about ``rate`` of clean inputs are
    rejected: the ``(1 - rate)`` quantile of the clean scores (linear interpolation, numpy's
    default).

    Example:
        >>> threshold_for_rate(torch.arange(11.0), 0.1)  # only the clean score 10 lies above
        9.0
    """
    return float(torch.quantile(clean_scores.double(), 1.0 - rate))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanResult(Result):
    """What a model-level detector found.

    Attributes:
        infected: the verdict.
        flagged_labels: labels judged to be backdoor targets.
        scores: one anomaly score per label (higher = more suspicious).
        details: method-specific figures (per-label norms, triggers...).
        params: the detector's settings.
        seconds: wall time.
    """

    infected: bool
    flagged_labels: list[int]
    scores: torch.Tensor
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SanitizeResult(Result):
    """What a data-level sanitiser found.

    Attributes:
        scores: ``(N,)`` suspicion per sample, in the order of the given data (higher = more
            suspicious).
        flagged: ``(N,)`` bool, the samples judged poisoned.
        details: method-specific evidence (per-label verdicts, cluster sizes...).
        params: the sanitiser's settings.
        seconds: wall time.
    """

    scores: torch.Tensor
    flagged: torch.Tensor
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def flagged_indices(self) -> torch.Tensor:
        return self.flagged.nonzero().flatten()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["flagged_indices"] = self.flagged_indices.tolist()
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepairResult(Result):
    """A repaired model (a new object; the caller's is untouched) and the history.

    Attributes:
        model: the repaired network.
        history: one dict per step (e.g. ``{"ratio": 0.1, "accuracy": 0.98, "attack_success": 0.3}``).
        details: method-specific figures.
        params: the repair's settings.
        seconds: wall time.
    """

    model: nn.Module = not_serialised(repr=False)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
