"""Shared pieces of the CLI: options, loading arguments, output. No defence logic lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from .._utils import limits
from .._utils.results import to_jsonable
from .._utils.validation import MAX_CLASSES
from ..data import ImageDataset, load_data
from ..data.dataset import fit_to_model
from ..errors import ConfigError, DataError
from ..models import LoadedModel, load_model
from ..triggers import Trigger


# --- argument types: every numeric option is range-checked by click (one `error:` line, exit 2) ---

POSITIVE_INT = click.IntRange(min=1)
"""A count that must be at least 1 (``--batch-size``, ``--epochs``, ``--n-samples`` ...)."""
NON_NEGATIVE_INT = click.IntRange(min=0)
"""A label, a seed, a count that may be 0 (``--show``)."""
SEED = click.IntRange(min=0, max=2**63 - 1)


class FiniteFloat(click.ParamType):
    """A float that is finite and inside ``(low, high)``, each end open or closed."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _range(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)) or \
                self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            self.fail(f"{value!r} is not in {self._range()}", param, ctx)
        return v


PROBABILITY = FiniteFloat(0.0, 1.0, low_open=True)
"""A share in (0, 1] (``--rate``)."""
OPEN_UNIT = FiniteFloat(0.0, 1.0, low_open=True, high_open=True)
"""A rate in (0, 1) (``--frr``, ``--epsilon``)."""
POSITIVE_FLOAT = FiniteFloat(0.0, None, low_open=True)
"""A step size (``--lr``)."""


class MemorySize(click.ParamType):
    """``512M``, ``4G``, ``1000000`` -> bytes (``--max-memory``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return limits.parse_size(value)
        except Exception as e:  # ResourceLimitError: one sentence
            self.fail(str(e), param, ctx)


MEMORY_SIZE = MemorySize()


class Device(click.ParamType):
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to exist on this machine."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, torch.device):
            value = str(value)
        try:
            dev = torch.device(str(value))
        except (RuntimeError, ValueError, TypeError):
            self.fail(f"{value!r} is not a device; use cpu, cuda, cuda:N or mps", param, ctx)
        if dev.type == "cpu":
            return str(dev)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                self.fail(f"{value!r}: CUDA is not available on this machine (use --device cpu)", param, ctx)
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", param, ctx)
            return str(dev)
        if dev.type == "mps":
            if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
                self.fail(f"{value!r}: MPS is not available on this machine (use --device cpu)", param, ctx)
            return str(dev)
        self.fail(f"{value!r}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps", param, ctx)


DEVICE = Device()


def pick_device(device: str | None) -> torch.device:
    """The CLI alone picks CUDA when present (the library follows the model)."""
    if device:
        return torch.device(DEVICE.convert(device, None, None))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- output paths: checked writable before any computation ---

def _first_existing(p: Path) -> Path:
    q = p.absolute()
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def _probe_dir(d: Path, option: str, target: Path) -> None:
    """Create and remove a file in ``d``: the only check that holds for root, read-only mounts and
    pseudo file systems alike."""
    try:
        fd, name = tempfile.mkstemp(prefix=".trojanscope-write-check-", dir=d)
    except OSError as e:
        raise ConfigError(f"{option} {target}: cannot write in {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _existing(p: Path, option: str) -> os.stat_result | None:
    """The status of output path ``p`` (after following links) if it exists, even as a dangling
    link (which is refused); None when nothing is there yet."""
    if not os.path.lexists(p):
        return None
    try:
        return p.stat()
    except OSError as e:
        raise ConfigError(f"{option} {p}: {e.strerror or e}") from None


def check_output_file(path: Path | str | None, option: str) -> None:
    """Refuse an output file (``--json``, ``--report``, ``--heatmap``) that cannot be written, before
    anything is computed: a directory, a device, a path under a regular file, an unwritable folder.
    ``-`` (stdout) and None pass. Nothing is created."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    st = _existing(p, option)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{option} {p} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            if os.path.realpath(p) == os.devnull:
                return
            raise ConfigError(f"{option} {p} is not a regular file (a device, FIFO or socket); give a file name"
                              + (" or '-' for stdout" if option == "--json" else ""))
        try:
            with open(p, "ab"):
                pass
        except OSError as e:
            raise ConfigError(f"{option} {p}: cannot write ({e.strerror or e})") from None
        return
    _check_parent(p, option)


def check_output_dir(path: Path | str | None, option: str = "--out") -> None:
    """Refuse an output directory that is a file, sits under a file or cannot be written, before
    anything is computed. Nothing is created."""
    if path is None:
        return
    p = Path(path)
    st = _existing(p, option)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{option} {p} exists and is not a directory")
        _probe_dir(p, option, p)
        return
    _check_parent(p, option)


def _check_parent(p: Path, option: str) -> None:
    anc = _first_existing(p.parent if str(p.parent) else Path("."))
    try:
        st = anc.stat()
    except OSError as e:
        raise ConfigError(f"{option} {p}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{option} {p} lies under {anc}, which is not a directory")
    _probe_dir(anc, option, p)


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


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    if v is None:
        return "-"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
          headers: dict[str, str] | None = None, percent: Sequence[str] = ()) -> str:
    """A plain aligned text table; ``percent`` columns are shown as percentages."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    heads = [(headers or {}).get(c, c) for c in cols]
    def cell(r: dict[str, Any], c: str) -> str:
        v = r.get(c)
        if c in percent and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{100 * v:.1f}%"
        if c == "seconds" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v:.1f}"
        return fmt(v)
    body = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(out)


def _numeric(s: str) -> bool:
    return s.replace(".", "", 1).replace("%", "").replace("-", "", 1).isdigit()


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


def checked_params(factory: Callable[..., Any], items: Sequence[str], who: str,
                   hidden: tuple[str, ...] = ("self",)) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for the constructor of ``factory`` (a registered class, named ``who``
    in the error); a key it does not take is an error listing those it takes (but ``hidden``)."""
    import inspect

    kwargs = parse_params(items)
    sig = inspect.signature(factory.__init__).parameters  # type: ignore[misc]
    unknown = sorted(set(kwargs) - set(sig))
    if unknown:
        raise ConfigError(f"{who} takes no parameter {', '.join(unknown)}; "
                          f"it takes {', '.join(p for p in sig if p not in hidden)}")
    return kwargs


def defence_params(method: str, items: Sequence[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` pairs for the registered defence ``method``; an unknown key is an error."""
    from ..defenses import DEFENSES

    return checked_params(DEFENSES.get(method), items, method, ("self", "device"))
