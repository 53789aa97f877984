"""``trojanscope repair``: remove a backdoor with any registered repair method.

The ``--method`` choices are the registry's repair family, so every repair module imported by
``trojanscope.defenses`` appears here without editing this file.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import click

from .._utils.results import to_jsonable
from ..defenses import DEFENSES, create, list_defenses
from ..errors import ConfigError, DataError, UnsupportedModelError
from ..models import save_model
from ..triggers import Trigger
from . import cli
from ._common import common_options, defence_params, fit_to_model, model_options, open_data, open_model, table, write_json


def load_scan_triggers(path: Path) -> dict[int, Trigger]:
    """The flagged labels' reversed triggers from a directory written by ``scan --out`` (or its
    ``scan.json``), as ``{label: Trigger}``."""
    p = Path(path)
    js = p / "scan.json" if p.is_dir() else p
    if not js.is_file():
        raise DataError(f"{path}: not a scan directory (no scan.json); write one with `trojanscope scan --out DIR`")
    try:
        d = json.loads(js.read_text())
        labels = [int(k) for k in d["flagged_labels"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{js}: not a scan result ({e})") from None
    return {k: Trigger.load(js.parent / f"trigger_{k}.safetensors") for k in labels}


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(list_defenses("repair")), required=True, help="The repair method.")
@click.option("--data", "data_spec", required=True,
              help="The defender's clean data: bundled name[:split] (default split: train), an .npz or an image folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the repaired model (loads with `trojanscope evaluate`) and repair.json.")
@click.option("--scan", "scan_path", type=click.Path(path_type=Path), default=None,
              help="A directory written by `trojanscope scan --out` (or its scan.json): reuse its reversed triggers "
                   "instead of scanning again (methods that take triggers: unlearn, nc-prune).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A setting of the method, repeatable (e.g. -p granularity=unit -p epochs=5 for fine-prune).")
@model_options
@common_options
def repair(model_path: Path, method: str, data_spec: str, out: Path, scan_path: Path | None, params: tuple[str, ...],
           arch: str | None, input_shape: str | None, num_classes: int | None, json_path: Path | None, seed: int,
           device: str | None) -> None:
    """Repair MODEL with METHOD on clean data and write the repaired model to OUT."""
    data = open_data(data_spec, default_split="train")
    lm = open_model(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device, data=data)
    if lm.spec.arch is None:
        raise UnsupportedModelError(
            f"{model_path}: repair writes a trojanscope model directory, which needs a known architecture; give a "
            f"trojanscope model directory or a state dict with --arch (not a {lm.format} program)")
    data = fit_to_model(data, lm)
    kwargs0 = defence_params(method, params)
    if "seed" in inspect.signature(DEFENSES.get(method).__init__).parameters:
        kwargs0.setdefault("seed", seed)
    defence = create(method, **kwargs0)
    kwargs: dict[str, Any] = {}
    if scan_path is not None:
        if "triggers" not in inspect.signature(defence.repair).parameters:
            raise ConfigError(f"--scan is not used by {method!r}; it takes no reversed trigger")
        kwargs["triggers"] = load_scan_triggers(scan_path)
    result = defence.repair(lm.model, data, **kwargs)
    spec = lm.spec
    spec.extra = {**spec.extra, "repaired_with": {"method": method, "params": to_jsonable(defence.get_params())}}
    save_model(result.model, out, spec)
    d = {"model": str(model_path), "method": method, "data": data.name, "out": str(out), **result.to_dict()}
    (out / "repair.json").write_text(json.dumps(to_jsonable(d), indent=2) + "\n")
    if result.history:
        cols: list[str] = []
        for r in result.history:
            cols += [k for k in r if k not in cols]
        click.echo(table(result.history, cols, percent=[c for c in ("accuracy", "attack_success") if c in cols]))
    if result.details.get("repaired") is False:
        click.echo(f"nothing repaired: {result.details.get('reason', '')}")
    click.echo(f"{method}: repaired model written to {out}/ ({result.seconds:.1f} s)")
    write_json(json_path, d)
