"""What a benchmark run covers: the attack columns, the defence rows and the run's settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .._utils.results import to_jsonable
from ..defenses import DEFENSES, list_defenses
from ..errors import ConfigError

#: The defence families a config may name as a whole (``defenses = ["data"]``).
FAMILIES = ("model", "data", "input", "repair")
#: The attack kind of a column whose model is a file the user received (a ``[[victim]]`` table).
RECEIVED = "received"
#: The registry-free name of a chain of defences (run by :class:`trojanscope.pipeline.Pipeline`).
CHAIN = "chain"


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack column: a preset name, or BadNets / a registered attack with explicit settings.

    Attributes:
        name: the label in the table.
        attack: ``"clean"`` (no attack), ``"badnets"``, another registered attack's name, or
            :data:`RECEIVED` (a model file the user received).
        params: the attack's settings (``trigger`` is a :meth:`Trigger.parse` spec string).
    """

    name: str
    attack: str = "badnets"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attack": self.attack, "params": dict(self.params)}


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """One defence row: a registered defence and its constructor arguments (or a :data:`CHAIN`)."""

    name: str
    defense: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "defense": self.defense, "params": dict(self.params)}

    def steps(self) -> list["DefenseSpec"]:
        """The registered defences this row runs: its chain's steps, or itself."""
        if self.defense == CHAIN:
            return [DefenseSpec(n, n, p) for n, p in self.params["steps"]]
        return [self]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What a benchmark run covers.

    Attributes:
        dataset: a bundled name (``mnist5k``, ``digits``: their train / val / test splits are
            used), an ``.npz`` file or an image folder (split 80 / 10 / 10, stratified).
        arch: the architecture trained for every attack.
        epochs, lr, batch_size: training settings (also used to retrain after sanitising).
        recipe: a training recipe of :data:`trojanscope.training.RECIPES` (``"sgd"``: one-cycle
            SGD with momentum, weight decay and random crops, the standard on colour sets;
            None: Adam at ``lr``, the MNIST default); ``lr`` defaults to the recipe's.
        seeds: one model per attack and seed.
        attacks: the attack columns.
        defenses: the defence rows.
        rate: poisoned share of the training set for the presets (5%: about a third of the
            target label's samples on a balanced 10-class set; at 10% they are half of it, and
            sanitisers that assume the poison is a minority of its label break down).
        target: the target label for the presets.
        sources: number of provenance groups given to a training set that has none (the
            poisoned samples all come from group 0, as from one compromised source).
        eval_samples: cap on the test inputs used for ASR / FAR (``None``: all).
    """

    dataset: str = "mnist5k"
    arch: str = "mnist_cnn"
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    recipe: str | None = None
    seeds: tuple[int, ...] = (0,)
    attacks: tuple[AttackSpec, ...] = ()
    defenses: tuple[DefenseSpec, ...] = ()
    rate: float = 0.05
    target: int = 0
    sources: int = 10
    eval_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["seeds"] = list(self.seeds)
        d["attacks"] = [a.to_dict() for a in self.attacks]
        d["defenses"] = [x.to_dict() for x in self.defenses]
        return to_jsonable(d)

    @property
    def training(self) -> dict[str, Any]:
        """The settings a trained model depends on (part of its cache fingerprint)."""
        out = {"dataset": self.dataset, "arch": self.arch, "epochs": self.epochs, "lr": self.lr,
               "batch_size": self.batch_size, "rate": self.rate, "target": self.target, "sources": self.sources}
        if self.recipe is not None:  # absent otherwise, so caches from before the key stay valid
            out["recipe"] = self.recipe
        return out


def expand_defenses(names: Iterable[str]) -> list[str]:
    """Registry names from config entries: a name, a family (all its defences) or ``"all"``."""
    out: list[str] = []
    for n in names:
        if n == "all":
            new = [d for f in FAMILIES for d in list_defenses(f)]
        elif n in FAMILIES:
            new = list_defenses(n)
        elif n in DEFENSES:
            new = [n]
        else:
            known = ", ".join(DEFENSES.names()) or "(none registered yet)"
            raise ConfigError(f"unknown defence {n!r} in the config; known: {known}; or a family "
                              f"({', '.join(FAMILIES)}) or 'all'")
        out += [d for d in new if d not in out]
    return out
