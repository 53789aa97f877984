"""``trojanscope filter``: score run-time inputs with an input filter (STRIP by default).

The filter is fitted on the defender's clean data (``--fit``), which sets the threshold from the
target false-rejection rate; then every input of ``--data`` gets a score (higher = more
suspicious) and a decision. When it is known which inputs carry a trigger (``--truth FILE``, or
an array ``triggered`` / ``is_poison`` inside the inputs' ``.npz``), the FAR and FRR are reported.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from ..defenses import DEFENSES, create, list_defenses
from ..errors import DataError
from ..metrics import detection_metrics
from . import cli
from ._common import NON_NEGATIVE_INT, OPEN_UNIT, defence_params, common_options, model_options, open_data, open_model, table, write_json

TRUTH_KEYS = ("triggered", "is_poison")


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


@cli.command(name="filter")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--fit", "fit_spec", required=True,
              help="The defender's clean data to fit the filter on: bundled name[:split] (default split: val), .npz or folder.")
@click.option("--data", "data_spec", required=True,
              help="The inputs to score: bundled name[:split] (default split: test), .npz or folder.")
@click.option("--method", type=click.Choice(list_defenses("input")), default="strip", show_default=True,
              help="The input filter.")
@click.option("--frr", type=OPEN_UNIT, default=0.01, show_default=True, help="Target false-rejection rate on clean inputs.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Another constructor argument of the filter (e.g. -p n_overlays=50); repeatable.")
@click.option("--truth", type=click.Path(path_type=Path), default=None,
              help="0/1 per input (1 = triggered): .npy, .json list or text; default: an array 'triggered' or "
                   "'is_poison' in the --data .npz.")
@click.option("--show", type=NON_NEGATIVE_INT, default=20, show_default=True, help="Inputs listed on screen (all are in --json).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (score histograms and the threshold).")
@model_options
@common_options
def filter_(model_path: Path, fit_spec: str, data_spec: str, method: str, frr: float, params: tuple[str, ...],
            truth: Path | None, show: int, report_path: Path | None, arch: str | None, input_shape: str | None,
            num_classes: int | None, json_path: Path | None, seed: int, device: str | None) -> None:
    """Fit an input filter on clean data and flag the suspicious inputs of --data."""
    if truth is not None:
        from .._utils.limits import require_regular_file

        require_regular_file(truth, "--truth file")  # before the filter is fitted
    lm = open_model(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device)
    clean = open_data(fit_spec, default_split="val", model=lm)
    inputs = open_data(data_spec, default_split="test", model=lm)
    kwargs = defence_params(method, params)
    sig = inspect.signature(DEFENSES.get(method).__init__).parameters
    for k, v in (("frr", frr), ("seed", seed)):
        if k in sig:
            kwargs.setdefault(k, v)
    filt = create(method, **kwargs)
    is_trig = read_truth(truth, data_spec, len(inputs))  # a bad truth file is refused before the fit
    filt.fit(lm.model, clean)  # type: ignore[attr-defined]
    scores = filt.score(inputs.x).float().cpu()  # type: ignore[attr-defined]
    thr = float(filt.threshold_)  # type: ignore[attr-defined]
    flagged = scores > thr
    result: dict[str, Any] = {"model": str(model_path), "method": method, "params": filt.get_params(),
                              "fit": clean.name, "data": inputs.name, "n": len(inputs), "threshold": thr,
                              "n_flagged": int(flagged.sum()), "scores": scores, "flagged": flagged}
    summary: dict[str, Any] = {"n": len(inputs), "flagged": int(flagged.sum()), "threshold": thr}
    if is_trig is not None:
        t = torch.from_numpy(is_trig)
        m = detection_metrics(scores, t, flagged)
        far = float((~flagged[t]).float().mean()) if bool(t.any()) else None
        frr_m = float(flagged[~t].float().mean()) if bool((~t).any()) else None
        result.update(truth=t, far=far, frr=frr_m, auroc=m["auroc"])
        summary.update(far=far, frr=frr_m, auroc=m["auroc"])
    rows = [{"input": i, "score": float(scores[i]), "flagged": bool(flagged[i]),
             **({"triggered": bool(is_trig[i])} if is_trig is not None else {})} for i in range(min(show, len(inputs)))]
    if rows:
        click.echo(table(rows))
        if len(inputs) > len(rows):
            click.echo(f"... {len(inputs) - len(rows)} more inputs (see --json)")
        click.echo()
    click.echo(table([summary], percent=[c for c in ("far", "frr") if c in summary]))
    write_json(json_path, result)
    if report_path is not None:
        from ..report import filter_section, write_report

        write_report(report_path, [filter_section(method, scores, thr, truth=None if is_trig is None else torch.from_numpy(is_trig),
                                                  clean_scores=getattr(filt, "clean_scores_", None), params=filt.get_params())],
                     title=f"{method} on {inputs.name}")
        click.echo(f"report: {report_path}")
