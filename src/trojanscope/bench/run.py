"""Running (or resuming) a benchmark matrix in a run folder, under an exclusive lock."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._utils.batching import DeviceLike
from ..attacks import ATTACKS
from ..data import ImageDataset
from ..defenses import DEFENSES
from ..errors import ConfigError
from .cells import evaluate_cell
from .config import check_defense_params, validate_config
from .scan import SCAN_PROVIDER, SharedScan, consumes_scan, stored_scan
from .spec import RECEIVED, AttackSpec, BenchConfig, DefenseSpec
from .store import CellRecord, cell_id, fingerprint, read_cell, run_metadata, save_cell, write_json, write_table
from .victims import AttackedModel, attacked_model, sample, splits

OnCell = Callable[[str, dict[str, Any]], None]


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


def run_bench(config: BenchConfig, out: str | Path, *, device: DeviceLike = None, progress: bool = True,
              on_cell: OnCell | None = None, max_cells: int | None = None) -> BenchResult:
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
    train, val, test = splits(config)
    validate_config(config, train)  # every attack and defence, before the first cell
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        run = _Run(config, out, train, val, sample(test, config.eval_samples, 0), device)
        run.start()
        run.go(progress=progress, on_cell=on_cell, max_cells=max_cells)
        return BenchResult(out, run.rows, run.computed, run.reused, run.trained, run.loaded,
                           time.perf_counter() - t_run)


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


def applicable(attack: AttackSpec, defense: DefenseSpec) -> bool:
    """False for a data sanitiser against an attack that edits a trained model without a poisoned
    training set (e.g. the Trojaning attack): there is nothing to sanitise."""
    sanitises = any(DEFENSES.get(st.defense).family == "data" for st in defense.steps())
    if attack.attack == RECEIVED:  # a data sanitiser needs the victim's training set
        return "train" in attack.params or not sanitises
    if attack.attack in ("clean", "badnets") or attack.attack not in ATTACKS:
        return True
    cls = ATTACKS.get(attack.attack)
    edits = getattr(cls, "kind", "data") == "model" and not hasattr(cls, "poison")
    return not (edits and sanitises)


@dataclasses.dataclass
class _Run:
    """One run over the planned cells: the models and scans of each (attack, seed) column, built
    on first use, and what was computed, reused, trained and loaded."""

    config: BenchConfig
    out: Path
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset  #: the test inputs the figures are measured on (``eval_samples`` of them)
    device: DeviceLike
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    computed: list[str] = dataclasses.field(default_factory=list)
    reused: list[str] = dataclasses.field(default_factory=list)
    trained: list[str] = dataclasses.field(default_factory=list)
    loaded: list[str] = dataclasses.field(default_factory=list)
    models: dict[tuple[str, int], AttackedModel] = dataclasses.field(default_factory=dict)
    scans: dict[tuple[str, int], SharedScan | None] = dataclasses.field(default_factory=dict)
    cells: list[tuple[int, AttackSpec, DefenseSpec]] = dataclasses.field(default_factory=list)

    @property
    def provider(self) -> DefenseSpec | None:
        return next((d for d in self.config.defenses if d.defense == SCAN_PROVIDER), None)

    def start(self) -> list[tuple[int, AttackSpec, DefenseSpec]]:
        """Write the run's settings, machine and plan; the planned cells, the provider's scan first."""
        for sub in ("cells", "models"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", self.config.to_dict())
        write_json(self.out / "meta.json", run_metadata(self.device))
        for d in self.config.defenses:
            check_defense_params(d)
        provider = self.provider
        order = sorted(self.config.defenses, key=lambda d: d is not provider)
        self.cells = [(seed, a, d) for seed in self.config.seeds for a in self.config.attacks for d in order
                      if applicable(a, d)]
        write_json(self.out / "plan.json", {"cells": [cell_id(a.name, d.name, seed) for seed, a, d in self.cells]})
        return self.cells

    def go(self, *, progress: bool, on_cell: OnCell | None, max_cells: int | None) -> None:
        """Compute (or reuse) every planned cell, up to ``max_cells`` new ones; the table is written even if a cell raises."""
        bar = None
        if progress:
            from .._utils.progress import progress as progress_bar

            bar = progress_bar(total=len(self.cells), desc="bench", unit="cell")
        n_new = 0
        try:
            for seed, aspec, dspec in self.cells:
                if self.reuse(seed, aspec, dspec):
                    if bar is not None:
                        bar.update(1)
                    continue
                if max_cells is not None and n_new >= max_cells:
                    break
                if bar is not None:
                    bar.set_postfix_str(f"{aspec.name} x {dspec.name}")
                self.compute(seed, aspec, dspec, on_cell)
                n_new += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            write_table(self.out, self.rows)

    def _fingerprints(self, seed: int, aspec: AttackSpec, dspec: DefenseSpec) -> tuple[str, str, bool]:
        """The model's and the cell's fingerprints, and whether the cell builds on the provider's scan."""
        provider = self.provider
        mfp = fingerprint({"training": self.config.training, "attack": aspec.to_dict(), "seed": seed})
        uses = provider is not None and consumes_scan(dspec)
        cfp = fingerprint({"model": mfp, "defense": dspec.to_dict(), "eval_samples": self.config.eval_samples,
                           "builds_on": provider.to_dict() if uses and provider is not None else None})
        return mfp, cfp, uses

    def reuse(self, seed: int, aspec: AttackSpec, dspec: DefenseSpec) -> bool:
        """Take the cell from the run folder if it is there, finished with the same settings."""
        cid = cell_id(aspec.name, dspec.name, seed)
        cached: CellRecord | None = read_cell(self.out / "cells" / f"{cid}.json", self._fingerprints(seed, aspec,
                                                                                                      dspec)[1])
        if cached is not None and dspec is self.provider:
            self.scans[(aspec.name, seed)] = stored_scan(self.out / "cells" / f"{cid}.scan")
            if self.scans[(aspec.name, seed)] is None:
                cached = None  # a cell of an older run, without its stored scan: computed again
        if cached is None:
            return False
        self.rows.append(dict(cached.row))
        self.reused.append(cid)
        return True

    def compute(self, seed: int, aspec: AttackSpec, dspec: DefenseSpec, on_cell: OnCell | None) -> None:
        """Compute the cell and store it (with the provider's scan, for the cells that build on it)."""
        cid = cell_id(aspec.name, dspec.name, seed)
        key = (aspec.name, seed)
        mfp, cfp, uses = self._fingerprints(seed, aspec, dspec)
        if key not in self.models:
            self.models[key] = attacked_model(self.config, aspec, seed, self.train, self.val, self.test, self.out,
                                              mfp, self.device, self.trained)
            if self.models[key].reused:
                self.loaded.append(f"{aspec.name}-s{seed}")
        scored = evaluate_cell(self.models[key], dspec, self.config, val=self.val, test=self.test, seed=seed,
                               device=self.device, shared=self.scans.get(key) if uses else None)
        if dspec is self.provider:
            if scored.scan is not None:
                scored.scan.save(self.out / "cells" / f"{cid}.scan")
            self.scans[key] = None if scored.scan is None else SharedScan.from_result(scored.scan)
        record = dataclasses.replace(scored.record, id=cid, fingerprint=cfp)
        save_cell(self.out / "cells", record)
        row = dict(record.row)
        self.rows.append(row)
        self.computed.append(cid)
        if on_cell is not None:
            on_cell(cid, row)
