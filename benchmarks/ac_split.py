"""How Activation Clustering's split of the target label places the poison, per way of splitting.

For every model (mnist5k ``mnist_cnn`` trained here; the colour models cached by
``benchmarks/colour.py`` under runs/colour/, skipped when absent), the target label's activations
at the sanitisers' default layer are split by: the paper's k-means on FastICA (``ica-kmeans``),
a diagonal Gaussian mixture on PCA (``pca-mixture``), each after :func:`refine_split`, and
:func:`discriminant_split` (the default). Printed per split: poisoned / all samples on each side,
the leak (poisoned samples on the side with fewer of them: 0 is a clean split) and Fisher's
separation ``d'``. Ground truth enters only to count the poison.

    nice python benchmarks/ac_split.py [--cases mnist,cmnist,digits,signs43]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import trojanscope as ts
from trojanscope.defenses.data._common import features, gaussian_split, resolve_feature_layer
from trojanscope.defenses.data.clustering import (discriminant_split, fisher_separation, reduce_activations,
                                                  refine_split, two_clusters)
from trojanscope.training import train_new

sys.path.insert(0, str(Path(__file__).resolve().parent))
import colour  # noqa: E402  (the colour models' trigger and cache)

#: (dataset, cached model tag or None for an mnist5k model trained here, poison rate, kind)
CASES = [("mnist5k", None, 0.02, "square"), ("mnist5k", None, 0.1, "square"), ("mnist5k", None, 0.05, "blend"),
         ("mnist5k", None, 0.1, "blend"), ("mnist5k", None, 0.1, "source"),
         ("cmnist", "cmnist-gtsrb_cnn-n4000-e10-adam-badnets0.1", 0.1, "square"),
         ("cmnist", "cmnist-gtsrb_cnn-n4000-e10-adam-badnets0.03", 0.03, "square"),
         ("cmnist", "cmnist-resnet188-n4000-e10-sgd-badnets0.1", 0.1, "square"),
         ("cmnist", "cmnist-resnet188-n4000-e10-sgd-badnets0.03", 0.03, "square"),
         ("digits", "digits-gtsrb_cnn-n1258-e10-adam-white-badnets0.1", 0.1, "square"),
         ("digits", "digits-gtsrb_cnn-n1258-e10-adam-white-badnets0.03", 0.03, "square"),
         ("signs43", "signs43-gtsrb_cnn-n17200-e10-adam-badnets0.1", 0.1, "square"),
         ("signs43", "signs43-gtsrb_cnn-n17200-e10-adam-badnets0.03", 0.03, "square"),
         ("signs43", "signs43-resnet188-n17200-e10-sgd-badnets0.1", 0.1, "square"),
         ("signs43", "signs43-resnet188-n17200-e10-sgd-nocrop-badnets0.03", 0.03, "square")]


def victim(dataset: str, tag: str | None, rate: float, kind: str):
    """(model, poisoned training set, target) or None when a cached model is absent."""
    if dataset == "mnist5k":
        train = ts.load_data("mnist5k", "train")
        trig = (ts.Trigger.noise(train.image_shape, 0.2) if kind == "blend"
                else ts.Trigger.square(train.image_shape, 4, "white", "bottom-right"))
        target, sources = (9, (1, 7)) if kind == "source" else (0, None)
        data = ts.BadNets(trig, target=target, rate=rate, seed=0, source_labels=sources).poison(train)
        return train_new("mnist_cnn", data, seed=0, epochs=3), data, target
    if not (colour.CACHE / tag / "model.safetensors").exists():
        return None
    train = ts.load_data(f"{dataset}:train")
    data = ts.BadNets(colour.trigger_for(train.image_shape), target=0, rate=rate, seed=0).poison(train)
    return ts.load_model(colour.CACHE / tag).model, data, 0


def placement(side: np.ndarray, poison: np.ndarray, pca: np.ndarray) -> dict:
    counts = [[int(poison[side == s].sum()), int((side == s).sum())] for s in (0, 1)]
    return {"sides": counts, "leak": min(counts[0][0], counts[1][0]), "d": round(fisher_separation(pca, side), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mnist5k,cmnist,digits,signs43")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for dataset, tag, rate, kind in CASES:
        if dataset not in a.cases.split(","):
            continue
        v = victim(dataset, tag, rate, kind)
        if v is None:
            print(json.dumps({"model": tag, "skipped": "not in runs/colour (benchmarks/colour.py --train-only)"}))
            continue
        model, data, target = v
        layer = resolve_feature_layer(model, data.x, "auto", device=None)
        idx = (data.y == target).nonzero().flatten()
        a_t = features(model, data, layer, batch_size=256, device=None).double()[idx].numpy()
        poison = data.is_poison[idx].numpy()
        ica, _ = reduce_activations(a_t, 10, "ica", 0)
        pca, _ = reduce_activations(a_t, 10, "pca", 0)
        starts = {"ica-kmeans": two_clusters(ica, 0), "pca-mixture": gaussian_split(pca, 0, covariance="diag")[0].numpy()}
        row = {"model": tag or f"mnist5k mnist_cnn {kind} {rate:g}", "layer": layer, "n": len(idx), "poison": int(poison.sum())}
        for name, side in starts.items():
            row[name] = placement(side, poison, pca)
            row[name + " refined"] = placement(refine_split(pca, side, 0), poison, pca)
        side, info = discriminant_split(ica, pca, 0)
        row["discriminant"] = {**placement(side, poison, pca), "start": info["start"]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
