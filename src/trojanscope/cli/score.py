"""``trojanscope bench score``: score a population scan against a round's truth, as TrojAI does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .._utils.limits import read_json_file
from ..errors import DataError
from ._common import table, write_json
from ._paths import check_output_file
from .bench import bench


def read_scan(path: Path) -> list[dict[str, Any]]:
    """The rows of a population scan: its ``scan.json``, or a folder holding one."""
    p = path / "scan.json" if path.is_dir() else path
    rows = read_json_file(p, "scan")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("file"), str) for r in rows):
        raise DataError(f"scan {p} is not a population scan (a JSON list of rows with 'file'; "
                        "`trojanscope scan FOLDER --out DIR` writes DIR/scan.json)")
    return rows


@bench.command("score")
@click.argument("scan_path", metavar="SCAN", type=click.Path(exists=True, path_type=Path))
@click.argument("truth_path", metavar="ROUND", type=click.Path(exists=True, path_type=Path))
@click.option("--key", "keys", multiple=True, type=click.Choice(["probability", "population_probability"]),
              help="Which probability of the rows to score (repeat; default: both where the scan has them).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="A model above this probability counts as called backdoored (false / true positives).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an HTML report: reliability diagram and the probabilities of clean and "
                   "backdoored models.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the scores as JSON to this file ('-' for stdout).")
def score_cmd(scan_path: Path, truth_path: Path, keys: tuple[str, ...], threshold: float,
              report_path: Path | None, json_path: Path | None) -> None:
    """Score the population scan SCAN (`scan FOLDER --out DIR`: DIR or DIR/scan.json) against the
    truth of ROUND (a `bench round` folder or its truth.json): ROC-AUC and cross-entropy of the
    probabilities (a model that failed counts as 0.5), false and true positives, all-to-one targets
    among the flagged labels, detections by attack mode and correct verdicts by architecture, and
    the reliability of the calibration. The truth is read here only; a scan never sees it."""
    from ..population import score_scan
    from ..rounds import load_truth

    check_output_file(json_path, "--json")
    check_output_file(report_path, "--report")
    rows, truth = read_scan(scan_path), load_truth(truth_path)
    if not keys:
        keys = tuple(k for k in ("probability", "population_probability")
                     if any(r.get(k) is not None for r in rows)) or ("probability",)
    scores = {k: score_scan(rows, truth, key=k, threshold=threshold) for k in keys}
    echo = click.echo if str(json_path) != "-" else (lambda m: click.echo(m, err=True))
    first = next(iter(scores.values()))
    echo(f"{first['n']} models scored ({first['positives']} backdoored), threshold {threshold:g}"
         + (f"; {len(first['unscanned'])} of the round not in the scan" if first["unscanned"] else "")
         + (f"; {len(first['unmatched'])} rows with no truth" if first["unmatched"] else ""))
    echo(table([{"key": k, **{c: s[c] for c in ("roc_auc", "cross_entropy", "false_positives", "true_positives",
                                                "a2o_target_flagged", "failed")},
                 "by_mode": " ".join(f"{m} {v}" for m, v in s["detected_by_mode"].items())} for k, s in scores.items()],
               headers={"roc_auc": "ROC-AUC", "cross_entropy": "cross-entropy", "false_positives": "FP",
                        "true_positives": "TP", "a2o_target_flagged": "a2o target", "by_mode": "detected by mode"}))
    if report_path is not None:
        from ..report import write_report

        sections = [{"title": k, "family": "population", "result": s} for k, s in scores.items()]
        echo(f"report: {write_report(report_path, sections, title=f'population score of {scan_path}')}")
    write_json(json_path, scores)
