"""The bench's presets: the default matrix, the ``--quick`` one, and the settings they use."""

from __future__ import annotations

import importlib.util
from typing import Any

from ..attacks import ATTACKS
from ..defenses import DEFENSES
from ..defenses.repair.neural_cleanse import SMALL_SET_UNLEARNING
from ..errors import ConfigError
from .spec import CHAIN, AttackSpec, BenchConfig, DefenseSpec, expand_defenses

#: The BadNets variants of the issue, by preset name (trigger sizes scale with the image).
PRESET_ATTACKS = ("clean", "badnets-patch", "badnets-pattern", "badnets-pixel", "badnets-blended",
                  "badnets-all-to-all", "badnets-source-specific")

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


def preset_attack_spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` of a preset (``badnets-patch``...) or of a registered attack's name."""
    if name in PRESET_ATTACKS:
        return AttackSpec(name, "clean" if name == "clean" else "badnets", {"preset": name})
    if name in ATTACKS and name != "badnets":
        return AttackSpec(name, name, {})
    known = ", ".join(list(PRESET_ATTACKS) + [n for n in ATTACKS.names() if n != "badnets"])
    raise ConfigError(f"unknown attack {name!r}; known: {known} (or describe one in an [[attack]] table)")


def _rows(name: str, params: dict[str, Any]) -> list[DefenseSpec]:
    """The row of a registered defence, and its :data:`VARIANTS` beside it."""
    return [DefenseSpec(name, name, params)] + [DefenseSpec(row, name, {**params, **extra})
                                               for row, base, extra in VARIANTS if base == name]


def _chain(steps: list[str], params: dict[str, dict[str, Any]]) -> DefenseSpec | None:
    """The chain of ``steps`` (pruned channels kept between them), or None if a step is not registered."""
    if not set(steps) <= set(DEFENSES.names()) or importlib.util.find_spec("trojanscope.pipeline") is None:
        return None
    return DefenseSpec(" > ".join(steps), CHAIN, {"steps": [[n, params.get(n, {})] for n in steps],
                                                 "retrain": "continue"})


def default_config() -> BenchConfig:
    """Every preset attack, every registered defence, mnist5k, one seed."""
    extra = [preset_attack_spec(n) for n in ATTACKS.names() if n != "badnets"]
    defenses = [row for n in expand_defenses(["all"]) for row in _rows(n, dict(BENCH_PARAMS.get(n, {})))]
    for steps in (["activation-clustering", "fine-prune"], ["fine-prune", "activation-clustering"]):
        if (chain := _chain(steps, {})) is not None:
            defenses.append(chain)
    return BenchConfig(attacks=tuple(preset_attack_spec(n) for n in PRESET_ATTACKS) + tuple(extra),
                       defenses=tuple(defenses))


def _quick_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the names the defence ``name`` does not take."""
    return {k: v for k, v in params.items() if k in DEFENSES.get(name).param_defaults()}


def quick_config() -> BenchConfig:
    """The ``--quick`` preset: mnist5k, 2 epochs, one seed; the clean baseline and four attacks
    (BadNets patch and blended, plus every other registered attack, topped up with the BadNets
    pattern and all-to-all variants); every registered defence but :data:`QUICK_EXCLUDE`, with
    faster settings (:data:`QUICK_PARAMS`), and one chain (Activation Clustering, then Fine-Pruning); 5 provenance
    sources; ASR / FAR measured on 300 test inputs."""
    attacks = [preset_attack_spec(a) for a in ("clean", "badnets-patch", "badnets-blended")]
    for n in ATTACKS.names():
        if n != "badnets":
            names = ATTACKS.get(n).param_names()
            attacks.append(AttackSpec(n, n, {k: v for k, v in QUICK_ATTACK_PARAMS.get(n, {}).items() if k in names}))
    for extra in ("badnets-pattern", "badnets-all-to-all"):
        if len(attacks) < 5:
            attacks.append(preset_attack_spec(extra))
    defenses = [row for n in expand_defenses(["all"]) if n not in QUICK_EXCLUDE
                for row in _rows(n, _quick_params(n, {**BENCH_PARAMS.get(n, {}), **QUICK_PARAMS.get(n, {})}))]
    steps = ["activation-clustering", "fine-prune"]  # one chain: Milakovic's order, pruned channels kept
    chain = _chain(steps, {n: _quick_params(n, QUICK_PARAMS.get(n, {})) for n in steps if n in DEFENSES})
    if chain is not None:
        defenses.append(chain)
    return BenchConfig(epochs=2, seeds=(0,), attacks=tuple(attacks), defenses=tuple(defenses), eval_samples=300,
                       sources=5)
