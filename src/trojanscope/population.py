"""Scanning a population of models with Neural Cleanse, and scoring it as TrojAI does.

:func:`scan_population` scans a folder of models (a :mod:`~trojanscope.rounds` round, or any
model files), one row per model, over local processes or Ray, resumably;
:func:`population_scores` gives the ROC-AUC and cross-entropy of the per-model probabilities and
:func:`score_scan` the whole score of a scan against a round's truth (``bench score``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.dataset import ImageDataset, fit_to_model
from ._utils.limits import read_json_file
from .errors import ConfigError, TrojanscopeError

log = logging.getLogger(__name__)


# --- scoring a population ---------------------------------------------------------------------

def population_scores(prob: np.ndarray | list[float], truth: np.ndarray | list[bool]) -> dict[str, float]:
    """ROC-AUC and cross-entropy of per-model probabilities (the TrojAI scores).

    The cross-entropy clips probabilities to ``[1e-6, 1 - 1e-6]`` as an infinite loss for a
    single confident mistake would hide the rest of the population.
    """
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-6, 1 - 1e-6)
    t = np.asarray(truth, dtype=bool)
    auc = float(roc_auc_score(t, p)) if 0 < t.sum() < t.size else math.nan
    return {"roc_auc": auc, "cross_entropy": float(log_loss(t, p, labels=[False, True])),
            "n": int(t.size), "positives": int(t.sum())}


def reliability_bins(prob: np.ndarray | list[float], truth: np.ndarray | list[bool], *,
                     n_bins: int = 5) -> list[dict[str, float]]:
    """The reliability diagram of a calibrated probability: ``n_bins`` equal-width bins of
    ``[0, 1]`` (a probability of exactly 1 falls in the last); for each non-empty bin its edges
    ``lo``, ``hi``, the number of models ``n``, their ``mean_probability`` and the
    ``share_backdoored`` among them. A calibrated detector has the two close in every bin."""
    p = np.asarray(prob, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape or p.ndim != 1:
        raise ConfigError(f"reliability_bins needs probabilities and truth of one length, got {p.shape} and {t.shape}")
    if n_bins < 1:
        raise ConfigError(f"reliability_bins needs n_bins >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ix = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = ix == b
        if sel.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                        "mean_probability": float(p[sel].mean()), "share_backdoored": float(t[sel].mean())})
    return out


#: The probability TrojAI's scoring gives a model the detector failed on.
FAILED_PROBABILITY = 0.5


def score_scan(rows: list[dict[str, Any]], truth: dict[str, dict[str, Any]], *, key: str = "probability",
               threshold: float = 0.5) -> dict[str, Any]:
    """Score a population scan against a round's truth (:func:`~trojanscope.rounds.load_truth`).

    Rows are matched to truth by the model file's stem; models the round excluded (attack too
    weak) are left out. A model that failed to scan, or has no ``key``, counts with probability
    :data:`FAILED_PROBABILITY` (as TrojAI scores a missing answer) and is counted in ``failed``.

    Returns:
        ``roc_auc``, ``cross_entropy`` (:func:`population_scores`), ``n``, ``positives``,
        ``false_positives`` / ``true_positives`` (probability > ``threshold``), ``a2o_target_flagged``
        (backdoored all-to-one models called backdoored whose target is among the flagged
        labels: ``flagged_labels`` and, for ``population_probability``, ``population_label``),
        ``detected_by_mode``, ``correct_by_arch`` (``"hits/models"`` strings), ``reliability``
        (:func:`reliability_bins`), ``failed``, ``unmatched`` (rows with no truth) and
        ``unscanned`` (truth with no row), and the per-model ``models`` (name, probability, truth).
    """
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("file"), str) for r in rows):
        raise ConfigError("a scan is a list of rows, each with a 'file' (the scan.json of `scan FOLDER`)")
    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    by_name = {Path(r["file"]).stem: r for r in rows}
    kept = {n: t for n, t in truth.items() if "excluded" not in t}
    models, failed = [], 0
    for name, t in sorted(kept.items()):
        r = by_name.get(name)
        if r is None:
            continue
        v = r.get(key)
        ok = r.get("error") is None and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and 0 <= v <= 1
        failed += not ok
        flagged = [int(k) for k in (r.get("flagged_labels") or []) if isinstance(k, int)]
        if key == "population_probability" and isinstance(r.get("population_label"), int):
            flagged.append(int(r["population_label"]))
        models.append({"name": name, "probability": float(v) if ok else FAILED_PROBABILITY,
                       "backdoored": bool(t.get("backdoored")), "mode": t.get("mode"), "arch": t.get("arch"),
                       "target": t.get("target"), "flagged": flagged})
    if not models:
        raise ConfigError("no scanned model matches the round's truth (rows are matched by file name)")
    prob = np.array([m["probability"] for m in models])
    tr = np.array([m["backdoored"] for m in models])
    called = prob > threshold
    out: dict[str, Any] = {"key": key, "threshold": threshold, **population_scores(prob, tr),
                           "false_positives": int((called & ~tr).sum()), "true_positives": int((called & tr).sum())}
    a2o = [(m, c) for m, c in zip(models, called) if m["backdoored"] and m["mode"] == "all-to-one"]
    out["a2o_target_flagged"] = f"{sum(bool(c) and m['target'] in m['flagged'] for m, c in a2o)}/{len(a2o)}"
    out["detected_by_mode"] = {}
    for mode in sorted({m["mode"] for m in models if m["backdoored"]}, key=str):
        sel = [bool(c) for m, c in zip(models, called) if m["backdoored"] and m["mode"] == mode]
        out["detected_by_mode"][str(mode)] = f"{sum(sel)}/{len(sel)}"
    out["correct_by_arch"] = {}
    for arch in sorted({str(m["arch"]) for m in models}):
        sel = [bool(c) == m["backdoored"] for m, c in zip(models, called) if str(m["arch"]) == arch]
        out["correct_by_arch"][arch] = f"{sum(sel)}/{len(sel)}"
    out.update(reliability=reliability_bins(prob, tr), failed=failed,
               unmatched=sorted(set(by_name) - set(truth)), unscanned=sorted(set(kept) - set(by_name)),
               models=[{k: m[k] for k in ("name", "probability", "backdoored", "mode", "arch")} for m in models])
    return out


def population_label_z(norms: np.ndarray | list, *, floor: float = 1e-3) -> np.ndarray:
    """``(M, ...)`` how far each label's reversed-trigger norm lies below what that label usually
    takes, across a population of ``M`` models of the same labels (lower = more suspicious).

    Some labels are easy to reach in every model of a data set (on digits, labels 2 and 4 take a
    trigger about 3x smaller than the others), so a label's norm says more against the same label
    in other models than against the other labels of its own model. With ``rel[m] = log
    norms[m] - median(log norms[m])`` (each model's own scale removed), ``usual`` the median of
    ``rel`` over the models and ``spread`` 1.4826 times its median absolute deviation (at least
    ``floor``): ``z = (rel - usual) / spread``. Medians over the models keep the statistics of a
    label robust to the few models whose backdoor targets it. ``norms`` is ``(M, K)`` label norms
    or ``(M, K, K)`` pair norms (source, target), whose NaN cells (the diagonal) are left out and
    stay NaN. Only the population's norms enter, never its truth. This is the toolkit's addition,
    not Neural Cleanse's; see benchmarks/README.md ("Population detection").
    """
    n = np.asarray(norms, dtype=np.float64)
    if n.ndim < 2 or n.shape[0] < 2 or n[0].size < 2:
        raise ConfigError(f"population_label_z needs an (M >= 2, K >= 2, ...) array of norms, got shape {n.shape}")
    cells = ~np.isnan(n)
    if not (cells == cells[:1]).all() or not cells[0].any():
        raise ConfigError("population_label_z: every model must have norms for the same cells")
    if np.isinf(n).any() or (n[cells] <= 0).any():
        raise ConfigError("population_label_z needs finite, positive norms")
    logn = np.log(np.where(cells, n, 1.0))
    logn[~cells] = np.nan
    flat = logn.reshape(n.shape[0], -1)
    rel = logn - np.nanmedian(flat, axis=1).reshape((-1,) + (1,) * (n.ndim - 1))
    with np.errstate(all="ignore"):
        usual = np.nanmedian(rel, axis=0, keepdims=True) if cells[0].all() else _nanmedian0(rel)
        spread = np.maximum(1.4826 * (np.nanmedian(np.abs(rel - usual), axis=0, keepdims=True)
                                      if cells[0].all() else _nanmedian0(np.abs(rel - usual))), floor)
    return (rel - usual) / spread


def _nanmedian0(a: np.ndarray) -> np.ndarray:
    """``nanmedian`` over axis 0, keepdims, NaN (without a warning) where a cell is NaN in every row."""
    out = np.full((1,) + a.shape[1:], np.nan)
    ok = ~np.isnan(a).all(0)
    out[0][ok] = np.nanmedian(a[:, ok], axis=0)
    return out


#: The fewest models of one label set that :func:`add_population_probability` normalises over: a
#: per-label median over fewer models is carried by the few whose backdoor targets that label.
MIN_POPULATION = 10
#: The fewest models of one architecture (``structure``) that are normalised against their own
#: architecture instead of the whole label set (architectures differ in which labels and pairs come
#: easy: label 0 and the pair 5 -> 3 on an MNIST BatchNorm ResNet). Chosen on the first held-out
#: rounds and checked on fresh ones (benchmarks/README.md, "Population detection").
MIN_STRUCTURE_POPULATION = 10


def _pair_matrix(r: dict[str, Any], k: int) -> np.ndarray | None:
    """A row's ``(K, K)`` pair norms with NaN on the diagonal, or None when it has none or any
    off-diagonal norm is missing or not finite."""
    m = r.get("pair_l1_norms")
    if not isinstance(m, list) or len(m) != k or any(not isinstance(row, list) or len(row) != k for row in m):
        return None
    a = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=np.float64)
    off = ~np.eye(k, dtype=bool)
    if not np.isfinite(a[off]).all() or (a[off] <= 0).any():
        return None
    a[~off] = np.nan
    return a


def model_structure(model: torch.nn.Module) -> str:
    """A fingerprint of a model's architecture: 12 hex digits of the SHA-1 of its state dict's
    tensor shapes and dtypes, in order (names, values and code left out). Two models of the same
    architecture, input size and label count share it; it is read from the loaded module's
    tensors only, so a hostile file can at worst make its model look like another architecture."""
    import hashlib

    h = hashlib.sha1()
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor):
            h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:12]


def _structure_groups(members: list[dict[str, Any]]) -> list[list[int]]:
    """Indices into ``members`` (rows of one label count) of each ``structure`` (architecture,
    :func:`model_structure`) with at least :data:`MIN_STRUCTURE_POPULATION` rows, when the members hold
    more than one structure."""
    by: dict[Any, list[int]] = {}
    for i, r in enumerate(members):
        by.setdefault(r.get("structure"), []).append(i)
    return [ix for s, ix in by.items() if s is not None and MIN_STRUCTURE_POPULATION <= len(ix) < len(members)]


def add_population_probability(rows: list[dict[str, Any]], schedule: str) -> None:
    """Add ``population_z`` (minus the lowest :func:`population_label_z` of the model's labels),
    ``population_label`` (that label) and ``population_probability`` to each scanned row, in place;
    with pair scans (``pair_l1_norms``) also ``population_pair_z`` and ``population_pair``
    (source, target), the same over the K x K pairs, and ``population_pair_rows_z``, the mean over
    the sources of each source's most anomalous pair: a backdoor that moves many sources (all-to-one,
    all-to-all) shows in every row, a natural confusion of one pair in one.

    The population is the rows that scanned (no ``error``) with finite norms for the same number
    of labels, at least :data:`MIN_POPULATION` of them; a model whose ``structure``
    (:func:`model_structure`) has at least :data:`MIN_STRUCTURE_POPULATION` members of its own is
    normalised against those (architectures differ in which labels come easy), the others against
    the whole label set.
    The probability is
    :func:`~trojanscope.defenses.model._nc_evidence.trojan_probability` of the row's evidence plus
    ``pop_z`` (and ``pair_pop_z``, ``pair_rows_pop_z``) under ``POPULATION_CALIBRATION[schedule + "+pairs"]`` when every
    member has pair norms and that calibration exists, else ``POPULATION_CALIBRATION[schedule]``.
    Other rows, and every row where there is no such calibration, get None. The per-model
    ``probability`` and ``verdict`` are left as they are.
    """
    from .defenses.model._nc_evidence import POPULATION_CALIBRATION, trojan_probability

    for r in rows:
        r["population_z"] = r["population_label"] = r["population_probability"] = None
        r["population_pair_z"] = r["population_pair"] = r["population_pair_rows_z"] = None
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        norms = r.get("l1_norms")
        if (r.get("error") is None and norms and r.get("evidence")
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in norms)):
            groups.setdefault(len(norms), []).append(r)
    for k, members in groups.items():
        if len(members) < MIN_POPULATION:
            continue
        subgroups = _structure_groups(members)

        def z_over(cells: list[np.ndarray]) -> np.ndarray:
            z = population_label_z(np.stack(cells))
            for ix in subgroups:  # an architecture with a population of its own: against its own
                z[ix] = population_label_z(np.stack([cells[i] for i in ix]))
            return z

        z = z_over([np.array([max(float(v), 1e-6) for v in r["l1_norms"]]) for r in members])
        extra = [{"pop_z": float(-zi.min())} for zi in z]
        for r, zi, e in zip(members, z, extra):
            r["population_z"], r["population_label"] = round(e["pop_z"], 4), int(zi.argmin())
        pairs = [_pair_matrix(r, k) for r in members]
        key = schedule
        if all(p is not None for p in pairs):
            pz = z_over(pairs)
            for r, zi, e in zip(members, pz, extra):
                e["pair_pop_z"] = float(-np.nanmin(zi))
                e["pair_rows_pop_z"] = float(np.mean(-np.nanmin(zi, axis=1)))
                r["population_pair_rows_z"] = round(e["pair_rows_pop_z"], 4)
                src, tgt = np.unravel_index(int(np.nanargmin(zi)), zi.shape)
                r["population_pair_z"], r["population_pair"] = round(e["pair_pop_z"], 4), [int(src), int(tgt)]
            key = f"{schedule}+pairs"
        cal = POPULATION_CALIBRATION.get(key) or POPULATION_CALIBRATION.get(schedule)
        if cal is None:
            continue
        for r, e in zip(members, extra):
            ev = {**r["evidence"], **e}
            if all(isinstance(ev.get(f), (int, float)) and math.isfinite(ev[f]) for f in cal["coef"]):
                r["population_probability"] = round(trojan_probability(ev, cal), 6)


# --- scanning a population ----------------------------------------------------------------------

#: The columns of a population scan's table (``scan.csv``).
SCAN_COLUMNS = ("file", "probability", "verdict", "flagged_labels", "seconds", "error", "population_probability",
                "population_label")


def expand_models(items: list[str | Path]) -> list[Path]:
    """The model files named by ``items``: files, folders (every non-hidden entry in them that is
    not a plain sub-folder, sorted: files, trojanscope model folders, and FIFOs, sockets or device
    files, which are listed so that their scan row says why they were refused instead of their
    being left out unseen) and glob patterns; duplicates removed, order kept."""
    import glob as _glob

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and not (p / "model.safetensors").exists():
            members = sorted(q for q in p.iterdir() if not q.name.startswith(".")
                             and (not q.is_dir() or (q / "model.safetensors").exists()))
            if not members:
                raise ConfigError(f"folder {p} holds no model files")
            out.extend(members)
        elif p.exists():
            out.append(p)
        elif any(ch in str(item) for ch in "*?["):
            hits = sorted(Path(h) for h in _glob.glob(str(item)) if not Path(h).name.startswith("."))
            if not hits:
                raise ConfigError(f"no model file matches {item!r}")
            out.extend(hits)
        else:
            raise ConfigError(f"model file {item} does not exist")
    seen: set[str] = set()
    uniq = []
    for p in out:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def _read_model_bytes(path: Path) -> dict[str, bytes]:
    """A model's files as bytes (a model folder's few files, or the one file), for a worker on
    another machine. Only regular files are read, and only within the memory budget
    (:func:`~trojanscope._utils.limits.check_alloc`): a FIFO would block the driver, a huge file
    would be read whole into its memory. Raises DataError / ResourceLimitError."""
    from ._utils.limits import check_alloc, require_regular_file

    files = ({q.name: q for q in sorted(path.iterdir()) if q.is_file()} if path.is_dir()
             else {"": require_regular_file(path, "model file")})
    check_alloc(sum(q.stat().st_size for q in files.values()), f"model file {path}")
    return {k: q.read_bytes() for k, q in files.items()}


def _materialise(blob: dict[str, bytes], name: str, tmp: Path) -> Path:
    """Write a model received as bytes to ``tmp`` (the loader reads files)."""
    if set(blob) == {""}:
        p = tmp / Path(name).name
        p.write_bytes(blob[""])
        return p
    d = tmp / (Path(name).name or "model")
    d.mkdir(parents=True, exist_ok=True)
    for k, v in blob.items():
        (d / Path(k).name).write_bytes(v)
    return d


def scan_one(model: str | Path | dict[str, bytes], data: ImageDataset, params: dict[str, Any], *,
             name: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Scan one model file with :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanse`.

    ``model`` is a path or the file's bytes (``{"": bytes}``, or ``{member: bytes}`` for a model
    folder). Never raises for a bad model: the row's ``error`` says what went wrong.

    Returns:
        a row: ``file``, ``probability``, ``verdict`` (``"backdoor"``, ``"clean"`` or
        ``"error"``), ``flagged_labels``, ``seconds``, ``error``, the scan's ``evidence`` and the
        model's ``clean_accuracy`` on the clean data.
    """
    import tempfile

    from .defenses.model.neural_cleanse import NeuralCleanse
    from .models import load_model
    from .training import torch_threads

    label = str(name if name is not None else model)
    t0 = time.perf_counter()
    row = _error_row(label, None)
    try:
        with torch_threads(None if threads is None else max(1, int(threads))), \
                tempfile.TemporaryDirectory(prefix="trojanscope-scan-") as tmp:
            path = _materialise(model, label, Path(tmp)) if isinstance(model, dict) else Path(model)
            lm = load_model(path, default_input_shape=data.image_shape)
            res = NeuralCleanse(**params).scan(lm.model, fit_to_model(data, lm))
        row.update(probability=round(float(res.probability), 6), verdict="backdoor" if res.infected else "clean",
                   flagged_labels=list(res.flagged_labels), format=lm.format,
                   structure=model_structure(lm.model),
                   evidence={k: v for k, v in res.evidence.items() if k != "calibration"},
                   suspects=res.details["suspects"], l1_norms=[round(float(v), 4) for v in res.l1_norms],
                   clean_accuracy=round(float(res.details["clean_accuracy"]), 4),
                   image_passes=res.image_passes)
        if res.pair_l1_norms is not None:  # (K, K), NaN (JSON null) on the diagonal
            row["pair_l1_norms"] = [[None if v != v else round(float(v), 4) for v in r] for r in res.pair_l1_norms.tolist()]
    except TrojanscopeError as e:
        row["error"] = str(e)
    except MemoryError:
        row["error"] = "out of memory; try a smaller --batch-size"
    except Exception as e:  # a hostile or broken model must not stop the population
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {msg}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _row_file(out: Path, path: Path) -> Path:
    import hashlib

    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return out / "rows" / f"{path.name}-{h}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{id(text)}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_scan_table(rows: list[dict[str, Any]], out: Path) -> None:
    """``out/scan.csv`` (the :data:`SCAN_COLUMNS`) and ``out/scan.json`` (all fields)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SCAN_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "flagged_labels": " ".join(str(v) for v in r.get("flagged_labels") or []),
                    "probability": "" if r.get("probability") is None else r["probability"],
                    "population_probability": "" if r.get("population_probability") is None else r["population_probability"],
                    "population_label": "" if r.get("population_label") is None else r["population_label"],
                    "error": r.get("error") or ""})
    _write_atomic(out / "scan.csv", buf.getvalue())
    _write_atomic(out / "scan.json", json.dumps(rows, indent=2) + "\n")


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def scan_population(models: list[Path], data: ImageDataset, params: dict[str, Any], *, workers: int = 1,
                    out: Path | None = None, address: str | None = None, backend: str = "auto",
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Scan every model of ``models`` (see :func:`scan_one`), ``workers`` at a time.

    Args:
        models: model files (see :func:`expand_models`).
        data: the clean data every model is scanned with.
        params: :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanse` settings.
        workers: models scanned at once. Above 1, over Ray when it is installed (or asked for
            with ``backend="ray"``), else over local processes; each worker gets ``cores //
            workers`` torch threads.
        out: a folder for the finished rows (``out/rows/*.json``, one per model, written as soon
            as the model is done) and the table (``out/scan.csv``, ``out/scan.json``). A model
            with a row there is not scanned again, so a killed run resumes.
        address: a Ray cluster (``ray://HOST:PORT``); default ``RAY_ADDRESS`` or a local
            instance.
        backend: ``"auto"``, ``"ray"``, ``"processes"`` or ``"serial"``.
        on_row: called with each new row (progress).

    Returns:
        one row per model, in the order of ``models``.
    """
    import os

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if backend not in ("auto", "ray", "processes", "serial"):
        raise ConfigError(f"unknown backend {backend!r}")
    setting = _setting_digest(data, params) if out is not None else ""
    rows, todo = _finished_rows(models, out, setting)

    def finish(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if out is not None:
            stamp = {"_stamp": _file_stamp(models[i], setting)}
            _write_atomic(_row_file(out, models[i]), json.dumps({**row, **stamp}, indent=2) + "\n")
        if on_row is not None:
            on_row(row)

    if backend == "auto":
        backend = "serial" if workers == 1 else ("ray" if _have_ray() else "processes")
    threads = max(1, _cores() // workers)
    if todo:
        log.info("scanning %d models (%d already done) with %s, %d worker(s), %d thread(s) each", len(todo),
                 len(models) - len(todo), backend, workers, threads)
    if backend == "serial" or not todo:
        for i in todo:
            finish(i, scan_one(models[i], data, params, name=str(models[i])))
    elif backend == "processes":
        _scan_processes(models, todo, data, params, workers, threads, finish)
    else:
        _scan_ray(models, todo, data, params, workers, threads, address or os.environ.get("RAY_ADDRESS"), finish)
    result = [rows[i] for i in range(len(models))]
    add_population_probability(result, str(params.get("schedule", "all")))
    if out is not None:
        write_scan_table(result, out)
    return result


def _setting_digest(data: ImageDataset, params: dict[str, Any]) -> str:
    """What a stored row was scanned with: the scan settings as Neural Cleanse resolves them (so two
    spellings of the same settings agree) and the clean data's images and labels."""
    import hashlib

    from ._utils.results import to_jsonable
    from .defenses.model.neural_cleanse import NeuralCleanse

    try:
        resolved = {k: v for k, v in NeuralCleanse(**params).get_params().items() if k != "device"}
    except Exception:  # settings it refuses: every model's row will say so; digest them as given
        resolved = dict(params)
    h = hashlib.sha256(json.dumps(to_jsonable(resolved), sort_keys=True, default=str).encode())
    h.update(f"{tuple(data.x.shape)}:{data.num_classes};".encode())
    h.update(data.x.contiguous().numpy().tobytes())
    h.update(data.y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_stamp(path: Path, setting: str) -> str:
    """A stored row's claim to be current: the model file's size and modification time, and the
    settings it was scanned with (:func:`_setting_digest`)."""
    try:
        st = Path(path).stat()
        return f"{st.st_size}:{st.st_mtime_ns}:{setting}"
    except OSError:
        return f"missing:{setting}"


def _finished_rows(models: list[Path], out: Path | None,
                   setting: str = "") -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The rows already in ``out/rows`` by model index, and the indices still to scan: those without
    a row, those whose worker died (``error`` "worker failed: ...": the model gets another try, not a
    verdict), and those whose model file or scan settings changed since (:func:`_file_stamp`), so a
    replaced model or a rerun with other settings never gets another run's verdict. (Rows written
    before the stamp existed have none and are kept.)"""
    rows: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, p in enumerate(models):
        rf = _row_file(out, p) if out is not None else None
        if rf is not None and rf.exists():
            try:
                row = read_json_file(rf, "stored scan row")
                stamp = row.pop("_stamp", None) if isinstance(row, dict) else None
                if (isinstance(row, dict) and not str(row.get("error") or "").startswith("worker failed:")
                        and stamp in (None, _file_stamp(p, setting))):
                    rows[i] = row
                    continue
            except (OSError, ValueError, TrojanscopeError):  # unreadable: scanned again
                pass
        todo.append(i)
    return rows, todo


def _error_row(file: str, error: str | None) -> dict[str, Any]:
    """A row with no result: the model could not be scanned (``error`` says why)."""
    return {"file": file, "probability": None, "verdict": "error", "flagged_labels": [], "seconds": 0.0,
            "error": error}


def _scan_processes(models: list[Path], todo: list[int], data: ImageDataset, params: dict[str, Any], workers: int,
                    threads: int, finish: Callable[[int, dict[str, Any]], None]) -> None:
    """Fan the scans out over ``workers`` local (spawned) processes."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                initializer=_init_worker, initargs=(data, params, threads)) as ex:
        futs = {ex.submit(_worker_scan, str(models[i])): i for i in todo}
        for f in cf.as_completed(futs):
            i = futs[f]
            try:
                row = f.result()
            except Exception as e:  # a worker died (e.g. killed for memory)
                row = _error_row(str(models[i]), f"worker failed: {type(e).__name__}: {e}")
            finish(i, row)


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


_WORKER: dict[str, Any] = {}


def _init_worker(data: ImageDataset, params: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(data=data, params=params)


def _worker_scan(path: str) -> dict[str, Any]:
    return scan_one(path, _WORKER["data"], _WORKER["params"], name=path)


def _scan_ray(models: list[Path], todo: list[int], data: ImageDataset, params: dict[str, Any], workers: int,
              threads: int, address: str | None, finish: Callable[[int, dict[str, Any]], None]) -> None:
    """Fan the scans out over Ray: the data and each model's bytes travel as object references."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--workers over Ray needs Ray: pip install 'trojanscope[cluster]'") from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=workers, **kw)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(scan_one)
        data_ref = ray.put(data)
        pending = {}
        nxt = 0
        while nxt < len(todo) or pending:
            while nxt < len(todo) and len(pending) < workers:
                i = todo[nxt]
                nxt += 1
                try:
                    blob = _read_model_bytes(models[i])
                except (TrojanscopeError, OSError) as e:  # refused before any worker sees it
                    finish(i, _error_row(str(models[i]), str(e)))
                    continue
                ref = remote.remote(ray.put(blob), data_ref, params, name=str(models[i]), threads=threads)
                pending[ref] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:  # the task's worker died
                    row = _error_row(str(models[i]), f"worker failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                finish(i, row)
    finally:
        if started:
            ray.shutdown()
