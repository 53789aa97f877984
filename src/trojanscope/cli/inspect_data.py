"""``inspect-data``: find the poisoned samples of a training set (Spectral Signatures, Activation
Clustering, provenance filtering), optionally retrain on the rest and report what that did."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import cli
from ._common import POSITIVE_INT, NON_NEGATIVE_INT, OPEN_UNIT, common_options, fit_to_model, model_options, open_data, parse_trigger, pick_device, table, write_json
from ._surface import open_surface

#: CLI method name -> registry name.
METHODS = {"spectral": "spectral", "clustering": "activation-clustering", "provenance": "provenance"}


def _fresh_kind(surface: Any) -> str:
    if surface.received:
        return f"re-initialised copy of the received {surface.format} graph"
    return "re-initialised copy of the model's architecture"


def fresh_model_kind(surface: Any, method: str, mode: str, analysis: str) -> str | None:
    """Which fresh model the method trained inside (exclusionary reclassification, provenance), if any."""
    trains = method == "provenance" or mode == "auto" or (method == "clustering" and
                                                          analysis == "exclusionary-reclassification")
    return _fresh_kind(surface) if trains else None


def read_groups(path: Path, n: int) -> torch.Tensor:
    """One integer provenance segment per sample from an .npy, .txt, .json or an .npz's ``groups``."""
    from .._utils.limits import check_alloc, require_regular_file
    from ..data.loaders import load_npy, read_npz

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
    from ..data.loaders import read_npz

    arr = read_npz(p, wanted=("is_poison",)).get("is_poison")  # headers checked, no pickle
    if arr is None:
        return None
    if arr.ndim != 1 or arr.shape[0] != n or not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
        raise DataError(f"{p}: is_poison must hold one 0/1 value per sample ({n}), got shape {arr.shape}")
    return arr.astype(bool)


@cli.command("inspect-data")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", required=True, help="The training set: bundled name[:split] (default split: "
              "train), an .npz (its 'groups' array gives the provenance) or an image folder.")
@click.option("--method", type=click.Choice(list(METHODS)), required=True)
@click.option("--mode", type=click.Choice(["auto", "paper"]), default="auto", show_default=True,
              help="auto: no assumed poison share, per-label verdicts; paper: the paper's procedure.")
@click.option("--epsilon", type=OPEN_UNIT, default=0.05, show_default=True, help="spectral --mode paper: assumed poisoned share.")
@click.option("--analysis", type=click.Choice(["exclusionary-reclassification", "relative-size", "silhouette", "distance"]),
              default="exclusionary-reclassification", show_default=True, help="clustering --mode paper: the analysis.")
@click.option("--layer", default="penultimate", show_default=True, help="Representation (spectral, clustering).")
@click.option("--provenance", "provenance_file", type=click.Path(path_type=Path), default=None,
              help="One integer segment per sample: .npy, .txt, .json, or an .npz with 'groups'.")
@click.option("--trusted", "trusted_spec", default=None,
              help="provenance: a trusted clean evaluation set (without it, a share of each segment is held out).")
@click.option("--retrain-epochs", type=POSITIVE_INT, default=3, show_default=True,
              help="Epochs of the models trained inside the method (reclassification, provenance).")
@click.option("--retrain", "do_retrain", is_flag=True, help="Train a new model on what is left; report CA (and ASR).")
@click.option("--epochs", type=POSITIVE_INT, default=10, show_default=True, help="--retrain: training epochs.")
@click.option("--test", "test_spec", default=None, help="--retrain: test data (default: the bundled set's test split).")
@click.option("--trigger", default=None, help="--retrain: trigger spec or .safetensors, to measure attack success "
              "(evaluation only; the method never sees it).")
@click.option("--target", type=NON_NEGATIVE_INT, default=None, help="--retrain: the trigger's target label.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for flagged.json, the retrained model and one plot per flagged label.")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (score histogram, settings).")
@model_options
@common_options
def inspect_data(model_path: Path, data_spec: str, method: str, mode: str, epsilon: float, analysis: str, layer: str,
                 provenance_file: Path | None, trusted_spec: str | None, retrain_epochs: int, do_retrain: bool,
                 epochs: int, test_spec: str | None, trigger: str | None, target: int | None, out: Path | None,
                 batch_size: int, report_path: Path | None, arch: str | None, input_shape: str | None,
                 num_classes: int | None, json_path: Path | None, seed: int, device: str | None) -> None:
    """Find the poisoned samples of a training set; optionally retrain without them."""
    import logging

    log = logging.getLogger("trojanscope.inspect_data")
    t0 = time.perf_counter()
    if provenance_file is not None:
        from .._utils.limits import require_regular_file

        require_regular_file(provenance_file, "provenance file")  # before the model is loaded
    data = open_data(data_spec, default_split="train")
    lm, surface = open_surface(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device,
                               data=data)
    data = fit_to_model(data, lm)
    net = surface.module
    log.info("model %s (%s), data %s: %d samples", model_path, lm.format, data.name, len(data))
    if (trigger is None) != (target is None):
        raise ConfigError("--trigger and --target go together")
    if (trigger is not None or test_spec is not None) and not do_retrain:
        raise ConfigError("--trigger, --target and --test only apply with --retrain")
    sanitizer = _sanitizer(method, mode, epsilon, analysis, layer, batch_size, seed, retrain_epochs)
    data, trusted = _inputs(method, data, provenance_file, trusted_spec, lm, log)
    log.info("%s (mode %s)%s", METHODS[method], mode, "" if method == "provenance" else f" on the {layer!r} representation")
    result = sanitizer.inspect(net, data, trusted=trusted)
    log.info("%s: %d of %d samples flagged in %.1f s", method, int(result.flagged.sum()), len(data), result.seconds)
    report: dict[str, Any] = {"model": str(model_path), "format": surface.format, "data": data.name, "method": method,
                              "mode": mode, "n": len(data), "fresh_model": fresh_model_kind(surface, method, mode, analysis),
                              **result.to_dict()}
    _print_verdicts(result, method, data)
    summary: dict[str, Any] = {"flagged": int(result.flagged.sum()), "of": len(data),
                               "attacked_labels": getattr(result, "attacked_labels", None),
                               "flagged_segments": getattr(result, "flagged_segments", None),
                               "seconds": result.seconds}
    _score_against_truth(result, data_spec, data, report)
    if do_retrain:
        _retrain(net, data, result, surface, lm, data_spec, test_spec, trigger, target, epochs, seed, device, out,
                 method, summary, report, log)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "flagged.json", {"flagged_indices": result.flagged_indices, "scores": result.scores,
                                          **({"flagged_segments": result.flagged_segments} if method == "provenance" else {})})
        from ..report.files import sanitizer_pngs

        summary["plots"] = sanitizer_pngs(result, data.y, out, name=method)
    summary["seconds"] = time.perf_counter() - t0
    click.echo(table([summary], [c for c in summary if c != "plots"]))
    report["summary"] = summary
    write_json(json_path, report)
    if report_path is not None:
        from ..report import write_report

        click.echo(f"report: {write_report(report_path, [(method, result)], title=f'{method} on {data.name}')}")


def _sanitizer(method: str, mode: str, epsilon: float, analysis: str, layer: str, batch_size: int, seed: int,
               retrain_epochs: int) -> Any:
    """The sanitiser of ``--method`` with the options that apply to it."""
    from ..defenses import create

    params: dict[str, Any] = dict(mode=mode, batch_size=batch_size, seed=seed, retrain_epochs=retrain_epochs)
    if method != "provenance":
        params["layer"] = layer
    if method == "spectral":
        params["epsilon"] = epsilon
    if method == "clustering":
        params["analysis"] = analysis
    return create(METHODS[method], **params)


def _inputs(method: str, data: ImageDataset, provenance_file: Path | None, trusted_spec: str | None, lm: Any,
            log: Any) -> tuple[ImageDataset, ImageDataset | None]:
    """The dataset to inspect (with ``--provenance``'s groups) and the trusted set, if any."""
    if method != "provenance":
        if provenance_file is not None or trusted_spec is not None:
            raise ConfigError("--provenance and --trusted only apply to --method provenance")
        return data, None
    groups = read_groups(provenance_file, len(data)) if provenance_file is not None else data.groups
    if groups is None:
        raise DataError("--method provenance needs --provenance FILE or an .npz with a 'groups' array")
    trusted = open_data(trusted_spec, default_split="val", model=lm) if trusted_spec else None
    log.info("provenance: %d segments, %s", int(groups.unique().numel()),
             "a trusted set" if trusted is not None else "held-out shares of each segment")
    return dataclasses.replace(data, groups=groups), trusted


def _print_verdicts(result: Any, method: str, data: ImageDataset) -> None:
    if method == "provenance":
        rows = [{"segment": s, "n": v["n"], "score": v["score"], "flagged": v["flagged"]}
                for s, v in sorted(result.per_segment.items())]
    else:
        rows = [{"label": k, "n": v["n"], "attacked": v["attacked"],
                 "flagged": int(result.flagged[data.y == k].sum())} for k, v in sorted(result.per_label.items())]
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
                       "auroc": det["auroc"], "poison_flagged": int((result.flagged.numpy() & truth).sum()),
                       "clean_flagged": int((result.flagged.numpy() & ~truth).sum())}],
                     headers={"recall": "recall (poison removed)", "clean_removed": "clean removed"},
                     percent=["precision", "recall", "clean_removed"]))
    click.echo()


def _retrain(net: Any, data: ImageDataset, result: Any, surface: Any, lm: Any, data_spec: str, test_spec: str | None,
             trigger: str | None, target: int | None, epochs: int, seed: int, device: str | None, out: Path | None,
             method: str, summary: dict[str, Any], report: dict[str, Any], log: Any) -> None:
    """``--retrain``: train a new model on what was kept; its CA and, with ``--trigger``, ASR."""
    from ..metrics import attack_success_rate
    from ..training import retrain

    if test_spec is not None:
        test = open_data(test_spec, model=lm)
    else:
        from .core import _test_split

        test = _test_split(data_spec)
        if test is None:
            click.echo(f"warning: no test data for {data.name}, so the retrained model's CA and ASR are not "
                       f"measured; give --test (e.g. --test digits:test)", err=True)
    log.info("retraining on the %d samples kept (%d epochs)", len(data) - int(result.flagged.sum()), epochs)
    trig = parse_trigger(trigger, data.image_shape) if trigger is not None else None
    if target is not None and not 0 <= target < data.num_classes:
        raise ConfigError(f"--target {target} is out of range for {data.num_classes} classes")
    rr = retrain(net, data, result, test=test, epochs=epochs, seed=seed, device=pick_device(device))
    asr = attack_success_rate(rr.model, test, trig, int(target)) if (test is not None and trig is not None) else None  # type: ignore[arg-type]
    summary.update(retrained_accuracy=rr.accuracy, retrained_attack_success=asr, n_kept=rr.n_kept)
    report["retrain"] = {**rr.to_dict(), "attack_success": asr, "fresh_model": _fresh_kind(surface)}
    if out is not None:
        written = surface.write(rr.model, out / "retrained", extra={"retrained_after": method})
        summary["retrained_model"] = str(written)
