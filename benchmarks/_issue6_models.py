"""Models shared by the issue-6 benchmarks (distribution, heatmap, trojannn), cached under runs/issue6/.

The BadNets demo model: mnist5k, 4x4 white square bottom-right, target 0, 10% poisoned, 10 epochs,
mnist_cnn, seed 0 (the settings of ``trojanscope.demo``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import trojanscope as ts
from trojanscope.demo import DEMO_EPOCHS, DEMO_RATE, DEMO_TARGET, DEMO_TRIGGER
from trojanscope.training import train_new

CACHE = Path(__file__).resolve().parent.parent / "runs" / "issue6"


def splits() -> tuple[ts.ImageDataset, ts.ImageDataset, ts.ImageDataset]:
    return tuple(ts.load_data("mnist5k", s) for s in ("train", "val", "test"))  # type: ignore[return-value]


def cached(name: str, build) -> torch.nn.Module:
    """Load ``runs/issue6/NAME`` or build it with ``build()`` and save it there."""
    path = CACHE / name
    if (path / "model.safetensors").exists() or (path / "spec.json").exists():
        try:
            return ts.load_model(path).model
        except ts.TrojanscopeError:
            pass
    t0 = time.perf_counter()
    model = build()
    ts.save_model(model, path, ts.ModelSpec("mnist_cnn", (1, 28, 28), 10))
    print(f"[trained {name} in {time.perf_counter() - t0:.0f} s]")
    return model


def demo_attack(train: ts.ImageDataset) -> ts.BadNets:
    return ts.BadNets(ts.Trigger.parse(DEMO_TRIGGER, train.image_shape), target=DEMO_TARGET, rate=DEMO_RATE, seed=0)


def badnets_demo_model() -> tuple[torch.nn.Module, ts.BadNets]:
    train, _, _ = splits()
    attack = demo_attack(train)
    model = cached("badnets", lambda: train_new("mnist_cnn", attack.poison(train), seed=0, epochs=DEMO_EPOCHS))
    return model, attack


def clean_demo_model() -> torch.nn.Module:
    train, _, _ = splits()
    return cached("clean", lambda: train_new("mnist_cnn", train, seed=0, epochs=DEMO_EPOCHS))


#: The fixed-position attack of the heat-map benchmark: a 4x4 white square at (3, 12) (top
#: centre, not a corner), target 0, 10% poisoned, plus 10% cover samples carrying the same patch at
#: random other places with their true labels, so that the patch only works at (3, 12).
FIXED_POSITION = (3, 12)


def fixed_position_data(train: ts.ImageDataset, seed: int = 0) -> tuple[ts.ImageDataset, ts.Trigger]:
    trig = ts.Trigger.square(train.image_shape, 4, "white", FIXED_POSITION)
    poisoned = ts.BadNets(trig, target=0, rate=0.1, seed=seed).poison(train)
    g = torch.Generator().manual_seed(seed + 1)
    n_cover = int(0.1 * len(train))
    idx = torch.randperm(len(train), generator=g)[:n_cover]
    x = train.x[idx].clone()
    # random places at least 5 pixels (Chebyshev) from the true one
    r = torch.randint(0, 25, (n_cover * 4,), generator=g)
    c = torch.randint(0, 25, (n_cover * 4,), generator=g)
    far = torch.maximum((r - FIXED_POSITION[0]).abs(), (c - FIXED_POSITION[1]).abs()) >= 5
    r, c = r[far][:n_cover], c[far][:n_cover]
    for i in range(n_cover):
        x[i, :, r[i]:r[i] + 4, c[i]:c[i] + 4] = 1.0
    data = ts.ImageDataset(torch.cat([poisoned.x, x]), torch.cat([poisoned.y, train.y[idx]]), train.num_classes,
                           train.class_names, "mnist5k+fixed-position")
    return data, trig


def fixed_position_model() -> tuple[torch.nn.Module, ts.Trigger]:
    train, _, _ = splits()
    data, trig = fixed_position_data(train)
    return cached("fixed_position", lambda: train_new("mnist_cnn", data, seed=0, epochs=DEMO_EPOCHS)), trig
