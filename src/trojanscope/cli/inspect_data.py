"""``inspect-data``: find the poisoned samples of a training set with any registered data
sanitiser (Spectral Signatures, Activation Clustering, provenance filtering), optionally retrain
on the rest and report what that did."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import click

from .._utils.limits import require_regular_file
from ..data import ImageDataset
from ..data.sidecar import ground_truth, read_groups
from ..defenses import DEFENSES, create, list_defenses
from ..defenses.data.provenance import ProvenanceResult
from ..errors import ConfigError
from . import cli
from ._common import NON_NEGATIVE_INT, POSITIVE_INT, common_options, fit_to_model, model_options, open_data, parse_trigger, pick_device, table, write_json
from ._options import defence_options, fill
from ._surface import open_surface

log = logging.getLogger("trojanscope.inspect_data")

#: Short ``--method`` names, besides the registry's.
ALIASES = {"clustering": "activation-clustering"}


def _registry_name(method: str) -> str:
    return ALIASES.get(method, method)


def _trusted_methods() -> list[str]:
    return [n for n in list_defenses("data") if DEFENSES.get(n).uses_trusted]


def _fresh_kind(surface: Any) -> str:
    if surface.received:
        return f"re-initialised copy of the received {surface.format} graph"
    return "re-initialised copy of the model's architecture"


@cli.command("inspect-data")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", required=True, help="The training set: bundled name[:split] (default split: "
              "train), an .npz (its 'groups' array gives the provenance) or an image folder.")
@click.option("--method", type=click.Choice(sorted([*list_defenses("data"), *ALIASES])), required=True,
              help="The sanitiser (the registry's data family; clustering = activation-clustering).")
@defence_options("spectral", {
    "mode": "auto: no assumed poison share, per-label verdicts; paper: the paper's procedure.",
    "epsilon": "spectral --mode paper: assumed poisoned share."})
@defence_options("activation-clustering", {"analysis": "clustering --mode paper: the analysis."})
@defence_options("spectral", {"layer": "Representation (spectral, clustering)."})
@click.option("--provenance", "provenance_file", type=click.Path(path_type=Path), default=None,
              help="One integer segment per sample: .npy, .txt, .json, or an .npz with 'groups'.")
@click.option("--trusted", "trusted_spec", default=None,
              help="provenance: a trusted clean evaluation set (without it, a share of each segment is held out).")
@defence_options("spectral", {"retrain_epochs": "Epochs of the models trained inside the method (reclassification, "
                                                 "provenance)."})
@click.option("--retrain", "do_retrain", is_flag=True, help="Train a new model on what is left; report CA (and ASR).")
@click.option("--epochs", type=POSITIVE_INT, default=10, show_default=True, help="--retrain: training epochs.")
@click.option("--test", "test_spec", default=None, help="--retrain: test data (default: the bundled set's test split).")
@click.option("--trigger", default=None, help="--retrain: trigger spec or .safetensors, to measure attack success "
              "(evaluation only; the method never sees it).")
@click.option("--target", type=NON_NEGATIVE_INT, default=None, help="--retrain: the trigger's target label.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for flagged.json, the retrained model and one plot per flagged label.")
@defence_options("spectral", {"batch_size": None})
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (score histogram, settings).")
@model_options
@common_options
def inspect_data(model_path: Path, data_spec: str, method: str, params: dict[str, Any], provenance_file: Path | None,
                 trusted_spec: str | None, do_retrain: bool, epochs: int, test_spec: str | None, trigger: str | None,
                 target: int | None, out: Path | None, report_path: Path | None, arch: str | None,
                 input_shape: str | None, num_classes: int | None, json_path: Path | None, seed: int,
                 device: str | None) -> None:
    """Find the poisoned samples of a training set; optionally retrain without them."""
    t0 = time.perf_counter()
    _check_options(method, provenance_file, trusted_spec, do_retrain, trigger, target, test_spec)
    sanitizer = create(_registry_name(method), **fill(DEFENSES.get(_registry_name(method)), {}, **params, seed=seed))
    data = open_data(data_spec, default_split="train")
    lm, surface = open_surface(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device,
                               data=data)
    data = fit_to_model(data, lm)
    log.info("model %s (%s), data %s: %d samples", model_path, lm.format, data.name, len(data))
    data, trusted = _inputs(data, provenance_file, trusted_spec, lm)
    layer = sanitizer.get_params().get("layer")
    log.info("%s (mode %s)%s", _registry_name(method), params["mode"], "" if layer is None else f" on the {layer!r} representation")
    result = sanitizer.inspect(surface.module, data, trusted=trusted)
    log.info("%s: %d of %d samples flagged in %.1f s", method, int(result.flagged.sum()), len(data), result.seconds)
    report: dict[str, Any] = {"model": str(model_path), "format": surface.format, "data": data.name, "method": method,
                              "mode": params["mode"], "n": len(data),
                              "fresh_model": _fresh_kind(surface) if sanitizer.trains_models else None,
                              **result.to_dict()}
    _print_verdicts(result, data)
    summary: dict[str, Any] = {"flagged": int(result.flagged.sum()), "of": len(data),
                               "attacked_labels": getattr(result, "attacked_labels", None),
                               "flagged_segments": getattr(result, "flagged_segments", None),
                               "seconds": result.seconds}
    if result.details.get("layer") is not None:  # the representation a layer-reading sanitiser read
        summary = {"layer": result.details["layer"], **summary}
    _score_against_truth(result, data_spec, data, report)
    if do_retrain:
        _retrain(surface, lm, data, result, data_spec, test_spec, trigger, target, epochs, seed, device, out,
                 method, summary, report)
    if out is not None:
        _write_flagged(result, data, out, method, summary)
    summary["seconds"] = time.perf_counter() - t0
    click.echo(table([summary], [c for c in summary if c != "plots"]))
    report["summary"] = summary
    write_json(json_path, report)
    if report_path is not None:
        from ..report import write_report

        click.echo(f"report: {write_report(report_path, [(method, result)], title=f'{method} on {data.name}')}")


def _check_options(method: str, provenance_file: Path | None, trusted_spec: str | None, do_retrain: bool,
                   trigger: str | None, target: int | None, test_spec: str | None) -> None:
    """Refuse options that do not go together, before anything is read."""
    if trusted_spec is not None and not DEFENSES.get(_registry_name(method)).uses_trusted:
        raise ConfigError(f"--trusted only applies to a method that takes a trusted set ({', '.join(_trusted_methods())})")
    if provenance_file is not None:
        require_regular_file(provenance_file, "provenance file")  # before the model is loaded
    if (trigger is None) != (target is None):
        raise ConfigError("--trigger and --target go together")
    if (trigger is not None or test_spec is not None) and not do_retrain:
        raise ConfigError("--trigger, --target and --test only apply with --retrain")


def _inputs(data: ImageDataset, provenance_file: Path | None, trusted_spec: str | None,
            lm: Any) -> tuple[ImageDataset, ImageDataset | None]:
    """The dataset to inspect (with ``--provenance``'s groups) and the trusted set, if any."""
    if provenance_file is not None:
        data = dataclasses.replace(data, groups=read_groups(provenance_file, len(data)))
    trusted = open_data(trusted_spec, default_split="val", model=lm) if trusted_spec else None
    return data, trusted


def _write_flagged(result: Any, data: ImageDataset, out: Path, method: str, summary: dict[str, Any]) -> None:
    """``--out``: flagged.json and one plot per flagged label."""
    from ..report.files import sanitizer_pngs

    out.mkdir(parents=True, exist_ok=True)
    segments = getattr(result, "flagged_segments", None)
    write_json(out / "flagged.json", {"flagged_indices": result.flagged_indices, "scores": result.scores,
                                      **({"flagged_segments": segments} if segments is not None else {})})
    summary["plots"] = sanitizer_pngs(result, data.y, out, name=method)


def _print_verdicts(result: Any, data: ImageDataset) -> None:
    """One row per provenance segment (a provenance result) or per label."""
    if isinstance(result, ProvenanceResult):
        rows = [{"segment": s, "n": v["n"], "score": v["score"], "flagged": v["flagged"]}
                for s, v in sorted(result.per_segment.items())]
    else:
        rows = [{"label": k, "n": v["n"], "attacked": v["attacked"],
                 "flagged": int(result.flagged[data.y == k].sum())} for k, v in sorted(result.per_label.items())]
        if any("rule" in v for v in result.per_label.values()):  # the auto verdicts: which rule decided
            for row, (_, v) in zip(rows, sorted(result.per_label.items())):
                row["rule"] = v.get("rule") or "-"
    click.echo(table(rows))


def _score_against_truth(result: Any, data_spec: str, data: ImageDataset, report: dict[str, Any]) -> None:
    """Detection figures against the data file's ``is_poison`` (scoring only: the method never saw it)."""
    truth = ground_truth(data_spec, len(data))
    if truth is None:
        return
    from ..metrics import detection_metrics

    det = detection_metrics(result.scores, truth, result.flagged)
    report["detection"] = det
    click.echo(f"\nagainst is_poison in {data_spec}: {det['n_poison']} poisoned of {det['n']}")
    click.echo(table([{"precision": det["precision"], "recall": det["recall"], "clean_removed": det["fpr"],
                       "auroc": det["auroc"], "poison_flagged": det["n_flagged_poison"],
                       "clean_flagged": det["n_flagged_clean"]}],
                     headers={"recall": "recall (poison removed)", "clean_removed": "clean removed"},
                     percent=["precision", "recall", "clean_removed"]))
    click.echo()


def _retrain(surface: Any, lm: Any, data: ImageDataset, result: Any, data_spec: str, test_spec: str | None,
             trigger: str | None, target: int | None, epochs: int, seed: int, device: str | None, out: Path | None,
             method: str, summary: dict[str, Any], report: dict[str, Any]) -> None:
    """``--retrain``: train a new model on what was kept; its CA and, with ``--trigger``, ASR."""
    from ..metrics import attack_success_rate
    from ..training import retrain

    if test_spec is not None:
        test = open_data(test_spec, model=lm)
    else:
        from .core import test_split

        test = test_split(data_spec)
        if test is None:
            click.echo(f"warning: no test data for {data.name}, so the retrained model's CA and ASR are not "
                       f"measured; give --test (e.g. --test digits:test)", err=True)
    log.info("retraining on the %d samples kept (%d epochs)", len(data) - int(result.flagged.sum()), epochs)
    trig = parse_trigger(trigger, data.image_shape) if trigger is not None else None
    if target is not None and not 0 <= target < data.num_classes:
        raise ConfigError(f"--target {target} is out of range for {data.num_classes} classes")
    rr = retrain(surface.module, data, result, test=test, epochs=epochs, seed=seed, device=pick_device(device))
    asr = attack_success_rate(rr.model, test, trig, int(target)) if (test is not None and trig is not None) else None  # type: ignore[arg-type]
    summary.update(retrained_accuracy=rr.accuracy, retrained_attack_success=asr, n_kept=rr.n_kept)
    runs = rr.params.get("chance_runs")
    if runs:
        tried = ", ".join(f"seed {r['seed']} {r['init']} {100 * r['train_accuracy']:.1f}%" for r in runs)
        click.echo(f"note: the retraining stayed at chance and was run {len(runs)} times ({tried})")
    report["retrain"] = {**rr.to_dict(), "attack_success": asr, "fresh_model": _fresh_kind(surface)}
    if out is not None:
        written = surface.write(rr.model, out / "retrained", extra={"retrained_after": method})
        summary["retrained_model"] = str(written)
