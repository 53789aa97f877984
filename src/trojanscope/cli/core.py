"""``train`` and ``models``, and the training options and data that ``poison`` shares."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..data.loaders import load_data
from ..errors import ConfigError
from ..metrics import clean_accuracy
from ..models import ModelSpec, list_models, save_model
from ..training import train_new
from . import cli
from ._common import POSITIVE_FLOAT, POSITIVE_INT, common_options, pick_device, table, write_json


def training_options(f):
    f = click.option("--threads", type=POSITIVE_INT, default=None, help="CPU threads for training (default: torch's).")(f)
    f = click.option("--width", type=POSITIVE_INT, default=None,
                     help="Width of resnet18 / preact_resnet18 / vgg11_bn (64: the full model).")(f)
    f = click.option("--recipe", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
                     help="adam: Adam, constant lr; sgd: SGD momentum 0.9, wd 5e-4, one-cycle, random crops.")(f)
    f = click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True)(f)
    f = click.option("--lr", type=POSITIVE_FLOAT, default=None, help="Learning rate (default: the recipe's, 1e-3 / 0.05).")(f)
    f = click.option("--epochs", type=POSITIVE_INT, default=10, show_default=True)(f)
    f = click.option("--arch", default="mnist_cnn", show_default=True, help="Architecture (see `trojanscope models`).")(f)
    f = click.option("--data", "data_spec", default="mnist5k", show_default=True,
                     help="Bundled name[:split], an .npz or an image folder.")(f)
    f = click.option("--test", "test_spec", default=None,
                     help="Test data for CA (and ASR): a data spec, or a share such as 0.2 of --data held out "
                          "(stratified, --seed). Default: the bundled set's test split; none for your own data.")(f)
    return f


def describe_architecture(name: str) -> dict[str, Any]:
    """What ``trojanscope models`` prints for one registered architecture: its default input
    shape and kind (greyscale / colour), default number of classes, parameter count (at those
    defaults) and the first line of its docstring."""
    import inspect

    from ..models import MODELS, create_model
    from ._options import factory_defaults

    factory = MODELS.get(name)
    defaults = factory_defaults(factory)
    shape = tuple(defaults.get("input_shape", (1, 28, 28)))
    k = int(defaults.get("num_classes", 10))
    net = create_model(name, input_shape=shape, num_classes=k)
    doc = (inspect.getdoc(factory) or "").strip().splitlines()
    return {"name": name, "input": "x".join(str(v) for v in shape),
            "kind": "greyscale" if shape[0] == 1 else "colour" if shape[0] == 3 else f"{shape[0]} channels",
            "classes": k, "parameters": sum(p.numel() for p in net.parameters()),
            "description": doc[0] if doc else ""}


@cli.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the list as JSON to this file ('-' for stdout).")
def models(json_path: Path | None) -> None:
    """List the built-in architectures: default input (C x H x W, greyscale or colour), classes and
    parameter count. Any input shape and number of classes can be given when training."""
    rows = [describe_architecture(n) for n in list_models()]
    text = table(rows, ["name", "input", "kind", "classes", "parameters", "description"])
    click.echo(text, err=str(json_path) == "-")
    write_json(json_path, rows)


@cli.command()
@training_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write.")
@common_options
def train(data_spec: str, test_spec: str | None, arch: str, epochs: int, lr: float | None, batch_size: int,
          recipe: str, width: int | None, threads: int | None, out: Path,
          json_path: Path | None, seed: int, device: str | None) -> None:
    """Train a clean model and write it to OUT (safetensors + JSON spec)."""
    t0 = time.perf_counter()
    data, test = train_and_test(data_spec, test_spec, seed)
    dev = pick_device(device)
    ex = training_extra(recipe, width, threads)
    model = train_new(arch, data, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, device=dev, progress=True,
                      **ex)
    spec = ModelSpec(arch, data.image_shape, data.num_classes, arch_kwargs=ex["arch_kwargs"] or {},
                     class_names=data.class_names,
                     extra={"trained_on": data.name, "epochs": epochs, "lr": lr, "recipe": recipe, "seed": seed})
    save_model(model, out, spec)
    result = {"model": str(out), "accuracy": clean_accuracy(model, test) if test is not None else None,
              "n": len(test) if test is not None else 0, "seconds": time.perf_counter() - t0}
    click.echo(table([result], ["model", "accuracy", "n", "seconds"], percent=["accuracy"]))
    warn_if_at_chance(result["accuracy"], data.num_classes)
    write_json(json_path, result)


def warn_if_at_chance(accuracy: float | None, num_classes: int) -> None:
    """A warning line when a model just trained is no better than chance on its test data (at most
    twice 1/K): a plain ReLU stack such as ``gtsrb_cnn`` can sit at loss ln K for every epoch
    (on cmnist with one thread it did for seeds 0, 1 and 2), and such a model is no subject for a
    defence."""
    if accuracy is not None and accuracy <= 2.0 / num_classes:
        click.echo(f"warning: the trained model classifies {100 * accuracy:.1f}% of the test data right (chance "
                   f"{100 / num_classes:.1f}%): its training never left chance; try another --seed or --recipe",
                   err=True)


def training_extra(recipe: str, width: int | None, threads: int | None) -> dict[str, Any]:
    """train_new's arguments from --recipe / --width / --threads."""
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    return {"recipe": recipe, "threads": threads, "arch_kwargs": {"width": width} if width else None}


def test_split(data_spec: str):
    """The bundled test split when training on a bundled set; None for the user's own data."""
    name = data_spec.partition(":")[0]
    from ..data.loaders import BUNDLED

    return load_data(f"{name}:test") if name in BUNDLED else None


def train_and_test(data_spec: str, test_spec: str | None, seed: int, *, what: str = "CA and ASR"):
    """``(train, test)`` for the training commands.

    ``test_spec`` is a data spec, or a share in (0, 1) of ``data_spec`` held out (stratified by
    label, seeded) and removed from the training set. Without it, a bundled set's test split is
    used; for the user's own data there is none, and a warning says that ``what`` is not measured.
    """
    data = load_data(data_spec, default_split="train")
    if test_spec is None:
        test = test_split(data_spec)
        if test is None:
            click.echo(f"warning: no test data for {data.name}, so {what} are not measured; give --test FILE, or "
                       f"--test 0.2 to hold out a share of the data", err=True)
        return data, test
    try:
        share = float(test_spec)
    except ValueError:
        return data, load_data(test_spec, default_split="test")
    if not 0 < share < 1:
        raise ConfigError(f"--test takes a data spec or a share in (0, 1), got {test_spec!r}")
    test, rest = data.split(share, seed=seed)
    if len(test) == 0 or len(rest) == 0:
        raise ConfigError(f"--test {test_spec}: holding out that share of {len(data)} samples leaves an empty split")
    return rest, test
