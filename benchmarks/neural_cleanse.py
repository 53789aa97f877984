"""Neural Cleanse: the batched scan (all labels per forward pass) against the sequential one.

Same model (the demo's BadNets mnist_cnn on mnist5k, seed 0, cached), same data (val split),
same settings; each mode runs in its own process so that its peak memory (max RSS above the
process's baseline just before the scan) is its own. Prints wall time, CPU time, peak memory
and the verdicts.

First it prints the ceiling: the cost per image of one optimisation step (forward and backward
of mnist_cnn) for one label's mini-batch (16 images, the scan's default) and for ten labels' (160).
On a CPU the convolutions are compute-bound, so the per-image cost hardly falls with the batch
and batching the labels can only remove per-step overhead: that, not the code, bounds the
speed-up here (measured idle: 1.2x). On a GPU a 16-image step leaves the device mostly idle,
which is where batching the labels should pay (not measured: no GPU has been lent to this project
yet; ``--device cuda`` runs the same comparison on one).

On a shared machine the wall time is inflated by other processes: the CPU time (user + system
of the process, all threads) is the load-independent figure; with one thread it is an upper
bound of the uncontended wall time.

Usage::

    nice .venv/bin/python benchmarks/neural_cleanse.py [--threads 1 2] [--epochs 80] [--device cuda]

One thread by default: on a CPU shared with other jobs, two threads spin on each other and
both modes get several times slower (the batched scan took 83 CPU seconds instead of 11).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "trojanscope-nc-models"


def child(mode: str, threads: int, epochs: int, device: str) -> None:
    import torch

    torch.set_num_threads(threads)
    import trojanscope as ts
    from trojanscope.defenses.model.neural_cleanse import NeuralCleanse

    sys.path.insert(0, str(Path(__file__).parent))
    from neural_cleanse_figures import get_model

    train, val = ts.load_data("mnist5k", "train"), ts.load_data("mnist5k", "val")
    model, attack = get_model("badnets", 0, CACHE, train)
    cuda = device.startswith("cuda")
    model.to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    r = NeuralCleanse(mode=mode, epochs=epochs, seed=0, device=device).scan(model, val)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    target = attack.targets[0]
    print(json.dumps({
        "mode": mode, "threads": threads, "wall_s": wall,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                    else (r1.ru_maxrss - max(0, min(base, rss_now))) / 1024),
        "infected": r.infected,
        "flagged": r.flagged_labels, "target_index": float(r.anomaly_indices[target]),
        "norms": [round(float(v), 1) for v in r.l1_norms]}))


def ceiling(threads: int, device: str = "cpu", samples_per_step: int = 16, labels: int = 10) -> None:
    """What batching can gain at most here: one optimisation step's cost per image, for one label's
    batch and for all labels' batch. When the per-image cost does not fall with the batch (the
    convolutions are compute-bound), the batched scan can only save the per-step overhead."""
    import torch

    torch.set_num_threads(threads)
    from trojanscope.models import create_model

    net = create_model("mnist_cnn").eval().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for p in net.parameters():
        p.requires_grad_(False)
    per_image = {}
    for b in (samples_per_step, samples_per_step * labels):
        x = torch.rand(b, 1, 28, 28, device=device)
        w = torch.zeros(1, 1, 28, 28, device=device, requires_grad=True)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(10):
                out = net((1 - torch.sigmoid(w)) * x + torch.sigmoid(w))
                torch.autograd.grad(out.logsumexp(1).sum(), [w])
            sync()
            best = min(best, (time.perf_counter() - t0) / 10)
        per_image[b] = best / b
        print(f"ceiling   threads {threads}  forward+backward of {b:4d} images: {1e3 * best:7.2f} ms "
              f"({1e6 * best / b:6.1f} us per image)", flush=True)
    small, big = per_image[samples_per_step], per_image[samples_per_step * labels]
    print(f"ceiling   threads {threads}: one {labels}-label batch instead of {labels} one-label batches saves at most "
          f"{small / big:.2f}x of the model's compute per step", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both modes run; on cuda the "
                    "peak memory is torch's peak allocation")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "THREADS"))
    ap.add_argument("--ceiling", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ceiling:
        ceiling(args.ceiling, args.device)
        return
    if args.child:
        child(args.child[0], int(args.child[1]), args.epochs, args.device)
        return
    for threads in args.threads:
        subprocess.run([sys.executable, __file__, "--ceiling", str(threads), "--device", args.device], check=True)
    rows = []
    for threads in args.threads:
        for mode in ("batched", "sequential"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(threads), "--epochs", str(args.epochs),
                                  "--device", args.device],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['mode']:<10} threads {r['threads']}  wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  "
                  f"peak +{r['peak_mb']:6.1f} MB  infected {r['infected']}  flagged {r['flagged']}  "
                  f"target index {r['target_index']:.2f}", flush=True)
    for threads in args.threads:
        b, s = (next(r for r in rows if r["mode"] == m and r["threads"] == threads) for m in ("batched", "sequential"))
        print(f"threads {threads}: batched is {s['wall_s'] / b['wall_s']:.1f}x faster in wall time, "
              f"{s['cpu_s'] / b['cpu_s']:.1f}x in CPU time; same verdict: "
              f"{b['infected'] == s['infected'] and b['flagged'] == s['flagged']}; "
              f"batched 10-label scan {b['wall_s']:.1f} s wall, {b['cpu_s']:.1f} s CPU")


if __name__ == "__main__":
    main()
