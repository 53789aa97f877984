"""Shared pieces of the CLI: the common options, loading arguments, output. No defence logic lives
here (the defence options are generated in ``_options.py``)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from .._utils.results import to_jsonable
from .._utils.validation import MAX_CLASSES
from ..data import ImageDataset, load_data
from ..data.dataset import fit_to_model
from ..errors import ConfigError, DataError
from ..models import LoadedModel, load_model
from ..triggers import Trigger
from ._paths import check_output_dir, check_output_file
from ._table import columns, fmt, table
from ._types import (DEVICE, MEMORY_SIZE, NON_NEGATIVE_INT, OPEN_UNIT, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY, SEED,
                     FiniteFloat, pick_device)

__all__ = ["DEVICE", "MEMORY_SIZE", "NON_NEGATIVE_INT", "OPEN_UNIT", "POSITIVE_FLOAT", "POSITIVE_INT", "PROBABILITY",
           "SEED", "FiniteFloat", "check_output_dir", "check_output_file", "columns", "common_options", "debug", "fit_to_model",
           "fmt", "model_options", "open_data", "open_model", "parse_params", "parse_shape", "parse_trigger",
           "pick_device", "table", "write_json"]


def common_options(f: Callable) -> Callable:
    """``--json PATH``, ``--seed`` and ``--device`` on every command; ``--json`` is checked writable
    before the command runs."""
    f = click.option("--device", type=DEVICE, default=None,
                     help="cpu, cuda, cuda:1... (default: CUDA when present)")(f)
    f = click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for every random choice.")(f)
    f = click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
                     help="Also write the result as JSON to this file ('-' for stdout).")(f)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_output_file(kwargs.get("json_path"), "--json")
        for key, option in (("report_path", "--report"), ("heatmap_path", "--heatmap")):
            check_output_file(kwargs.get(key), option)
        if "out" in kwargs:
            check_output_dir(kwargs.get("out"), "--out")
        seed = kwargs.get("seed")
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
        if str(kwargs.get("json_path")) != "-":
            return f(*args, **kwargs)
        # --json -: stdout holds the JSON alone (pipe it to a parser); the tables and messages go to stderr
        global _json_stdout
        _json_stdout = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return f(*args, **kwargs)
        finally:
            _json_stdout = None
    return wrapper


#: The real stdout while a command runs with ``--json -`` (its ordinary output goes to stderr).
_json_stdout: Any = None


def model_options(f: Callable) -> Callable:
    """Options to interpret a model file that does not describe itself (state dicts)."""
    f = click.option("--num-classes", type=click.IntRange(min=1, max=MAX_CLASSES), default=None, help="Number of classes (state dicts, programs).")(f)
    f = click.option("--input-shape", default=None, help="C,H,W of the inputs (state dicts, programs).")(f)
    f = click.option("--arch", default=None, help="Architecture of a bare state dict (see `trojanscope models`).")(f)
    return f


def parse_shape(s: str | None) -> tuple[int, int, int] | None:
    if s is None:
        return None
    try:
        shape = tuple(int(v) for v in s.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"--input-shape must be C,H,W (e.g. 1,28,28), got {s!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be three positive integers C,H,W, got {s!r}")
    return shape  # type: ignore[return-value]


def open_model(path: str | Path, *, arch: str | None = None, input_shape: str | None = None,
               num_classes: int | None = None, device: str | None = None,
               data: ImageDataset | None = None) -> LoadedModel:
    """Load a model argument safely and move it to the CLI's device.

    With ``data``, a model file that does not state its input shape (TorchScript, a state dict)
    takes the data's, so ``--input-shape`` is needed only to override it.
    """
    lm = load_model(path, arch=arch, input_shape=parse_shape(input_shape), num_classes=num_classes,
                    default_input_shape=None if data is None else data.image_shape)
    lm.model.to(pick_device(device))
    return lm


def open_data(spec: str, *, default_split: str = "test", model: LoadedModel | None = None) -> ImageDataset:
    """Load a data argument; with a model, check that the shapes and labels fit it."""
    data = load_data(spec, default_split=default_split)  # type: ignore[arg-type]
    return fit_to_model(data, model) if model is not None else data


def parse_trigger(spec: str, image_shape: tuple[int, int, int]) -> Trigger:
    return Trigger.parse(spec, image_shape)


def write_json(path: Path | None, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` (``-`` = stdout); nothing when ``path`` is None."""
    if path is None:
        return
    text = json.dumps(to_jsonable(obj), indent=2) + "\n"
    if str(path) == "-":
        out = _json_stdout if _json_stdout is not None else sys.stdout
        out.write(text)
        out.flush()
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as e:
            raise DataError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """Run the block on ``threads`` CPU threads: torch's and the BLAS of numpy / scikit-learn
    (threadpoolctl); torch's count is given back afterwards. None leaves both as they are."""
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def debug() -> bool:
    return os.environ.get("TROJANSCOPE_DEBUG", "") not in ("", "0")


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value is read as JSON when it parses (numbers, true/false, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = val
    return out
