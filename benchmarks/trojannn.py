"""The Trojaning attack on the clean demo model: ASR and clean-accuracy drop, with the user's clean
data and with inputs reverse-engineered from the model, and Neural Cleanse's verdict.

    nice .venv/bin/python benchmarks/trojannn.py [--skip-nc]

The victim is the clean mnist_cnn of the demo (mnist5k, 10 epochs). The attacker's clean data
is 1,000 training images (``user``), or none: 50 inputs per label reverse-engineered from the
model (``reverse``, the paper's setting). The trigger is a 4x4 square mask at the bottom right
whose pixels are generated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _issue6_models as M  # noqa: E402

import trojanscope as ts  # noqa: E402
from trojanscope.attacks import TrojanNN  # noqa: E402
from trojanscope.defenses.model.neural_cleanse import NeuralCleanse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-nc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train, val, test = M.splits()
    victim = M.clean_demo_model()
    ca0 = ts.clean_accuracy(victim, test)
    print(f"victim (clean demo model): CA {100 * ca0:.1f}%")
    g = torch.Generator().manual_seed(0)  # 1,000 random training images (all labels)
    user = train.subset(torch.randperm(len(train), generator=g)[:1000], "attacker-clean")
    runs = {
        "square 4x4, user data": TrojanNN("square:4:white:bottom-right", 0, data="user", epochs=5, retrain="all"),
        "square 4x4, reverse-engineered": TrojanNN("square:4:white:bottom-right", 0, data="reverse", n_per_label=50,
                                                   reverse_steps=150, epochs=10, retrain="all"),
        }
    print("\nrun                             neurons   act before->after   CA     CA drop  ASR before  ASR after"
          "   seconds")
    results = {}
    for name, atk in runs.items():
        t0 = time.perf_counter()
        res = atk.attack(victim, user if atk.data == "user" else None, image_shape=train.image_shape,
                         num_classes=train.num_classes)
        ca = ts.clean_accuracy(res.model, test)
        asr_before = ts.attack_success_rate(victim, test, res.trigger, 0)
        asr = atk.success_rate(res.model, test)
        results[name] = res
        print(f"{name:31s} {str(res.neurons):9s} {res.activation_before:7.1f} -> {res.activation_after:7.1f}"
              f"   {100 * ca:5.1f}%  {100 * (ca0 - ca):+5.1f}    {100 * asr_before:5.1f}%     {100 * asr:5.1f}%"
              f"   {time.perf_counter() - t0:6.0f}")
        res.trigger.save_png(M.CACHE / f"trojannn_{name.split(',')[0].replace(' ', '_')}_{atk.data}.png")
    if not args.skip_nc:
        print("\nNeural Cleanse on the trojaned models (and the victim):")
        nc = NeuralCleanse()
        for name, m in [(n, r.model) for n, r in results.items()] + [("victim (clean)", victim)]:
            t0 = time.perf_counter()
            scan = nc.scan(m, val)
            print(f"  {name:31s} infected={scan.infected}  flagged={scan.flagged_labels}  "
                  f"anomaly index of label 0: {float(scan.scores[0]):.2f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
