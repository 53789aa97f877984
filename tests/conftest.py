"""Shared fixtures: bundled data and two trained models (clean and BadNets), once per session."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import trojanscope as ts
from trojanscope.data import ImageDataset, PoisonedDataset

torch.set_num_threads(min(2, os.cpu_count() or 1))

#: ``TROJANSCOPE_DEVICE=cuda pytest`` reruns the suite on a GPU.
DEVICE = torch.device(os.environ.get("TROJANSCOPE_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (torch and BLAS) for modules of tiny tensors: on a small shared machine,
    two threads fighting for cores are many times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def mnist() -> dict[str, ImageDataset]:
    """mnist5k splits: train (4000), val (500), test (500)."""
    return {s: ts.load_data("mnist5k", s) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def digits() -> dict[str, ImageDataset]:
    """scikit-learn's 8x8 digits: train / val / test."""
    return {s: ts.load_data("digits", s) for s in ("train", "val", "test")}


@dataclass
class TrainedPair:
    """A clean and a BadNets mnist_cnn trained on mnist5k (the demo attack, fewer epochs)."""

    clean: torch.nn.Module
    backdoored: torch.nn.Module
    attack: ts.BadNets
    poisoned: PoisonedDataset
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset

    @property
    def trigger(self) -> ts.Trigger:
        return self.attack.triggers[0]


@pytest.fixture(scope="session")
def trained(mnist) -> TrainedPair:
    """Clean and BadNets (4x4 white square, bottom-right, target 0, 10%) models; about 10 s."""
    train = mnist["train"]
    attack = ts.BadNets(ts.Trigger.square(train.image_shape, 4, "white", "bottom-right"), target=0, rate=0.1)
    poisoned = attack.poison(train)
    clean = ts.training.train_new("mnist_cnn", train, seed=0, epochs=5, device=DEVICE)
    bad = ts.training.train_new("mnist_cnn", poisoned, seed=0, epochs=5, device=DEVICE)
    return TrainedPair(clean, bad, attack, poisoned, train, mnist["val"], mnist["test"])
