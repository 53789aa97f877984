"""``trojanscope filter``: score run-time inputs with an input filter (STRIP by default).

The filter is fitted on the defender's clean data (``--fit``), which sets the threshold from the
target false-rejection rate; then every input of ``--data`` gets a score (higher = more
suspicious), a decision and the forward passes it cost (STRIP's overlays; 1 for one-pass
filters). When it is known which inputs carry a trigger (``--truth FILE``, or an array
``triggered`` / ``is_poison`` inside the inputs' ``.npz``), the FAR and FRR are reported.

``--data`` as an ``.npz`` or a folder is *streamed* (:mod:`trojanscope.data.streams`):
``--chunk-size`` inputs are read, decided and written at a time, so memory stays bounded whatever
the number of inputs (only the per-input figures are kept).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from .._utils.limits import require_regular_file
from ..data.sidecar import read_truth
from ..data.streams import open_stream
from ..defenses import DEFENSES, create, list_defenses
from ..metrics import filter_rates
from . import cli
from ._common import NON_NEGATIVE_INT, POSITIVE_INT, common_options, model_options, open_data, open_model, table, write_json
from ._options import defence_options, defence_params, fill


def decide_chunk(filt: Any, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, decisions and forward passes per input of one chunk (``start``: its place in the
    stream, which picks STRIP's overlays)."""
    if hasattr(filt, "decide"):
        d = filt.decide(x, start=start)
        return d.scores.float().cpu(), d.flagged.cpu(), d.n_overlays.cpu()
    s = filt.score(x).float().cpu()
    return s, s > filt.threshold_, torch.ones(s.shape[0], dtype=torch.long)


def _csv_rows(writer: Any, start: int, s: torch.Tensor, f: torch.Tensor, u: torch.Tensor, names: list[str] | None,
              is_trig: np.ndarray | None) -> None:
    """``--csv``: the rows of one chunk (after the header, with the first chunk)."""
    if start == 0:
        writer.writerow(["index", "score", "flagged", "overlays"] + (["path"] if names else [])
                        + (["triggered"] if is_trig is not None else []))
    for j in range(s.shape[0]):
        writer.writerow([start + j, f"{float(s[j]):.6g}", int(f[j]), int(u[j])]
                        + ([names[j]] if names else []) + ([int(is_trig[start + j])] if is_trig is not None else []))


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
        start = 0
        for x, names in source.chunks(chunk_size):
            s, f, u = decide_chunk(filt, x, start)
            if csv_file is not None:
                _csv_rows(writer, start, s, f, u, names, is_trig)
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
@defence_options("strip", {"frr": "Target false-rejection rate on clean inputs (of every filter that has one)."},
                 into="shared")
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
def filter_(model_path: Path, fit_spec: str, data_spec: str, method: str, shared: dict[str, Any], params: tuple[str, ...],
            truth: Path | None, chunk_size: int, csv_path: Path | None, threads: int | None, quiet: bool, show: int,
            report_path: Path | None, arch: str | None, input_shape: str | None, num_classes: int | None,
            json_path: Path | None, seed: int, device: str | None) -> None:
    """Fit an input filter on clean data and flag the suspicious inputs of --data."""
    if threads is not None:
        torch.set_num_threads(threads)
    if truth is not None:
        require_regular_file(truth, "--truth file")  # before the filter is fitted
    kwargs = fill(DEFENSES.get(method), defence_params(method, params), **shared, seed=seed)
    lm = open_model(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device)
    clean = open_data(fit_spec, default_split="val", model=lm)
    source = open_stream(data_spec, lm)
    is_trig = read_truth(truth, data_spec, source.n)
    filt = create(method, **kwargs).fit(lm.model, clean)  # type: ignore[attr-defined]
    thr = float(filt.threshold_)
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
        rates = filter_rates(scores, torch.from_numpy(is_trig), flagged)
        result.update(truth=torch.from_numpy(is_trig), **rates)
        summary.update(rates)
    _print_inputs(scores, flagged, passes, paths, is_trig, show)
    click.echo(table([summary], percent=[c for c in ("far", "frr") if c in summary]))
    write_json(json_path, result)
    if report_path is not None:
        from ..report import filter_section, write_report

        write_report(report_path, [filter_section(method, scores, thr, truth=None if is_trig is None else torch.from_numpy(is_trig),
                                                  clean_scores=getattr(filt, "clean_scores_", None), params=filt.get_params())],
                     title=f"{method} on {source.name}")
        click.echo(f"report: {report_path}")


def _print_inputs(scores: torch.Tensor, flagged: torch.Tensor, passes: torch.Tensor, paths: list[str],
                  is_trig: np.ndarray | None, show: int) -> None:
    """The first ``--show`` inputs, one row each."""
    n = int(scores.shape[0])
    rows = [{"input": paths[i] if paths else i, "score": float(scores[i]), "flagged": bool(flagged[i]),
             "overlays": int(passes[i]), **({"triggered": bool(is_trig[i])} if is_trig is not None else {})}
            for i in range(min(show, n))]
    if rows:
        click.echo(table(rows))
        if n > len(rows):
            click.echo(f"... {n - len(rows)} more inputs (see --json / --csv)")
        click.echo()
