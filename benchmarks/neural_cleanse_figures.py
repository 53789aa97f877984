"""The "Done when" figures of the Neural Cleanse issue, measured on mnist5k.

Models (mnist_cnn, 10 epochs, the demo's training settings), cached under ``--cache``:

* ``clean`` and ``badnets`` (4x4 white square, bottom-right, target 0, 10% poisoned) for each
  of ``--seeds`` (three by default);
* ``checker``: 4x4 checkerboard in the top-left corner, target 3, 10% poisoned;
* ``blend``: whole-image uniform noise blended with alpha 0.2, target 0, 10% poisoned.

For each: a Neural Cleanse scan (default settings) with the val split as the defender's clean
data; then, on the backdoored models, unlearning (clean training split: see ``UNLEARNING``), neuron
pruning (val split) of the penultimate layer (the default) and of the last convolutional
block's units (``granularity="unit"``: every position of every channel of the last feature map
is a neuron) and the activation filter (fitted on val, FPR / FNR measured on test), all
from the scan's reversed trigger. Clean accuracy and the *original* trigger's attack success
are measured on the test split (ground truth enters only here, through ``metrics``).

Usage::

    nice .venv/bin/python benchmarks/neural_cleanse_figures.py [--seeds 0 1 2] [--scan-seeds 0 1 2 3] [--only scan]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

import trojanscope as ts
from trojanscope.defenses.input.activation_filter import ActivationFilter
from trojanscope.defenses.model.neural_cleanse import NeuralCleanse, mad_anomaly_index
from trojanscope.defenses.repair.neural_cleanse import SMALL_SET_UNLEARNING, NeuronPruning, Unlearning
from trojanscope.models import ModelSpec, load_model, save_model
from trojanscope.training import train_new

ATTACKS = {
    "badnets": ("square:4:white:bottom-right", 0),
    "checker": ("checkerboard:4:top-left", 3),
    "blend": ("blend:noise:0.2", 0),
}

#: Unlearning settings measured, each with two unlearning seeds: the paper's (10% share, one
#: epoch), the small-set recipe (same 10%, 3 epochs of SGD: see ``Unlearning``), and a 25% share.
UNLEARNING = (
    ("unlearn 10% (paper)", {}),
    ("unlearn 10%, 3 ep SGD", SMALL_SET_UNLEARNING),
    ("unlearn 25%", {"share": 0.25}),
)


def get_model(kind: str, seed: int, cache: Path, train: ts.ImageDataset) -> tuple[torch.nn.Module, ts.BadNets | None]:
    attack = None
    data = train
    if kind != "clean":
        spec, target = ATTACKS[kind]
        attack = ts.BadNets(ts.Trigger.parse(spec, train.image_shape), target=target, rate=0.1, seed=seed)
        data = attack.poison(train)
    d = cache / f"{kind}{seed}"
    if (d / "model.safetensors").is_file():
        return load_model(d).model, attack
    t0 = time.perf_counter()
    model = train_new("mnist_cnn", data, seed=seed, epochs=10)
    save_model(model, d, ModelSpec("mnist_cnn", train.image_shape, train.num_classes))
    print(f"# trained {kind}{seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model, attack


def side_index(indices: torch.Tensor, norms: torch.Tensor, target: int | None) -> float:
    """The target's anomaly index, or (no target: a clean model) the largest index of a label whose
    norm is below the median (numpy's), the only ones that can be flagged."""
    if target is not None:
        return float(indices[target])
    low = norms < torch.quantile(norms, 0.5)
    return float(indices[low].max()) if bool(low.any()) else 0.0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "trojanscope-nc-models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scan-seeds", type=int, nargs="+", default=[0],
                    help="scan each model with these seeds (a row each); the mitigation uses the first")
    ap.add_argument("--only", choices=["train", "scan", "all"], default="all")
    ap.add_argument("--kinds", nargs="+", default=["clean", "badnets", "checker", "blend"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, val, test = (ts.load_data("mnist5k", s) for s in ("train", "val", "test"))
    jobs = [(k, s) for s in args.seeds for k in ("clean", "badnets") if k in args.kinds]
    jobs += [(k, args.seeds[0]) for k in ("checker", "blend") if k in args.kinds]
    models = {(k, s): get_model(k, s, args.cache, train) for k, s in jobs}
    if args.only == "train":
        return

    print("\n## Scan (NeuralCleanse defaults, clean data = val split)")
    print("idx: the target's anomaly index, or for a clean model the largest index below the median norm;")
    print("log idx: the same on log norms (outlier_scale='log': the same optimisation, so no second scan)")
    print(f"{'model':<13} {'CA':>6} {'ASR':>6} {'infected':>8} {'flagged':>10} {'idx':>6} "
          f"{'target |m|':>10} {'median |m|':>10} {'log idx':>8} {'wall s':>7} {'cpu s':>6}")
    scans = {}
    for (kind, seed), (model, attack) in models.items():
        target = attack.targets[0] if attack else None
        ca = ts.clean_accuracy(model, test)
        asr = attack.success_rate(model, test) if attack else float("nan")
        for ss in args.scan_seeds:
            c0, t0 = cpu(), time.perf_counter()
            r = NeuralCleanse(seed=ss).scan(model, val)
            wall, used = time.perf_counter() - t0, cpu() - c0
            scans.setdefault((kind, seed), r)  # the mitigation uses the first scan seed's triggers
            norms = r.l1_norms.double()
            idx, lidx = side_index(r.anomaly_indices, norms, target), side_index(
                mad_anomaly_index(norms.clamp_min(1e-12).log()), norms, target)
            tnorm = float(r.l1_norms[target]) if target is not None else float("nan")
            name = f"{kind}{seed}" + (f"/s{ss}" if len(args.scan_seeds) > 1 else "")
            print(f"{name:<13} {ca:6.3f} {asr:6.3f} {str(r.infected):>8} {str(r.flagged_labels):>10} {idx:6.2f} "
                  f"{tnorm:10.1f} {r.details['median_l1_norm']:10.1f} {lidx:8.2f} {wall:7.1f} {used:6.1f}",
                  flush=True)
    if args.only == "scan":
        return

    print("\n## Mitigation on the backdoored models (original trigger's ASR and CA on the test split)")
    print(f"{'model':<10} {'method':<22} {'CA before':>9} {'CA after':>9} {'ASR before':>10} {'ASR after':>9} "
          f"{'note':<30}")
    for (kind, seed), (model, attack) in models.items():
        if attack is None or not scans[kind, seed].flagged_labels:
            continue
        r = scans[kind, seed]
        ca0, asr0 = ts.clean_accuracy(model, test), attack.success_rate(model, test)
        for label, kw in UNLEARNING:
            for useed in (seed, seed + 10):
                t0 = time.perf_counter()
                un = Unlearning(seed=useed, **kw).repair(model, train, scan=r)
                m = un.model
                note = f"{un.details['n_finetune']} images, seed {useed}, {time.perf_counter() - t0:.1f} s"
                print(f"{kind + str(seed):<10} {label:<22} {ca0:9.3f} {ts.clean_accuracy(m, test):9.3f} {asr0:10.3f} "
                      f"{attack.success_rate(m, test):9.3f} {note:<30}", flush=True)
        for label, kw in (("penultimate", {}), ("last-conv units", {"granularity": "unit"})):
            t0 = time.perf_counter()
            pr = NeuronPruning(**kw).repair(model, val, scan=r)
            m = pr.model
            note = f"{pr.history[-1]['ratio']:.0%} pruned, {time.perf_counter() - t0:.1f} s"
            print(f"{kind + str(seed):<10} {'pruning ' + label:<22} {ca0:9.3f} {ts.clean_accuracy(m, test):9.3f} "
                  f"{asr0:10.3f} {attack.success_rate(m, test):9.3f} {note:<30}", flush=True)
        filt = ActivationFilter().fit(model, val, scan=r)
        trig = attack.triggers[0]
        keep = test.y != attack.targets[0]
        fpr = float(filt.flag(test.x).float().mean())
        fnr = 1 - float(filt.flag(trig.apply(test.x[keep])).float().mean())
        curve = ts.metrics.fpr_fnr_curve(filt.score(test.x), filt.score(trig.apply(test.x[keep])))
        print(f"{kind + str(seed):<10} {'activation filter':<22} FPR on test {fpr:.3f}, FNR {fnr:.3f} at the val-calibrated "
              f"threshold; curve: FNR {curve.fnr_at(0.05):.3f} at FPR <= 5%", flush=True)


if __name__ == "__main__":
    main()
