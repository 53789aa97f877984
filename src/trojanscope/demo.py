"""The main job on bundled data: train a clean and a BadNets model on ``mnist5k`` and run every
defence on them. Each defence adds one step (a function of :class:`DemoContext`) to ``STEPS``;
each step appends rows to the table the demo prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .attacks import BadNets
from .data import ImageDataset, PoisonedDataset, load_data
from .metrics import clean_accuracy
from .models import ModelSpec, save_model
from .training import train_new
from .triggers import Trigger

log = logging.getLogger(__name__)

#: The demo attack: BadNets, 4x4 white square at the bottom-right, target 0, 10% poisoned.
DEMO_TRIGGER = "square:4:white:bottom-right"
DEMO_TARGET = 0
DEMO_RATE = 0.1
DEMO_EPOCHS = 10


@dataclass
class DemoContext:
    """What the steps share: data, the two models, the attack, and the table being built."""

    out: Path
    seed: int = 0
    device: Any = None
    train: ImageDataset | None = None
    val: ImageDataset | None = None
    test: ImageDataset | None = None
    attack: BadNets | None = None
    poisoned: PoisonedDataset | None = None
    clean_model: nn.Module | None = None
    backdoored_model: nn.Module | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def trigger(self) -> Trigger:
        assert self.attack is not None
        return self.attack.triggers[0]

    def row(self, model: str, step: str, model_obj: nn.Module | None = None, **figures: Any) -> dict[str, Any]:
        """Append a table row; with ``model_obj``, measure its clean accuracy and attack success."""
        r: dict[str, Any] = {"model": model, "step": step}
        if model_obj is not None:
            r["accuracy"] = clean_accuracy(model_obj, self.test)
            r["attack_success"] = self.attack.success_rate(model_obj, self.test)  # type: ignore[union-attr]
        r.update(figures)
        self.rows.append(r)
        return r


def step_train(ctx: DemoContext) -> None:
    """Train the clean and the BadNets model."""
    ctx.train, ctx.val, ctx.test = (load_data("mnist5k", s) for s in ("train", "val", "test"))  # type: ignore[arg-type]
    ctx.attack = BadNets(Trigger.parse(DEMO_TRIGGER, ctx.train.image_shape), target=DEMO_TARGET, rate=DEMO_RATE,
                         seed=ctx.seed)
    ctx.poisoned = ctx.attack.poison(ctx.train)
    t0 = time.perf_counter()
    ctx.clean_model = train_new("mnist_cnn", ctx.train, seed=ctx.seed, epochs=DEMO_EPOCHS, device=ctx.device)
    ctx.row("clean", "train", ctx.clean_model, seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    ctx.backdoored_model = train_new("mnist_cnn", ctx.poisoned, seed=ctx.seed, epochs=DEMO_EPOCHS, device=ctx.device)
    ctx.row("badnets", "train", ctx.backdoored_model, seconds=time.perf_counter() - t0)
    for name, m, d in (("clean", ctx.clean_model, ctx.train), ("badnets", ctx.backdoored_model, ctx.poisoned)):
        save_model(m, ctx.out / name, ModelSpec("mnist_cnn", d.image_shape, d.num_classes, class_names=d.class_names,
                                                 extra={"trained_on": d.name}))
    ctx.trigger.save(ctx.out / "badnets" / "trigger_0.safetensors")
    ctx.trigger.save_png(ctx.out / "badnets" / "trigger_0.png")


def step_sanitize_data(ctx: DemoContext) -> None:
    """Data sanitising: Activation Clustering and Spectral Signatures on the poisoned training set, then retrain."""
    from .defenses.data.clustering import ActivationClustering
    from .training import retrain
    from .defenses.data.spectral import SpectralSignatures
    from .metrics import detection_metrics

    assert ctx.poisoned is not None and ctx.backdoored_model is not None
    truth = ctx.poisoned.is_poison
    # the epsilon-free defaults; and the paper's spectral rule with the true poisoned share as its epsilon
    ac = ActivationClustering(seed=ctx.seed, device=ctx.device).inspect(ctx.backdoored_model, ctx.poisoned)
    sa = SpectralSignatures(seed=ctx.seed, device=ctx.device).inspect(ctx.backdoored_model, ctx.poisoned)
    sp = SpectralSignatures(mode="paper", epsilon=DEMO_RATE, device=ctx.device).inspect(ctx.backdoored_model, ctx.poisoned)
    for step, res in (("activation clustering", ac), ("spectral signatures", sa),
                      (f"spectral (paper, eps={DEMO_RATE:g})", sp)):
        m = detection_metrics(res.scores, truth, res.flagged)
        ctx.results[step] = {**res.to_dict(), "detection": m}
        ctx.row("badnets", step, poison_removed=m["recall"], clean_removed=m["fpr"],
                flagged=",".join(map(str, res.attacked_labels)) or "-", seconds=res.seconds)
    # retraining on what Activation Clustering left (fewer epochs than the demo's models, to stay fast)
    rr = retrain(ctx.backdoored_model, ctx.poisoned, ac, epochs=3, seed=ctx.seed, device=ctx.device)
    ctx.row("badnets", "retrain after clustering (3 epochs)", rr.model, removed=rr.n_removed, seconds=rr.seconds)


def step_neural_cleanse(ctx: DemoContext) -> None:
    """Neural Cleanse: scan both models, then unlearn the reversed trigger from the backdoored one."""
    from .defenses.model.neural_cleanse import NeuralCleanse
    from .defenses.repair.neural_cleanse import SMALL_SET_UNLEARNING, Unlearning

    # a reduced budget (120 steps per label instead of 160) keeps the demo short
    nc = NeuralCleanse(epochs=60, seed=ctx.seed, device=ctx.device)
    scans = {}
    for name, model in (("clean", ctx.clean_model), ("badnets", ctx.backdoored_model)):
        r = nc.scan(model, ctx.val)
        scans[name] = r
        ctx.results[f"neural_cleanse_{name}"] = r.to_dict()
        (ctx.out / name).mkdir(parents=True, exist_ok=True)
        for k in r.flagged_labels:
            r.triggers[k].save_png(ctx.out / name / f"neural_cleanse_label_{k}.png")
        ctx.row(name, "neural-cleanse scan", verdict="backdoor" if r.infected else "clean",
                flagged=",".join(map(str, r.flagged_labels)) or "-",
                target_index=float(r.anomaly_indices[DEMO_TARGET]), seconds=r.seconds)
    # the paper's 10% share of the bundled 4,000 images is 400: its one epoch is too few steps
    # to unlearn reliably, so the demo uses the small-set settings (3 epochs of SGD)
    u = Unlearning(seed=ctx.seed, device=ctx.device, **SMALL_SET_UNLEARNING).repair(
        ctx.backdoored_model, ctx.train, scan=scans["badnets"])
    ctx.results["neural_cleanse_unlearning"] = u.to_dict()
    ctx.row("badnets", "nc unlearning (10%, 3 epochs SGD)", u.model, seconds=u.seconds)


def step_strip(ctx: DemoContext) -> None:
    """STRIP at run time: FAR at a 1% target FRR on the BadNets model, measured FRR on the clean one."""
    from .defenses.input.strip import STRIP

    assert ctx.test is not None and ctx.val is not None
    keep = ctx.test.y != DEMO_TARGET
    stamped = ctx.trigger.apply(ctx.test.x[keep])
    for name, model in (("badnets", ctx.backdoored_model), ("clean", ctx.clean_model)):
        t0 = time.perf_counter()
        strip = STRIP(n_overlays=50, frr=0.01, seed=ctx.seed, device=ctx.device).fit(model, ctx.val)  # type: ignore[arg-type]
        frr = float(strip.flag(ctx.test.x).float().mean())
        far = float((~strip.flag(stamped)).float().mean())
        ctx.results[f"strip_{name}"] = {"threshold": strip.threshold_, "frr": frr, "far": far,
                                         "params": strip.get_params()}
        # the clean model ignores the trigger, so its stamped inputs are not attacks: no FAR in its row
        shown = {"far": far} if name == "badnets" else {}
        ctx.row(name, "strip (S=50, FRR target 1%)", frr=frr, **shown, seconds=time.perf_counter() - t0)


def step_fine_pruning(ctx: DemoContext) -> None:
    """Fine-Pruning of the BadNets model's last convolutional block, on the clean validation set.

    Twice: the paper's whole channels, then single units (one channel at one position). The
    demo's corner patch is carried by ordinary channels at the corner's positions, so the first
    leaves the backdoor in place and the second removes it; the table shows both.
    """
    from .defenses.repair.pruning import FinePruning

    assert ctx.val is not None
    for granularity, key in (("channel", "fine_pruning"), ("unit", "fine_pruning_units")):
        fp = FinePruning(granularity=granularity, seed=ctx.seed, device=ctx.device).repair(
            ctx.backdoored_model, ctx.val)  # type: ignore[arg-type]
        ctx.results[key] = fp.to_dict()
        ctx.row("badnets", f"fine-pruning ({fp.details['n_pruned']}/{fp.details['n_neurons']} {granularity}s)", fp.model,
                seconds=fp.seconds)


#: The demo's steps, in order. Defences append theirs here.
STEPS: list[Callable[[DemoContext], None]] = [
    step_train,
    step_neural_cleanse,
    step_sanitize_data,
    step_strip,
    step_fine_pruning,
]


def run_demo(out: str | Path = "demo_out", *, seed: int = 0, device: Any = None,
             steps: list[Callable[[DemoContext], None]] | None = None,
             on_step: Callable[[str], None] | None = None) -> DemoContext:
    """Run the demo's steps and return the context with its table rows."""
    ctx = DemoContext(out=Path(out), seed=seed, device=device)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for step in steps or STEPS:
        if on_step is not None:
            on_step((step.__doc__ or step.__name__).strip().splitlines()[0])
        step(ctx)
    return ctx
