"""``trojanscope evaluate``: clean accuracy of a model, and attack success with a trigger."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..errors import ConfigError
from ..metrics import attack_success_rate, clean_accuracy
from . import cli
from ._common import NON_NEGATIVE_INT, POSITIVE_INT, common_options, fit_to_model, model_options, open_data, open_model, parse_trigger, table, write_json


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", default="mnist5k:test", show_default=True,
              help="Bundled name[:split] (default split: test), an .npz or an image folder.")
@click.option("--trigger", default=None, help="Trigger spec or .safetensors file to measure attack success.")
@click.option("--target", type=NON_NEGATIVE_INT, default=None, help="Target label of --trigger (all-to-one).")
@click.option("--all-to-all", is_flag=True, help="The trigger maps label i to (i + 1) mod K.")
@click.option("--source", "sources", type=NON_NEGATIVE_INT, multiple=True, help="Source label(s) of a source-specific trigger.")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True)
@model_options
@common_options
def evaluate(model_path: Path, data_spec: str, trigger: str | None, target: int | None, all_to_all: bool,
             sources: tuple[int, ...], batch_size: int, arch: str | None, input_shape: str | None,
             num_classes: int | None, json_path: Path | None, seed: int, device: str | None) -> None:
    """Clean accuracy of MODEL on the data, and attack success with a trigger."""
    data = open_data(data_spec)
    lm = open_model(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device, data=data)
    data = fit_to_model(data, lm)
    result: dict = {"model": str(model_path), "format": lm.format, "data": data.name,
                    "accuracy": clean_accuracy(lm.model, data, batch_size=batch_size), "n": len(data)}
    if trigger is not None:
        if target is None and not all_to_all:
            raise ConfigError("--trigger needs --target (or --all-to-all)")
        trig = parse_trigger(trigger, data.image_shape)
        if all_to_all:
            tmap = (torch.arange(data.num_classes) + 1) % data.num_classes
            result["attack_success_rate"] = attack_success_rate(lm.model, data, trig, tmap, batch_size=batch_size)
        else:
            if not 0 <= target < data.num_classes:  # type: ignore[operator]
                raise ConfigError(f"--target {target} is out of range for {data.num_classes} classes")
            result["attack_success_rate"] = attack_success_rate(lm.model, data, trig, int(target),  # type: ignore[arg-type]
                                                                source_labels=list(sources) or None,
                                                                batch_size=batch_size)
        result["trigger"] = trig.name
        result["target"] = "all-to-all" if all_to_all else target
    click.echo(table([result], [c for c in ("model", "format", "n", "accuracy", "attack_success_rate") if c in result],
                     percent=["accuracy", "attack_success_rate"]))
    write_json(json_path, result)
