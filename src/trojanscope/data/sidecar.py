"""Per-sample side files: the provenance group of each sample (``inspect-data --provenance``), the
0/1 "triggered" labels of filtered inputs (``filter --truth``) and the ``is_poison`` array of a
training set written by ``trojanscope poison``. The truth labels only score a result; no defence
reads them. Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils.limits import check_alloc, require_regular_file
from ..errors import DataError
from ._npy import load_npy, read_npz

#: Arrays of an inputs' ``.npz`` that say which inputs carry a trigger.
TRUTH_KEYS = ("triggered", "is_poison")


def read_truth(path: Path | None, data_spec: str, n: int) -> np.ndarray | None:
    """The triggered-or-not labels: from ``--truth`` (.npy, .json list, or text of 0/1), else from
    an array ``triggered`` / ``is_poison`` in the inputs' .npz; None when neither is there."""
    arr: Any = None
    if path is not None:
        p = require_regular_file(path, "--truth file")
        try:
            if p.suffix == ".npy":
                arr = load_npy(p, "--truth file")
            else:
                check_alloc(p.stat().st_size * 16, f"--truth file {p.name}")
                text = p.read_text()
                if p.suffix == ".json":
                    arr = np.asarray(json.loads(text))
                else:
                    arr = np.asarray([float(v) for v in text.replace(",", " ").split()])
        except (ValueError, OSError, json.JSONDecodeError, RecursionError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"--truth {p}: cannot read 0/1 labels ({type(e).__name__}: {str(e)[:120]})") from None
    elif data_spec.endswith(".npz") and Path(data_spec).is_file():
        found = read_npz(data_spec, wanted=TRUTH_KEYS)
        arr = next((found[k] for k in TRUTH_KEYS if k in found), None)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"the truth labels must be numbers 0 or 1, got {arr.dtype} values")
    arr = arr.reshape(-1)
    if arr.shape[0] != n:
        raise DataError(f"the truth labels hold {arr.shape[0]} values for {n} inputs")
    if not np.isin(arr, (0, 1)).all():
        raise DataError("the truth labels must be 0 (clean) or 1 (triggered)")
    return arr.astype(bool)


# --- streamed inputs ------------------------------------------------------------------------------

def read_groups(path: Path, n: int) -> torch.Tensor:
    """One integer provenance segment per sample from an .npy, .txt, .json or an .npz's ``groups``."""
    require_regular_file(path, "provenance file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = load_npy(path, "provenance file")
        elif suffix == ".npz":
            found = read_npz(path, what="provenance file", wanted=("groups",))
            if "groups" not in found:
                raise DataError(f"{path}: an .npz provenance file needs a 'groups' array, found {sorted(found)}")
            arr = found["groups"]
        else:
            check_alloc(path.stat().st_size * 16, f"provenance file {path.name}")
            if suffix == ".json":
                arr = np.asarray(json.loads(path.read_text()))
            else:
                arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (ValueError, OSError, json.JSONDecodeError, RecursionError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read provenance file {path}: {type(e).__name__}: {str(e)[:120]}") from None
    arr = np.asarray(arr)
    if arr.dtype.hasobject or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{path}: provenance values must be non-negative integers, got {arr.dtype} values")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{path}: need one provenance value per sample ({n}), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)) or \
            not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)) or (arr.size and (arr.min() < 0 or arr.max() >= 2**53)):
        raise DataError(f"{path}: provenance values must be non-negative integers")
    return torch.from_numpy(arr.astype(np.int64))


def ground_truth(spec: str, n: int) -> np.ndarray | None:
    """The ``is_poison`` array of an ``.npz`` data file (as ``trojanscope poison`` writes in
    ``train.npz``), or None when the data is not such a file. Used only to score the result."""
    p = Path(spec)
    if p.suffix.lower() != ".npz" or not p.is_file():
        return None
    arr = read_npz(p, wanted=("is_poison",)).get("is_poison")  # headers checked, no pickle
    if arr is None:
        return None
    if arr.ndim != 1 or arr.shape[0] != n or not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
        raise DataError(f"{p}: is_poison must hold one 0/1 value per sample ({n}), got shape {arr.shape}")
    return arr.astype(bool)
