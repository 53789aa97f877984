"""The models a bench run defends: one per (attack, seed), trained once and cached in the run
folder (``models/<attack>__s<seed>/``), or a model file the user received (never trained).

Each comes as an :class:`AttackedModel` that carries the ground truth of its attack (the planted
triggers, the target, which training samples were poisoned): only :mod:`trojanscope.bench.cells`
reads it, to score a defence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .._utils.batching import DeviceLike, generator
from ..attacks import ATTACKS, Attack, BadNets
from ..data import ImageDataset, PoisonedDataset, load_data
from ..data.loaders import BUNDLED
from ..errors import ConfigError, TrojanscopeError
from ..metrics import attack_success_rate, clean_accuracy
from ..models import ModelSpec, load_model, save_model
from ..training import train_new
from ..triggers import Trigger
from .spec import RECEIVED, AttackSpec, BenchConfig
from .store import cell_id, fingerprint, write_json

log = logging.getLogger(__name__)


# --- attacks --------------------------------------------------------------------------------------

def build_attack(spec: AttackSpec, train: ImageDataset, *, seed: int, rate: float = 0.05,
                 target: int = 0) -> Attack | None:
    """The attack object of ``spec`` for data shaped like ``train`` (``None`` for ``clean``)."""
    shape = train.image_shape
    size = max(2, min(shape[1:]) // 7)
    if spec.attack == "clean":
        return None
    p = dict(spec.params)
    preset = p.pop("preset", None)
    if preset is not None:
        return _preset_attack(preset, train, seed=seed, rate=rate, target=target)
    if spec.attack == "badnets":
        trig = Trigger.parse(str(p.pop("trigger", f"square:{size}")), shape)
        p.setdefault("target", target)
        p.setdefault("rate", rate)
        try:
            return BadNets(trig, seed=seed, **p)
        except TypeError as e:
            raise ConfigError(f"attack {spec.name!r}: {e}") from None
    cls = ATTACKS.get(spec.attack)
    names, defaults = cls.param_names(), cls.param_defaults()
    if isinstance(p.get("trigger"), str):
        p["trigger"] = Trigger.parse(p["trigger"], shape)
    if "trigger" in names and "trigger" not in defaults and "trigger" not in p:
        p["trigger"] = Trigger.square(shape, size, "white", "bottom-right")
    if "seed" in names:
        p.setdefault("seed", seed)
    if "target" in names and "target" not in defaults:
        p.setdefault("target", target)
    try:
        return cls(**p)
    except TypeError as e:
        raise ConfigError(f"attack {spec.name!r} ({spec.attack}): {e}") from None


def _preset_attack(preset: str, train: ImageDataset, *, seed: int, rate: float, target: int) -> BadNets:
    """The BadNets attack of a preset name (``badnets-patch``...)."""
    shape = train.image_shape
    size = max(2, min(shape[1:]) // 7)
    trig = {
        "badnets-patch": lambda: Trigger.square(shape, size, "white", "bottom-right"),
        "badnets-pattern": lambda: Trigger.checkerboard(shape, size, "bottom-right"),
        "badnets-pixel": lambda: Trigger.pixel(shape, "white", "bottom-right"),
        "badnets-blended": lambda: Trigger.noise(shape, 0.2, seed=1000 + seed),
        "badnets-all-to-all": lambda: Trigger.square(shape, size, "white", "bottom-right"),
        "badnets-source-specific": lambda: Trigger.square(shape, size, "white", "bottom-right"),
    }[preset]()
    if preset == "badnets-all-to-all":
        return BadNets(trig, target=target, rate=rate, mode="all-to-all", seed=seed)
    if preset == "badnets-source-specific":
        k = train.num_classes
        src = [s for s in range(k) if s != target][:max(1, k // 3)]
        return BadNets(trig, target=target, rate=rate, source_labels=src, seed=seed)
    return BadNets(trig, target=target, rate=rate, seed=seed)


@dataclasses.dataclass
class AttackedModel:
    """A trained model for one (attack, seed) column, with the ground truth of its attack.

    Attributes:
        name, seed: the column.
        model: the trained (possibly backdoored) network.
        attack: the attack object (``None`` for the clean baseline).
        poisoned: the training set the model was trained on (poisoned for data attacks).
        triggers: the planted trigger(s) (empty for the clean baseline).
        target: the attacker's target: an int, or a ``(K,)`` map for all-to-all.
        source_labels: the source labels of a source-specific attack.
        ca, asr: clean accuracy and attack success on the test inputs.
        reused: loaded from the run folder rather than trained.
        received: the model is a file the user received (a ``[[victim]]``), not trained here.
        poison_mask: for a received model, which training samples were poisoned (scoring only).
    """

    name: str
    seed: int
    model: nn.Module
    attack: Attack | None
    poisoned: ImageDataset
    triggers: list[Trigger] = dataclasses.field(default_factory=list)
    target: int | torch.Tensor | None = None
    source_labels: list[int] | None = None
    ca: float = 0.0
    asr: float | None = None
    reused: bool = False
    received: bool = False
    poison_mask: torch.Tensor | None = None

    @property
    def is_poison(self) -> torch.Tensor:
        """``(N,)`` bool over :attr:`poisoned`: the relabelled samples."""
        if self.poison_mask is not None:
            return self.poison_mask
        if isinstance(self.poisoned, PoisonedDataset):
            return self.poisoned.is_poison
        return torch.zeros(len(self.poisoned), dtype=torch.bool)

    @property
    def edits_model(self) -> bool:
        """True for attacks that edit a trained model (no poisoned training set to sanitise)."""
        return self.attack is not None and getattr(self.attack, "kind", "data") == "model"

    def true_targets(self) -> set[int]:
        """The labels the attacker aims at (every label for all-to-all)."""
        if self.target is None:
            return set()
        if isinstance(self.target, torch.Tensor):
            return {int(v) for v in self.target.unique()}
        if isinstance(self.attack, BadNets):
            return set(self.attack.targets)
        return {int(self.target)}

    def success_rate(self, model: nn.Module, data: ImageDataset) -> float | None:
        """Attack success of the planted trigger(s) against ``model`` (None for the clean baseline)."""
        if (self.attack is None and not self.received) or not self.triggers or self.target is None:
            return None
        if isinstance(self.attack, BadNets):
            return float(self.attack.success_rate(model, data))
        return float(attack_success_rate(model, data, self.triggers[0], self.target,
                                         source_labels=self.source_labels))

    def measure(self, test: ImageDataset) -> "AttackedModel":
        """Set :attr:`ca` and :attr:`asr` on ``test``; returns self."""
        self.ca = clean_accuracy(self.model, test)
        self.asr = self.success_rate(self.model, test)
        return self


# --- data -----------------------------------------------------------------------------------------

def splits(cfg: BenchConfig) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """The train / val / test splits of the run's dataset (80 / 10 / 10 for a set of the user's)."""
    name = cfg.dataset.partition(":")[0]
    if name in BUNDLED:
        return tuple(load_data(name, s) for s in ("train", "val", "test"))  # type: ignore[return-value]
    full = load_data(cfg.dataset)
    train, rest = full.split(0.8, seed=0)
    val, test = rest.split(0.5, seed=0)
    return train, val, test


def sample(data: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """At most ``n`` samples of ``data`` (a seeded random subset, in order)."""
    if n is None or n >= len(data):
        return data
    idx = torch.randperm(len(data), generator=generator(seed))[:n].sort().values
    return data.subset(idx)


def _read_poison(path: str | Path, n: int) -> torch.Tensor:
    """``(n,)`` bool from a JSON list of indices, or a JSON object with ``poison_indices`` (what
    ``trojanscope poison`` writes)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the poisoned indices {path}: {e}") from None
    idx = d.get("poison_indices") if isinstance(d, dict) else d
    if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < n for i in idx):
        raise ConfigError(f"{path}: expected a list of sample indices in [0, {n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(idx, dtype=torch.long)] = True
    return mask


# --- the model cache ------------------------------------------------------------------------------

def model_dir(out: Path, name: str, seed: int) -> Path:
    """Where the run folder ``out`` keeps the model of column ``name``, seed ``seed``."""
    return out / "models" / cell_id(name, "model", seed).replace("__model", "")


def _cached_model(mdir: Path, fp: str) -> tuple[nn.Module, list[Trigger]] | None:
    meta_path = mdir / "attack.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fp:
            return None
        trigs = [Trigger.load(mdir / f"trigger_{i}.safetensors") for i in range(int(meta.get("n_triggers", 0)))]
        return load_model(mdir).model, trigs
    except (OSError, ValueError, TrojanscopeError) as e:
        log.warning("cached model %s unreadable (%s); training it again", mdir, e)
        return None


def _store_model(mdir: Path, model: nn.Module, data: ImageDataset, cfg: BenchConfig, spec: AttackSpec, seed: int,
                 fp: str, attack: Attack | None, triggers: Sequence[Trigger], is_poison: torch.Tensor) -> None:
    save_model(model, mdir, ModelSpec(cfg.arch, data.image_shape, data.num_classes, class_names=data.class_names,
                                      extra={"trained_on": data.name, "attack": spec.name, "seed": seed}))
    for i, t in enumerate(triggers):
        t.save(mdir / f"trigger_{i}.safetensors")
    # attack.json is written last: its presence (with the fingerprint) marks the model finished
    write_json(mdir / "attack.json", {"fingerprint": fp, "attack": spec.to_dict(),
                                      "attack_params": attack.to_dict() if attack is not None else None,
                                      "n_triggers": len(triggers), "seed": seed,
                                      "poison_indices": is_poison.nonzero().flatten().tolist()})


@dataclasses.dataclass
class _Trainer:
    """What training a column's model needs: the run's settings and where the models go."""

    cfg: BenchConfig
    train: ImageDataset
    val: ImageDataset
    out: Path
    device: DeviceLike
    trained: list[str]

    def new(self, data: ImageDataset, seed: int) -> nn.Module:
        c = self.cfg
        return train_new(c.arch, data, seed=seed, device=self.device, epochs=c.epochs, lr=c.lr,
                         batch_size=c.batch_size, recipe=c.recipe)

    def base(self, seed: int) -> nn.Module:
        """The clean model of ``seed`` (the clean column, and the victim of model-editing attacks)."""
        fp = fingerprint({"training": self.cfg.training, "base": True, "seed": seed})
        mdir = model_dir(self.out, "_base", seed)
        hit = _cached_model(mdir, fp)
        if hit is not None:
            return hit[0]
        model = self.new(self.train, seed)
        _store_model(mdir, model, self.train, self.cfg, AttackSpec("_base", "clean"), seed, fp, None, [],
                     torch.zeros(len(self.train), dtype=torch.bool))
        self.trained.append(f"_base-s{seed}")
        return model

    def attacked(self, attack: Attack | None, poisoned: ImageDataset, seed: int) -> tuple[nn.Module, list[Trigger]]:
        """Train the model of ``attack``: on ``poisoned``, or by editing the clean model."""
        if attack is None:
            return self.base(seed), []
        if getattr(attack, "kind", "data") != "model":
            return self.new(poisoned, seed), list(getattr(attack, "triggers", []))
        base = self.base(seed)
        if hasattr(attack, "implant"):  # e.g. the pruning-aware attack
            return attack.implant(base, self.train, val_data=self.val, device=self.device), \
                list(getattr(attack, "triggers", []))
        res = attack.attack(base, self.train)  # e.g. the Trojaning attack: it makes its own trigger
        return res.model, [res.trigger]


def _poisoned(attack: Attack | None, spec: AttackSpec, train: ImageDataset, cfg: BenchConfig,
              seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """The training set of the column (with provenance groups) and which of its samples were poisoned."""
    from ..data.poisoned import assign_sources

    edits_model = attack is not None and getattr(attack, "kind", "data") == "model"
    poisoned: ImageDataset = train
    if attack is not None and hasattr(attack, "poison"):
        poisoned = attack.poison(train)
    elif attack is not None and not edits_model:
        raise ConfigError(f"attack {spec.name!r} can neither poison data nor edit a model")
    is_poison = poisoned.is_poison if isinstance(poisoned, PoisonedDataset) else torch.zeros(len(train), dtype=torch.bool)
    return assign_sources(poisoned, cfg.sources, seed), is_poison


def _attack_target(attack: Attack | None, num_classes: int) -> int | torch.Tensor | None:
    if attack is None:
        return None
    if hasattr(attack, "target_map"):
        return attack.target_map(num_classes)
    return int(attack.target) if getattr(attack, "target", None) is not None else None


def attacked_model(cfg: BenchConfig, spec: AttackSpec, seed: int, train: ImageDataset, val: ImageDataset,
                   test: ImageDataset, out: Path, fp: str, device: DeviceLike, trained: list[str]) -> AttackedModel:
    """Train (or load from the run folder) the model of one attack column; ``trained`` gets the
    name of every model trained."""
    if spec.attack == RECEIVED:
        return received_model(spec, seed, train, test, device)
    attack = build_attack(spec, train, seed=seed, rate=cfg.rate, target=cfg.target)
    poisoned, is_poison = _poisoned(attack, spec, train, cfg, seed)
    mdir = model_dir(out, spec.name, seed)
    hit = _cached_model(mdir, fp)
    if hit is not None:
        model, triggers = hit
    else:
        model, triggers = _Trainer(cfg, train, val, out, device, trained).attacked(attack, poisoned, seed)
        _store_model(mdir, model, poisoned, cfg, spec, seed, fp, attack, triggers, is_poison)
        trained.append(f"{spec.name}-s{seed}")
    if device is not None:
        model.to(device)
    model.eval()
    src = getattr(attack, "source_labels", None)
    return AttackedModel(spec.name, seed, model, attack, poisoned, list(triggers),
                         _attack_target(attack, train.num_classes), None if src is None else list(src),
                         reused=hit is not None).measure(test)


def received_model(spec: AttackSpec, seed: int, train: ImageDataset, test: ImageDataset,
                   device: DeviceLike) -> AttackedModel:
    """The column of a received model file: loaded safely, as its trainable surface, never trained."""
    from ..models.surface import model_surface

    p = spec.params
    data = load_data(p["train"], default_split="train") if "train" in p else train
    lm = load_model(p["model"], default_input_shape=data.image_shape)
    if tuple(lm.spec.input_shape) != data.image_shape or lm.spec.num_classes < data.num_classes:
        raise ConfigError(f"victim {spec.name!r}: the model takes {tuple(lm.spec.input_shape)} with "
                          f"{lm.spec.num_classes} classes; the data is {data.image_shape} with {data.num_classes}")
    model = model_surface(lm).module
    if device is not None:
        model.to(device)
    model.eval()
    is_poison = _read_poison(p["poison"], len(data)) if "poison" in p else torch.zeros(len(data), dtype=torch.bool)
    triggers = [Trigger.parse(p["trigger"], data.image_shape)] if "trigger" in p else []
    return AttackedModel(spec.name, seed, model, None, data, triggers, p.get("target"), None, reused=True,
                         received=True, poison_mask=is_poison).measure(test)
