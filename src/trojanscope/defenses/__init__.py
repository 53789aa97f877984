"""Defences, by family. Each module is imported explicitly so that the registry is complete.

``create("name", **params)`` builds one by name; ``list_defenses(family=...)`` lists them.
"""

from typing import Any

from .base import (DEFENSES, DataSanitizer, Defense, Explainer, InputFilter, ModelDetector, Repair, RepairResult,
                   SanitizeResult, ScanResult, register, threshold_for_rate)

# Defence modules (one import line each; keep sorted by family):
from .data.clustering import ActivationClustering  # noqa: E402
from .data.provenance import ProvenanceFilter  # noqa: E402
from .data.spectral import SpectralSignatures  # noqa: E402
from .input.activation_filter import ActivationFilter  # noqa: E402
from .input.strip import STRIP  # noqa: E402
from .model.distribution import TriggerDistribution  # noqa: E402
from .model.heatmap import MovingWindowSearch  # noqa: E402
from .model.neural_cleanse import NeuralCleanse  # noqa: E402
from .repair.distribution_unlearning import DistributionUnlearning  # noqa: E402
from .repair.neural_cleanse import NeuronPruning, Unlearning  # noqa: E402
from .repair.pruning import FinePruning, Pruning  # noqa: E402


def create(name: str, **params: Any) -> Defense:
    """Build the defence registered as ``name`` with ``params``."""
    return DEFENSES.create(name, **params)


def list_defenses(family: str | None = None) -> list[str]:
    """Registered defence names, optionally of one family (model, data, input, repair, explain)."""
    return [n for n, cls in DEFENSES.items() if family is None or cls.family == family]


__all__ = ["ActivationClustering", "ActivationFilter", "DEFENSES", "DataSanitizer", "Defense", "FinePruning", "Pruning", "STRIP", "DistributionUnlearning",
           "MovingWindowSearch", "TriggerDistribution", "InputFilter", "ModelDetector",
           "NeuralCleanse", "NeuronPruning", "ProvenanceFilter", "Repair", "RepairResult",
           "SanitizeResult", "ScanResult", "SpectralSignatures", "Unlearning", "create", "list_defenses", "register", "threshold_for_rate"]
