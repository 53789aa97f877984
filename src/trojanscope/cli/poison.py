"""``trojanscope poison``: poison a training set and train a backdoored model on it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import torch

from ..data.dataset import ImageDataset
from ..errors import ConfigError
from ..metrics import clean_accuracy
from ..models import ModelSpec, save_model
from ..training import train_new
from . import cli
from ._common import NON_NEGATIVE_INT, POSITIVE_INT, PROBABILITY, common_options, parse_trigger, pick_device, table, write_json
from ._options import attack_params, settings
from .core import train_and_test, training_extra, training_options, warn_if_at_chance


def build_cli_attack(attack: str, triggers: list[Any], targets: list[int], *, rate: float, mode: str,
                     sources: tuple[int, ...], trojan_data: str, params: dict[str, Any], seed: int) -> Any:
    """The attack object of ``poison``'s options: the common flags fill the constructor arguments
    the attack has (trigger, target, rate, seed), ``-p`` settings override them or set the rest
    (an attack's own training, e.g. ``-p epochs=3`` for pruning-aware's retraining)."""
    from ..attacks import ATTACKS

    cls = ATTACKS.get(attack)
    sig = settings(cls)
    if attack == "badnets":
        kw: dict[str, Any] = dict(trigger=triggers if len(triggers) > 1 else triggers[0],
                                  target=targets if len(targets) > 1 else targets[0], rate=rate, mode=mode,
                                  source_labels=list(sources) or None, seed=seed)
    else:
        if len(triggers) > 1 or len(targets) > 1:
            raise ConfigError(f"{attack} takes one --trigger and one --target")
        if mode != "all-to-one" or sources:
            raise ConfigError(f"--mode and --source are BadNets options; {attack} is all-to-one")
        kw = {"target": targets[0]}
        if "trigger" in sig:
            kw["trigger"] = triggers[0]
        elif "mask" in sig:  # the Trojaning attack: the trigger spec gives its mask
            kw["mask"] = triggers[0]
        for name, value in (("rate", rate), ("seed", seed), ("data", trojan_data)):
            if name in sig and not (name == "rate" and attack == "trojannn"):
                kw[name] = value
    kw.update(params)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"attack {attack}: {e}") from None


def _attack_names() -> list[str]:
    from ..attacks import ATTACKS

    return sorted(ATTACKS.names())


@cli.command()
@click.option("--attack", type=click.Choice(_attack_names()), default="badnets", show_default=True,
              help="badnets: poison the data and train on it; trojannn: train a clean model, then trojan it (the "
                   "--trigger's mask, or 'watermark'); pruning-aware: train a clean model, prune it, train the "
                   "pruned model on poisoned data, reinstate the pruned channels as dormant decoys. Each attack's "
                   "own settings: -p KEY=VALUE.")
@click.option("--trojan-data", type=click.Choice(["user", "reverse"]), default="user", show_default=True,
              help="trojannn: retrain on the --data images or on inputs reverse-engineered from the model.")
@click.option("--trigger", "triggers", multiple=True, default=["square:4:white:bottom-right"], show_default=True,
              help="Trigger spec (see Trigger.parse); repeat for several targets.")
@click.option("--target", "targets", type=NON_NEGATIVE_INT, multiple=True, default=[0], show_default=True,
              help="Target label; repeat once per --trigger.")
@click.option("--rate", type=PROBABILITY, default=0.1, show_default=True, help="Share of the training set poisoned.")
@click.option("--mode", type=click.Choice(["all-to-one", "all-to-all"]), default="all-to-one", show_default=True)
@click.option("--source", "sources", type=NON_NEGATIVE_INT, multiple=True, help="Source label(s) of a source-specific attack.")
@click.option("--groups", "n_sources", type=POSITIVE_INT, default=10, show_default=True,
              help="Provenance groups written to train.npz for a training set that has none: the clean samples "
                   "spread over them at random, the poisoned ones all in group 0 (one compromised source).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A setting of the attack, repeatable (e.g. -p max_drop=0.05 for pruning-aware, "
                   "-p n_neurons=1 for trojannn).")
@training_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the model, the trigger(s), the poisoned training set (train.npz) and poison.json.")
@common_options
def poison(attack: str, trojan_data: str, triggers: tuple[str, ...], targets: tuple[int, ...], rate: float, mode: str,
           sources: tuple[int, ...], n_sources: int, params: tuple[str, ...], data_spec: str, test_spec: str | None,
           arch: str, epochs: int, lr: float | None, batch_size: int, recipe: str, width: int | None,
           threads: int | None, out: Path, json_path: Path | None, seed: int, device: str | None) -> None:
    """Poison a training set and train a backdoored model on it.

    OUT gets the model, the trigger(s), poison.json (the attack and the poisoned indices) and
    train.npz: the training set the model was trained on (x, y), with is_poison (ground truth,
    for scoring) and groups (provenance), ready for `trojanscope inspect-data OUT --data
    OUT/train.npz`. The Trojaning attack edits a trained model and poisons no stored sample, so
    its train.npz is the clean set with is_poison all false.
    """
    from ..data.poisoned import assign_sources

    t0 = time.perf_counter()
    if n_sources < 1:
        raise ConfigError(f"--groups must be >= 1, got {n_sources}")
    data, test = train_and_test(data_spec, test_spec, seed)
    tg = list(targets)
    dev = pick_device(device)
    ex = training_extra(recipe, width, threads)
    kw = attack_params(attack, params)
    if attack == "badnets" and len(triggers) > 1 and len(tg) == 1:
        raise ConfigError(f"{len(triggers)} triggers need {len(triggers)} --target values")
    trig_objs = [parse_trigger(t, data.image_shape) for t in triggers] if attack != "trojannn" else list(triggers)
    atk = build_cli_attack(attack, trig_objs, tg, rate=rate, mode=mode, sources=sources, trojan_data=trojan_data,
                           params=kw, seed=seed)
    poisoned: Any = atk.poison(data) if hasattr(atk, "poison") else data
    train_kw = dict(seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, device=dev, progress=True, **ex)
    model, trigs = _implant(atk, arch, data, poisoned, dev, train_kw)
    poisoned = assign_sources(_as_poisoned(poisoned, data, atk, attack), n_sources, seed)
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(arch, data.image_shape, data.num_classes, arch_kwargs=ex["arch_kwargs"] or {},
                     class_names=data.class_names,
                     extra={"trained_on": poisoned.name, "attack": atk.to_dict(), "epochs": epochs, "seed": seed})
    save_model(model, out, spec)
    for i, t in enumerate(trigs):
        t.save(out / f"trigger_{i}.safetensors")
        t.save_png(out / f"trigger_{i}.png")
    write_training_set(poisoned, out / "train.npz")
    write_json(out / "poison.json", {"attack": atk.to_dict(), "data": data.name, "n": len(poisoned),
                                     "test": test_spec, "poison_indices": poisoned.poison_indices,
                                     "cover_indices": poisoned.cover_indices})
    result: dict[str, Any] = {"model": str(out), "attack": atk.to_dict(), "n_poison": int(poisoned.poison_indices.numel()),
                              "train_set": str(out / "train.npz"), "accuracy": None, "attack_success_rate": None}
    if test is not None:
        result.update(accuracy=clean_accuracy(model, test), n=len(test),
                      attack_success_rate=atk.success_rate(model, test))
    result["seconds"] = time.perf_counter() - t0
    click.echo(table([result], ["model", "n_poison", "accuracy", "attack_success_rate", "seconds"],
                     percent=["accuracy", "attack_success_rate"]))
    warn_if_at_chance(result["accuracy"], data.num_classes)
    write_json(json_path, result)


def _implant(atk: Any, arch: str, data: ImageDataset, poisoned: Any, dev: Any,
             train_kw: dict[str, Any]) -> tuple[torch.nn.Module, list[Any]]:
    """The backdoored model and its trigger(s): trained on the poisoned set for a data attack;
    for a model attack, a clean model trained on ``data`` and then edited by the attack."""
    if getattr(atk, "kind", "data") != "model":
        return train_new(arch, poisoned, **train_kw), list(atk.triggers)
    victim = train_new(arch, data, **train_kw)
    if hasattr(atk, "implant"):  # pruning-aware: prune, train on the poisoned set, reinstate decoys
        return atk.implant(victim, data, device=dev), list(atk.triggers)
    trojan = atk.attack(victim, data)  # the Trojaning attack makes its own trigger
    return trojan.model, [trojan.trigger]


def _as_poisoned(poisoned: Any, data: ImageDataset, atk: Any, attack: str) -> Any:
    """``poisoned`` as a :class:`~trojanscope.data.poisoned.PoisonedDataset` (an attack that
    poisons no stored sample leaves the clean set: no poisoned or cover index)."""
    from ..data.poisoned import PoisonedDataset

    if isinstance(poisoned, PoisonedDataset):
        return poisoned
    none = torch.empty(0, dtype=torch.long)
    return PoisonedDataset(data.x, data.y, data.num_classes, data.class_names, f"{data.name}+{attack}",
                           data.groups, poison_indices=none, cover_indices=none, original_y=data.y,
                           attack=atk.to_dict())


def write_training_set(poisoned: Any, path: Path) -> None:
    """``train.npz``: float ``x`` (N, C, H, W), ``y`` (as trained on), ``is_poison`` and
    ``is_cover`` (ground truth, for scoring only), ``original_y`` and the provenance ``groups``."""
    import numpy as np

    n = len(poisoned)
    cover = torch.zeros(n, dtype=torch.bool)
    cover[poisoned.cover_indices] = True
    arrays = {"x": poisoned.x.numpy(), "y": poisoned.y.numpy(), "is_poison": poisoned.is_poison.numpy(),
              "is_cover": cover.numpy(),
              "original_y": (poisoned.original_y if poisoned.original_y is not None else poisoned.y).numpy()}
    if poisoned.groups is not None:
        arrays["groups"] = poisoned.groups.numpy()
    np.savez_compressed(path, **arrays)
