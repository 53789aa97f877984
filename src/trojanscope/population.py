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
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attacks.badnets import BadNets
from .data.dataset import ImageDataset
from .errors import ConfigError
from .metrics import attack_success_rate, clean_accuracy
from .triggers import Trigger

log = logging.getLogger(__name__)

ARCHITECTURES = ("mnist_cnn", "bn_resnet", "vgg_dropout")
MODES = ("all-to-one", "source-specific", "all-to-all")
TRIGGER_KINDS = ("solid", "random-binary", "checkerboard", "blend", "rgba")


# --- the round's small architectures ---------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, a: int, b: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(a, b, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(b, b, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(b)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or a != b:
            self.shortcut = nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class SmallBNResNet(nn.Module):
    """A small BatchNorm ResNet: 3x3 stem, three basic blocks (``w``, ``2w``, ``4w`` channels,
    each with stride 2), global average pooling, one linear layer."""

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 width: int = 8) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(input_shape[0], w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = _Block(w, w, 2)
        self.layer2 = _Block(w, 2 * w, 2)
        self.layer3 = _Block(2 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.linear(self.flatten(self.pool(out)))


class SmallVGG(nn.Module):
    """A VGG-style net: two stages of two 3x3 convolutions and a max-pool, then two dense layers
    with dropout."""

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 width: int = 8, hidden: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        c, w = input_shape[0], width
        self.features = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        with torch.no_grad():
            d = int(self.features(torch.zeros(1, *input_shape)).flatten(1).shape[1])
        self.flatten = nn.Flatten()
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(d, hidden)
        self.relu = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop2(self.relu(self.fc1(self.drop1(self.flatten(self.features(x)))))))


def build_architecture(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    """One of :data:`ARCHITECTURES`, initialised from ``seed``."""
    from .models import create_model

    if name == "mnist_cnn":
        return create_model("mnist_cnn", input_shape=input_shape, num_classes=num_classes, seed=seed, hidden=128)
    factories: dict[str, Callable[..., nn.Module]] = {"bn_resnet": SmallBNResNet, "vgg_dropout": SmallVGG}
    if name not in factories:
        raise ConfigError(f"unknown round architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return factories[name](input_shape=input_shape, num_classes=num_classes)


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
    # all-to-all needs every label's sources poisoned: keep its rate in the upper half
    lo = 0.05 if mode == "all-to-all" else 0.01
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
        seed: the round's seed (fixes every draw; the held-out round of the figures uses its own).
        data: bundled data set (its ``train`` split trains, ``test`` measures CA and ASR).
        train_size: images of the train split each model is trained on (a stratified subset
            drawn per model; None: all of it).
        epochs: training epochs per model.
        min_asr: the attack success a backdoor needs to count.
        max_tries: draws per backdoored slot before giving up on it.
        architectures: the architectures drawn from (cycled, so each gets its share).
        modes: the attack modes (cycled over the backdoored models).
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
        part = train
        if spec.train_size is not None and spec.train_size < len(train):
            part = train.split(spec.train_size / len(train), seed=slot["slot_seed"] % 100003)[0]
        row: dict[str, Any] = {}
        for attempt in range(spec.max_tries if slot["backdoored"] else 1):
            cfg = draw_config(rng, backdoored=slot["backdoored"], mode=slot["mode"], arch=slot["arch"],
                              num_classes=train.num_classes, image_shape=train.image_shape)
            model, figs = train_member(cfg, part, test, epochs=spec.epochs)
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


def load_truth(round_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The truth rows of a round by model file stem (for scoring only)."""
    d = Path(round_dir)
    rows = {}
    for p in sorted((d / "truth").glob("*.json")):
        r = json.loads(p.read_text())
        rows[r["name"]] = r
    return rows


# --- scoring a population ---------------------------------------------------------------------

def population_scores(prob: np.ndarray | list[float], truth: np.ndarray | list[bool]) -> dict[str, float]:
    """ROC-AUC and cross-entropy of per-model probabilities (the TrojAI scores).

    The cross-entropy clips probabilities to ``[1e-6, 1 - 1e-6]`` as an infinite loss for a
    single confident mistake would hide the rest of the population.
    """
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-6, 1 - 1e-6)
    t = np.asarray(truth, dtype=bool)
    auc = float(roc_auc_score(t, p)) if 0 < t.sum() < t.size else math.nan
    return {"roc_auc": auc, "cross_entropy": float(log_loss(t, p, labels=[False, True])),
            "n": int(t.size), "positives": int(t.sum())}


# --- scanning a population ----------------------------------------------------------------------

#: The columns of a population scan's table (``scan.csv``).
SCAN_COLUMNS = ("file", "probability", "verdict", "flagged_labels", "seconds", "error")


def expand_models(items: list[str | Path]) -> list[Path]:
    """The model files named by ``items``: files, folders (every non-hidden file or trojanscope
    model folder in them, sorted) and glob patterns; duplicates removed, order kept."""
    import glob as _glob

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and not (p / "model.safetensors").exists():
            members = sorted(q for q in p.iterdir() if not q.name.startswith(".")
                             and (q.is_file() or (q / "model.safetensors").exists()))
            if not members:
                raise ConfigError(f"folder {p} holds no model files")
            out.extend(members)
        elif p.exists():
            out.append(p)
        elif any(ch in str(item) for ch in "*?["):
            hits = sorted(Path(h) for h in _glob.glob(str(item)) if not Path(h).name.startswith("."))
            if not hits:
                raise ConfigError(f"no model file matches {item!r}")
            out.extend(hits)
        else:
            raise ConfigError(f"model file {item} does not exist")
    seen: set[str] = set()
    uniq = []
    for p in out:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def _read_model_bytes(path: Path) -> dict[str, bytes]:
    """A model's files as bytes (a model folder's few files, or the one file)."""
    if path.is_dir():
        return {q.name: q.read_bytes() for q in sorted(path.iterdir()) if q.is_file()}
    return {"": path.read_bytes()}


def _materialise(blob: dict[str, bytes], name: str, tmp: Path) -> Path:
    """Write a model received as bytes to ``tmp`` (the loader reads files)."""
    if set(blob) == {""}:
        p = tmp / Path(name).name
        p.write_bytes(blob[""])
        return p
    d = tmp / (Path(name).name or "model")
    d.mkdir(parents=True, exist_ok=True)
    for k, v in blob.items():
        (d / Path(k).name).write_bytes(v)
    return d


def scan_one(model: str | Path | dict[str, bytes], data: ImageDataset, params: dict[str, Any], *,
             name: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Scan one model file with :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanse`.

    ``model`` is a path or the file's bytes (``{"": bytes}``, or ``{member: bytes}`` for a model
    folder). Never raises for a bad model: the row's ``error`` says what went wrong.

    Returns:
        a row: ``file``, ``probability``, ``verdict`` (``"backdoor"``, ``"clean"`` or
        ``"error"``), ``flagged_labels``, ``seconds``, ``error`` and the scan's ``evidence``.
    """
    import tempfile

    from .defenses.model.neural_cleanse import NeuralCleanse
    from .errors import TrojanscopeError
    from .models import load_model

    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    label = str(name if name is not None else model)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"file": label, "probability": None, "verdict": "error", "flagged_labels": [],
                           "seconds": 0.0, "error": None}
    try:
        with tempfile.TemporaryDirectory(prefix="trojanscope-scan-") as tmp:
            path = _materialise(model, label, Path(tmp)) if isinstance(model, dict) else Path(model)
            lm = load_model(path, default_input_shape=data.image_shape)
            if data.image_shape != tuple(lm.spec.input_shape):
                raise TrojanscopeError(f"the data's images are {data.image_shape} but the model expects "
                                       f"{tuple(lm.spec.input_shape)}")
            if data.num_classes > lm.spec.num_classes:
                raise TrojanscopeError(f"the data has label {data.num_classes - 1}, out of range for a model "
                                       f"with {lm.spec.num_classes} classes")
            d = data
            if data.num_classes < lm.spec.num_classes:
                d = ImageDataset(data.x, data.y, lm.spec.num_classes, None, data.name, data.groups)
            res = NeuralCleanse(**params).scan(lm.model, d)
        row.update(probability=round(float(res.probability), 6), verdict="backdoor" if res.infected else "clean",
                   flagged_labels=list(res.flagged_labels), format=lm.format,
                   evidence={k: v for k, v in res.evidence.items() if k != "calibration"},
                   suspects=res.details["suspects"], l1_norms=[round(float(v), 4) for v in res.l1_norms],
                   image_passes=res.image_passes)
    except TrojanscopeError as e:
        row["error"] = str(e)
    except MemoryError:
        row["error"] = "out of memory; try a smaller --batch-size"
    except Exception as e:  # a hostile or broken model must not stop the population
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {msg}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _row_file(out: Path, path: Path) -> Path:
    import hashlib

    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return out / "rows" / f"{path.name}-{h}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{id(text)}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_scan_table(rows: list[dict[str, Any]], out: Path) -> None:
    """``out/scan.csv`` (the :data:`SCAN_COLUMNS`) and ``out/scan.json`` (all fields)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SCAN_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "flagged_labels": " ".join(str(v) for v in r.get("flagged_labels") or []),
                    "probability": "" if r.get("probability") is None else r["probability"],
                    "error": r.get("error") or ""})
    _write_atomic(out / "scan.csv", buf.getvalue())
    _write_atomic(out / "scan.json", json.dumps(rows, indent=2) + "\n")


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def scan_population(models: list[Path], data: ImageDataset, params: dict[str, Any], *, workers: int = 1,
                    out: Path | None = None, address: str | None = None, backend: str = "auto",
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Scan every model of ``models`` (see :func:`scan_one`), ``workers`` at a time.

    Args:
        models: model files (see :func:`expand_models`).
        data: the clean data every model is scanned with.
        params: :class:`~trojanscope.defenses.model.neural_cleanse.NeuralCleanse` settings.
        workers: models scanned at once. Above 1, over Ray when it is installed (or asked for
            with ``backend="ray"``), else over local processes; each worker gets ``cores //
            workers`` torch threads.
        out: a folder for the finished rows (``out/rows/*.json``, one per model, written as soon
            as the model is done) and the table (``out/scan.csv``, ``out/scan.json``). A model
            with a row there is not scanned again, so a killed run resumes.
        address: a Ray cluster (``ray://HOST:PORT``); default ``RAY_ADDRESS`` or a local
            instance.
        backend: ``"auto"``, ``"ray"``, ``"processes"`` or ``"serial"``.
        on_row: called with each new row (progress).

    Returns:
        one row per model, in the order of ``models``.
    """
    import os

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if backend not in ("auto", "ray", "processes", "serial"):
        raise ConfigError(f"unknown backend {backend!r}")
    rows: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, p in enumerate(models):
        rf = _row_file(out, p) if out is not None else None
        if rf is not None and rf.exists():
            try:
                rows[i] = json.loads(rf.read_text())
                continue
            except (OSError, ValueError):
                pass
        todo.append(i)

    def finish(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if out is not None:
            _write_atomic(_row_file(out, models[i]), json.dumps(row, indent=2) + "\n")
        if on_row is not None:
            on_row(row)

    if backend == "auto":
        backend = "serial" if workers == 1 else ("ray" if _have_ray() else "processes")
    threads = max(1, _cores() // workers)
    if todo:
        log.info("scanning %d models (%d already done) with %s, %d worker(s), %d thread(s) each", len(todo),
                 len(models) - len(todo), backend, workers, threads)
    if backend == "serial" or not todo:
        for i in todo:
            finish(i, scan_one(models[i], data, params, name=str(models[i])))
    elif backend == "processes":
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                    initializer=_init_worker, initargs=(data, params, threads)) as ex:
            futs = {ex.submit(_worker_scan, str(models[i])): i for i in todo}
            for f in cf.as_completed(futs):
                i = futs[f]
                try:
                    row = f.result()
                except Exception as e:  # a worker died (e.g. killed for memory)
                    row = {"file": str(models[i]), "probability": None, "verdict": "error", "flagged_labels": [],
                           "seconds": 0.0, "error": f"worker failed: {type(e).__name__}: {e}"}
                finish(i, row)
    else:
        _scan_ray(models, todo, data, params, workers, threads, address or os.environ.get("RAY_ADDRESS"), finish)
    if out is not None:
        write_scan_table([rows[i] for i in range(len(models))], out)
    return [rows[i] for i in range(len(models))]


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


_WORKER: dict[str, Any] = {}


def _init_worker(data: ImageDataset, params: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(data=data, params=params)


def _worker_scan(path: str) -> dict[str, Any]:
    return scan_one(path, _WORKER["data"], _WORKER["params"], name=path)


def _scan_ray(models: list[Path], todo: list[int], data: ImageDataset, params: dict[str, Any], workers: int,
              threads: int, address: str | None, finish: Callable[[int, dict[str, Any]], None]) -> None:
    """Fan the scans out over Ray: the data and each model's bytes travel as object references."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--workers over Ray needs Ray: pip install 'trojanscope[cluster]'") from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=workers, **kw)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(scan_one)
        data_ref = ray.put(data)
        pending = {}
        nxt = 0
        while nxt < len(todo) or pending:
            while nxt < len(todo) and len(pending) < workers:
                i = todo[nxt]
                nxt += 1
                ref = remote.remote(ray.put(_read_model_bytes(models[i])), data_ref, params, name=str(models[i]),
                                    threads=threads)
                pending[ref] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:  # the task's worker died
                    row = {"file": str(models[i]), "probability": None, "verdict": "error", "flagged_labels": [],
                           "seconds": 0.0, "error": f"worker failed: {type(e).__name__}: {str(e).splitlines()[0]}"}
                finish(i, row)
    finally:
        if started:
            ray.shutdown()
