"""The attack families, for evaluation.

==========  ================================================  =============================
``kind``    verb                                              result
==========  ================================================  =============================
``data``    ``poison(dataset) -> PoisonedDataset``            the caller trains on it
``model``   ``attack(model, clean_data) -> Result``           ``.model``: a backdoored copy
==========  ================================================  =============================

Every attack also has ``triggers`` (or ``trigger_`` once run) and ``success_rate(model, data)``.
Data attacks never train: training lives in ``training.py``. Model attacks start from the
caller's trained model and return a new one; the caller's is never edited.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar

from torch import nn

from .._utils.registry import Registry
from .._utils.results import to_jsonable
from ..data.dataset import ImageDataset

ATTACKS: Registry[type["Attack"]] = Registry("attack")
register_attack = ATTACKS.register


class Attack(abc.ABC):
    """Base class: ``get_params`` / ``__repr__`` / ``to_dict`` come from the constructor's signature."""

    kind: ClassVar[str] = "data"  #: "data" (poisons a training set) or "model" (edits a trained model)

    @classmethod
    def _init_params(cls) -> list[inspect.Parameter]:
        """The constructor's named parameters (the one place an attack's signature is read)."""
        return [p for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameter names."""
        return [p.name for p in cls._init_params()]

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """The constructor's defaults, by parameter name; a parameter of :meth:`param_names`
        missing here has no default (the caller must give it)."""
        return {p.name: p.default for p in cls._init_params() if p.default is not p.empty}

    def get_params(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.param_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def to_dict(self) -> dict[str, Any]:
        return {"attack": getattr(type(self), "registry_name", type(self).__name__),
                **{k: to_jsonable(v) for k, v in self.get_params().items()}}

    @abc.abstractmethod
    def success_rate(self, model: nn.Module, data: ImageDataset) -> float:
        """Attack success of this attack's trigger(s) against ``model`` on ``data``."""
