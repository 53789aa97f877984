"""Neural Cleanse: the batched scan (all labels per forward pass) against the sequential one.

Same model (the demo's BadNets mnist_cnn on mnist5k, seed 0, cached), same data (val split),
same settings; each mode runs in its own process so that its peak memory (max RSS above the
process's baseline just before the scan) is its own. Prints wall time, CPU time, peak memory
and the verdicts.

On a shared machine the wall time is inflated by other processes: the CPU time (user + system
of the process, all threads) is the load-independent figure; with one thread it is an upper
bound of the uncontended wall time.

Usage::

    nice .venv/bin/python benchmarks/neural_cleanse.py [--threads 1 2] [--epochs 80]

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


def child(mode: str, threads: int, epochs: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import trojanscope as ts
    from trojanscope.defenses.model.neural_cleanse import NeuralCleanse

    sys.path.insert(0, str(Path(__file__).parent))
    from neural_cleanse_figures import get_model

    train, val = ts.load_data("mnist5k", "train"), ts.load_data("mnist5k", "val")
    model, attack = get_model("badnets", 0, CACHE, train)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    r = NeuralCleanse(mode=mode, epochs=epochs, seed=0).scan(model, val)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    target = attack.targets[0]
    print(json.dumps({
        "mode": mode, "threads": threads, "wall_s": wall,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "peak_mb": (r1.ru_maxrss - max(0, min(base, rss_now))) / 1024, "infected": r.infected,
        "flagged": r.flagged_labels, "target_index": float(r.anomaly_indices[target]),
        "norms": [round(float(v), 1) for v in r.l1_norms]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "THREADS"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.epochs)
        return
    rows = []
    for threads in args.threads:
        for mode in ("batched", "sequential"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(threads), "--epochs", str(args.epochs)],
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
