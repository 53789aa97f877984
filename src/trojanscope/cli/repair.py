"""``trojanscope repair``: remove a backdoor with any registered repair method.

The ``--method`` choices are the registry's repair family, so every repair module imported by
``trojanscope.defenses`` appears here without editing this file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from .._utils.results import to_jsonable
from ..defenses import DEFENSES, create, list_defenses
from ..errors import ConfigError, DataError
from . import cli
from ._common import columns, common_options, fit_to_model, model_options, open_data, table, write_json
from ._options import defence_params, fill, takes
from ._surface import open_surface

log = logging.getLogger("trojanscope.repair")


def load_scan(path: Path) -> Any:
    """A scan written by ``scan --out`` (:meth:`NeuralCleanseResult.load`), refused without its
    reversed triggers (what a repair builds on)."""
    from ..defenses.model.neural_cleanse import NeuralCleanseResult

    res = NeuralCleanseResult.load(path)
    if len(res.triggers) != res.num_classes:
        raise DataError(f"{path}: the scan holds no reversed triggers")
    return res


def parse_position(value: Any) -> tuple[int, int]:
    """A position given as ``ROW,COL`` (or a JSON ``[row, col]``) as a tuple of ints."""
    if isinstance(value, str):
        parts = value.replace(" ", "").split(",")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = []
    try:
        if len(parts) != 2:
            raise ValueError
        r, c = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"position takes ROW,COL (the trigger's top-left pixel, e.g. -p position=23,23), "
                          f"got {value!r}") from None
    return r, c


#: The CLI's default budget for ``distribution-unlearn`` when ``-p`` leaves it unset: 3 staircase
#: levels and 100 generator steps (the class defaults, the paper's 10 levels and 400 steps, took
#: past 600 s on a 2-core CPU), then 3 epochs of fine-tuning. Measured in the README.
DISTRIBUTION_BUDGET: dict[str, Any] = {"n_levels": 3, "steps": 100, "epochs": 3}


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(list_defenses("repair")), required=True, help="The repair method.")
@click.option("--data", "data_spec", required=True,
              help="The defender's clean data: bundled name[:split] (default split: train), an .npz or an image folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the repaired model, in the input's format (a trojanscope directory stays one; "
                   ".pt2 -> model.pt2, TorchScript -> model.ts.pt, ONNX -> model.onnx; loads with `trojanscope "
                   "evaluate`) and repair.json.")
@click.option("--train-bn-stats", is_flag=True,
              help="Received models (.pt2, TorchScript, ONNX): let fine-tuning update BatchNorm running statistics "
                   "(default: frozen, only the affine weights train).")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), default=None,
              help="A directory written by `trojanscope scan --out` (or its scan.json): reuse its reversed triggers "
                   "instead of scanning again (unlearn, nc-prune), or take the target label, the trigger's size "
                   "and its place from it (distribution-unlearn).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A setting of the method, repeatable (e.g. -p granularity=unit -p epochs=5 for fine-prune; "
                   "-p target=0 -p position=23,23 -p trigger_size=4 for distribution-unlearn without a scan). "
                   "distribution-unlearn's CLI budget: n_levels=3, steps=100, epochs=3 unless set here.")
@model_options
@common_options
def repair(model_path: Path, method: str, data_spec: str, out: Path, train_bn_stats: bool, scan_path: Path | None,
           params: tuple[str, ...], arch: str | None, input_shape: str | None, num_classes: int | None, json_path: Path | None, seed: int,
           device: str | None) -> None:
    """Repair MODEL with METHOD on clean data and write the repaired model to OUT."""
    cls = DEFENSES.get(method)
    kwargs = fill(cls, defence_params(method, params), seed=seed)
    if cls.uses_scan == "never" and scan_path is not None:
        raise ConfigError(f"--scan is not used by {method!r}; it takes no reversed trigger")
    data = open_data(data_spec, default_split="train")
    lm, surface = open_surface(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device,
                               data=data, freeze_bn=not train_bn_stats)
    data = fit_to_model(data, lm)
    scan = None if scan_path is None else load_scan(scan_path)
    kwargs, scan = _settings(cls, kwargs, scan, data.num_classes)
    defence = create(method, **kwargs)
    log.info("%s with %s", method, ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    result = defence.repair(surface.module, data, scan=scan)
    written = surface.write(result.model, out, extra={
        "repaired_with": {"method": method, "params": to_jsonable(defence.get_params())}})
    d = {"model": str(model_path), "method": method, "data": data.name, "out": str(out), "format": surface.format,
         "written": str(written), "reloaded": True, "surface": surface.to_dict(), **result.to_dict()}
    write_json(out / "repair.json", d)
    if result.history:
        cols = columns(result.history)
        click.echo(table(result.history, cols, percent=[c for c in ("accuracy", "attack_success") if c in cols]))
    if result.details.get("note"):
        click.echo(f"note: {result.details['note']}")
    if result.details.get("repaired") is False:
        click.echo(f"nothing repaired: {result.details.get('reason', '')}")
    click.echo(f"{method}: repaired model written to {written} ({surface.format}, reloaded; {result.seconds:.1f} s)")
    write_json(json_path, d)


def _settings(cls: Any, kwargs: dict[str, Any], scan: Any, num_classes: int) -> tuple[dict[str, Any], Any]:
    """The repair's settings and its ``scan=``. A repair that places a trigger of its own (it has
    ``position`` and ``trigger_size`` settings: distribution-unlearn) gets the CLI's budget and,
    from a scan, its target, size and place (:func:`scan_placement`) instead of the scan itself."""
    if kwargs.get("position") is not None:
        kwargs["position"] = parse_position(kwargs["position"])
    if not (takes(cls, "position") and takes(cls, "trigger_size")):
        return kwargs, scan
    kwargs = {**DISTRIBUTION_BUDGET, **kwargs}
    if scan is not None:
        from ..bench import SharedScan

        kwargs.update(scan_placement(SharedScan.from_result(scan), kwargs, num_classes,
                                     cls.param_defaults()["trigger_size"]))
        log.info("from the scan: target %s, a %sx%s trigger at %s", kwargs["target"], kwargs["trigger_size"],
                 kwargs["trigger_size"], kwargs["position"])
    return kwargs, None


def scan_placement(scan: Any, given: dict[str, Any], num_classes: int, default_size: int) -> dict[str, Any]:
    """``target``, ``trigger_size`` and ``position`` for a trigger-distribution repair from a
    scan, as the bench takes them: the scan's flagged label, the side of the smallest square
    holding 80% of its reversed mask, and that square's top-left corner. Settings the user gave
    with ``-p`` win."""
    out: dict[str, Any] = {}
    if given.get("target") is None:
        if not scan.flagged_labels:
            raise ConfigError("the scan found no backdoor, so it names no target label; give -p target=K to "
                              "repair anyway")
        out["target"] = scan.suspected_target
    target = int(given.get("target", out.get("target")))
    if not 0 <= target < num_classes:
        raise ConfigError(f"target {target} is out of range for {num_classes} classes")
    size = given.get("trigger_size")
    if size is None:
        size = type(scan)([target], scan.scores, scan.triggers).suspected_size()
        if size is not None:
            out["trigger_size"] = size
        else:
            size = default_size
    if given.get("position") is None:
        from ..bench import mask_box

        out["position"] = mask_box(scan.triggers[target].mask, int(size))
    return out
