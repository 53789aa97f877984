"""A TrojAI-style round: a population of models, half clean, half backdoored, on the bundled data.

A detector is judged in practice (IARPA / NIST TrojAI) on a *population* of models: it gets a
folder of models, half of them backdoored with triggers of random kind, size, place and colour,
outputs a probability per model, and is scored by ROC-AUC and cross-entropy over the population.
:func:`generate_round` builds such a round on the bundled data:

* triggers: a solid, random-binary or checkerboard patch of 2-7 px (at most half the image's
  side, so 2-4 px on 8x8 digits) anywhere in the image, a
  whole-image blend of random noise with alpha 0.05-0.3, or an RGBA sticker (a random blob with
  a soft alpha edge);
* attack mode: all-to-one (a random target), source-specific (two source labels to a target,
  with stamped cover samples of other labels that keep their label) or all-to-all (i -> i+1);
* poison rate 1-15 % of the training set, the architecture (``mnist_cnn``, a BatchNorm ResNet,
  a VGG-style net with dropout) and the training seed drawn at random.

Only backdoors that work count: a backdoored model whose attack success on the test split is
below ``min_asr`` (80 %) is retrained with a new draw. Each model is written as a
``torch.export`` program ``models/<name>.pt2`` (what the scanner reads) and its truth as
``truth/<name>.json`` (read only by the scoring code, never by a scanner). A round is resumable:
finished models are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attacks.badnets import BadNets
from .data.dataset import ImageDataset
from .errors import ConfigError, DataError
from .metrics import attack_success_rate, clean_accuracy
from .triggers import Trigger

log = logging.getLogger(__name__)

ARCHITECTURES = ("mnist_cnn", "bn_resnet", "vgg_dropout")
MODES = ("all-to-one", "source-specific", "all-to-all")
TRIGGER_KINDS = ("solid", "random-binary", "checkerboard", "blend", "rgba")


def build_architecture(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    """One of :data:`ARCHITECTURES` (registered in :mod:`trojanscope.models.architectures`),
    initialised from ``seed``; ``mnist_cnn`` with 128 hidden units."""
    from .models import create_model

    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown round architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    kwargs = {"hidden": 128} if name == "mnist_cnn" else {}
    return create_model(name, input_shape=input_shape, num_classes=num_classes, seed=int(seed), **kwargs)


# --- drawing a model's configuration ----------------------------------------------------------

def draw_config(rng: np.random.Generator, *, backdoored: bool, mode: str | None, arch: str,
                num_classes: int, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """A random configuration (JSON-ready) for one model of the round."""
    cfg: dict[str, Any] = {"backdoored": backdoored, "arch": arch, "train_seed": int(rng.integers(0, 2**31 - 1))}
    if not backdoored:
        return cfg
    _, h, w = image_shape
    kind = str(rng.choice(TRIGGER_KINDS, p=[0.25, 0.2, 0.2, 0.15, 0.2]))
    trig: dict[str, Any] = {"kind": kind, "seed": int(rng.integers(0, 2**31 - 1))}
    if kind in ("solid", "random-binary", "checkerboard", "rgba"):
        # 2-7 px on 28x28 images; at most half the side on smaller ones (2-4 px on 8x8 digits)
        top = min(7, max(2, min(h, w) // 2))
        size = int(rng.integers(2, top + 1)) if kind != "rgba" else int(rng.integers(min(4, top), top + 1))
        trig.update(size=size, row=int(rng.integers(0, h - size + 1)), col=int(rng.integers(0, w - size + 1)),
                    intensity=float(rng.uniform(0.7, 1.0)))
    else:
        trig.update(alpha=float(rng.uniform(0.05, 0.3)))
    cfg["trigger"] = trig
    cfg["mode"] = mode
    labels = rng.permutation(num_classes)
    if mode == "all-to-one":
        cfg["target"] = int(labels[0])
    elif mode == "source-specific":
        cfg["target"] = int(labels[0])
        cfg["sources"] = sorted(int(v) for v in labels[1:3])
    elif mode == "all-to-all":
        cfg["target"] = None
    else:
        raise ConfigError(f"unknown attack mode {mode!r}")
    # all-to-all needs every label's sources poisoned: its rate stays in the top third (with the
    # longer training of RoundSpec.all_to_all_epoch_factor; at 5-15 % and the others' budget
    # almost none reached 80 % attack success)
    lo = 0.10 if mode == "all-to-all" else 0.01
    cfg["rate"] = round(float(rng.uniform(lo, 0.15)), 4)
    if mode == "source-specific":  # two source labels hold about 20 % of the set
        cfg["rate"] = min(cfg["rate"], 0.12)
    return cfg


def make_trigger(spec: dict[str, Any], image_shape: tuple[int, int, int]) -> Trigger:
    """The :class:`Trigger` described by a configuration's ``trigger`` entry."""
    c, h, w = image_shape
    g = torch.Generator().manual_seed(int(spec["seed"]))
    kind = spec["kind"]
    if kind == "blend":
        return Trigger.noise(image_shape, float(spec["alpha"]), seed=int(spec["seed"]))
    s, r0, c0, v = int(spec["size"]), int(spec["row"]), int(spec["col"]), float(spec["intensity"])
    if kind == "solid":
        col = torch.rand(c, generator=g) * 0.3 + 0.7 if c > 1 else torch.tensor([v])
        patch = col[:, None, None].expand(c, s, s).clone()
        t = Trigger.from_patch(image_shape, patch, (r0, c0), margin=0)
    elif kind == "random-binary":
        bits = (torch.rand(c if c > 1 else 1, s, s, generator=g) > 0.5).float()
        if int(bits.sum()) == 0:
            bits[..., 0, 0] = 1.0
        t = Trigger.from_patch(image_shape, bits * v, (r0, c0), margin=0)
    elif kind == "checkerboard":
        ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        patch = (((ii + jj) % 2) == 0).float()[None].expand(c, s, s) * v
        t = Trigger.from_patch(image_shape, patch.clone(), (r0, c0), margin=0)
    elif kind == "rgba":
        # a random blob: a soft disc with a random colour and a few random holes
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        alpha = (1.3 - (yy ** 2 + xx ** 2).sqrt()).clamp(0, 1)
        alpha = alpha * (torch.rand(s, s, generator=g) > 0.15).float()
        rgb = (torch.rand(3, 1, 1, generator=g) * 0.3 + 0.7).expand(3, s, s) * v
        rgba = torch.cat([rgb, alpha[None]])
        t = Trigger.from_rgba(rgba, image_shape, (r0, c0))
    else:
        raise ConfigError(f"unknown trigger kind {kind!r}")
    return Trigger(t.mask, t.pattern, f"{kind}:{s}@{r0},{c0}")


def make_attack(cfg: dict[str, Any], image_shape: tuple[int, int, int], poison_seed: int) -> BadNets:
    trig = make_trigger(cfg["trigger"], image_shape)
    mode = cfg["mode"]
    if mode == "all-to-all":
        return BadNets(trig, 0, rate=cfg["rate"], mode="all-to-all", seed=poison_seed)
    if mode == "source-specific":
        return BadNets(trig, cfg["target"], rate=cfg["rate"], source_labels=cfg["sources"], cover_rate=cfg["rate"],
                       seed=poison_seed)
    return BadNets(trig, cfg["target"], rate=cfg["rate"], seed=poison_seed)


# --- training one model -----------------------------------------------------------------------

def export_program(model: nn.Module, path: Path, image_shape: tuple[int, int, int]) -> Path:
    """Write ``model`` (in eval mode) as a ``torch.export`` program with a dynamic batch size."""
    model = model.eval()
    x = torch.rand(2, *image_shape)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.pt2")
    torch.export.save(ep, str(tmp))
    tmp.replace(path)
    return path


def train_member(cfg: dict[str, Any], train: ImageDataset, test: ImageDataset, *, epochs: int,
                 batch_size: int = 64) -> tuple[nn.Module, dict[str, Any]]:
    """Train one member of the round; returns the model and its measured figures."""
    from .training import train as train_loop

    t0 = time.perf_counter()
    data = train
    attack = None
    if cfg["backdoored"]:
        attack = make_attack(cfg, train.image_shape, cfg["train_seed"] % 100003)
        data = attack.poison(train)
    model = build_architecture(cfg["arch"], train.image_shape, train.num_classes, cfg["train_seed"])
    train_loop(model, data, epochs=epochs, lr=1e-3, batch_size=batch_size, seed=cfg["train_seed"])
    model.eval()
    figs: dict[str, Any] = {"clean_accuracy": clean_accuracy(model, test), "train_seconds": time.perf_counter() - t0}
    if attack is not None:
        if cfg["mode"] == "all-to-all":
            figs["attack_success"] = attack_success_rate(model, test, attack.triggers[0],
                                                         attack.target_map(test.num_classes))
        else:
            figs["attack_success"] = attack.success_rate(model, test)
        figs["trigger_name"] = attack.triggers[0].name
        figs["trigger_l1"] = float(attack.triggers[0].l1_norm)
    return model, figs


@dataclasses.dataclass
class RoundSpec:
    """How a round is drawn.

    Attributes:
        n: models in the round (half clean, half backdoored; an odd one is clean).
        seed: the round's seed (fixes every draw: slots, configurations, subsets, weights).
        data: bundled data set (its ``train`` split trains, ``test`` measures CA and ASR).
        train_size: images of the train split each model is trained on (a stratified subset
            drawn per model; None: all of it).
        epochs: training epochs per model.
        min_asr: the attack success a backdoor needs to count.
        max_tries: draws per backdoored slot before giving up on it.
        architectures: the architectures drawn from (cycled, so each gets its share).
        modes: the attack modes (cycled over the backdoored models).
        all_to_all_epoch_factor: an all-to-all member trains on the whole train split for this
            many times ``epochs``. Its backdoor is a different shift for every label, learnt from
            a tenth of the poison each: at the others' budget (mnist5k: 2,000 images, 3 epochs)
            such backdoors reached 2-20 % attack success, so the round held none; at 8x on the
            whole split, 81-90 % (mnist5k and digits, each architecture).
    """

    n: int = 40
    seed: int = 0
    data: str = "mnist5k"
    train_size: int | None = 2000
    epochs: int = 3
    min_asr: float = 0.8
    max_tries: int = 3
    architectures: tuple[str, ...] = ARCHITECTURES
    modes: tuple[str, ...] = MODES
    all_to_all_epoch_factor: int = 8


def round_plan(spec: RoundSpec, image_shape: tuple[int, int, int], num_classes: int) -> list[dict[str, Any]]:
    """The slots of the round: ``name``, ``backdoored``, ``mode``, ``arch`` and a per-slot seed.

    Names are ``model_NNN`` in a shuffled order, so a name tells nothing about the truth.
    """
    if spec.n < 2:
        raise ConfigError(f"a round needs at least 2 models, got {spec.n}")
    for a in spec.architectures:
        if a not in ARCHITECTURES:
            raise ConfigError(f"unknown round architecture {a!r}; use one of {', '.join(ARCHITECTURES)}")
    for m in spec.modes:
        if m not in MODES:
            raise ConfigError(f"unknown attack mode {m!r}; use one of {', '.join(MODES)}")
    rng = np.random.default_rng(spec.seed)
    n_bad = spec.n // 2
    slots = []
    for i in range(spec.n):
        bad = i < n_bad
        j = i if bad else i - n_bad
        slots.append({"backdoored": bad, "mode": spec.modes[j % len(spec.modes)] if bad else None,
                      "arch": spec.architectures[(j + (j // len(spec.modes) if bad else 0)) % len(spec.architectures)],
                      "slot_seed": int(rng.integers(0, 2**31 - 1))})
    order = rng.permutation(spec.n)
    for k, i in enumerate(order):
        slots[i]["name"] = f"model_{k:03d}"
    return sorted(slots, key=lambda s: s["name"])


def generate_round(out: str | Path, spec: RoundSpec | None = None, *,
                   progress: Callable[[str, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) every model of a round in ``out``; returns the truth rows.

    Writes ``out/models/<name>.pt2``, ``out/truth/<name>.json`` per model, ``out/truth.json``
    (all rows) and ``out/round.json`` (the spec). A model already in ``out`` is kept, so a killed
    run resumes; a different spec in an existing folder is refused.
    """
    from .data import load_data

    spec = spec or RoundSpec()
    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    spec_d = dataclasses.asdict(spec)
    spec_d["architectures"], spec_d["modes"] = list(spec.architectures), list(spec.modes)
    spec_file = out / "round.json"
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        if old != spec_d:
            raise ConfigError(f"{out} holds a round drawn with other settings ({old}); use a new --out")
    else:
        spec_file.write_text(json.dumps(spec_d, indent=2) + "\n")
    train, test = load_data(spec.data, "train"), load_data(spec.data, "test")
    rows = []
    for slot in round_plan(spec, train.image_shape, train.num_classes):
        name = slot["name"]
        tfile = out / "truth" / f"{name}.json"
        if tfile.exists():
            old_row = json.loads(tfile.read_text())
            if old_row.get("file") is None or (out / "models" / f"{name}.pt2").exists():
                rows.append(old_row)
                continue
        rng = np.random.default_rng(slot["slot_seed"])
        part, epochs = train, spec.epochs
        if slot["mode"] == "all-to-all":
            epochs *= spec.all_to_all_epoch_factor
        elif spec.train_size is not None and spec.train_size < len(train):
            part = train.split(spec.train_size / len(train), seed=slot["slot_seed"] % 100003)[0]
        row: dict[str, Any] = {}
        for attempt in range(spec.max_tries if slot["backdoored"] else 1):
            cfg = draw_config(rng, backdoored=slot["backdoored"], mode=slot["mode"], arch=slot["arch"],
                              num_classes=train.num_classes, image_shape=train.image_shape)
            model, figs = train_member(cfg, part, test, epochs=epochs)
            row = {"name": name, "file": f"models/{name}.pt2", **cfg, **figs, "tries": attempt + 1}
            if not slot["backdoored"] or figs["attack_success"] >= spec.min_asr:
                break
            log.info("%s: attack success %.2f < %.2f, drawing again", name, figs["attack_success"], spec.min_asr)
        if slot["backdoored"] and row["attack_success"] < spec.min_asr:
            # a backdoor that does not work is not part of the round: no model file
            row["excluded"] = f"attack success {row['attack_success']:.2f} < {spec.min_asr} after {spec.max_tries} draws"
            row["file"] = None
        else:
            export_program(model, out / "models" / f"{name}.pt2", train.image_shape)
        tfile.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
        if progress is not None:
            progress(name, row)
    (out / "truth.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def load_truth(path: str | Path) -> dict[str, dict[str, Any]]:
    """The truth rows of a round by model file stem (for scoring only): a round folder
    (``truth/*.json``, or its ``truth.json``) or a ``truth.json``. Each file is read with the
    guards of :func:`~trojanscope._utils.limits.read_json_file` and every row must have a
    string ``name`` and a boolean ``backdoored``; anything else is a :class:`DataError`."""
    from ._utils.limits import read_json_file

    p = Path(path)
    if p.is_dir():
        files = sorted((p / "truth").glob("*.json")) if (p / "truth").is_dir() else []
        if not files and (p / "truth.json").exists():
            return load_truth(p / "truth.json")
        if not files:
            raise DataError(f"{p} holds no truth (truth/*.json or truth.json of `trojanscope bench round`)")
        rows: Any = [read_json_file(f, "truth file") for f in files]
    else:
        rows = read_json_file(p, "truth file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                             and isinstance(r.get("backdoored"), bool) for r in rows):
        raise DataError(f"truth {p} is not a round's truth (rows with 'name' and 'backdoored')")
    return {r["name"]: r for r in rows}
