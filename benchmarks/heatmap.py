"""Moving-window heat map on a model whose trigger only works at one non-corner place.

    nice .venv/bin/python benchmarks/heatmap.py [--epochs 15] [--out runs/issue6]

The model: mnist_cnn, mnist5k, BadNets with a 4x4 white square at (3, 12) (top centre), target
0, 10% poisoned, plus 10% cover samples with the same patch at other places and their true
labels (so it only works there), 10 epochs. Prints the ASR of the patch at its place and
elsewhere, whether the heat map's maximum lies on the trigger, and the ASR (on the test split)
of the trigger found by the final search in the hot region; writes the heat map as a PNG.
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
from trojanscope.defenses.model.heatmap import MovingWindowSearch  # noqa: E402
from trojanscope.report._explain_plots import save_heatmap_png  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--final-epochs", type=int, default=40)
    ap.add_argument("--n-images", type=int, default=300)
    ap.add_argument("--out", type=Path, default=M.CACHE)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the CPU is shared; two threads spin on each other
    train, val, test = M.splits()
    model, trig = M.fixed_position_model()
    r, c = M.FIXED_POSITION
    print(f"fixed-position model: CA {100 * ts.clean_accuracy(model, test):.1f}%, "
          f"ASR at {M.FIXED_POSITION} {100 * ts.attack_success_rate(model, test, trig, 0):.1f}%")
    for pos in [(r, c - 4), (r, c + 4), (r + 5, c), (12, 12), (23, 23), (1, 1)]:
        t = ts.Trigger.square(train.image_shape, 4, "white", pos)
        print(f"  same patch at {pos}: ASR {100 * ts.attack_success_rate(model, test, t, 0):.1f}%")
    t0 = time.perf_counter()
    search = MovingWindowSearch(epochs=args.epochs, final_epochs=args.final_epochs, n_images=args.n_images)
    res = search.explain(model, val, 0)
    pr, pc = res.peak
    on = r <= pr < r + 4 and c <= pc < c + 4
    asr = ts.attack_success_rate(model, test, res.trigger, 0)
    r0, c0, r1, c1 = res.bbox
    print(f"\nmoving window: {res.window}x{res.window} windows, stride {res.stride}, "
          f"{res.positions.shape[0]} windows, {time.perf_counter() - t0:.0f} s")
    print(f"heat map maximum at {res.peak}: {'ON' if on else 'NOT on'} the trigger "
          f"(rows {r}-{r + 3}, cols {c}-{c + 3})")
    print(f"hot region: rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1}")
    print(f"final search: |a|_1 = {float(res.trigger.l1_norm):.1f}, ASR on test {100 * asr:.1f}% "
          f"(on its optimisation images {100 * res.trigger_asr:.1f}%)")
    top = res.strength.topk(5)
    print("strongest windows (top-left, strength, ASR, |a|_1):")
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {tuple(res.positions[i].tolist())}  {v:.4f}  {100 * float(res.window_asr[i]):.0f}%"
              f"  {float(res.window_l1[i]):.1f}")
    png = save_heatmap_png(res, args.out / "heatmap.png", background=test.x[0], truth=(r, c, r + 4, c + 4))
    res.trigger.save_png(args.out / "heatmap_trigger.png")
    print(f"heat map written to {png}")


if __name__ == "__main__":
    main()
