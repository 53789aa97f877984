"""``trojanscope pipeline``: run a chain of defences and print the figures after each step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..defenses import DEFENSES, list_defenses
from ..errors import ConfigError
from ..pipeline import Pipeline, evaluator
from . import cli
from ._common import columns, POSITIVE_INT, POSITIVE_FLOAT, NON_NEGATIVE_INT, common_options, fit_to_model, model_options, open_data, parse_trigger, table, write_json
from ._common import cpu_threads, parse_params
from ._options import fill
from ._surface import open_surface


def parse_step(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` -> ``(name, params)``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in DEFENSES:
        raise ConfigError(f"unknown defence {name!r} in --step; known: {', '.join(list_defenses())}")
    params = parse_params(tuple(p for p in rest.split(",") if p.strip())) if rest else {}
    return name, params


@cli.command(name="pipeline")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--step", "steps", multiple=True, required=True,
              help="A defence, in order: NAME or NAME:KEY=VALUE,... (e.g. --step activation-clustering "
                   "--step fine-prune:epochs=5); repeat.")
@click.option("--fit", "fit_spec", required=True,
              help="The defender's clean data: bundled name[:split] (default split: val), .npz or folder.")
@click.option("--train", "train_spec", default=None,
              help="The (possibly poisoned) training set, for data sanitisers: bundled name[:split], .npz or folder.")
@click.option("--test", "test_spec", default="mnist5k:test", show_default=True,
              help="Data the figures are measured on.")
@click.option("--trigger", default=None, help="Trigger spec or .safetensors file: attack success after each step.")
@click.option("--target", type=NON_NEGATIVE_INT, default=None, help="Target label of --trigger.")
@click.option("--retrain", type=click.Choice(["scratch", "continue"]), default="scratch", show_default=True,
              help="After a data sanitiser: train a fresh model, or train the current one on (pruned channels kept).")
@click.option("--epochs", type=POSITIVE_INT, default=10, show_default=True, help="Retraining epochs after a sanitiser.")
@click.option("--lr", type=POSITIVE_FLOAT, default=1e-3, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the final model, in the input's format (loads with `trojanscope evaluate`), "
                   "and pipeline.json.")
@click.option("--threads", type=POSITIVE_INT, default=None,
              help="CPU threads for torch and for numpy / scikit-learn (default: theirs). Trainings from "
                   "scratch depend on it: give the same count to repeat a run.")
@model_options
@common_options
def pipeline(model_path: Path, steps: tuple[str, ...], fit_spec: str, train_spec: str | None, test_spec: str,
             trigger: str | None, target: int | None, retrain: str, epochs: int, lr: float, out: Path | None,
             threads: int | None, arch: str | None, input_shape: str | None, num_classes: int | None,
             json_path: Path | None, seed: int, device: str | None) -> None:
    """Run defences on MODEL in the order of the --step options; print CA and ASR after each."""
    clean = open_data(fit_spec, default_split="val")
    lm, surface = open_surface(model_path, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device,
                               data=clean)
    clean = fit_to_model(clean, lm)
    test = open_data(test_spec, default_split="test", model=lm)
    train = open_data(train_spec, default_split="train", model=lm) if train_spec else None
    if trigger is not None and target is None:
        raise ConfigError("--trigger needs --target")
    if target is not None and not 0 <= target < test.num_classes:
        raise ConfigError(f"--target {target} is out of range for {test.num_classes} classes")
    trig = parse_trigger(trigger, test.image_shape) if trigger else None
    specs = []
    for s in steps:
        name, params = parse_step(s)
        specs.append((name, fill(DEFENSES.get(name), params, seed=seed)))
    pipe = Pipeline(specs, retrain=retrain, epochs=epochs, lr=lr, seed=seed)  # type: ignore[arg-type]
    with cpu_threads(threads):
        res = pipe.run(surface.module, clean, train_data=train, evaluate=evaluator(test, trig, target))
    if out is not None:
        written = surface.write(res.model, out, extra={"defended_with": pipe.get_params()})
        click.echo(f"final model written to {written} ({surface.format})")
        write_json(out / "pipeline.json", res.to_dict())
    cols = columns(res.history, skip=("family",))
    pct = [c for c in cols if c.startswith(("accuracy", "attack_success", "clean_rejected", "triggered_rejected"))]
    click.echo(table(res.history, cols, percent=pct))
    write_json(json_path, {"model": str(model_path), **res.to_dict()})
