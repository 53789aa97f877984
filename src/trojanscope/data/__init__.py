"""Datasets: bundled (offline), bring-your-own, and poisoned."""

from .dataset import ImageDataset, stratified_split
from .loaders import (BUNDLED, from_tensors, load_data, load_digits, load_image_folder, load_mnist5k, load_npz,
                      load_torchvision, save_npz)
from .poisoned import PoisonedDataset

__all__ = [
    "BUNDLED", "ImageDataset", "PoisonedDataset", "from_tensors", "load_data", "load_digits", "load_image_folder",
    "load_mnist5k", "load_npz", "load_torchvision", "save_npz", "stratified_split",
]
