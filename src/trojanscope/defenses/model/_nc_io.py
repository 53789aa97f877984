"""On-disk form of a :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanseResult`.

A result directory holds two files:

* ``scan.json``: :meth:`NeuralCleanseResult.to_dict` (what people and scripts read: the verdict,
  the flagged labels, one row per label, the evidence, the settings) plus ``format`` and
  ``version``;
* ``scan.safetensors``: the per-label tensors (``scores``, ``l1_norms``, ``anomaly_indices``,
  ``attack_success``, ``reached``, ``flagged``, ``per_source_attack_success``) and the reversed
  triggers (``trigger_masks`` ``(K, H, W)``, ``trigger_patterns`` ``(K, C, H, W)``), and with a
  pair scan its ``pair_l1_norms`` ``(K, K)`` (NaN where no pair ran).

Loading checks every shape and dtype against the label count before reading a tensor, and the
values (triggers finite and in [0, 1], rates in [0, 1] or NaN where undefined, no NaN score);
anything else is a :class:`~trojanscope.errors.DataError`. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..._utils.limits import read_json_file, require_regular_file
from ..._utils.results import to_jsonable
from ...errors import DataError
from ...triggers import Trigger, TriggerBatch

if TYPE_CHECKING:
    from .neural_cleanse import NeuralCleanseResult

FORMAT = "trojanscope.neural-cleanse-result"
VERSION = 1
JSON_NAME = "scan.json"
TENSOR_NAME = "scan.safetensors"

#: The (K,) tensors and their dtypes.
_VECTORS = {"scores": torch.float32, "l1_norms": torch.float32, "anomaly_indices": torch.float32,
            "attack_success": torch.float32, "reached": torch.bool, "flagged": torch.bool}


def save_result(result: "NeuralCleanseResult", directory: str | Path) -> Path:
    """Write ``result`` to ``directory`` (created); returns the directory."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(result, name).detach().cpu().to(dtype).contiguous() for name, dtype in _VECTORS.items()}
    tensors["per_source_attack_success"] = result.per_source_attack_success.detach().cpu().float().contiguous()
    if result.pair_l1_norms is not None:
        tensors["pair_l1_norms"] = result.pair_l1_norms.detach().cpu().float().contiguous()
    if result.triggers:
        batch = TriggerBatch.from_triggers(result.triggers, range(len(result.triggers)))
        tensors["trigger_masks"], tensors["trigger_patterns"] = batch.masks.contiguous(), batch.patterns.contiguous()
    tmp = out / (TENSOR_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(tmp, out / TENSOR_NAME)
    doc = {"format": FORMAT, "version": VERSION, **to_jsonable(result.to_dict())}
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / JSON_NAME)
    return out


def load_result(cls: type["NeuralCleanseResult"], directory: str | Path) -> "NeuralCleanseResult":
    """Read a result written by :func:`save_result` (``directory`` or its ``scan.json``)."""
    p = Path(directory)
    folder = p.parent if p.name == JSON_NAME and not p.is_dir() else p
    doc = _read_json(require_regular_file(folder / JSON_NAME, "scan result"))
    tensors = _read_tensors(require_regular_file(folder / TENSOR_NAME, "scan tensors"))
    k = int(tensors["scores"].numel())
    labels = _labels(doc.get("flagged_labels"), k, folder)
    names = [t.get("name") if isinstance(t, dict) else None for t in doc.get("triggers") or []]
    triggers: list[Trigger] = []
    if "trigger_masks" in tensors:
        names = [names[j] if j < len(names) and isinstance(names[j], str) else f"neural-cleanse:label{j}"
                 for j in range(k)]
        triggers = list(TriggerBatch(tensors["trigger_masks"], tensors["trigger_patterns"], torch.arange(k), tuple(names)))
    prob = doc.get("probability")
    return cls(infected=_typed(doc, "infected", bool, folder), flagged_labels=labels, scores=tensors["scores"],
               probability=math.nan if prob is None else float(_typed(doc, "probability", (int, float), folder)),
               evidence=_typed(doc, "evidence", dict, folder, {}), image_passes=int(_typed(doc, "image_passes", int, folder, 0)),
               details=_typed(doc, "details", dict, folder, {}), params=_typed(doc, "params", dict, folder, {}),
               seconds=float(_typed(doc, "seconds", (int, float), folder, 0.0)), l1_norms=tensors["l1_norms"],
               anomaly_indices=tensors["anomaly_indices"], attack_success=tensors["attack_success"],
               per_source_attack_success=tensors["per_source_attack_success"], flagged=tensors["flagged"],
               reached=tensors["reached"], triggers=triggers, pair_l1_norms=tensors.get("pair_l1_norms"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = read_json_file(path, "scan result")
    except OSError as e:
        raise DataError(f"{path}: not a scan result ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{path}: not a scan result written by NeuralCleanseResult.save (write one with "
                        f"`trojanscope scan --out DIR`)")
    if doc.get("version") != VERSION:
        raise DataError(f"{path}: scan result version {doc.get('version')!r}, this version reads {VERSION}")
    return doc


def _typed(doc: dict[str, Any], key: str, types: Any, where: Path, default: Any = ...) -> Any:
    if key not in doc or doc[key] is None:
        if default is ...:
            raise DataError(f"{where / JSON_NAME}: no {key!r}")
        return default
    v = doc[key]
    if (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))) or not isinstance(v, types):
        raise DataError(f"{where / JSON_NAME}: {key!r} has the wrong type ({type(v).__name__})")
    return v


def _labels(value: Any, k: int, where: Path) -> list[int]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise DataError(f"{where / JSON_NAME}: 'flagged_labels' must be a list of labels")
    if any(not 0 <= v < k for v in value):
        raise DataError(f"{where / JSON_NAME}: its flagged labels {value} do not fit its {k} labels")
    return [int(v) for v in value]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise DataError(f"{path}: not a scan result's tensors")
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            _check_shapes(shapes, path)
            tensors = {name: f.get_tensor(name) for name in shapes}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    _check_values(tensors, path)
    return tensors


def _check_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted((set(_VECTORS) | {"per_source_attack_success"}) - set(shapes))
    if missing:
        raise DataError(f"{path}: missing tensors {missing}")
    k = shapes["scores"][0] if len(shapes["scores"]) == 1 else -1
    if k < 1 or any(shapes[n] != (k,) for n in _VECTORS) or shapes["per_source_attack_success"] != (k, k):
        raise DataError(f"{path}: the per-label tensors must be (K,) and per_source_attack_success (K, K)")
    if ("trigger_masks" in shapes) != ("trigger_patterns" in shapes):
        raise DataError(f"{path}: trigger_masks and trigger_patterns go together")
    if "trigger_masks" in shapes:
        m, p = shapes["trigger_masks"], shapes["trigger_patterns"]
        if len(m) != 3 or len(p) != 4 or m[0] != k or p[0] != k or p[2:] != m[1:] or not 1 <= p[1] <= 4:
            raise DataError(f"{path}: trigger_masks must be (K, H, W) and trigger_patterns (K, C, H, W), got {m} and {p}")
    if "pair_l1_norms" in shapes and shapes["pair_l1_norms"] != (k, k):
        raise DataError(f"{path}: pair_l1_norms must be (K, K), got {shapes['pair_l1_norms']}")
    extra = sorted(set(shapes) - set(_VECTORS) - {"per_source_attack_success", "trigger_masks", "trigger_patterns",
                                                  "pair_l1_norms"})
    if extra:
        raise DataError(f"{path}: unexpected tensors {extra}")


def _check_values(t: dict[str, torch.Tensor], path: Path) -> None:
    for name, dtype in {**_VECTORS, "per_source_attack_success": torch.float32, "trigger_masks": torch.float32,
                        "trigger_patterns": torch.float32, "pair_l1_norms": torch.float32}.items():
        if name in t and t[name].dtype != dtype:
            raise DataError(f"{path}: {name} must be {dtype}, got {t[name].dtype}")
    if torch.isnan(t["scores"]).any() or torch.isnan(t["anomaly_indices"]).any():
        raise DataError(f"{path}: NaN scores")
    if not torch.isfinite(t["l1_norms"]).all() or (t["l1_norms"] < 0).any():
        raise DataError(f"{path}: l1_norms must be finite and >= 0")
    if "pair_l1_norms" in t and (torch.isinf(t["pair_l1_norms"]).any() or (t["pair_l1_norms"] < 0).any()):
        raise DataError(f"{path}: pair_l1_norms must be >= 0 (NaN where no pair ran)")
    for name in ("attack_success", "per_source_attack_success"):
        r = t[name]
        if name == "attack_success" and torch.isnan(r).any():
            raise DataError(f"{path}: NaN attack success")
        if ((r < 0) | (r > 1)).any() or torch.isinf(r).any():
            raise DataError(f"{path}: {name} must lie in [0, 1]")
    for name in ("trigger_masks", "trigger_patterns"):
        if name in t and (not torch.isfinite(t[name]).all() or (t[name] < 0).any() or (t[name] > 1).any()):
            raise DataError(f"{path}: {name} must be finite and lie in [0, 1]")
