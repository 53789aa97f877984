"""``trojanscope filter``: score run-time inputs with an input filter (STRIP by default).

The filter is fitted on the defender's clean data (``--fit``), which sets the threshold from the
target false-rejection rate; then every input of ``--data`` gets a score (higher = more
suspicious), a decision and the forward passes it cost (STRIP's overlays; 1 for one-pass
filters). When it is known which inputs carry a trigger (``--truth FILE``, or an array
``triggered`` / ``is_poison`` inside the inputs' ``.npz``), the FAR and FRR are reported.

``--data`` as an ``.npz`` or a folder is *streamed*: ``--chunk-size`` inputs are read, decided
and written at a time, so memory stays bounded whatever the number of inputs (only the per-input
figures are kept). An ``.npz`` needs only an array ``x``; its images are read chunk by chunk from
the archive. A folder's images (any depth, sorted by path) are converted to the model's channels
and resized to its input size.
"""

from __future__ import annotations

import csv
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from .._utils.limits import MAX_IMAGE_PIXELS, check_alloc, require_regular_file
from ..defenses import DEFENSES, create, list_defenses
from ..errors import ConfigError, DataError
from ..metrics import detection_metrics
from . import cli
from ._common import NON_NEGATIVE_INT, OPEN_UNIT, POSITIVE_INT, defence_params, common_options, model_options, open_data, open_model, table, write_json

TRUTH_KEYS = ("triggered", "is_poison")
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def read_truth(path: Path | None, data_spec: str, n: int) -> np.ndarray | None:
    """The triggered-or-not labels: from ``--truth`` (.npy, .json list, or text of 0/1), else from
    an array ``triggered`` / ``is_poison`` in the inputs' .npz; None when neither is there."""
    from .._utils.limits import check_alloc, require_regular_file
    from ..data.loaders import load_npy, read_npz

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

def _to_nchw(a: np.ndarray, shape: tuple[int, int, int], name: str) -> torch.Tensor:
    """uint8 ``(n, H, W)`` / ``(n, H, W, C)`` scaled by 1/255, or float ``(n, C, H, W)`` /
    ``(n, H, W)`` kept, as float32 ``(n, C, H, W)``; checked against the model's ``shape``."""
    if a.dtype == np.uint8:
        a = a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0)
    else:
        a = a[:, None] if a.ndim == 3 else a
        t = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # a copy: frombuffer is read-only
    if tuple(t.shape[1:]) != tuple(shape):
        raise DataError(f"{name}: the images are {tuple(t.shape[1:])} but the model expects {tuple(shape)}")
    return t


class NpzStream:
    """The array ``x`` of an ``.npz``, read ``chunk`` images at a time straight from the archive
    (nothing unpickled; the header's shape is checked against the member's real size)."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        self.path, self.shape, self.name = require_regular_file(path, "input data"), shape, path.name
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if len(names) != len(set(names)):
                    raise DataError(f"{path}: the archive holds two members of one name (readers disagree on which counts)")
                if "x.npy" not in names:
                    raise DataError(f"{path}: an .npz of inputs must hold an array 'x', found "
                                    f"{sorted(n.removesuffix('.npy') for n in z.namelist())}")
                info = z.getinfo("x.npy")
                with z.open(info) as f:
                    self._header(f, info.file_size)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"cannot read {path} as .npz: {e}") from None

    def _header(self, f: Any, size: int) -> None:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise DataError(f"{self.path}: unsupported .npy version {version}")
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise DataError(f"{self.path}: x holds Python objects (refused: reading them would unpickle)")
        if not (dtype == np.uint8 or dtype.kind == "f"):
            raise DataError(f"{self.path}: x must be uint8 or float images, got dtype {dtype}")
        if fortran or len(shape) not in (3, 4) or 0 in shape:
            raise DataError(f"{self.path}: x must be a non-empty C-ordered (N, H, W), (N, H, W, C) or (N, C, H, W) "
                            f"array, got shape {shape}{' (Fortran order)' if fortran else ''}")
        self.offset = f.tell()
        self.row = int(np.prod(shape[1:])) * dtype.itemsize
        if self.offset + shape[0] * self.row != size:
            raise DataError(f"{self.path}: x declares shape {shape} ({dtype}) but holds {size - self.offset} bytes")
        self.n, self.dtype, self.array_shape = int(shape[0]), dtype, tuple(shape)

    def chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        check_alloc(min(chunk, self.n) * self.row * 3, f"a chunk of {chunk} images of {self.path.name}")
        with zipfile.ZipFile(self.path) as z, z.open("x.npy") as f:
            f.read(self.offset)
            for i in range(0, self.n, chunk):
                k = min(chunk, self.n - i)
                buf = f.read(k * self.row)
                if len(buf) != k * self.row:
                    raise DataError(f"{self.path}: x ends early at image {i}")
                a = np.frombuffer(buf, dtype=self.dtype).reshape((k, *self.array_shape[1:]))
                yield _to_nchw(a, self.shape, self.name), None


class FolderStream:
    """The images under a folder (any depth, sorted by path), converted to the model's channels
    and resized to its input size, read ``chunk`` at a time."""

    def __init__(self, root: Path, shape: tuple[int, int, int]) -> None:
        self.root, self.shape, self.name = root, shape, root.name
        if shape[0] not in (1, 3):
            raise DataError(f"images from a folder need a model of 1 or 3 channels, not {shape[0]}")
        self.files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file()),
                            key=lambda p: p.relative_to(root).parts)
        if not self.files:
            raise DataError(f"{root}: no images found")
        self.n = len(self.files)

    def chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.shape
        check_alloc(min(chunk, self.n) * c * h * w * 4, f"a chunk of {chunk} images")
        for i in range(0, self.n, chunk):
            files, xs = self.files[i:i + chunk], []
            for f in files:
                try:
                    with Image.open(f) as im:
                        if im.width * im.height > MAX_IMAGE_PIXELS:
                            raise DataError(f"image {f} has {im.width} x {im.height} pixels, over the budget of "
                                            f"{MAX_IMAGE_PIXELS}")
                        im = im.convert("L" if c == 1 else "RGB")
                        if (im.height, im.width) != (h, w):
                            im = im.resize((w, h), Image.BILINEAR)
                        a = np.asarray(im, dtype=np.float32) / 255.0
                except DataError:
                    raise
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                    raise DataError(f"cannot read image {f}: {e}") from None
                xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            yield torch.from_numpy(np.stack(xs)), [str(f.relative_to(self.root)) for f in files]


class MemoryStream:
    """A dataset already in memory (a bundled set), served in chunks."""

    def __init__(self, x: torch.Tensor, name: str) -> None:
        self.x, self.name, self.n = x, name, int(x.shape[0])

    def chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        for i in range(0, self.n, chunk):
            yield self.x[i:i + chunk], None


def open_stream(spec: str, lm: Any) -> NpzStream | FolderStream | MemoryStream:
    """``--data`` as a stream: an .npz or a folder read lazily, anything else loaded whole."""
    p = Path(spec)
    shape = tuple(lm.spec.input_shape)
    if p.suffix == ".npz" and p.is_file():
        return NpzStream(p, shape)  # type: ignore[arg-type]
    if p.is_dir():
        return FolderStream(p, shape)  # type: ignore[arg-type]
    data = open_data(spec, default_split="test", model=lm)
    return MemoryStream(data.x, data.name)


def decide_chunk(filt: Any, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, decisions and forward passes per input of one chunk (``start``: its place in the
    stream, which picks STRIP's overlays)."""
    if hasattr(filt, "decide"):
        d = filt.decide(x, start=start)
        return d.scores.float().cpu(), d.flagged.cpu(), d.n_overlays.cpu()
    s = filt.score(x).float().cpu()
    return s, s > filt.threshold_, torch.ones(s.shape[0], dtype=torch.long)


def _decide_stream(filt: Any, source: Any, method: str, chunk_size: int, csv_path: Path | None,
                   is_trig: np.ndarray | None, quiet: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Decide every input of ``source``, chunk by chunk, writing the CSV rows as they come.
    Returns ``(scores, flagged, forward passes, paths)`` (paths empty for in-memory data)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=source.n, desc=method, unit="input", file=sys.stderr, disable=quiet or not sys.stderr.isatty())
    scores_l, flagged_l, passes_l, paths = [], [], [], []
    csv_file = None
    try:
        if csv_path is not None:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            csv_file = csv_path.open("w", newline="")
            writer = csv.writer(csv_file)
            header = ["index", "score", "flagged", "overlays"]
        start = 0
        for x, names in source.chunks(chunk_size):
            s, f, u = decide_chunk(filt, x, start)
            if csv_file is not None:
                if start == 0:
                    writer.writerow(header + (["path"] if names else []) + (["triggered"] if is_trig is not None else []))
                for j in range(s.shape[0]):
                    writer.writerow([start + j, f"{float(s[j]):.6g}", int(f[j]), int(u[j])]
                                    + ([names[j]] if names else []) + ([int(is_trig[start + j])] if is_trig is not None else []))
            scores_l.append(s)
            flagged_l.append(f)
            passes_l.append(u)
            if names:
                paths += names
            start += s.shape[0]
            bar.update(s.shape[0])
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
    return torch.cat(scores_l), torch.cat(flagged_l), torch.cat(passes_l), paths


@cli.command(name="filter")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--fit", "fit_spec", required=True,
              help="The defender's clean data to fit the filter on: bundled name[:split] (default split: val), .npz or folder.")
@click.option("--data", "data_spec", required=True,
              help="The inputs to score: bundled name[:split] (default split: test), or an .npz (array x) or a folder "
                   "of images, streamed.")
@click.option("--method", type=click.Choice(list_defenses("input")), default="strip", show_default=True,
              help="The input filter.")
@click.option("--frr", type=OPEN_UNIT, default=0.01, show_default=True, help="Target false-rejection rate on clean inputs.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Another constructor argument of the filter (e.g. -p n_overlays=50, -p early_stop=false); repeatable.")
@click.option("--truth", type=click.Path(path_type=Path), default=None,
              help="0/1 per input (1 = triggered): .npy, .json list or text; default: an array 'triggered' or "
                   "'is_poison' in the --data .npz.")
@click.option("--chunk-size", type=POSITIVE_INT, default=1024, show_default=True,
              help="Inputs read and decided at a time (bounds memory; results do not depend on it).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one row per input (index, score, flagged, overlays, [path], [triggered]) as the inputs are decided.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="CPU threads for torch (default: torch's).")
@click.option("--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
@click.option("--show", type=NON_NEGATIVE_INT, default=20, show_default=True, help="Inputs listed on screen (all are in --json).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (score histograms and the threshold).")
@model_options
@common_options
def filter_(model_path: Path, fit_spec: str, data_spec: str, method: str, frr: float, params: tuple[str, ...],
            truth: Path | None, chunk_size: int, csv_path: Path | None, threads: int | None, quiet: bool, show: int,
            report_path: Path | None, arch: str | None, input_shape: str | None, num_classes: int | None,
            json_path: Path | None, seed: int, device: str | None) -> None:
    """Fit an input filter on clean data and flag the suspicious inputs of --data."""
    if chunk_size < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"--chunk-size and --threads must be >= 1, got {chunk_size} and {threads}")
    if threads is not None:
        torch.set_num_threads(threads)
    if truth is not None:
        from .._utils.limits import require_regular_file

        require_regular_file(truth, "--truth file")  # before the filter is fitted
    lm = open_model(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device)
    clean = open_data(fit_spec, default_split="val", model=lm)
    source = open_stream(data_spec, lm)
    is_trig = read_truth(truth, data_spec, source.n)
    kwargs = defence_params(method, params)
    defaults = DEFENSES.get(method).param_defaults()
    for k, v in (("frr", frr), ("seed", seed)):
        if k in defaults:
            kwargs.setdefault(k, v)
    filt = create(method, **kwargs)
    filt.fit(lm.model, clean)  # type: ignore[attr-defined]
    thr = float(filt.threshold_)  # type: ignore[attr-defined]
    scores, flagged, passes, paths = _decide_stream(filt, source, method, chunk_size, csv_path, is_trig, quiet)
    n = int(scores.shape[0])
    result: dict[str, Any] = {"model": str(model_path), "method": method, "params": filt.get_params(),
                              "fit": clean.name, "data": source.name, "n": n, "threshold": thr,
                              "n_flagged": int(flagged.sum()), "mean_overlays": float(passes.double().mean()),
                              "scores": scores, "flagged": flagged, "overlays": passes}
    if paths:
        result["paths"] = paths
    summary: dict[str, Any] = {"n": n, "flagged": int(flagged.sum()), "threshold": thr,
                               "mean_overlays": float(passes.double().mean())}
    if is_trig is not None:
        t = torch.from_numpy(is_trig)
        m = detection_metrics(scores, t, flagged)
        far = float((~flagged[t]).float().mean()) if bool(t.any()) else None
        frr_m = float(flagged[~t].float().mean()) if bool((~t).any()) else None
        result.update(truth=t, far=far, frr=frr_m, auroc=m["auroc"])
        summary.update(far=far, frr=frr_m, auroc=m["auroc"])
    rows = [{"input": paths[i] if paths else i, "score": float(scores[i]), "flagged": bool(flagged[i]),
             "overlays": int(passes[i]), **({"triggered": bool(is_trig[i])} if is_trig is not None else {})}
            for i in range(min(show, n))]
    if rows:
        click.echo(table(rows))
        if n > len(rows):
            click.echo(f"... {n - len(rows)} more inputs (see --json / --csv)")
        click.echo()
    click.echo(table([summary], percent=[c for c in ("far", "frr") if c in summary]))
    write_json(json_path, result)
    if report_path is not None:
        from ..report import filter_section, write_report

        write_report(report_path, [filter_section(method, scores, thr, truth=None if is_trig is None else torch.from_numpy(is_trig),
                                                  clean_scores=getattr(filt, "clean_scores_", None), params=filt.get_params())],
                     title=f"{method} on {source.name}")
        click.echo(f"report: {report_path}")
