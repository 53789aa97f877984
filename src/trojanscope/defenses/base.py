"""The four defence families and their typed results.

Every defence is a small class: hyperparameters (the paper's names and defaults) go into the
constructor and are stored verbatim; data goes into the verb. Values are checked when the verb
runs, from the class's ``_constraints``. A defence never receives the attack, its trigger or its
target label.

============  ====================================================  ===================
family        verb                                                  result
============  ====================================================  ===================
``model``     ``scan(model, clean_data)``                           :class:`ScanResult`
``data``      ``inspect(model, dataset)``                           :class:`SanitizeResult`
``input``     ``fit(model, clean_data)`` / ``score(x)`` / ``flag(x)``  tensors ``(N,)``
``repair``    ``repair(model, clean_data)``                         :class:`RepairResult`
============  ====================================================  ===================
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .._utils.registry import Registry
from .._utils.results import Result
from .._utils.validation import check_params
from ..errors import NotFittedError

#: Every defence, by name; ``defenses/__init__.py`` imports each module explicitly.
DEFENSES: Registry[type["Defense"]] = Registry("defence")
register = DEFENSES.register


class Defense(abc.ABC):
    """Base class: ``get_params`` and ``__repr__`` come from the constructor's signature."""

    family: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = False
    needs_hooks: ClassVar[bool] = False  #: True when the method reads internal layers
    _constraints: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as stored."""
        return {name: getattr(self, name) for name in self._param_names()}

    def _validate_params(self) -> None:
        check_params(self, self._constraints)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class ModelDetector(Defense):
    """Model-level detection: ``scan(model, clean_data) -> ScanResult``."""

    family: ClassVar[str] = "model"

    @abc.abstractmethod
    def scan(self, model: nn.Module, clean_data: Any) -> "ScanResult":
        """Decide whether ``model`` is backdoored, using only ``clean_data``."""


class DataSanitizer(Defense):
    """Data-level sanitising: ``inspect(model, dataset) -> SanitizeResult``."""

    family: ClassVar[str] = "data"

    @abc.abstractmethod
    def inspect(self, model: nn.Module, dataset: Any) -> "SanitizeResult":
        """Score every sample of ``dataset`` and flag the ones judged poisoned."""


class InputFilter(Defense):
    """Input-level filtering at run time.

    ``fit(model, clean_data)`` calibrates ``threshold_`` from a target false-rejection rate on
    clean data and returns ``self``; ``score(x)`` returns one score per input, **higher meaning
    more suspicious** (the one sign convention of every input filter); ``flag(x)`` returns
    ``score(x) > threshold_``. Learned state ends in ``_``; ``score`` before ``fit`` raises
    :class:`~trojanscope.errors.NotFittedError`.
    """

    family: ClassVar[str] = "input"

    def fit(self, model: nn.Module, clean_data: Any) -> "InputFilter":
        self._validate_params()
        self._fit(model, clean_data)
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
    def _fit(self, model: nn.Module, clean_data: Any) -> None:
        """Learn the filter's state from clean data and set ``threshold_``."""

    @abc.abstractmethod
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """One score per input, higher = more suspicious."""


class Repair(Defense):
    """Repair: ``repair(model, clean_data) -> RepairResult``; works on a deep copy."""

    family: ClassVar[str] = "repair"

    @abc.abstractmethod
    def repair(self, model: nn.Module, clean_data: Any, **kwargs: Any) -> "RepairResult":
        """Return a repaired copy of ``model`` (the caller's model is never edited)."""


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

    model: nn.Module = dataclasses.field(repr=False)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
