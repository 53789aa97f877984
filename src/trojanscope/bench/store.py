"""The run store: how a ``trojanscope bench`` run folder is written and read (the one typed
reader, which :mod:`trojanscope.report` uses too).

A run folder holds ``config.json`` (the settings), ``meta.json`` (versions and machine),
``plan.json`` (the planned cells), ``cells/<id>.json`` (one finished cell each: its table row, its
result as a dict, the glue's extras such as the ground truth it was scored against, the defence's
params) with an optional ``cells/<id>.safetensors`` (the reversed triggers the result held),
``results.csv`` / ``results.json`` (the table, :data:`COLUMNS`) and
``models/<attack>__s<seed>/`` (each attacked model, with its planted ``trigger_*.safetensors``).
A cell is written and read as a frozen :class:`CellRecord`; :func:`load_run` reads the whole
folder into a :class:`RunData`. Every file is written to a temporary name and renamed, and a
cell's JSON is written last, so a killed run leaves only finished cells.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._utils.batching import DeviceLike
from .._utils.results import to_jsonable
from ..errors import ConfigError
from ..triggers import Trigger

log = logging.getLogger(__name__)

#: The columns of the result table, in order.
COLUMNS = ("attack", "defense", "family", "seed", "ca_before", "asr_before", "ca_after", "asr_after", "verdict",
           "flagged_labels", "target_found", "poison_removed", "clean_removed", "auroc", "far", "frr", "seconds",
           "error")

#: The result kinds the report draws (one :class:`~trojanscope.report.displays.Display` each).
KINDS = ("scan", "heatmap", "distribution", "sanitize", "filter", "repair", "chain", "population")
#: The kind of a family's results where the defence's class does not say more.
KIND_OF_FAMILY = {"model": "scan", "data": "sanitize", "input": "filter", "repair": "repair", "chain": "chain",
                  "population": "population"}
#: The kind of the results of model-level tools that are not detectors, by the class name a cell
#: records (for cells whose defence is not in the registry of the reading process).
KIND_OF_CLASS = {"MovingWindowSearch": "heatmap", "TriggerDistribution": "distribution"}


@dataclasses.dataclass(frozen=True)
class CellRecord:
    """One finished cell of a run: one defence on one attacked model (one seed).

    Attributes:
        id: the cell's id (its file name without the suffix, :func:`cell_id`).
        attack, defense, seed: what the cell ran (the defence's name in the run, e.g. a preset).
        family: the defence's family (``model``, ``data``, ``input``, ``repair``, ``explain``, ``chain``).
        kind: what its result is (one of :data:`KINDS`; ``""`` if unknown), which picks the figures.
        row: the cell's row of the results table (:data:`COLUMNS`).
        result: the defence's result as a dict (``to_dict()``), or None if the cell failed.
        extras: what the bench's glue added: the truth the result was scored against
            (``true_targets``, ``is_poison``), filter scores, a projection of the activations.
        params: the defence's parameters.
        defense_name: the registry name of the defence; ``defense_class``: its class name.
        tensors: the tensors stored beside the cell (``<where>.mask`` / ``<where>.pattern`` of
            the triggers the result held).
        planted: the triggers planted in the attacked model (none for a clean model).
        fingerprint: the settings the cell was computed with (a resumed run reuses a cell only
            when they are the same).
    """

    id: str
    attack: str
    defense: str
    seed: int
    family: str
    kind: str
    row: Mapping[str, Any]
    result: Mapping[str, Any] | None
    extras: Mapping[str, Any]
    params: Mapping[str, Any]
    defense_name: str = ""
    defense_class: str = ""
    tensors: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)
    planted: tuple[Trigger, ...] = ()
    fingerprint: str = ""

    @property
    def error(self) -> str | None:
        """The cell's error message, or None if it finished."""
        return self.row.get("error") or None

    @property
    def backdoored(self) -> bool:
        """Whether the attacked model carries a backdoor (its attack success was measured)."""
        return self.row.get("asr_before") is not None

    def to_json(self, tensor_file: str | None = None) -> dict[str, Any]:
        """The cell's JSON document (what :func:`cell_record` reads back; the tensors go to a side file)."""
        doc: dict[str, Any] = {"row": self.row, "result": self.result, "extras": self.extras, "params": self.params,
                               "defense_name": self.defense_name}
        if self.defense_class:
            doc["defense_class"] = self.defense_class
        doc.update(fingerprint=self.fingerprint, id=self.id)
        if tensor_file is not None:
            doc["tensor_file"] = tensor_file
        return doc


@dataclasses.dataclass(frozen=True)
class RunData:
    """A bench run folder as the report reads it.

    Attributes:
        path: the folder.
        config: the run's settings (``config.json``).
        meta: versions and machine (``meta.json``).
        planned: how many cells the run planned (0 if unknown).
        cells: the finished cells, in file-name order.
    """

    path: Path
    config: Mapping[str, Any]
    meta: Mapping[str, Any]
    planned: int
    cells: tuple[CellRecord, ...]


# --- names and fingerprints -----------------------------------------------------------------------

def safe_name(s: str) -> str:
    """``s`` as the bench writes it in a file or folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def cell_id(attack: str, defense: str, seed: int) -> str:
    """The id (and file name) of the cell of ``defense`` on the model of ``attack``, seed ``seed``."""
    return f"{safe_name(attack)}__{safe_name(defense)}__s{seed}"


def fingerprint(obj: Any) -> str:
    """A short digest of JSON-able settings (what a cached model or cell was computed with)."""
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def natural_key(s: str) -> list[Any]:
    """Sort key that orders ``a2`` before ``a10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --- writing --------------------------------------------------------------------------------------

def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` (through a temporary file, so a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


def save_cell(folder: Path, record: CellRecord) -> None:
    """Write a finished cell: its tensors (if any) first, its JSON last (its presence marks it done)."""
    tensor_file = None
    if record.tensors:
        from safetensors.torch import save_file

        tmp = folder / f"{record.id}.safetensors.tmp"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in record.tensors.items()}, str(tmp))
        os.replace(tmp, folder / f"{record.id}.safetensors")
        tensor_file = f"{record.id}.safetensors"
    write_json(folder / f"{record.id}.json", record.to_json(tensor_file))


def write_table(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``results.csv`` and ``results.json``: one row per attack x defence x seed."""
    rows = [{c: r.get(c) for c in COLUMNS} for r in rows]
    write_json(out / "results.json", rows)
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


# --- reading --------------------------------------------------------------------------------------

def read_json(p: Path) -> dict[str, Any]:
    """A JSON object file ({} if it is missing or not JSON)."""
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def read_cell(path: Path, fp: str) -> CellRecord | None:
    """A finished cell computed with the settings ``fp`` (and no error), or None to compute it."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != fp or rec.get("row", {}).get("error"):
        return None
    return cell_record(rec)


def load_cells(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored cell document of a run folder (its JSON as a dict), in file-name order."""
    folder = Path(run_dir) / "cells"
    recs = []
    for p in sorted(folder.glob("*.json")):
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable cell %s: %s", p, e)
    return recs


def load_run(run_dir: str | Path) -> RunData:
    """Read a bench run folder; ConfigError if it holds no finished cell."""
    run = Path(run_dir)
    raw = load_cells(run)
    if not raw:
        raise ConfigError(f"{run} holds no finished cells (is it a `trojanscope bench` run folder?)")
    planted: dict[tuple[str, int], tuple[Trigger, ...]] = {}
    cells = []
    for rec in raw:
        row = rec.get("row") or {}
        key = (str(row.get("attack")), int(row.get("seed") or 0))
        if key not in planted:
            planted[key] = planted_triggers(run / "models" / f"{safe_name(key[0])}__s{key[1]}")
        tensors = read_tensors(run / "cells" / rec["tensor_file"]) if rec.get("tensor_file") else {}
        cells.append(cell_record(rec, tensors=tensors, planted=planted[key]))
    return RunData(path=run, config=read_json(run / "config.json"), meta=read_json(run / "meta.json"),
                   planned=len(read_json(run / "plan.json").get("cells", [])), cells=tuple(cells))


def cell_record(rec: Mapping[str, Any], *, tensors: Mapping[str, torch.Tensor] | None = None,
                planted: tuple[Trigger, ...] = ()) -> CellRecord:
    """A :class:`CellRecord` from a cell's JSON document (``row``, ``result``, ``extras``, ``params``...)."""
    row = dict(rec.get("row") or {})
    family = str(row.get("family") or "")
    name = str(rec.get("defense_name") or row.get("defense") or "")
    cls_name = str(rec.get("defense_class") or "")
    return CellRecord(id=str(rec.get("id", "")), attack=str(row.get("attack")), defense=str(row.get("defense")),
                      seed=int(row.get("seed") or 0), family=family, kind=kind_of(family, name, cls_name), row=row,
                      result=rec.get("result"), extras=dict(rec.get("extras") or {}),
                      params=dict(rec.get("params") or {}), defense_name=name,
                      defense_class=cls_name, tensors=dict(tensors or {}),
                      planted=tuple(planted), fingerprint=str(rec.get("fingerprint") or ""))


def kind_of(family: str, defense_name: str, defense_class: str = "") -> str:
    """The kind of result a defence gives: from its registered class (a heat map search and a
    trigger distribution are model-level tools that are not detectors), else from the class name
    the cell recorded (:data:`KIND_OF_CLASS`), else from its family."""
    from ..defenses import DEFENSES, DataSanitizer, InputFilter, ModelDetector, MovingWindowSearch, Repair, \
        TriggerDistribution

    try:
        cls = DEFENSES.get(defense_name)
    except (ConfigError, KeyError):
        return KIND_OF_CLASS.get(defense_class) or KIND_OF_FAMILY.get(family, "")
    for base, kind in ((MovingWindowSearch, "heatmap"), (TriggerDistribution, "distribution"),
                       (ModelDetector, "scan"), (DataSanitizer, "sanitize"), (InputFilter, "filter"),
                       (Repair, "repair")):
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    return KIND_OF_CLASS.get(defense_class) or KIND_OF_FAMILY.get(family, "")


def planted_triggers(model_dir: Path) -> tuple[Trigger, ...]:
    """The triggers stored with an attacked model (``trigger_*.safetensors``), in natural order."""
    trigs = []
    for p in sorted(model_dir.glob("trigger_*.safetensors"), key=lambda p: natural_key(p.name)):
        try:
            trigs.append(Trigger.load(p))
        except Exception as e:  # a damaged side file costs a thumbnail, not the report
            log.warning("cannot read planted trigger %s: %s", p, e)
    return tuple(trigs)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a cell's side file ({} if it is missing or cannot be read)."""
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a damaged side file costs a gallery, not the report
        log.warning("cannot read %s: %s", path, e)
        return {}
