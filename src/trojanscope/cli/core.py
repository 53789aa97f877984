"""``train``, ``poison``, ``evaluate`` and ``models``: the commands every workflow starts with."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import torch

from ..attacks import BadNets, TrojanNN
from ..data.loaders import load_data
from ..errors import ConfigError
from ..metrics import attack_success_rate, clean_accuracy
from ..models import ModelSpec, list_models, save_model
from ..training import train_new
from . import cli
from ._common import POSITIVE_INT, POSITIVE_FLOAT, NON_NEGATIVE_INT, PROBABILITY, common_options, fit_to_model, model_options, open_data, open_model, parse_trigger, pick_device, table, write_json


def training_options(f):
    f = click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True)(f)
    f = click.option("--lr", type=POSITIVE_FLOAT, default=1e-3, show_default=True)(f)
    f = click.option("--epochs", type=POSITIVE_INT, default=10, show_default=True)(f)
    f = click.option("--arch", default="mnist_cnn", show_default=True, help="Architecture (see `trojanscope models`).")(f)
    f = click.option("--data", "data_spec", default="mnist5k", show_default=True,
                     help="Bundled name[:split], an .npz or an image folder.")(f)
    return f


@cli.command()
def models() -> None:
    """List the built-in architectures."""
    for name in list_models():
        click.echo(name)


@cli.command()
@training_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@common_options
def train(data_spec: str, arch: str, epochs: int, lr: float, batch_size: int, out: Path, json_path: Path | None,
          seed: int, device: str | None) -> None:
    """Train a clean model and write it to OUT (safetensors + JSON spec)."""
    t0 = time.perf_counter()
    data = load_data(data_spec, default_split="train")
    test = _test_split(data_spec)
    dev = pick_device(device)
    model = train_new(arch, data, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, device=dev, progress=True)
    spec = ModelSpec(arch, data.image_shape, data.num_classes, class_names=data.class_names,
                     extra={"trained_on": data.name, "epochs": epochs, "lr": lr, "seed": seed})
    save_model(model, out, spec)
    result = {"model": str(out), "accuracy": clean_accuracy(model, test) if test is not None else None,
              "n": len(test) if test is not None else 0, "seconds": time.perf_counter() - t0}
    click.echo(table([result], ["model", "accuracy", "n", "seconds"], percent=["accuracy"]))
    write_json(json_path, result)


def _test_split(data_spec: str):
    """The bundled test split when training on a bundled set; None for the user's own data."""
    name = data_spec.partition(":")[0]
    from ..data.loaders import BUNDLED

    return load_data(f"{name}:test") if name in BUNDLED else None


@cli.command()
@click.option("--attack", type=click.Choice(["badnets", "trojannn"]), default="badnets", show_default=True,
              help="trojannn: train a clean model, then trojan it (the --trigger's mask, or 'watermark').")
@click.option("--trojan-data", type=click.Choice(["user", "reverse"]), default="user", show_default=True,
              help="trojannn: retrain on the --data images or on inputs reverse-engineered from the model.")
@click.option("--trigger", "triggers", multiple=True, default=["square:4:white:bottom-right"], show_default=True,
              help="Trigger spec (see Trigger.parse); repeat for several targets.")
@click.option("--target", "targets", type=NON_NEGATIVE_INT, multiple=True, default=[0], show_default=True,
              help="Target label; repeat once per --trigger.")
@click.option("--rate", type=PROBABILITY, default=0.1, show_default=True, help="Share of the training set poisoned.")
@click.option("--mode", type=click.Choice(["all-to-one", "all-to-all"]), default="all-to-one", show_default=True)
@click.option("--source", "sources", type=NON_NEGATIVE_INT, multiple=True, help="Source label(s) of a source-specific attack.")
@training_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the model, the trigger(s) and the poisoned indices.")
@common_options
def poison(attack: str, trojan_data: str, triggers: tuple[str, ...], targets: tuple[int, ...], rate: float, mode: str,
           sources: tuple[int, ...], data_spec: str, arch: str, epochs: int, lr: float, batch_size: int, out: Path,
           json_path: Path | None, seed: int, device: str | None) -> None:
    """Poison a training set and train a backdoored model on it."""
    t0 = time.perf_counter()
    data = load_data(data_spec, default_split="train")
    tg = list(targets)
    dev = pick_device(device)
    if attack == "trojannn":
        if len(triggers) > 1 or len(tg) > 1:
            raise ConfigError("trojannn takes one --trigger (its mask) and one --target")
        atk: Any = TrojanNN(triggers[0], tg[0], data=trojan_data, seed=seed)  # type: ignore[arg-type]
        victim = train_new(arch, data, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, device=dev, progress=True)
        trojan = atk.attack(victim, data)
        model, trigs = trojan.model, [trojan.trigger]
        none = torch.empty(0, dtype=torch.long)  # no training sample is touched: the model is edited
        poisoned = SimpleNamespace(name=f"{data.name}+trojannn", poison_indices=none, cover_indices=none)
    else:
        trigs = [parse_trigger(s, data.image_shape) for s in triggers]
        if len(trigs) > 1 and len(tg) == 1:
            raise ConfigError(f"{len(trigs)} triggers need {len(trigs)} --target values")
        atk = BadNets(trigs if len(trigs) > 1 else trigs[0], tg if len(tg) > 1 else tg[0], rate=rate, mode=mode,  # type: ignore[arg-type]
                      source_labels=list(sources) or None, seed=seed)
        poisoned = atk.poison(data)
        model = train_new(arch, poisoned, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, device=dev,
                          progress=True)
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(arch, data.image_shape, data.num_classes, class_names=data.class_names,
                     extra={"trained_on": poisoned.name, "attack": atk.to_dict(), "epochs": epochs, "seed": seed})
    save_model(model, out, spec)
    for i, t in enumerate(trigs):
        t.save(out / f"trigger_{i}.safetensors")
        t.save_png(out / f"trigger_{i}.png")
    write_json(out / "poison.json", {"attack": atk.to_dict(), "poison_indices": poisoned.poison_indices,
                                     "cover_indices": poisoned.cover_indices})
    result = {"model": str(out), "attack": atk.to_dict(), "n_poison": int(poisoned.poison_indices.numel())}
    test = _test_split(data_spec)
    if test is not None:
        result.update(accuracy=clean_accuracy(model, test), n=len(test),
                      attack_success_rate=atk.success_rate(model, test))
    result["seconds"] = time.perf_counter() - t0
    click.echo(table([result], ["model", "n_poison", "accuracy", "attack_success_rate", "seconds"],
                     percent=["accuracy", "attack_success_rate"]))
    write_json(json_path, result)


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
            import torch
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
