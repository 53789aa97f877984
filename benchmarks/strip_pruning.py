"""Figures of issue 5: STRIP, Pruning, Fine-Pruning, the pruning-aware attack, chains of defences.

Run (CPU is shared: be nice)::

    nice .venv/bin/python benchmarks/strip_pruning.py [strip] [prune] [aware] [chains] [chains-units]

Models are the demo's (mnist5k, mnist_cnn, 10 epochs, seed 0), cached under runs/issue5/.
Every figure is measured on the mnist5k test split (500 images); the defender's clean data is
the validation split (500 images), never the training set.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import trojanscope as ts
from trojanscope.attacks import PruningAware
from trojanscope.defenses import STRIP, FinePruning, Pruning
from trojanscope.metrics import attack_evaluator
from trojanscope.demo import DEMO_EPOCHS, DEMO_RATE, DEMO_TARGET, DEMO_TRIGGER
from trojanscope.metrics import detection_metrics
from trojanscope.training import train_new

torch.set_num_threads(1)  # the CPU is shared; 2 threads spin on each other
CACHE = Path(__file__).resolve().parent.parent / "runs" / "issue5"


def splits() -> tuple[ts.ImageDataset, ts.ImageDataset, ts.ImageDataset]:
    return tuple(ts.load_data("mnist5k", s) for s in ("train", "val", "test"))  # type: ignore[return-value]


def cached(name: str, build) -> torch.nn.Module:
    path = CACHE / name
    if (path / "model.safetensors").exists():
        return ts.load_model(path).model
    t0 = time.perf_counter()
    model = build()
    ts.save_model(model, path, ts.ModelSpec("mnist_cnn", (1, 28, 28), 10))
    print(f"[trained {name} in {time.perf_counter() - t0:.0f} s]", flush=True)
    return model


TRAIN, VAL, TEST = splits()
TRIGGER = ts.Trigger.parse(DEMO_TRIGGER, TRAIN.image_shape)
BADNETS = ts.BadNets(TRIGGER, target=DEMO_TARGET, rate=DEMO_RATE, seed=0)
#: A blended trigger (Chen et al. 2017): uniform noise blended at 20% over the whole image.
BLEND = ts.Trigger.noise(TRAIN.image_shape, alpha=0.2, seed=1)
BLENDED = ts.BadNets(BLEND, target=DEMO_TARGET, rate=DEMO_RATE, seed=0)


def clean_model():
    return cached("clean", lambda: train_new("mnist_cnn", TRAIN, seed=0, epochs=DEMO_EPOCHS))


def badnets_model():
    return cached("badnets", lambda: train_new("mnist_cnn", BADNETS.poison(TRAIN), seed=0, epochs=DEMO_EPOCHS))


def blended_model():
    return cached("blended", lambda: train_new("mnist_cnn", BLENDED.poison(TRAIN), seed=0, epochs=DEMO_EPOCHS))


PA = PruningAware(TRIGGER, target=DEMO_TARGET, rate=DEMO_RATE, epochs=5, seed=0)


def pruning_aware_model():
    return cached("pruning_aware", lambda: PA.implant(clean_model(), TRAIN, val_data=VAL))


def pct(v: float) -> str:
    return f"{100 * v:5.1f}%"


# --- STRIP ----------------------------------------------------------------------------------------

def strip_figures(name: str, model, attack: ts.BadNets | None, **params) -> dict:
    t0 = time.perf_counter()
    strip = STRIP(**params).fit(model, VAL)
    clean_scores = strip.score(TEST.x)
    clean_flag = clean_scores > strip.threshold_
    out = {"model": name, "threshold_entropy": -strip.threshold_, "frr_measured": float(clean_flag.float().mean())}
    if attack is not None:
        keep = TEST.y != DEMO_TARGET
        xt = attack.triggers[0].apply(TEST.x[keep])
        trig_scores = strip.score(xt)
        trig_flag = trig_scores > strip.threshold_
        truth = torch.cat([torch.zeros(len(TEST)), torch.ones(xt.shape[0])]).bool()
        m = detection_metrics(torch.cat([clean_scores, trig_scores]), truth, torch.cat([clean_flag, trig_flag]))
        out.update(far=1 - m["recall"], auroc=m["auroc"],
                   mean_entropy_clean=float(-clean_scores.mean()), mean_entropy_trojan=float(-trig_scores.mean()))
    out["seconds"] = time.perf_counter() - t0
    return out


def run_strip() -> None:
    print("\n== STRIP (S=100, alpha 1.5 (its clipped default), clipped, FRR target 1%, fitted on val: 250 overlays + 250 calibration)")
    for name, model, attack, kw in (("badnets", badnets_model, BADNETS, {}),
                                    ("clean", clean_model, BADNETS, {}),
                                    ("badnets, clip=False", badnets_model, BADNETS, {"clip": False}),
                                    ("blended", blended_model, BLENDED, {}),
                                    ("blended, clip=False", blended_model, BLENDED, {"clip": False})):
        r = strip_figures(name, model(), attack, **kw)
        print("  " + ", ".join(f"{k}={pct(v) if k in ('far', 'frr_measured') else (f'{v:.4f}' if isinstance(v, float) else v)}"
                               for k, v in r.items()), flush=True)
        if name == "blended":
            print(f"  blended model: CA {pct(ts.clean_accuracy(model(), TEST))}, ASR {pct(BLENDED.success_rate(model(), TEST))}",
                  flush=True)


# --- Pruning / Fine-Pruning -----------------------------------------------------------------------

def show_curve(curve: list[dict]) -> None:
    print("    pruned  val-acc  test-acc  ASR")
    for r in curve:
        print(f"    {r['pruned']:6d}  {pct(r['accuracy'])}   {pct(r['test_accuracy'])}   {pct(r['attack_success'])}")


def run_prune(name: str = "badnets", model=None, attack=None) -> None:
    model = model if model is not None else badnets_model()
    attack = attack or BADNETS
    ev = attack_evaluator(attack.triggers[0], DEMO_TARGET, TEST)
    for granularity in ("channel", "unit"):
        what = "last conv's channels (the paper)" if granularity == "channel" else "last conv block's units"
        print(f"\n== Pruning alone on the {name} model ({what}; stop at > 4 points val drop): the curve")
        res = Pruning(granularity=granularity).repair(model, VAL, monitor=ev)
        show_curve(res.history if granularity == "channel" else res.history[::4] + res.history[-1:])
        k = res.details["n_pruned"]
        at_k = next(r for r in res.history if r["pruned"] == k)
        print(f"  kept {k}/{res.details['n_neurons']} pruned: test CA {pct(at_k['test_accuracy'])}, "
              f"ASR {pct(at_k['attack_success'])}")
        print(f"\n== Fine-Pruning on the {name} model ({granularity}s)")
        t0 = time.perf_counter()
        fp = FinePruning(granularity=granularity).repair(model, VAL, monitor=ev)
        for r in fp.history:
            print(f"  {r['stage']:10s}  val {pct(r['accuracy'])}  test CA {pct(r['test_accuracy'])}  "
                  f"ASR {pct(r['attack_success'])}")
        print(f"  pruned {fp.details['n_pruned']}/{fp.details['n_neurons']} {granularity}s; CA drop "
              f"{100 * (fp.history[0]['test_accuracy'] - fp.history[-1]['test_accuracy']):.1f} points; "
              f"{time.perf_counter() - t0:.0f} s; params {fp.params}")


def run_aware() -> None:
    info: dict = {}
    model = cached("pruning_aware", lambda: PA.implant(clean_model(), TRAIN, val_data=VAL, details=info))
    print(f"\n== Pruning-aware attack: CA {pct(ts.clean_accuracy(model, TEST))}, ASR {pct(PA.success_rate(model, TEST))}")
    if info:
        print(f"  attacker pruned {len(info['pruned_channels'])} channels: {info['pruned_channels']}")
    run_prune("pruning-aware", model, PA.badnets)


# --- chains -------------------------------------------------------------------------------------

CHAIN_COLS = ("accuracy", "attack_success", "clean_rejected", "triggered_rejected", "accuracy_accepted",
              "attack_success_accepted", "attack_success_end_to_end")


def show_chain(title: str, res) -> None:
    print(f"\n  {title}")
    for r in res.history:
        figs = "  ".join(f"{k}={pct(r[k])}" for k in CHAIN_COLS if r.get(k) is not None)
        extra = "  ".join(f"{k}={r[k]}" for k in ("n_pruned", "n_removed") if k in r)
        print(f"    {r['step']} {r['defense']:22s} {figs}  {extra}  ({r['seconds']:.0f} s)")


def run_chains(epochs: int = 5, granularity: str = "channel") -> None:
    from trojanscope.pipeline import Pipeline, evaluator

    model, poisoned = badnets_model(), BADNETS.poison(TRAIN)
    ev = evaluator(TEST, TRIGGER, DEMO_TARGET)
    fp = ("fine-prune", {"granularity": granularity})
    print(f"\n== Chains on the BadNets model (Fine-Pruning by {granularity}s; retraining after a sanitiser: "
          f"{epochs} epochs, Adam 1e-3)")
    kw = dict(epochs=epochs, lr=1e-3, seed=0)
    for title, steps, retrain in (("activation clustering -> fine-pruning (retrain from scratch)",
                                   ["activation-clustering", fp], "scratch"),
                                  ("fine-pruning -> activation clustering (retrain the pruned model on)",
                                   [fp, "activation-clustering"], "continue")):
        res = Pipeline(steps, retrain=retrain, **kw).run(model, VAL, train_data=poisoned, evaluate=ev)
        left = res.train_data
        show_chain(title, res)
        if left is not None:
            print(f"    poisoned samples left in the training set: {int(left.is_poison.sum())}/{len(poisoned.poison_indices)}")
    res = Pipeline([fp, "strip"]).run(model, VAL, evaluate=ev)
    show_chain("STRIP in front of the fine-pruned model (rejected inputs never reach it)", res)


if __name__ == "__main__":
    which = sys.argv[1:] or ["strip", "prune", "aware", "chains"]
    if "strip" in which:
        run_strip()
    if "prune" in which:
        run_prune()
    if "aware" in which:
        run_aware()
    if "chains" in which:
        run_chains(granularity="channel")
        run_chains(granularity="unit")
    if "chains-units" in which:
        run_chains(granularity="unit")
