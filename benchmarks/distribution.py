"""MESA on the BadNets demo model: sampled triggers, the grid of samples, and repair.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/distribution.py [--steps 300] [--seeds 0 1 2]
        [--position 22 22] [--out runs/issue6]

Prints, for the demo model (mnist5k, 4x4 white square bottom-right, target 0, 10%, 10 epochs):

* per staircase level: beta, the MINE entropy estimate, the ensemble weight, the mean ASR of 100
  samples on the test set, the share above beta (the issue asks >= 90% at the top level) and the
  mean per-pixel standard deviation of the samples (0 = the generator collapsed to one point);
* for each repair seed: clean accuracy and the original trigger's ASR after the distribution
  repair and after Neural Cleanse's single-trigger unlearning (the ``unlearn`` repair with the
  trigger reverse-engineered for label 0), both on the same 1,000 clean images, 2 epochs, Adam
  1e-3, 20% of the samples stamped; then ASR on held-out trigger variants (shifted by 1-2 px,
  recoloured, resized), per variant and averaged, mean over the seeds;
* ablations with the same budget, so that the table says where the gain comes from: MESA stamped
  at the located place only (``shift=0``); the top generator's central point ``G_top(0)``, one
  trigger, stamped at the same valid places as MESA; the NC trigger moved over the same places.

The trigger's position is located from the model (moving window) unless ``--position`` is given.
The variants are a test set only: nothing in the repairs sees them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _issue6_models as M  # noqa: E402

import trojanscope as ts  # noqa: E402
from trojanscope.defenses import create  # noqa: E402
from trojanscope.defenses.model.distribution import TriggerDistribution  # noqa: E402
from trojanscope.defenses.model.heatmap import locate_trigger  # noqa: E402
from trojanscope.defenses.model.neural_cleanse import NeuralCleanse  # noqa: E402
from trojanscope.defenses.repair.distribution_unlearning import DistributionUnlearning  # noqa: E402
from trojanscope.defenses.repair.neural_cleanse import unlearning_set  # noqa: E402
from trojanscope.report._explain_plots import save_distribution_grid  # noqa: E402
from trojanscope.training import fine_tune  # noqa: E402

BUDGET = dict(rate=0.2, epochs=2, lr=1e-3, batch_size=64)   # the same for every repair


def variants(shape) -> dict[str, ts.Trigger]:
    sq = ts.Trigger.square
    return {
        "shift (-1,0)": sq(shape, 4, "white", (22, 23)), "shift (0,-2)": sq(shape, 4, "white", (23, 21)),
        "shift (+1,+1)": sq(shape, 4, "white", (24, 24)), "shift (-2,-1)": sq(shape, 4, "white", (21, 22)),
        "grey 0.8": sq(shape, 4, 0.8, (23, 23)), "grey 0.6": sq(shape, 4, 0.6, (23, 23)),
        "3x3": sq(shape, 3, "white", (24, 24)), "5x5": sq(shape, 5, "white", (22, 22)),
    }


class _CentrePoint(nn.Module):
    """Ablation: a generator that maps every noise to ``G(0)`` (one trigger per level)."""

    def __init__(self, gen: nn.Module) -> None:
        super().__init__()
        self.gen = gen
        self.weights = gen.weights

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(torch.zeros_like(z))


def moved(trigger: ts.Trigger, dr: int, dc: int) -> ts.Trigger:
    """``trigger`` moved by ``(dr, dc)`` pixels (what leaves the image is dropped, zeros come in)."""
    def roll(t: torch.Tensor) -> torch.Tensor:
        out = torch.roll(t, (dr, dc), (-2, -1))
        h, w = t.shape[-2:]
        if dr > 0:
            out[..., :dr, :] = 0
        elif dr < 0:
            out[..., h + dr:, :] = 0
        if dc > 0:
            out[..., :, :dc] = 0
        elif dc < 0:
            out[..., :, w + dc:] = 0
        return out
    return ts.Trigger(roll(trigger.mask), roll(trigger.pattern), f"{trigger.name}+({dr},{dc})")


def unlearn_moved(model, clean, trigger, offsets, seed):
    """NC unlearning with the reversed trigger moved over ``offsets`` in turn (same budget)."""
    net = copy.deepcopy(model)
    ds, _ = unlearning_set(clean, [moved(trigger, dr, dc) for dr, dc in offsets], share=1.0,
                           poison_ratio=BUDGET["rate"], seed=seed)
    fine_tune(net, ds, epochs=BUDGET["epochs"], lr=BUDGET["lr"], batch_size=BUDGET["batch_size"], seed=seed)
    return net


def arguments(out: Path) -> argparse.ArgumentParser:
    """The command line of the MESA benchmarks (``out``: where the grid of samples goes)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--levels", type=int, default=10)
    ap.add_argument("--fit-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the repairs")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--position", type=int, nargs=2, default=None,
                    help="skip the location step and use this (row, col), e.g. the one a previous run located")
    ap.add_argument("--no-ablations", action="store_true")
    return ap


def defender_clean(train: ts.ImageDataset) -> ts.ImageDataset:
    """The defender's clean data: 1,000 random training images (all labels), the same for every repair."""
    g = torch.Generator().manual_seed(0)
    return train.subset(torch.randperm(len(train), generator=g)[:1000], "defender-clean")


def fit_staircase(model, clean, test, target, pos, size, args, grid_path: Path) -> TriggerDistribution:
    """Fit the MESA staircase at ``pos`` and print, per level, beta, entropy, weight, the mean ASR of
    100 samples on ``test``, the share above beta and the samples' per-pixel std; save the grid."""
    t0 = time.perf_counter()
    dist = TriggerDistribution(n_levels=args.levels, trigger_size=size, position=pos, steps=args.steps,
                               samples_per_step=8, images_per_step=8, seed=args.fit_seed)
    dist.explain(model, clean, target)
    print(f"fitted {args.levels} generators ({args.steps} steps, seed {args.fit_seed}) in "
          f"{time.perf_counter() - t0:.0f} s")
    rep = dist.report(model, test, n=100)
    print("\nlevel  beta  entropy  weight  mean ASR  ASR>beta  pixel std")
    r, q = pos
    for i in range(args.levels):
        p = dist.sample_tensors(200, level=i, seed=1).patterns[:, :, r:r + size, q:q + size]
        print(f"{i:5d}  {float(rep.betas[i]):.2f}  {float(rep.entropies[i]):7.2f}  {float(rep.weights[i]):6.3f}"
              f"  {100 * float(rep.asr[i].mean()):7.1f}%  {100 * float(rep.valid_share[i]):6.1f}%"
              f"  {float(p.std(0).mean()):9.3f}")
    grid = save_distribution_grid(dist, grid_path, report=rep)
    print(f"grid of samples: {grid}")
    return dist


def centre_point(dist: TriggerDistribution) -> TriggerDistribution:
    """A copy of ``dist`` whose generators always return their central point ``G(0)``."""
    point = copy.deepcopy(dist)
    point.generators_ = _CentrePoint(point.generators_)
    return point


def measure(m: nn.Module, test, attack, target: int, var: dict[str, ts.Trigger]) -> tuple[float, float, list[float]]:
    """A repaired model's clean accuracy, the original trigger's ASR and each variant's ASR on ``test``."""
    return (ts.clean_accuracy(m, test), attack.success_rate(m, test),
            [ts.attack_success_rate(m, test, t, target) for t in var.values()])


def compare_repairs(model, clean, target, dist, nc_trigger, pos, seeds, score, ablations: bool = True) -> None:
    """For each repair seed, ``score(name, repaired model)`` after single-trigger NC unlearning and
    MESA's distribution unlearning with the same :data:`BUDGET`, then (``ablations``) MESA at the
    located place only, the central point ``G_top(0)`` at MESA's places, and the NC trigger moved
    over MESA's places."""
    r, q = pos
    point = centre_point(dist)
    for seed in seeds:
        print(f"\nrepair seed {seed}")
        t0 = time.perf_counter()
        single = create("unlearn", share=1.0, poison_ratio=BUDGET["rate"], epochs=BUDGET["epochs"], lr=BUDGET["lr"],
                        batch_size=BUDGET["batch_size"], seed=seed).repair(model, clean, scan={target: nc_trigger})
        score("single-trigger unlearn (NC)", single.model)
        t1 = time.perf_counter()
        mesa = DistributionUnlearning(min_beta=0.5, seed=seed, **BUDGET).repair(model, clean, scan=dist)
        score("distribution unlearn (MESA)", mesa.model)
        places = mesa.details["places"]
        print(f"  (NC {t1 - t0:.0f} s, MESA {time.perf_counter() - t1:.0f} s; MESA valid places {len(places)}: "
              f"{places})")
        if not ablations:
            continue
        score("ablation: MESA, located place only",
              DistributionUnlearning(min_beta=0.5, shift=0, seed=seed, **BUDGET).repair(
                  model, clean, scan=dist).model)
        score("ablation: one point G_top(0), places",
              DistributionUnlearning(min_beta=float(dist.betas_[-1]), seed=seed, **BUDGET).repair(
                  model, clean, scan=point).model)
        offsets = [(a - r, b - q) for a, b in places]
        score("ablation: NC trigger moved, places", unlearn_moved(model, clean, nc_trigger, offsets, seed))


def main() -> None:
    args = arguments(M.CACHE).parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    model, attack = M.badnets_demo_model()
    train, val, test = M.splits()
    clean = defender_clean(train)
    target = 0
    ca0, asr0 = ts.clean_accuracy(model, test), attack.success_rate(model, test)
    print(f"backdoored model: CA {100 * ca0:.1f}%  ASR {100 * asr0:.1f}%  (test: {int((test.y != target).sum())} "
          f"non-target images, 1 image = {100 / int((test.y != target).sum()):.2f}%)")

    t0 = time.perf_counter()
    pos = tuple(args.position) if args.position else locate_trigger(model, clean, target, 4, epochs=8)
    print(f"{'given' if args.position else 'located'} 4x4 trigger at {pos} (true (23, 23)) in "
          f"{time.perf_counter() - t0:.0f} s")
    dist = fit_staircase(model, clean, test, target, pos, 4, args, args.out / "mesa_grid.png")

    t0 = time.perf_counter()
    nc_trigger = NeuralCleanse(epochs=40).reverse(model, clean, targets=[target]).trigger(0)
    print(f"NC reversed trigger for label {target}: |m|={float(nc_trigger.l1_norm):.1f} "
          f"({time.perf_counter() - t0:.0f} s)")
    var = variants(train.image_shape)
    rows: dict[str, list[tuple[float, float, list[float]]]] = {}

    def score(name: str, m: nn.Module) -> None:
        ca, asr, v = measure(m, test, attack, target, var)
        rows.setdefault(name, []).append((ca, asr, v))
        print(f"  {name:34s} CA {100 * ca:5.1f}%  ASR {100 * asr:5.1f}%  variants {100 * sum(v) / len(v):5.2f}%",
              flush=True)

    compare_repairs(model, clean, target, dist, nc_trigger, pos, args.seeds, score, ablations=not args.no_ablations)

    print(f"\nmean over repair seeds {args.seeds} (min..max of the variant mean)")
    print(f"{'model':36s}  CA     CA drop  ASR orig  variants")
    print(f"{'backdoored':36s} {100 * ca0:5.1f}%  {0:+5.1f}   {100 * asr0:6.1f}%")
    for name, rs in rows.items():
        ca = statistics.mean(x[0] for x in rs)
        asr = statistics.mean(x[1] for x in rs)
        vm = [sum(x[2]) / len(x[2]) for x in rs]
        print(f"{name:36s} {100 * ca:5.1f}%  {100 * (ca0 - ca):+5.1f}   {100 * asr:6.2f}%  {100 * statistics.mean(vm):5.2f}%"
              f"  ({100 * min(vm):.2f}..{100 * max(vm):.2f})")
    print("\nASR on held-out variants, mean over repair seeds")
    names = ["backdoored", *rows]
    print(f"{'variant':14s} " + "  ".join(f"{n[:16]:>16s}" for n in names))
    base = [ts.attack_success_rate(model, test, t, target) for t in var.values()]
    for j, vname in enumerate(var):
        cells = [base[j]] + [statistics.mean(x[2][j] for x in rows[n]) for n in rows]
        print(f"{vname:14s} " + "  ".join(f"{100 * c:15.2f}%" for c in cells))
    means = [sum(base) / len(base)] + [statistics.mean(sum(x[2]) / len(x[2]) for x in rows[n]) for n in rows]
    print(f"{'mean':14s} " + "  ".join(f"{100 * c:15.2f}%" for c in means))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
