"""CIFAR-10, CIFAR-100, SVHN and GTSRB from the files torchvision downloads (the ``vision`` extra).

A data spec ``cifar10[:SPLIT][@ROOT]`` (likewise ``cifar100``, ``svhn``, ``gtsrb``) reads the
dataset from ``ROOT`` (default ``$TROJANSCOPE_DATA``, else ``~/.cache/trojanscope/data``), in the
on-disk layout that ``torchvision.datasets.<NAME>(ROOT, download=True)`` leaves there:

    cifar10   ROOT/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta
    cifar100  ROOT/cifar-100-python/train, test, meta          (the 100 fine labels)
    svhn      ROOT/train_32x32.mat, test_32x32.mat
    gtsrb     ROOT/gtsrb/GTSRB/Training/000CC/*.ppm;  ROOT/gtsrb/GTSRB/Final_Test/Images/*.ppm
              with ROOT/gtsrb/GT-final_test.csv                (images resized to 32x32)

Nothing is downloaded by a spec: :func:`download` does that, through torchvision. Reading needs
no torchvision: the CIFAR batches are pickles, read by an unpickler that admits only plain
containers and numpy arrays (a data file is as untrusted as a model file), SVHN's ``.mat`` files
go through scipy and GTSRB's images through PIL.

Splits: ``train`` and ``val`` are a seeded stratified 90 / 10 split of the official training
set, ``test`` is the official test set, ``all`` both official sets together.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset, stratified_split

TORCHVISION_SETS = {
    "cifar10": "CIFAR-10 from torchvision's files (3x32x32, 10 classes); cifar10[:SPLIT][@ROOT]",
    "cifar100": "CIFAR-100 from torchvision's files (3x32x32, 100 fine labels); cifar100[:SPLIT][@ROOT]",
    "svhn": "SVHN from torchvision's files (3x32x32, 10 classes); svhn[:SPLIT][@ROOT]",
    "gtsrb": "GTSRB from torchvision's files (resized to 3x32x32, 43 classes); gtsrb[:SPLIT][@ROOT]",
}
_TV_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "gtsrb": "GTSRB"}
_SIZE = 32
_MAX_BYTES = 4 << 30  #: refuse a single batch file larger than this


def default_root() -> Path:
    """``$TROJANSCOPE_DATA``, else ``~/.cache/trojanscope/data``."""
    return Path(os.environ.get("TROJANSCOPE_DATA") or Path.home() / ".cache" / "trojanscope" / "data")


def _missing(name: str, root: Path, what: str) -> DataError:
    return DataError(
        f"{name}: {what} not found under {root} (get it once with `pip install 'trojanscope[vision]'` and "
        f"`python -c \"from trojanscope.data.torchvision_sets import download; download('{name}', '{root}')\"`, "
        f"or name another root: {name}@ROOT or $TROJANSCOPE_DATA)"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Admits plain containers and numpy arrays only (what the CIFAR batches hold)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data batch")


def _read_batch(path: Path, name: str, root: Path) -> dict[str, object]:
    if not path.is_file():
        raise _missing(name, root, f"file {path.relative_to(root) if path.is_relative_to(root) else path}")
    if path.stat().st_size > _MAX_BYTES:
        raise DataError(f"{path}: {path.stat().st_size} bytes is too large for a data batch")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as e:
        raise DataError(f"cannot read {path} as a CIFAR batch: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a CIFAR batch must be a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_arrays(batch: dict[str, object], path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: a CIFAR batch needs 'data' (an array) and {label_key!r}")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must be a list of integers")
    if data.dtype != np.uint8 or data.size != y.size * 3 * _SIZE * _SIZE:
        raise DataError(f"{path}: 'data' must be uint8 with 3072 values per label, got {data.dtype} {data.shape} "
                        f"for {y.size} labels")
    return data.reshape(-1, 3, _SIZE, _SIZE), y.astype(np.int64)


def _names(meta_path: Path, key: str) -> list[str] | None:
    if not meta_path.is_file():
        return None
    try:
        meta = _read_batch(meta_path, "meta", meta_path.parent)
    except DataError:
        return None
    names = meta.get(key)
    if not isinstance(names, list):
        return None
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str] | None, int]:
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta, meta_key, k = "labels", "batches.meta", "label_names", 10
    else:
        folder = root / "cifar-100-python"
        files = ["train"] if train else ["test"]
        label_key, meta, meta_key, k = "fine_labels", "meta", "fine_label_names", 100
    if not folder.is_dir():
        raise _missing(name, root, f"folder {folder.name}")
    xs, ys = zip(*(_cifar_arrays(_read_batch(folder / f, name, root), folder / f, label_key) for f in files))
    names = _names(folder / meta, meta_key)
    return np.concatenate(xs), np.concatenate(ys), names if names and len(names) == k else None, k


def _read_svhn(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, None, int]:
    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        raise _missing("svhn", root, f"file {path.name}")
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except (ValueError, OSError, TypeError, NotImplementedError) as e:
        raise DataError(f"cannot read {path} as a .mat file: {e}") from None
    X, y = mat.get("X"), mat.get("y")
    if not isinstance(X, np.ndarray) or not isinstance(y, np.ndarray) or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: needs X of shape (32, 32, 3, N) and y of shape (N, 1)")
    y = y.reshape(-1).astype(np.int64)
    if y.size != X.shape[3]:
        raise DataError(f"{path}: X holds {X.shape[3]} images but y {y.size} labels")
    y[y == 10] = 0  # SVHN writes the digit 0 as label 10
    return np.ascontiguousarray(X.transpose(3, 2, 0, 1)).astype(np.uint8), y, [str(i) for i in range(10)], 10


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (_SIZE, _SIZE):
                im = im.resize((_SIZE, _SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _read_gtsrb(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, None, int]:
    base = root / "gtsrb"
    xs: list[np.ndarray] = []
    ys: list[int] = []
    if train:
        folder = base / "GTSRB" / "Training"
        if not folder.is_dir():
            raise _missing("gtsrb", root, "folder gtsrb/GTSRB/Training")
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        for c, cname in enumerate(classes):
            for f in sorted((folder / cname).glob("*.ppm")):
                xs.append(_read_image(f))
                ys.append(c)
    else:
        folder, gt = base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"
        if not folder.is_dir() or not gt.is_file():
            raise _missing("gtsrb", root, "gtsrb/GTSRB/Final_Test/Images with gtsrb/GT-final_test.csv")
        with open(gt, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
        for r in rows:
            fname, cid = r.get("Filename"), r.get("ClassId")
            if not fname or cid is None or not cid.strip().isdigit() or Path(fname).name != fname:
                raise DataError(f"{gt}: bad row {r}")
            xs.append(_read_image(folder / fname))
            ys.append(int(cid))
    if not xs:
        raise DataError(f"gtsrb: no .ppm images under {folder}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), None, 43


def read_official(name: str, root: str | Path | None = None, *, train: bool = True) -> ImageDataset:
    """The official train or test set of ``name`` read from ``root``'s torchvision layout."""
    key = name.lower()
    if key not in TORCHVISION_SETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(TORCHVISION_SETS)}")
    r = Path(root) if root is not None else default_root()
    if key in ("cifar10", "cifar100"):
        x, y, names, k = _read_cifar(key, r, train)
    elif key == "svhn":
        x, y, names, k = _read_svhn(r, train)
    else:
        x, y, names, k = _read_gtsrb(r, train)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{key}: labels must lie in [0, {k}), found {int(y.min())}..{int(y.max())}")
    xt = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    return ImageDataset(xt, torch.from_numpy(y), k, names, f"{key}:{'train' if train else 'test'}")


def load_torchvision_spec(spec: str, split: str | None = None, *, default_split: str = "train") -> ImageDataset:
    """Load ``NAME[:SPLIT][@ROOT]`` (see the module's docstring)."""
    body, _, root = spec.partition("@")
    name, _, spec_split = body.partition(":")
    sp = split or spec_split or default_split
    if sp not in ("train", "val", "test", "all"):
        raise DataError(f"unknown split {sp!r} for {name}: use one of train, val, test, all")
    r = Path(root) if root else None
    if sp == "test":
        return read_official(name, r, train=False)
    full = read_official(name, r, train=True)
    if sp == "all":
        test = read_official(name, r, train=False)
        return ImageDataset(torch.cat([full.x, test.x]), torch.cat([full.y, test.y]), full.num_classes,
                            full.class_names, f"{name}:all")
    parts = stratified_split(full.y, [0.9, 0.1], seed=0)
    return full.subset(parts[0 if sp == "train" else 1], name=f"{name}:{sp}")


def download(name: str, root: str | Path | None = None) -> Path:
    """Fetch ``name``'s official train and test sets into ``root`` through torchvision (needs a network)."""
    key = name.lower()
    if key not in TORCHVISION_SETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(TORCHVISION_SETS)}")
    try:
        from torchvision import datasets
    except ImportError:
        raise DataError("torchvision is not installed: pip install 'trojanscope[vision]' "
                        "(on CPU torch, see the README's note on the CPU build)") from None
    except (RuntimeError, OSError) as e:  # e.g. a CUDA torchvision build on a CPU-only torch
        raise DataError(f"torchvision is installed but does not load with this torch ({e}); install the "
                        "build made for it, see the README's note on the CPU build") from None
    r = Path(root) if root is not None else default_root()
    cls = getattr(datasets, _TV_CLASS[key])
    try:
        for train in (True, False):
            if key in ("svhn", "gtsrb"):
                cls(str(r), split="train" if train else "test", download=True)
            else:
                cls(str(r), train=train, download=True)
    except (RuntimeError, OSError) as e:
        raise DataError(f"{key}: download failed: {e}") from None
    return r
