"""``trojanscope scan``: is this model backdoored? (Neural Cleanse) Or each model of a population.

Exit codes: 0 no backdoor found, 1 a backdoor was found (so a CI pipeline can gate on it),
2 bad input (for a population: every model failed).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import click

from ..defenses.model.neural_cleanse import NeuralCleanse, NeuralCleanseResult
from . import cli
from ._common import NON_NEGATIVE_INT, common_options, fit_to_model, model_options, open_data, open_model, table, write_json
from ._options import defence_options
from ._scan_extras import EXIT_INFECTED, heatmap, progress, scan_population, write_scan_dir

#: The Neural Cleanse settings ``scan`` exposes, in order (types and defaults come from the class).
NC_OPTIONS: dict[str, str | None] = {
    "schedule": "Label schedule: every label to the end (the paper) or successive halving (labels whose trigger stays "
                "large stop early: about 3x fewer image passes; the default rule was measured on populations only "
                "with the full schedule, see benchmarks/README.md).",
    "decision": "Verdict from the MAD rule (see --outlier-scale, --min-ratio), or from the trojan probability "
                "(calibrated on generated digits and MNIST populations; both are reported).",
    "threshold": "With --decision probability: the probability above which a model is called backdoored.",
    "mode": "Optimise all labels in one batch, or one label at a time (the paper's way).",
    "epochs": "Maximum optimisation epochs per label.",
    "steps_per_epoch": None,
    "n_samples": "Clean images driving the optimisation (the rest measure attack success).",
    "batch_size": "Most images in one forward pass.",
    "outlier_scale": "The MAD test on the logarithms of the mask norms (the default: a trigger far smaller than "
                     "every other label's is flagged however widely the clean labels' norms spread) or on the norms "
                     "themselves (the paper; use it with --anomaly-threshold 2).",
    "anomaly_threshold": "A label below the median norm is flagged when its anomaly index exceeds this (3 on the log "
                         "scale; the paper's 2 on the L1 scale).",
    "min_ratio": "...and when its norm is at least this many times below the median norm (a guard for clean norms "
                 "that agree within a few per cent, where the MAD is tiny; 1 turns it off, as the paper).",
    "pairs": "Also reverse a trigger for every (source, target) pair, for source-specific and all-to-all backdoors "
             "(K(K-1) more jobs; about 5x the image passes of --schedule all). Evidence for one model; over a "
             "population of 10 or more, part of the population probability (with --schedule all, its calibrated "
             "setting).",
}

log = logging.getLogger("trojanscope.scan")


@cli.command()
@click.argument("model_paths", metavar="MODEL...", nargs=-1, required=True)
@click.option("--data", "data_spec", required=True,
              help="Clean data: bundled name[:split] (default split: val), an .npz or an image folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="One model: write scan.json, the reversed triggers (.safetensors) and PNGs of each mask, "
                   "pattern and stamped example here (give it to `repair --scan`). Several models: write "
                   "scan.csv and scan.json (one row per model) and each finished model's row (a rerun resumes).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Models scanned at once: over Ray when installed (pip install 'trojanscope[cluster]'; a local "
                   "instance unless --address or RAY_ADDRESS), else local processes.")
@click.option("--address", default=None, help="Ray cluster to use (ray://HOST:PORT); default: RAY_ADDRESS, else local.")
@click.option("--backend", type=click.Choice(["auto", "ray", "processes"]), default="auto", show_default=True,
              help="How --workers fans out.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@defence_options("neural-cleanse", NC_OPTIONS)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (anomaly indices, trigger sizes, reversed triggers).")
@click.option("--heatmap", "heatmap_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also run the moving-window search for a trigger of unknown shape and place on the flagged "
                   "(else the most suspicious) label: write its heat map as this PNG and search its hot region.")
@click.option("--heatmap-target", type=NON_NEGATIVE_INT, default=None, help="The label the moving-window search looks at.")
@model_options
@common_options
def scan(model_paths: tuple[str, ...], data_spec: str, out: Path | None, workers: int, address: str | None,
         backend: str, quiet: bool, params: dict[str, Any], report_path: Path | None, heatmap_path: Path | None,
         heatmap_target: int | None, arch: str | None, input_shape: str | None, num_classes: int | None,
         json_path: Path | None, seed: int, device: str | None) -> None:
    """Scan MODEL for a backdoor with Neural Cleanse; or each model of a population.

    MODEL is a trojanscope model directory, a torch.export .pt2 program or a TorchScript file
    (only inputs and outputs are used). Prints, per label, the L1 norm of the reversed trigger's
    mask, its anomaly index, its attack success on held-out clean data and whether it is flagged,
    and the calibrated probability that the model is backdoored.

    Several MODEL arguments, a folder of models or a glob ('runs/round/models/*.pt2') scan a
    population: one row per model (file, probability, verdict, flagged labels, seconds, error),
    with --out DIR written to DIR/scan.csv and DIR/scan.json; a model that fails gets its error in
    its row and the others go on; a killed run rerun with the same --out keeps its finished models.
    With 10 or more models of the same labels, each row also gets a population probability: each
    label's trigger norm against the same label in the other models (population_probability; the
    verdict stays the per-model one).

    Exit code 0: no backdoor found; 1: a backdoor was found (in any model); 2: bad input (for a
    population: every model failed).
    """
    from ..population import expand_models

    data = open_data(data_spec, default_split="val")
    params = {**params, "seed": seed}
    NeuralCleanse(**params)._validate_params()
    single = len(model_paths) == 1 and (Path(model_paths[0]).is_file() or (Path(model_paths[0]) / "model.safetensors").exists())
    if not single:
        scan_population(expand_models(list(model_paths)), data, params, out=out, workers=workers, address=address,
                         backend=backend, quiet=quiet, json_path=json_path)
        return
    model_path = Path(model_paths[0])
    lm = open_model(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device, data=data)
    data = fit_to_model(data, lm)
    nc = NeuralCleanse(**params, device=None)
    log.info("scan: %s (%s), %d clean images, %s schedule", model_path, lm.format, len(data), nc.schedule)
    with progress(nc, quiet) as callback:
        result = nc.scan(lm.model, data, callback=callback)
    _print_result(result, nc, len(data))
    if out is not None:
        write_scan_dir(result, out, data.x[0])
        click.echo(f"reversed triggers and images written to {out}/")
    d = {"model": str(model_path), "probability": result.probability, "format": lm.format, "data": data.name, **result.to_dict()}
    if heatmap_path is not None:
        d["heatmap"] = heatmap(lm.model, data, result, heatmap_path, heatmap_target, out, nc.batch_size, seed)
    write_json(json_path, d)
    if report_path is not None:
        from ..report import write_report

        click.echo(f"report: {write_report(report_path, [('Neural Cleanse', result)], title=f'scan of {model_path}')}")
    if result.infected:
        click.get_current_context().exit(EXIT_INFECTED)


def _print_result(result: NeuralCleanseResult, nc: NeuralCleanse, n: int) -> None:
    """The per-label table, the verdict and the evidence behind it (and a warning when the model
    gets most of the clean data wrong)."""
    from ..defenses.model.neural_cleanse import low_accuracy_warning

    warning = low_accuracy_warning(result.details.get("clean_accuracy"), result.num_classes)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    click.echo(table(result.labels(), ["label", "l1_norm", "anomaly_index", "attack_success", "flagged"],
                     headers={"l1_norm": "|m|_1", "anomaly_index": "anomaly index", "attack_success": "attack success"},
                     percent=["attack_success"]))
    ev = result.evidence
    evid = (f"probability {result.probability:.3f}: smallest trigger label {ev['label']}, log-scale anomaly index "
            f"{ev['log_index']:.2f}, {math.exp(ev['log_ratio']):.1f}x below the median norm, held-out attack "
            f"success {100 * ev['holdout_asr']:.0f}%")
    if result.infected:
        labels = ", ".join(f"{k} (anomaly index {float(result.anomaly_indices[k]):.2f})" for k in result.flagged_labels)
        click.echo(f"\nverdict: BACKDOOR FOUND; target label(s): {labels}\n{evid}")
    else:
        below = {k: float(result.anomaly_indices[k]) for k in range(result.num_classes) if float(result.scores[k]) > 0}
        top = max(below, key=below.get, default=None)
        if nc.decision == "probability":
            rule = f"probability {result.probability:.3f} <= {nc.threshold:g}"
        elif top is not None and below[top] > nc.anomaly_threshold:
            d = result.details  # the norms the rule read (at matched budgets under halving)
            tested = d.get("tested_l1_norms") or result.l1_norms.tolist()
            times = float(d.get("median_tested_l1_norm", d["median_l1_norm"])) / max(float(tested[top]), 1e-12)
            rule = (f"label {top}'s anomaly index {below[top]:.2f} > {nc.anomaly_threshold:g}, but its norm is only "
                    f"{times:.2f}x below the median (< --min-ratio {nc.min_ratio:g})")
        else:
            rule = f"largest anomaly index below the median: {below.get(top, 0.0):.2f} <= {nc.anomaly_threshold:g}"
        click.echo(f"\nverdict: no backdoor found ({rule})\n{evid}")
    if "pair_log_index" in ev:
        click.echo(f"pairs (evidence only): smallest trigger from label {ev['pair_source']} to {ev['pair_target']}, "
                   f"log-scale anomaly index {ev['pair_log_index']:.2f} among the {result.num_classes} x "
                   f"{result.num_classes - 1} pairs; from label {ev['pair_row_source']}, the smallest pair is "
                   f"{math.exp(ev['pair_row_ratio']):.1f}x below that label's median pair (the most of any label)")
    click.echo(f"{n} clean images ({result.details['n_optimisation']} optimised on, "
               f"{result.details['n_holdout']} held out), {result.seconds:.1f} s")
