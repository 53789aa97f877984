"""The benchmark matrix: every attack against every defence, over seeds, as one tidy table.

A run trains one model per (attack, seed), caches it in the run folder, then evaluates each
defence on it. One JSON file per finished cell is written as soon as the cell finishes, so an
interrupted run resumes where it stopped: finished cells and trained models are reused.

Defences never see the attack. Ground truth (the planted trigger, the target, which samples
were poisoned) enters only here, in the evaluation glue, through :mod:`trojanscope.metrics`:

============  =====================================================================================
family        how a cell is scored
============  =====================================================================================
``model``     ``scan(model, val)``: the verdict, the flagged labels, whether the true target is
              among them.
``data``      ``inspect(model, poisoned train)``: poison removed (recall) and clean removed (false
              positive rate), AUROC of the scores; then a model is retrained on the samples kept
              and its CA / ASR are the "after" figures.
``input``     ``fit(model, val)``, then ``flag`` on clean test inputs (FRR) and stamped test inputs
              (FAR: stamped inputs let through), AUROC over both; "after": the share of clean
              inputs accepted and correctly classified, and of stamped inputs accepted and sent to
              the target.
``repair``    ``repair(model, val)``: CA / ASR of the repaired model (unlearning fine-tunes on
              all of val: :data:`BENCH_PARAMS`).
============  =====================================================================================

A config (TOML; YAML when PyYAML is installed) looks like::

    dataset = "mnist5k"          # a bundled name, an .npz file or an image folder
    arch = "mnist_cnn"
    epochs = 3
    seeds = [0]
    attacks = ["clean", "badnets-patch", "badnets-blended"]
    defenses = ["all"]           # registry names, a family ("model", "data", "input", "repair") or "all"

    [[attack]]                   # a custom attack, in addition to the presets named above
    name = "red-corner"
    trigger = "square:3:red:top-left"
    target = 2
    rate = 0.05

    [params.neural-cleanse]      # settings for a defence (its constructor arguments)
    cost = 1e-3

    [[victim]]                   # a model file the user received, benchmarked as it is (never trained)
    name = "vendor-resnet"
    model = "vendor/model.pt2"   # anything the safe loader reads: .pt2, TorchScript, ONNX, a model directory
    trigger = "square:4:white:bottom-right"   # the known backdoor: scoring only
    target = 0
    train = "train.npz"          # optional: its training set, for the data sanitisers
    poison = "poison.json"       # optional: which samples of train were poisoned (scoring only)

A victim's clean data are the ``dataset``'s splits (val for the defender, test for the figures); its
repairs run on its trainable surface (:func:`trojanscope.models.surface.model_surface`, BatchNorm
statistics frozen) and a data sanitiser's retraining trains a re-initialised copy of its graph.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._utils.batching import DeviceLike, predict
from ._utils.results import to_jsonable
from .attacks import ATTACKS, Attack, BadNets
from .data import ImageDataset, PoisonedDataset, load_data
from .data.loaders import BUNDLED
from .defenses import DEFENSES, Defense, ModelDetector, list_defenses
from .defenses.repair.neural_cleanse import SMALL_SET_UNLEARNING
from .errors import ConfigError, DataError, TrojanscopeError
from .metrics import attack_success_rate, clean_accuracy, detection_metrics, target_labels
from .models import ModelSpec, load_model, save_model
from .training import train_new
from .triggers import Trigger

log = logging.getLogger(__name__)

FAMILIES = ("model", "data", "input", "repair")

#: The BadNets variants of the issue, by preset name (trigger sizes scale with the image).
PRESET_ATTACKS = ("clean", "badnets-patch", "badnets-pattern", "badnets-pixel", "badnets-blended",
                  "badnets-all-to-all", "badnets-source-specific")

#: The columns of the result table, in order.
COLUMNS = ("attack", "defense", "family", "seed", "ca_before", "asr_before", "ca_after", "asr_after", "verdict",
           "flagged_labels", "target_found", "poison_removed", "clean_removed", "auroc", "far", "frr", "seconds",
           "error")

#: Faster settings for ``--quick``, by registered attack; a name the class does not take is ignored.
QUICK_ATTACK_PARAMS: dict[str, dict[str, Any]] = {
    "trojannn": {"trigger_steps": 100, "epochs": 2},
    "pruning-aware": {"epochs": 2},
}

#: Faster settings for ``--quick``, by defence; a name the class does not take is ignored.
QUICK_PARAMS: dict[str, dict[str, Any]] = {
    "neural-cleanse": {"epochs": 20},
    "strip": {"n_overlays": 30},
    "spectral": {"retrain_epochs": 1},
    # the paper's relative-size analysis: no retraining per cluster (the default retrains 2 per label)
    "activation-clustering": {"mode": "paper", "analysis": "relative-size", "retrain_epochs": 1},
    "provenance": {"retrain_epochs": 1},
    "fine-prune": {"epochs": 2},
    "heatmap": {"epochs": 5, "final_epochs": 10},
    "moving-window": {"epochs": 5, "final_epochs": 10},
    "distribution": {"steps": 100},
    "trigger-distribution": {"steps": 100},
    "distribution-unlearn": {"n_levels": 3, "steps": 50},
}

#: Settings of both presets, by defence. Every repair gets the val split (500 images, 12.5% of
#: the training set) as the defender's clean data; the paper's unlearning fine-tunes on 10% of
#: the *training* data, so here it takes all of the val split rather than 10% of it (50 images).
#: The distribution repair fine-tunes for 3 epochs instead of 2: at batch 64 an epoch of 500
#: images is 8 steps (quick badnets-patch model: ASR 10% after 2 epochs, 1.8% after 3).
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "unlearn": {"share": 1.0},
    "distribution-unlearn": {"epochs": 3},
}

#: Defences the quick preset leaves out (name them in a config to run them). None since the
#: trigger-distribution repair takes its trigger position from the scan (12 s a cell, not 130 s).
QUICK_EXCLUDE: set[str] = set()

_TOP_KEYS = {"dataset", "arch", "epochs", "lr", "batch_size", "seeds", "attacks", "defenses", "defences", "attack",
             "defense", "defence", "params", "rate", "target", "sources", "eval_samples", "chain", "victim"}
_ATTACK_KEYS = {"name", "attack", "trigger", "target", "rate", "mode", "source_labels", "cover_rate", "params"}
_DEFENSE_KEYS = {"name", "defense", "params"}
_CHAIN_KEYS = {"name", "steps", "retrain"}
_VICTIM_KEYS = {"name", "model", "trigger", "target", "train", "poison"}
#: The attack kind of a column whose model is a file the user received (a ``[[victim]]`` table).
RECEIVED = "received"
#: The registry-free name of a chain of defences (run by :class:`trojanscope.pipeline.Pipeline`).
CHAIN = "chain"

#: The row of Fine-Pruning by units (one channel at one position) beside the paper's channels.
FINE_PRUNE_UNITS = "fine-prune (units)"

#: Rows of registered repairs with other settings, beside their paper defaults: ``(row name,
#: registered name, params)``. The units of the last convolutional block for both pruning
#: repairs, and Neural Cleanse unlearning with the small-clean-set settings.
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (FINE_PRUNE_UNITS, "fine-prune", {"granularity": "unit"}),
    ("nc-prune (units)", "nc-prune", {"granularity": "unit"}),
    ("unlearn (3 epochs, SGD)", "unlearn", SMALL_SET_UNLEARNING),
)


# --- configuration ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack column: a preset name, or BadNets / a registered attack with explicit settings.

    Attributes:
        name: the label in the table.
        attack: ``"clean"`` (no attack), ``"badnets"`` or another registered attack's name.
        params: the attack's settings (``trigger`` is a :meth:`Trigger.parse` spec string).
    """

    name: str
    attack: str = "badnets"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attack": self.attack, "params": dict(self.params)}


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """One defence row: a registered defence and its constructor arguments."""

    name: str
    defense: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "defense": self.defense, "params": dict(self.params)}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What a benchmark run covers.

    Attributes:
        dataset: a bundled name (``mnist5k``, ``digits``: their train / val / test splits are
            used), an ``.npz`` file or an image folder (split 80 / 10 / 10, stratified).
        arch: the architecture trained for every attack.
        epochs, lr, batch_size: training settings (also used to retrain after sanitising).
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
        return {"dataset": self.dataset, "arch": self.arch, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "rate": self.rate, "target": self.target, "sources": self.sources}


def _expand_defenses(names: Iterable[str]) -> list[str]:
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


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{where} must be {_tname(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{where} must be {_tname(types)}, got {type(value).__name__} {value!r}")
    return value


def _tname(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
                        "dict": "a table", "NoneType": "null"}.get(t.__name__, t.__name__) for t in ts)


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} in {where}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def parse_config(raw: Mapping[str, Any], *, base: BenchConfig | None = None) -> BenchConfig:
    """Validate a config mapping (from TOML / YAML) into a :class:`BenchConfig`.

    Keys missing from ``raw`` take their value from ``base`` (the defaults, or the quick preset).

    Raises:
        ConfigError: an unknown key, a wrong type, an unknown attack or defence, a bad value.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("the config must be a table of settings at the top level")
    _check_keys(raw, _TOP_KEYS, "the config")
    base = base or default_config()
    kw: dict[str, Any] = {}
    if "dataset" in raw:
        kw["dataset"] = _expect(raw["dataset"], str, "dataset")
    if "arch" in raw:
        from .models import list_models

        kw["arch"] = _expect(raw["arch"], str, "arch")
        if kw["arch"] not in list_models():
            raise ConfigError(f"unknown arch {kw['arch']!r}; known: {', '.join(list_models())}")
    for key, typ, lo in (("epochs", int, 0), ("batch_size", int, 1), ("sources", int, 1), ("target", int, 0)):
        if key in raw:
            kw[key] = _expect(raw[key], int, key)
            if kw[key] < lo:
                raise ConfigError(f"{key} must be >= {lo}, got {kw[key]}")
    for key in ("lr", "rate"):
        if key in raw:
            kw[key] = float(_expect(raw[key], (int, float), key))
            if not 0 < kw[key] <= (1 if key == "rate" else 10):
                raise ConfigError(f"{key} is out of range: {kw[key]}")
    if "eval_samples" in raw:
        v = raw["eval_samples"]
        kw["eval_samples"] = None if v is None else _expect(v, int, "eval_samples")
    if "seeds" in raw:
        seeds = raw["seeds"]
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        _expect(seeds, list, "seeds")
        if not seeds:
            raise ConfigError("seeds must name at least one seed")
        kw["seeds"] = tuple(int(_expect(s, int, "each seed")) for s in seeds)
        if len(set(kw["seeds"])) != len(kw["seeds"]):
            raise ConfigError(f"seeds repeat: {list(kw['seeds'])}")

    attacks: list[AttackSpec] | None = None
    if "attacks" in raw or "attack" in raw:
        attacks = []
        for n in _expect(raw.get("attacks", []), list, "attacks"):
            _expect(n, str, "each entry of attacks")
            attacks.append(preset_attack_spec(n))
        custom = raw.get("attack", [])
        if isinstance(custom, Mapping):
            custom = [custom]
        for i, a in enumerate(_expect(custom, list, "[[attack]]")):
            attacks.append(_custom_attack(_expect(a, dict, f"[[attack]] #{i + 1}"), i + 1))
    if "victim" in raw:
        attacks = attacks if attacks is not None else []
        victims = raw["victim"]
        if isinstance(victims, Mapping):
            victims = [victims]
        for i, v in enumerate(_expect(victims, list, "[[victim]]")):
            attacks.append(_victim(_expect(v, dict, f"[[victim]] #{i + 1}"), i + 1))
    if attacks is not None:
        names = [a.name for a in attacks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"attack names repeat: {', '.join(dup)} (give custom attacks a unique name)")
        if not attacks:
            raise ConfigError("the config names no attack")
        kw["attacks"] = tuple(attacks)

    if "defenses" in raw and "defences" in raw:
        raise ConfigError("give 'defenses' or 'defences', not both")
    params = raw.get("params", {})
    _expect(params, dict, "[params]")
    for k, v in params.items():
        _expect(v, dict, f"[params.{k}]")
    dkey = "defenses" if "defenses" in raw else "defences"
    defenses: list[DefenseSpec] | None = None
    if dkey in raw or "defense" in raw or "defence" in raw or "chain" in raw or params:
        defenses = []
        names = _expect(raw.get(dkey, ["all"] if dkey not in raw and not (raw.get("defense") or raw.get("defence"))
                                else []), list, dkey)
        for n in _expand_defenses([_expect(n, str, f"each entry of {dkey}") for n in names]):
            defenses.append(DefenseSpec(n, n, {**BENCH_PARAMS.get(n, {}), **params.get(n, {})}))
        custom = raw.get("defense", raw.get("defence", []))
        if isinstance(custom, Mapping):
            custom = [custom]
        for i, d in enumerate(_expect(custom, list, "[[defense]]")):
            _expect(d, dict, f"[[defense]] #{i + 1}")
            _check_keys(d, _DEFENSE_KEYS, f"[[defense]] #{i + 1}")
            reg = _expect(d.get("defense", d.get("name")), str, f"[[defense]] #{i + 1} defense")
            if reg not in DEFENSES:
                _expand_defenses([reg])
            defenses.append(DefenseSpec(_expect(d.get("name", reg), str, "defense name"), reg,
                                        {**BENCH_PARAMS.get(reg, {}),
                                         **_expect(d.get("params", {}), dict, "defense params")}))
        chains = raw.get("chain", [])
        if isinstance(chains, Mapping):
            chains = [chains]
        for i, ch in enumerate(_expect(chains, list, "[[chain]]")):
            defenses.append(_parse_chain(_expect(ch, dict, f"[[chain]] #{i + 1}"), i + 1, params))
        unknown_p = sorted(set(params) - {d.defense for d in defenses}
                           - {st[0] for d in defenses if d.defense == CHAIN for st in d.params["steps"]})
        if unknown_p:
            raise ConfigError(f"[params] names defences not in the run: {', '.join(unknown_p)}")
        names2 = [d.name for d in defenses]
        dup = sorted({n for n in names2 if names2.count(n) > 1})
        if dup:
            raise ConfigError(f"defence names repeat: {', '.join(dup)}")
        kw["defenses"] = tuple(defenses)
    cfg = dataclasses.replace(base, **kw)
    for d in cfg.defenses:
        _check_defense_params(d)
    return cfg


def _parse_chain(ch: Mapping[str, Any], i: int, params: Mapping[str, Any]) -> DefenseSpec:
    where = f"[[chain]] #{i}"
    _check_keys(ch, _CHAIN_KEYS, where)
    steps = _expect(ch.get("steps", []), list, f"{where} steps")
    if len(steps) < 2:
        raise ConfigError(f"{where} needs at least two steps (defence names)")
    names = [_expect(st, str, f"{where} step") for st in steps]
    for n in names:
        if n not in DEFENSES:
            _expand_defenses([n])  # the unknown-name message
    retrain = _expect(ch.get("retrain", "scratch"), str, f"{where} retrain")
    if retrain not in ("scratch", "continue"):
        raise ConfigError(f"{where} retrain must be 'scratch' or 'continue', got {retrain!r}")
    name = _expect(ch.get("name", " > ".join(names)), str, f"{where} name")
    return DefenseSpec(name, CHAIN, {"steps": [[n, dict(params.get(n, {}))] for n in names], "retrain": retrain})


def _check_defense_params(d: DefenseSpec) -> None:
    if d.defense == CHAIN:
        for n, p in d.params["steps"]:
            _check_defense_params(DefenseSpec(n, n, p))
        return
    cls = DEFENSES.get(d.defense)
    names = list(cls.param_defaults())
    bad = sorted(set(d.params) - set(names))
    if bad:
        raise ConfigError(f"defence {d.name!r} ({d.defense}) takes no parameter {', '.join(map(repr, bad))}; "
                          f"it takes: {', '.join(names) or 'none'}")


def _custom_attack(a: Mapping[str, Any], i: int) -> AttackSpec:
    where = f"[[attack]] #{i}"
    _check_keys(a, _ATTACK_KEYS, where)
    name = _expect(a.get("name", ""), str, f"{where} name")
    if not name:
        raise ConfigError(f"{where} needs a name")
    kind = _expect(a.get("attack", "badnets"), str, f"{where} attack")
    if kind != "badnets" and kind not in ATTACKS:
        raise ConfigError(f"{where}: unknown attack {kind!r}; known: {', '.join(ATTACKS.names())}")
    params = dict(_expect(a.get("params", {}), dict, f"{where} params"))
    for k in ("trigger", "target", "rate", "mode", "source_labels", "cover_rate"):
        if k in a:
            params[k] = a[k]
    if kind == "badnets":
        _expect(params.get("trigger", "square:4"), str, f"{where} trigger")
        if "mode" in params and params["mode"] not in ("all-to-one", "all-to-all"):
            raise ConfigError(f"{where} mode must be 'all-to-one' or 'all-to-all', got {params['mode']!r}")
    return AttackSpec(name, kind, params)


def _victim(v: Mapping[str, Any], i: int) -> AttackSpec:
    """A ``[[victim]]`` table: a model file the user received (any format the safe loader reads),
    benchmarked as it is. ``trigger`` / ``target`` (the known backdoor) and ``poison`` (which
    samples of ``train`` were poisoned) are used for scoring only; ``train`` is the training set,
    needed only by the data sanitisers."""
    where = f"[[victim]] #{i}"
    _check_keys(v, _VICTIM_KEYS, where)
    name = _expect(v.get("name", ""), str, f"{where} name")
    if not name:
        raise ConfigError(f"{where} needs a name")
    path = Path(_expect(v.get("model", ""), str, f"{where} model"))
    if not path.exists():
        raise ConfigError(f"{where}: model not found: {path}")
    params: dict[str, Any] = {"model": str(path), "sha256": _file_digest(path)}
    if ("trigger" in v) != ("target" in v):
        raise ConfigError(f"{where}: trigger and target go together")
    if "trigger" in v:
        params["trigger"] = _expect(v["trigger"], str, f"{where} trigger")
        params["target"] = _expect(v["target"], int, f"{where} target")
    for k in ("train", "poison"):
        if k in v:
            params[k] = _expect(v[k], str, f"{where} {k}")
    if "poison" in params and "train" not in params:
        raise ConfigError(f"{where}: poison names samples of train; give train too")
    return AttackSpec(name, RECEIVED, params)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _read_poison(path: str | Path, n: int) -> torch.Tensor:
    """``(n,)`` bool from a JSON list of indices, or a JSON object with ``poison_indices`` (what
    ``trojanscope poison`` writes)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the poisoned indices {path}: {e}") from None
    idx = d.get("poison_indices") if isinstance(d, dict) else d
    if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < n for i in idx):
        raise ConfigError(f"{path}: expected a list of sample indices in [0, {n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(idx, dtype=torch.long)] = True
    return mask


def preset_attack_spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` of a preset (``badnets-patch``...) or of a registered attack's name."""
    if name in PRESET_ATTACKS:
        return AttackSpec(name, "clean" if name == "clean" else "badnets", {"preset": name})
    if name in ATTACKS and name != "badnets":
        return AttackSpec(name, name, {})
    known = ", ".join(list(PRESET_ATTACKS) + [n for n in ATTACKS.names() if n != "badnets"])
    raise ConfigError(f"unknown attack {name!r}; known: {known} (or describe one in an [[attack]] table)")


def default_config() -> BenchConfig:
    """Every preset attack, every registered defence, mnist5k, one seed."""
    extra = [preset_attack_spec(n) for n in ATTACKS.names() if n != "badnets"]
    defenses = []
    for n in _expand_defenses(["all"]):
        params = dict(BENCH_PARAMS.get(n, {}))
        defenses.append(DefenseSpec(n, n, params))
        defenses += [DefenseSpec(row, n, {**params, **extra}) for row, base, extra in VARIANTS if base == n]
    if {"activation-clustering", "fine-prune"} <= set(DEFENSES.names()):
        if importlib.util.find_spec("trojanscope.pipeline") is not None:
            for steps in (["activation-clustering", "fine-prune"], ["fine-prune", "activation-clustering"]):
                defenses.append(DefenseSpec(" > ".join(steps), CHAIN, {"steps": [[n, {}] for n in steps],
                                                                         "retrain": "continue"}))
    return BenchConfig(attacks=tuple(preset_attack_spec(n) for n in PRESET_ATTACKS) + tuple(extra),
                       defenses=tuple(defenses))


def quick_config() -> BenchConfig:
    """The ``--quick`` preset: mnist5k, 2 epochs, one seed; the clean baseline and four attacks
    (BadNets patch and blended, plus every other registered attack, topped up with the BadNets
    pattern and all-to-all variants); every registered defence but :data:`QUICK_EXCLUDE`, with
    faster settings (:data:`QUICK_PARAMS`), and one chain (Activation Clustering, then Fine-Pruning); 5 provenance
    sources; ASR / FAR measured on 300 test inputs."""
    names = ["clean", "badnets-patch", "badnets-blended"]
    attacks = [preset_attack_spec(a) for a in names]
    for n in ATTACKS.names():
        if n != "badnets":
            sig = inspect.signature(ATTACKS.get(n).__init__).parameters
            attacks.append(AttackSpec(n, n, {k: v for k, v in QUICK_ATTACK_PARAMS.get(n, {}).items() if k in sig}))
    for extra in ("badnets-pattern", "badnets-all-to-all"):
        if len(attacks) < 5:
            attacks.append(preset_attack_spec(extra))
    defenses = []
    for n in _expand_defenses(["all"]):
        if n in QUICK_EXCLUDE:
            continue
        cls = DEFENSES.get(n)
        params = {k: v for k, v in {**BENCH_PARAMS.get(n, {}), **QUICK_PARAMS.get(n, {})}.items()
                  if k in cls.param_defaults()}
        defenses.append(DefenseSpec(n, n, params))
        defenses += [DefenseSpec(row, n, {**params, **extra}) for row, base, extra in VARIANTS if base == n]
    steps = ["activation-clustering", "fine-prune"]  # one chain: Milakovic's order, pruned channels kept
    if set(steps) <= set(DEFENSES.names()) and importlib.util.find_spec("trojanscope.pipeline") is not None:
        defenses.append(DefenseSpec(" > ".join(steps), CHAIN, {
            "steps": [[n, {k: v for k, v in QUICK_PARAMS.get(n, {}).items() if k in DEFENSES.get(n).param_defaults()}]
                      for n in steps], "retrain": "continue"}))
    return BenchConfig(epochs=2, seeds=(0,), attacks=tuple(attacks), defenses=tuple(defenses), eval_samples=300,
                       sources=5)


def load_config(path: str | Path | None = None, *, quick: bool = False) -> BenchConfig:
    """Read a TOML (or, with PyYAML installed, YAML) config; ``quick`` starts from the quick preset."""
    base = quick_config() if quick else default_config()
    if path is None:
        return base
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: YAML configs need PyYAML (pip install pyyaml); or write it as TOML") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(raw, base=base)


# --- attacks --------------------------------------------------------------------------------------

def build_attack(spec: AttackSpec, train: ImageDataset, *, seed: int, rate: float = 0.05,
                 target: int = 0) -> Attack | None:
    """The attack object of ``spec`` for data shaped like ``train`` (``None`` for ``clean``)."""
    shape = train.image_shape
    size = max(2, min(shape[1:]) // 7)
    if spec.attack == "clean":
        return None
    p = dict(spec.params)
    preset = p.pop("preset", None)
    if preset is not None:
        trig = {
            "badnets-patch": lambda: Trigger.square(shape, size, "white", "bottom-right"),
            "badnets-pattern": lambda: Trigger.checkerboard(shape, size, "bottom-right"),
            "badnets-pixel": lambda: Trigger.pixel(shape, "white", "bottom-right"),
            "badnets-blended": lambda: Trigger.noise(shape, 0.2, seed=1000 + seed),
            "badnets-all-to-all": lambda: Trigger.square(shape, size, "white", "bottom-right"),
            "badnets-source-specific": lambda: Trigger.square(shape, size, "white", "bottom-right"),
        }[preset]()
        if preset == "badnets-all-to-all":
            return BadNets(trig, target=target, rate=rate, mode="all-to-all", seed=seed)
        if preset == "badnets-source-specific":
            k = train.num_classes
            src = [s for s in range(k) if s != target][:max(1, k // 3)]
            return BadNets(trig, target=target, rate=rate, source_labels=src, seed=seed)
        return BadNets(trig, target=target, rate=rate, seed=seed)
    if spec.attack == "badnets":
        trig = Trigger.parse(str(p.pop("trigger", f"square:{size}")), shape)
        p.setdefault("target", target)
        p.setdefault("rate", rate)
        try:
            return BadNets(trig, seed=seed, **p)
        except TypeError as e:
            raise ConfigError(f"attack {spec.name!r}: {e}") from None
    cls = ATTACKS.get(spec.attack)
    sig = inspect.signature(cls.__init__).parameters
    if isinstance(p.get("trigger"), str):
        p["trigger"] = Trigger.parse(p["trigger"], shape)
    if "trigger" in sig and sig["trigger"].default is inspect.Parameter.empty and "trigger" not in p:
        p["trigger"] = Trigger.square(shape, size, "white", "bottom-right")
    if "seed" in sig:
        p.setdefault("seed", seed)
    if "target" in sig and sig["target"].default is inspect.Parameter.empty:
        p.setdefault("target", target)
    try:
        return cls(**p)
    except TypeError as e:
        raise ConfigError(f"attack {spec.name!r} ({spec.attack}): {e}") from None


@dataclasses.dataclass
class AttackedModel:
    """A trained model for one (attack, seed) column, with the ground truth of its attack.

    Attributes:
        name, seed: the column.
        model: the trained (possibly backdoored) network.
        attack: the attack object (``None`` for the clean baseline).
        poisoned: the training set the model was trained on (poisoned for data attacks).
        triggers: the planted trigger(s) (empty for the clean baseline).
        target: the attacker's target: an int, or a ``(K,)`` map for all-to-all.
        source_labels: the source labels of a source-specific attack.
        ca, asr: clean accuracy and attack success on the test inputs.
        reused: loaded from the run folder rather than trained.
        received: the model is a file the user received (a ``[[victim]]``), not trained here.
        poison_mask: for a received model, which training samples were poisoned (scoring only).
    """

    name: str
    seed: int
    model: nn.Module
    attack: Attack | None
    poisoned: ImageDataset
    triggers: list[Trigger] = dataclasses.field(default_factory=list)
    target: int | torch.Tensor | None = None
    source_labels: list[int] | None = None
    ca: float = 0.0
    asr: float | None = None
    reused: bool = False
    received: bool = False
    poison_mask: torch.Tensor | None = None

    @property
    def is_poison(self) -> torch.Tensor:
        """``(N,)`` bool over :attr:`poisoned`: the relabelled samples."""
        if self.poison_mask is not None:
            return self.poison_mask
        if isinstance(self.poisoned, PoisonedDataset):
            return self.poisoned.is_poison
        return torch.zeros(len(self.poisoned), dtype=torch.bool)

    @property
    def edits_model(self) -> bool:
        """True for attacks that edit a trained model (no poisoned training set to sanitise)."""
        return self.attack is not None and getattr(self.attack, "kind", "data") == "model"

    def true_targets(self) -> set[int]:
        """The labels the attacker aims at (every label for all-to-all)."""
        if self.target is None:
            return set()
        if isinstance(self.target, torch.Tensor):
            return {int(v) for v in self.target.unique()}
        if isinstance(self.attack, BadNets):
            return set(self.attack.targets)
        return {int(self.target)}

    def success_rate(self, model: nn.Module, data: ImageDataset) -> float | None:
        """Attack success of the planted trigger(s) against ``model`` (None for the clean baseline)."""
        if (self.attack is None and not self.received) or not self.triggers or self.target is None:
            return None
        if isinstance(self.attack, BadNets):
            return float(self.attack.success_rate(model, data))
        return float(attack_success_rate(model, data, self.triggers[0], self.target,
                                         source_labels=self.source_labels))


# --- the run ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchResult:
    """What a run did: the table, and which cells and models were computed or reused."""

    out: Path
    rows: list[dict[str, Any]]
    computed: list[str]
    reused: list[str]
    trained: list[str]
    loaded: list[str]
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("error")]


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def cell_id(attack: str, defense: str, seed: int) -> str:
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)  # noqa: E731
    return f"{safe(attack)}__{safe(defense)}__s{seed}"


def _splits(cfg: BenchConfig) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    name = cfg.dataset.partition(":")[0]
    if name in BUNDLED:
        return tuple(load_data(name, s) for s in ("train", "val", "test"))  # type: ignore[return-value]
    full = load_data(cfg.dataset)
    train, rest = full.split(0.8, seed=0)
    val, test = rest.split(0.5, seed=0)
    return train, val, test


def _with_groups(data: ImageDataset, is_poison: torch.Tensor, sources: int, seed: int) -> ImageDataset:
    """:func:`~trojanscope.data.poisoned.assign_sources`: provenance groups when ``data`` has none
    (``is_poison`` is ``data``'s own ground truth, all False for a set that is not poisoned)."""
    from .data.poisoned import assign_sources

    return assign_sources(data, sources, seed)


def _sample(data: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    if n is None or n >= len(data):
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.subset(idx)


def run_bench(config: BenchConfig, out: str | Path, *, device: DeviceLike = None, progress: bool = True,
              on_cell: Callable[[str, dict[str, Any]], None] | None = None,
              max_cells: int | None = None) -> BenchResult:
    """Run (or resume) the benchmark matrix of ``config`` in the folder ``out``.

    Args:
        config: what to run.
        out: the run folder (created; an existing one is resumed).
        device: where to train and evaluate (default: CPU).
        progress: show a tqdm progress bar.
        on_cell: called as ``on_cell(cell_id, row)`` after each newly computed cell is stored.
        max_cells: stop after computing this many new cells (the rest stay for a later resume).

    Returns:
        A :class:`BenchResult`; the table is also in ``out/results.csv`` and ``out/results.json``.
    """
    t_run = time.perf_counter()
    out = Path(out)
    if not config.attacks:
        raise ConfigError("the run has no attacks")
    if not config.defenses:
        raise ConfigError("the run has no defences: none is registered yet, or the config names none")
    train, val, test = _splits(config)
    validate_config(config, train)  # every attack and defence, before the first cell
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        return _run_locked(config, out, train, val, test, device=device, progress=progress, on_cell=on_cell,
                           max_cells=max_cells, t_run=t_run)


class RunLock:
    """An exclusive lock on a run folder (``OUT/.lock``, ``flock``), so that two runs on the same
    folder do not train the same models twice and write the same files at once. The lock dies
    with its process, so a killed run leaves no stale lock; the file names the run holding it."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self._fh: Any = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: no lock
            return self
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConfigError(f"the run folder {self.path.parent} is in use by another bench run ({holder}); wait "
                              f"for it to finish (it keeps every finished cell) or give another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            import fcntl

            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def validate_config(config: BenchConfig, train: ImageDataset) -> None:
    """Build every attack (parsing its trigger, checking its settings against the data) and every
    defence (checking its settings) of ``config``, so that a bad entry fails before any cell runs."""
    from ._utils.validation import check_params

    for a in config.attacks:
        if a.attack == RECEIVED:  # a model file: its trigger must parse for the data and its target fit
            try:
                if "trigger" in a.params:
                    Trigger.parse(a.params["trigger"], train.image_shape)
                    if not 0 <= int(a.params["target"]) < train.num_classes:
                        raise ConfigError(f"target {a.params['target']} is out of range for {train.num_classes} classes")
            except TrojanscopeError as e:
                raise ConfigError(f"victim {a.name!r}: {e}") from None
            continue
        for seed in config.seeds:
            try:
                atk = build_attack(a, train, seed=seed, rate=config.rate, target=config.target)
                if atk is None:
                    continue
                if hasattr(atk, "_check"):
                    atk._check(train.num_classes)
                elif getattr(atk, "_constraints", None):
                    check_params(atk, atk._constraints)
                target = getattr(atk, "target", None)
                if isinstance(target, int) and not 0 <= target < train.num_classes:
                    raise ConfigError(f"target {target} is out of range for {train.num_classes} classes")
            except TrojanscopeError as e:
                raise ConfigError(f"attack {a.name!r}: {e}") from None
    for d in config.defenses:
        _check_defense_params(d)
        steps = [DefenseSpec(n, n, p) for n, p in d.params["steps"]] if d.defense == CHAIN else [d]
        for st in steps:
            try:
                make_defense(st, config.seeds[0])._validate_params()
            except TrojanscopeError as e:
                raise ConfigError(f"defence {d.name!r}: {e}") from None


def _run_locked(config: BenchConfig, out: Path, train: ImageDataset, val: ImageDataset, test: ImageDataset, *,
                device: DeviceLike, progress: bool, on_cell: Callable[[str, dict[str, Any]], None] | None,
                max_cells: int | None, t_run: float) -> BenchResult:
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    test_eval = _sample(test, config.eval_samples, 0)
    _write_json(out / "config.json", config.to_dict())
    _write_json(out / "meta.json", run_metadata(device))
    for d in config.defenses:
        _check_defense_params(d)

    provider = next((d for d in config.defenses if d.defense == SCAN_PROVIDER), None)
    order = sorted(config.defenses, key=lambda d: d is not provider)  # the provider's scan first
    cells = [(seed, a, d) for seed in config.seeds for a in config.attacks for d in order if applicable(a, d)]
    _write_json(out / "plan.json", {"cells": [cell_id(a.name, d.name, seed) for seed, a, d in cells]})
    computed: list[str] = []
    reused: list[str] = []
    trained: list[str] = []
    loaded: list[str] = []
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from ._utils.progress import progress as progress_bar

        bar = progress_bar(total=len(cells), desc="bench", unit="cell")
    models: dict[tuple[str, int], AttackedModel] = {}
    scans: dict[tuple[str, int], SharedScan | None] = {}
    n_new = 0
    try:
        for seed, aspec, dspec in cells:
            cid = cell_id(aspec.name, dspec.name, seed)
            key = (aspec.name, seed)
            mfp = _fingerprint({"training": config.training, "attack": aspec.to_dict(), "seed": seed})
            uses = provider is not None and consumes_scan(dspec)
            cfp = _fingerprint({"model": mfp, "defense": dspec.to_dict(), "eval_samples": config.eval_samples,
                                "builds_on": provider.to_dict() if uses and provider is not None else None})
            cached = _read_cell(out / "cells" / f"{cid}.json", cfp)
            if cached is not None and dspec is provider:
                scans[key] = _stored_scan(out / "cells" / f"{cid}.scan")
                if scans[key] is None:
                    cached = None  # a cell of an older run, without its stored scan: computed again
            if cached is not None:
                rows.append(cached["row"])
                reused.append(cid)
                if bar is not None:
                    bar.update(1)
                continue
            if max_cells is not None and n_new >= max_cells:
                break
            if bar is not None:
                bar.set_postfix_str(f"{aspec.name} x {dspec.name}")
            if key not in models:
                models[key] = _attacked_model(config, aspec, seed, train, val, test_eval, out, mfp, device, trained)
                if models[key].reused:
                    loaded.append(f"{aspec.name}-s{seed}")
            am = models[key]
            record = evaluate_cell(am, dspec, config, val=val, test=test_eval, seed=seed, device=device,
                                   shared=scans.get(key) if uses else None)
            scan_result = record.pop(SCAN_KEY, None)
            if dspec is provider:
                if scan_result is not None:
                    scan_result.save(out / "cells" / f"{cid}.scan")
                scans[key] = None if scan_result is None else SharedScan.from_result(scan_result)
            record["fingerprint"] = cfp
            record["id"] = cid
            _save_cell(out / "cells", cid, record)
            rows.append(record["row"])
            computed.append(cid)
            n_new += 1
            if on_cell is not None:
                on_cell(cid, record["row"])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        write_table(out, rows)
    return BenchResult(out, rows, computed, reused, trained, loaded, time.perf_counter() - t_run)


def applicable(attack: AttackSpec, defense: DefenseSpec) -> bool:
    """False for a data sanitiser against an attack that edits a trained model without a poisoned
    training set (e.g. the Trojaning attack): there is nothing to sanitise."""
    names = [st[0] for st in defense.params["steps"]] if defense.defense == CHAIN else [defense.defense]
    if attack.attack == RECEIVED:  # a data sanitiser needs the victim's training set
        return "train" in attack.params or not any(DEFENSES.get(n).family == "data" for n in names)
    if attack.attack in ("clean", "badnets") or attack.attack not in ATTACKS:
        return True
    cls = ATTACKS.get(attack.attack)
    edits = getattr(cls, "kind", "data") == "model" and not hasattr(cls, "poison")
    return not (edits and any(DEFENSES.get(n).family == "data" for n in names))


def _model_dir(out: Path, name: str, seed: int) -> Path:
    return out / "models" / cell_id(name, "model", seed).replace("__model", "")


def _cached_model(mdir: Path, fingerprint: str) -> tuple[nn.Module, list[Trigger]] | None:
    meta_path = mdir / "attack.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        trigs = [Trigger.load(mdir / f"trigger_{i}.safetensors") for i in range(int(meta.get("n_triggers", 0)))]
        return load_model(mdir).model, trigs
    except (OSError, ValueError, TrojanscopeError) as e:
        log.warning("cached model %s unreadable (%s); training it again", mdir, e)
        return None


def _store_model(mdir: Path, model: nn.Module, data: ImageDataset, cfg: BenchConfig, spec: AttackSpec, seed: int,
                 fingerprint: str, attack: Attack | None, triggers: Sequence[Trigger], is_poison: torch.Tensor) -> None:
    save_model(model, mdir, ModelSpec(cfg.arch, data.image_shape, data.num_classes, class_names=data.class_names,
                                      extra={"trained_on": data.name, "attack": spec.name, "seed": seed}))
    for i, t in enumerate(triggers):
        t.save(mdir / f"trigger_{i}.safetensors")
    # attack.json is written last: its presence (with the fingerprint) marks the model finished
    _write_json(mdir / "attack.json", {"fingerprint": fingerprint, "attack": spec.to_dict(),
                                       "attack_params": attack.to_dict() if attack is not None else None,
                                       "n_triggers": len(triggers), "seed": seed,
                                       "poison_indices": is_poison.nonzero().flatten().tolist()})


def _base_model(cfg: BenchConfig, seed: int, train: ImageDataset, out: Path, device: DeviceLike,
                log_to: list[str]) -> nn.Module:
    """The clean model of ``seed`` (the clean column, and the victim of model-editing attacks)."""
    fp = _fingerprint({"training": cfg.training, "base": True, "seed": seed})
    mdir = _model_dir(out, "_base", seed)
    hit = _cached_model(mdir, fp)
    if hit is not None:
        return hit[0]
    model = train_new(cfg.arch, train, seed=seed, device=device, epochs=cfg.epochs, lr=cfg.lr,
                      batch_size=cfg.batch_size)
    _store_model(mdir, model, train, cfg, AttackSpec("_base", "clean"), seed, fp, None, [],
                 torch.zeros(len(train), dtype=torch.bool))
    log_to.append(f"_base-s{seed}")
    return model


def _attacked_model(cfg: BenchConfig, spec: AttackSpec, seed: int, train: ImageDataset, val: ImageDataset,
                    test: ImageDataset, out: Path, fingerprint: str, device: DeviceLike,
                    trained: list[str]) -> AttackedModel:
    """Train (or load from the run folder) the model of one attack column."""
    if spec.attack == RECEIVED:
        return _received_model(spec, seed, train, test, device)
    attack = build_attack(spec, train, seed=seed, rate=cfg.rate, target=cfg.target)
    edits_model = attack is not None and getattr(attack, "kind", "data") == "model"
    poisoned: ImageDataset = train
    if attack is not None and hasattr(attack, "poison"):
        poisoned = attack.poison(train)
    elif attack is not None and not edits_model:
        raise ConfigError(f"attack {spec.name!r} can neither poison data nor edit a model")
    is_poison = poisoned.is_poison if isinstance(poisoned, PoisonedDataset) else torch.zeros(len(train), dtype=torch.bool)
    poisoned = _with_groups(poisoned, is_poison, cfg.sources, seed)
    mdir = _model_dir(out, spec.name, seed)
    hit = _cached_model(mdir, fingerprint)
    reused = hit is not None
    if hit is not None:
        model, triggers = hit
    else:
        if attack is None:
            model, triggers = _base_model(cfg, seed, train, out, device, trained), []
        elif edits_model and hasattr(attack, "implant"):  # e.g. the pruning-aware attack
            base = _base_model(cfg, seed, train, out, device, trained)
            model = attack.implant(base, train, val_data=val, device=device)
            triggers = list(getattr(attack, "triggers", []))
        elif edits_model:  # e.g. the Trojaning attack: it makes its own trigger
            base = _base_model(cfg, seed, train, out, device, trained)
            res = attack.attack(base, train)
            model, triggers = res.model, [res.trigger]
        else:
            model = train_new(cfg.arch, poisoned, seed=seed, device=device, epochs=cfg.epochs, lr=cfg.lr,
                              batch_size=cfg.batch_size)
            triggers = list(getattr(attack, "triggers", []))
        _store_model(mdir, model, poisoned, cfg, spec, seed, fingerprint, attack, triggers, is_poison)
        trained.append(f"{spec.name}-s{seed}")
    if device is not None:
        model.to(device)
    model.eval()
    target: int | torch.Tensor | None = None
    if attack is not None:
        if hasattr(attack, "target_map"):
            target = attack.target_map(train.num_classes)
        elif getattr(attack, "target", None) is not None:
            target = int(attack.target)
    src = getattr(attack, "source_labels", None)
    am = AttackedModel(spec.name, seed, model, attack, poisoned, list(triggers), target,
                       None if src is None else list(src), reused=reused)
    am.ca = clean_accuracy(model, test)
    am.asr = am.success_rate(model, test)
    return am


def _received_model(spec: AttackSpec, seed: int, train: ImageDataset, test: ImageDataset,
                    device: DeviceLike) -> AttackedModel:
    """The column of a received model file: loaded safely, as its trainable surface, never trained."""
    from .models.surface import model_surface

    p = spec.params
    data = load_data(p["train"], default_split="train") if "train" in p else train
    lm = load_model(p["model"], default_input_shape=data.image_shape)
    if tuple(lm.spec.input_shape) != data.image_shape or lm.spec.num_classes < data.num_classes:
        raise ConfigError(f"victim {spec.name!r}: the model takes {tuple(lm.spec.input_shape)} with "
                          f"{lm.spec.num_classes} classes; the data is {data.image_shape} with {data.num_classes}")
    model = model_surface(lm).module
    if device is not None:
        model.to(device)
    model.eval()
    is_poison = _read_poison(p["poison"], len(data)) if "poison" in p else torch.zeros(len(data), dtype=torch.bool)
    triggers = [Trigger.parse(p["trigger"], data.image_shape)] if "trigger" in p else []
    am = AttackedModel(spec.name, seed, model, None, data, triggers, p.get("target"), None, reused=True,
                       received=True, poison_mask=is_poison)
    am.ca = clean_accuracy(model, test)
    am.asr = am.success_rate(model, test)
    return am


# --- one cell ---------------------------------------------------------------------------------------

#: The model detector whose scan other defences may build on (a chain): the repairs and filters
#: that take reversed ``triggers`` / a ``trigger``, and the explainers that need a suspected
#: ``target``, get this detector's scan of the same model instead of running their own.
SCAN_PROVIDER = "neural-cleanse"
#: The key under which a cell's record holds a detector's result object until the run stores it
#: (``cells/<cell id>.scan/``, :meth:`NeuralCleanseResult.save`).
SCAN_KEY = "scan_result"


def _stored_scan(directory: Path) -> "SharedScan | None":
    """The provider's stored scan of a reused cell, or None (not there, or unreadable: the
    defences that build on it then fail in their own cells, as for a failed scan)."""
    if not (directory / "scan.json").is_file():
        return None
    try:
        return SharedScan.load(directory)
    except DataError as e:
        log.warning("cannot read the stored scan %s: %s", directory, e)
        return None


@dataclasses.dataclass(frozen=True)
class SharedScan:
    """The provider's scan of one model, as the defences that build on it read it (duck-typed
    like a Neural Cleanse result: ``flagged_labels``, ``scores``, ``triggers``)."""

    flagged_labels: list[int]
    scores: torch.Tensor
    triggers: list[Trigger]
    infected: bool = False
    #: the provider's own result, when the scan came from one (what ``scan=`` of a repair takes)
    result: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def suspected_target(self) -> int:
        """The first flagged label, else the most anomalous one."""
        return int(self.flagged_labels[0]) if self.flagged_labels else int(self.scores.argmax())

    def suspected_size(self, share: float = 0.8) -> int | None:
        """Side of the smallest square window holding ``share`` of the suspected target's reversed
        mask (the scan's guess at the trigger's size), or None when no window up to half the
        image side does (a trigger spread over the image, e.g. a blend)."""
        mask = self.triggers[self.suspected_target].mask.double()
        total = float(mask.sum())
        if total <= 0:
            return None
        for size in range(1, min(mask.shape) // 2 + 1):
            _, best = _window_sums(mask, size)
            if best >= share * total:
                return size
        return None

    def suspected_position(self, size: int) -> tuple[int, int]:
        """Top-left ``(row, col)`` of the ``size x size`` box holding most of the suspected
        target's reversed mask: where the scan saw the trigger."""
        return mask_box(self.triggers[self.suspected_target].mask, size)

    @classmethod
    def from_result(cls, result: Any) -> "SharedScan":
        """The shared view of a Neural Cleanse result (every label's reversed trigger)."""
        return cls([int(v) for v in result.flagged_labels], result.scores.float(), list(result.triggers),
                   bool(result.infected), result)

    @classmethod
    def load(cls, directory: str | Path) -> "SharedScan":
        """A scan written by :meth:`NeuralCleanseResult.save` (``scan --out``, the bench's provider cells)."""
        from .defenses.model.neural_cleanse import NeuralCleanseResult

        return cls.from_result(NeuralCleanseResult.load(directory))


def consumes_scan(spec: DefenseSpec) -> bool:
    """True when the defence of ``spec`` builds on the provider's scan (see :data:`SCAN_PROVIDER`):
    an explainer (it explains the label the scan suspects), a defence whose ``uses_scan`` is
    ``"required"``, or ``"optional"`` unless the config sets its own ``target``."""
    if spec.defense in (SCAN_PROVIDER, CHAIN):
        return False
    cls = DEFENSES.get(spec.defense)
    if cls.family == "explain" or (cls.family == "model" and not issubclass(cls, ModelDetector)):
        return True
    if cls.uses_scan == "required":
        return True
    return cls.uses_scan == "optional" and spec.params.get("target") is None


@dataclasses.dataclass
class Cell:
    """What the evaluation glue of one cell needs."""

    am: AttackedModel
    cfg: BenchConfig
    val: ImageDataset
    test: ImageDataset
    seed: int
    device: DeviceLike
    record: dict[str, Any]
    shared: SharedScan | None = None

    @property
    def row(self) -> dict[str, Any]:
        return self.record["row"]

    def suspected_target(self, name: str) -> int:
        if self.shared is None:
            raise ConfigError(f"{name} needs a suspected target label: add {SCAN_PROVIDER!r} to the run, whose "
                              f"scan supplies it")
        return self.shared.suspected_target


def _window_sums(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """``(sums, largest)``: the sum of ``mask`` (H, W) in every ``size x size`` window."""
    sums = torch.nn.functional.avg_pool2d(mask.double()[None, None], size, stride=1)[0, 0] * size * size
    return sums, float(sums.max())


def mask_box(mask: torch.Tensor, size: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the ``size x size`` window with the largest sum of ``mask`` (H, W)."""
    h, w = mask.shape
    sums, _ = _window_sums(mask, max(1, min(int(size), h, w)))
    r, c = divmod(int(sums.flatten().argmax()), sums.shape[1])
    return r, c


def make_defense(spec: DefenseSpec, seed: int, shared: SharedScan | None = None) -> Defense:
    """Build the defence of ``spec``; its ``seed`` follows the cell's seed unless set (the scan
    itself goes to the verb, as ``scan=``)."""
    cls = DEFENSES.get(spec.defense)
    params = dict(spec.params)
    defaults = cls.param_defaults()
    if "seed" in defaults and "seed" not in params:
        params["seed"] = seed
    if shared is not None and {"position", "trigger_size"} <= set(defaults) and params.get("position") is None:
        # trigger-distribution tools: size and place the trigger from the scan's reversed mask,
        # instead of a moving-window search per cell (about 10x slower on a CPU); a size left to
        # the class default (3) under-covers the bench's 4x4 patches, and the repair then leaves
        # the real trigger working (quick badnets-patch model, 1 epoch: ASR 27% with size 4, 41% with 3)
        if "trigger_size" not in params and (guess := shared.suspected_size()) is not None:
            params["trigger_size"] = guess
        size = params.get("trigger_size", defaults["trigger_size"])
        params["position"] = shared.suspected_position(int(size))
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"defence {spec.name!r}: {e}") from None


def evaluate_cell(am: AttackedModel, spec: DefenseSpec, cfg: BenchConfig, *, val: ImageDataset, test: ImageDataset,
                  seed: int, device: DeviceLike = None, shared: SharedScan | None = None) -> dict[str, Any]:
    """Run one defence on one attacked model and score it against the ground truth.

    Args:
        shared: the provider's scan of the same model, for defences that build on one.

    Returns:
        ``{"row": the table row, "result": the defence's result as a dict, "extras": evaluation
        data for the report (scores of clean vs stamped inputs, ground truth...), "params": the
        defence's settings, "tensors": triggers to store}``. A defence that raises gives a row
        with ``error`` set.
    """
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(attack=am.name, defense=spec.name, seed=seed, ca_before=am.ca, asr_before=am.asr)
    record: dict[str, Any] = {"row": row, "result": None, "extras": {}, "params": {}, "tensors": {},
                              "defense_name": spec.defense}
    t0 = time.perf_counter()
    try:
        if spec.defense == CHAIN:
            row["family"] = CHAIN
            record["params"] = to_jsonable(spec.params)
            record["defense_class"] = "Pipeline"
            _eval_chain(spec, Cell(am, cfg, val, test, seed, device, record))
            row["seconds"] = time.perf_counter() - t0
            return record
        use = shared if consumes_scan(spec) else None
        defense = make_defense(spec, seed, use)
        row["family"] = defense.family
        params = defense.get_params()
        record["params"] = {k: (f"<{SCAN_PROVIDER} scan of this model>" if v is use and use is not None
                                else to_jsonable(v)) for k, v in params.items()}
        if use is not None:
            record["extras"]["builds_on"] = SCAN_PROVIDER
        record["defense_class"] = type(defense).__name__
        cell = Cell(am, cfg, val, test, seed, device, record, use)
        if defense.family == "model" and hasattr(defense, "scan"):
            _eval_detector(defense, cell)
        elif defense.family == "explain":
            _eval_explainer(defense, cell)
        elif defense.family == "data":
            _eval_sanitizer(defense, cell)
        elif defense.family == "input":
            _eval_filter(defense, cell)
        elif defense.family == "repair":
            _eval_repair(defense, cell)
        else:
            raise ConfigError(f"defence {spec.name!r} has an unknown family {defense.family!r}")
    except Exception as e:  # a failing defence is recorded in its row; the matrix goes on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row["error"] = f"{type(e).__name__}: {msg}"
        log.warning("cell %s x %s (seed %d) failed: %s", am.name, spec.name, seed, row["error"], exc_info=True)
    row["seconds"] = time.perf_counter() - t0
    return record


def _eval_detector(defense: Any, c: Cell) -> None:
    res = defense.scan(c.am.model, c.val)
    flagged = sorted(int(v) for v in res.flagged_labels)
    c.row["verdict"] = "infected" if res.infected else "clean"
    c.row["flagged_labels"] = " ".join(map(str, flagged))
    targets = c.am.true_targets()
    c.row["target_found"] = bool(targets & set(flagged)) if targets else None
    c.record["result"] = res.to_dict()
    c.record["extras"]["true_targets"] = sorted(targets)
    c.record["tensors"].update(_trigger_tensors(res))
    if hasattr(res, "save"):
        c.record[SCAN_KEY] = res  # stored by the run with its own save(), not in the cell's JSON


def _eval_explainer(defense: Any, c: Cell) -> None:
    """Model-level tools that explain a suspected target (the moving-window heat map, the trigger
    distribution): the target comes from the provider's scan, never from the attack."""
    target = c.suspected_target(type(defense).__name__)
    targets = c.am.true_targets()
    c.row["flagged_labels"] = str(target)
    c.row["target_found"] = (target in targets) if targets else None
    c.record["extras"].update(true_targets=sorted(targets), searched_target=target)
    res = defense.explain(c.am.model, c.val, target)
    c.record["result"] = res.to_dict()
    c.record["tensors"].update(_trigger_tensors(res))
    peak = getattr(res, "peak", None)
    heat = getattr(res, "heatmap", None)
    if peak is not None and heat is not None:
        if c.am.triggers and c.am.triggers[0].shape[1:] == tuple(heat.shape):
            on = bool(c.am.triggers[0].mask[int(peak[0]), int(peak[1])] > 0.05)
            c.row["verdict"] = f"label {target}: peak {'on' if on else 'off'} the trigger"
        else:
            c.row["verdict"] = f"label {target} searched"
    vs = getattr(res, "valid_share", None)
    if vs is not None:
        c.row["verdict"] = f"label {target}: {100 * float(torch.as_tensor(vs).mean()):.0f}% valid samples"
    if hasattr(defense, "sample_tensors"):
        smp = defense.sample_tensors(24, generator=torch.Generator().manual_seed(c.seed))
        imgs = (smp.masks[:, None] * smp.patterns).clamp(0, 1)
        c.record["tensors"]["samples.images"] = imgs
        c.record["result"]["samples"] = imgs.tolist()


def _eval_sanitizer(defense: Any, c: Cell) -> None:
    am = c.am
    data = am.poisoned.clean if isinstance(am.poisoned, PoisonedDataset) else am.poisoned
    trusted = c.val if defense.uses_trusted else None  # the defender's clean data, as every family gets
    res = defense.inspect(am.model, data, trusted=trusted)
    is_poison = am.is_poison
    flagged = torch.as_tensor(res.flagged).bool()
    m = detection_metrics(res.scores, is_poison, flagged)
    if m["n_poison"]:
        c.row["poison_removed"] = m["recall"]
    c.row["clean_removed"] = m["fpr"]
    c.row["auroc"] = m["auroc"]
    c.row["verdict"] = f"removed {int(flagged.sum())}"
    keep = (~flagged).nonzero().flatten()
    if keep.numel() == 0:
        raise ConfigError(f"{defense!r} flagged every training sample; nothing left to retrain on")
    kept = am.poisoned.subset(keep)
    if am.received:  # a fresh copy of the received graph (there is no architecture to build)
        from .training import Retrainer

        model = Retrainer(epochs=max(c.cfg.epochs, 1), lr=c.cfg.lr, batch_size=c.cfg.batch_size, seed=c.seed,
                          device=c.device).train(am.model, kept)
        c.record["extras"]["fresh_model"] = "re-initialised copy of the received graph"
    else:
        model = train_new(c.cfg.arch, kept, seed=c.seed, device=c.device, epochs=c.cfg.epochs, lr=c.cfg.lr,
                          batch_size=c.cfg.batch_size)
    c.row["ca_after"] = clean_accuracy(model, c.test)
    c.row["asr_after"] = am.success_rate(model, c.test)
    c.record["result"] = res.to_dict()
    c.record["extras"].update(is_poison=is_poison.nonzero().flatten().tolist(), metrics=m,
                              projection=_projection(am, data, flagged, is_poison))


def _projection(am: AttackedModel, data: ImageDataset, flagged: torch.Tensor, is_poison: torch.Tensor,
                max_points: int = 600) -> dict[str, Any] | None:
    """2-D PCA of the penultimate activations of the samples labelled as the (main) target, for the
    report: which of them were poisoned (ground truth) and which the defence flagged."""
    from ._utils.batching import activations

    if is_poison.any():
        label = int(torch.mode(data.y[is_poison]).values)
    else:
        label = int(torch.mode(data.y[flagged]).values) if flagged.any() else 0
    idx = (data.y == label).nonzero().flatten()
    if idx.numel() < 3:
        return None
    if idx.numel() > max_points:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))[:max_points]].sort().values
    try:
        a = activations(am.model, data.x[idx], "penultimate").double()
    except TrojanscopeError:
        return None
    from sklearn.decomposition import PCA

    xy = PCA(2, svd_solver="randomized", random_state=0).fit_transform(a.numpy())
    return {"label": label, "xy": xy.astype("float32").tolist(), "poison": is_poison[idx].tolist(), "flagged": flagged[idx].tolist()}


def _stamped(am: AttackedModel, test: ImageDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stamped test inputs of non-target (and, if any, source) labels, and the attacker's targets."""
    trigs = am.triggers
    if not trigs or am.target is None:
        return None
    tmap = am.target
    tgt = target_labels(test.y, tmap, test.num_classes)
    keep = test.y != tgt
    if am.source_labels is not None:
        keep &= torch.isin(test.y, torch.as_tensor(am.source_labels))
    x = trigs[0].apply(test.x[keep])
    return x, tgt[keep]


def _eval_chain(spec: DefenseSpec, c: Cell) -> None:
    """A chain of defences (:class:`trojanscope.pipeline.Pipeline`): the figures after the last step."""
    from .pipeline import Pipeline, rejected

    am = c.am
    steps = [(n, {**({"seed": c.seed} if "seed" in DEFENSES.get(n).param_defaults() and "seed" not in p else {}), **p})
             for n, p in spec.params["steps"]]
    pipe = Pipeline(steps, retrain=spec.params.get("retrain", "scratch"), epochs=c.cfg.epochs, lr=c.cfg.lr,
                    batch_size=c.cfg.batch_size, seed=c.seed, device=c.device)
    stamped = _stamped(am, c.test)

    def evaluate(model: nn.Module, filters: Sequence[Any]) -> dict[str, Any]:
        """CA and ASR of the defended system: inputs a filter rejects neither count as right nor
        as a success of the attack (the input family's "after" figures)."""
        pred = predict(model, c.test.x, device=c.device)
        acc = pred == c.test.y
        rej = rejected(filters, c.test.x)
        out: dict[str, Any] = {"test_accuracy": float((acc & ~rej).float().mean())}
        if stamped is not None:
            xs, tgt = stamped
            hit = predict(model, xs, device=c.device) == tgt
            out["attack_success"] = float((hit & ~rejected(filters, xs)).float().mean())
        return out

    data = am.poisoned.clean if isinstance(am.poisoned, PoisonedDataset) else am.poisoned
    res = pipe.run(am.model, c.val, train_data=data, evaluate=evaluate)
    last = res.history[-1]
    c.row["ca_after"] = last.get("test_accuracy")
    c.row["asr_after"] = last.get("attack_success") if (am.attack is not None or am.received) else None
    removed = [r.get("n_removed") for r in res.history if r.get("n_removed") is not None]
    c.row["verdict"] = " > ".join(str(r["defense"]) for r in res.history[1:])
    if removed and isinstance(am.poisoned, PoisonedDataset) and am.poisoned.poison_indices.numel():
        c.row["verdict"] += f" (removed {sum(removed)})"
    c.record["result"] = {"history": res.history, "params": res.params}


def _eval_filter(defense: Any, c: Cell) -> None:
    am, test, device = c.am, c.test, c.device
    defense.fit(am.model, c.val, scan=c.shared if defense.uses_scan != "never" else None)
    clean_s = defense.score(test.x).float().cpu()
    thr = float(defense.threshold_)
    clean_f = clean_s > thr
    c.row["frr"] = float(clean_f.float().mean())
    pred = predict(am.model, test.x, device=device)
    c.row["ca_after"] = float(((~clean_f) & (pred == test.y)).float().mean())
    extras: dict[str, Any] = {"clean_scores": clean_s.tolist(), "threshold": thr}
    st = _stamped(am, test)
    if st is not None:
        xs, tgt = st
        trig_s = defense.score(xs).float().cpu()
        trig_f = trig_s > thr
        c.row["far"] = float((~trig_f).float().mean())
        m = detection_metrics(torch.cat([clean_s, trig_s]), torch.cat([torch.zeros(len(clean_s), dtype=torch.bool),
                                                                       torch.ones(len(trig_s), dtype=torch.bool)]))
        c.row["auroc"] = m["auroc"]
        hit = predict(am.model, xs, device=device) == tgt
        c.row["asr_after"] = float(((~trig_f) & hit).float().mean())
        extras["triggered_scores"] = trig_s.tolist()
    c.row["verdict"] = f"rejects {100 * (1 - c.row['far']):.0f}% stamped" if c.row["far"] is not None else \
        f"rejects {100 * c.row['frr']:.0f}% clean"
    c.record["extras"].update(extras)
    c.record["result"] = {"threshold": thr, **{k: to_jsonable(v) for k, v in vars(defense).items()
                                              if k.endswith("_") and not k.startswith("_") and _small(v)}}


def _small(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() <= 4096
    return not isinstance(v, (nn.Module, SharedScan, Trigger, list, tuple, dict))


def _eval_repair(defense: Any, c: Cell) -> None:
    am, test = c.am, c.test
    c.record["extras"]["evaluated"] = True  # histories carry the planted trigger's ASR

    def monitor(model: nn.Module) -> dict[str, float]:
        """Figures along the repair's history (ground truth stays here, in the glue)."""
        out = {"test_accuracy": clean_accuracy(model, test)}
        asr = am.success_rate(model, test)
        if asr is not None:
            out["attack_success"] = asr
        return out

    res = defense.repair(am.model, c.val, scan=c.shared if defense.uses_scan != "never" else None, monitor=monitor)
    model = res.model
    c.row["ca_after"] = clean_accuracy(model, test)
    c.row["asr_after"] = am.success_rate(model, test)
    c.row["verdict"] = None if c.row["asr_after"] is None else \
        f"ASR {100 * (am.asr or 0):.0f}% → {100 * c.row['asr_after']:.0f}%"
    c.record["result"] = res.to_dict()
    c.record["tensors"].update(_trigger_tensors(res))


def _trigger_tensors(result: Any) -> dict[str, torch.Tensor]:
    """Masks and patterns of the triggers a result holds (in its fields or its details), for the
    report's gallery: keys ``"<where>.mask"`` and ``"<where>.pattern"``."""
    out: dict[str, torch.Tensor] = {}

    def walk(key: str, v: Any, depth: int = 0) -> None:
        if isinstance(v, Trigger):
            out[f"{key}.mask"] = v.mask
            out[f"{key}.pattern"] = v.pattern
        elif depth < 2 and isinstance(v, Mapping):
            for kk, vv in v.items():
                walk(f"{key}.{kk}", vv, depth + 1)
        elif depth < 2 and isinstance(v, (list, tuple)):
            for i, vv in enumerate(v):
                walk(f"{key}.{i}", vv, depth + 1)

    if dataclasses.is_dataclass(result):
        for f in dataclasses.fields(result):
            if f.name != "model":
                walk(f.name, getattr(result, f.name))
    return out


# --- storage ----------------------------------------------------------------------------------------

def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


def _save_cell(folder: Path, cid: str, record: dict[str, Any]) -> None:
    tensors = record.get("tensors", {})
    if tensors:
        from safetensors.torch import save_file

        tmp = folder / f"{cid}.safetensors.tmp"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, folder / f"{cid}.safetensors")
        record["tensor_file"] = f"{cid}.safetensors"
    _write_json(folder / f"{cid}.json", {k: v for k, v in record.items() if k != "tensors"})  # last: marks it done


def _read_cell(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """A finished cell (same settings, no error), or None to compute it."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fingerprint or rec.get("row", {}).get("error"):
        return None
    return rec


def load_cells(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored cell record of a run folder, in file-name order."""
    folder = Path(run_dir) / "cells"
    recs = []
    for p in sorted(folder.glob("*.json")):
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable cell %s: %s", p, e)
    return recs


def write_table(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``results.csv`` and ``results.json``: one row per attack x defence x seed."""
    rows = [{c: r.get(c) for c in COLUMNS} for r in rows]
    _write_json(out / "results.json", rows)
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, out / "results.csv")


def run_metadata(device: DeviceLike = None) -> dict[str, Any]:
    """Versions and machine, for the report."""
    import importlib.metadata as md

    def ver(p: str) -> str | None:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    return {"trojanscope": ver("trojanscope"), "torch": torch.__version__, "numpy": ver("numpy"),
            "scikit-learn": ver("scikit-learn"), "matplotlib": ver("matplotlib"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device or "cpu"), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
