"""Inputs read a chunk at a time, so memory stays bounded whatever their number (``trojanscope
filter --data``).

An ``.npz`` needs only an array ``x``; its images are read chunk by chunk from the archive
(nothing unpickled; the header's shape is checked against the member's real size). A folder's
images (any depth, sorted by path) are converted to the model's channels and resized to its
input size. Anything else is loaded whole and served in chunks.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils.limits import MAX_IMAGE_PIXELS, check_alloc, require_regular_file
from ..errors import DataError
from .dataset import fit_to_model
from .loaders import load_data

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _to_nchw(a: np.ndarray, shape: tuple[int, int, int], name: str) -> torch.Tensor:
    """uint8 ``(n, H, W)`` / ``(n, H, W, C)`` scaled by 1/255, or float ``(n, C, H, W)`` /
    ``(n, H, W)`` kept, as float32 ``(n, C, H, W)``; checked against the model's ``shape``."""
    if a.dtype == np.uint8:
        a = a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0)
    else:
        a = a[:, None] if a.ndim == 3 else a
        t = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # a copy: frombuffer is read-only
    if tuple(t.shape[1:]) != tuple(shape):
        raise DataError(f"{name}: the images are {tuple(t.shape[1:])} but the model expects {tuple(shape)}")
    return t


class NpzStream:
    """The array ``x`` of an ``.npz``, read ``chunk`` images at a time straight from the archive
    (nothing unpickled; the header's shape is checked against the member's real size)."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        self.path, self.shape, self.name = require_regular_file(path, "input data"), shape, path.name
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if len(names) != len(set(names)):
                    raise DataError(f"{path}: the archive holds two members of one name (readers disagree on which counts)")
                if "x.npy" not in names:
                    raise DataError(f"{path}: an .npz of inputs must hold an array 'x', found "
                                    f"{sorted(n.removesuffix('.npy') for n in z.namelist())}")
                info = z.getinfo("x.npy")
                with z.open(info) as f:
                    self._header(f, info.file_size)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"cannot read {path} as .npz: {e}") from None

    def _header(self, f: Any, size: int) -> None:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise DataError(f"{self.path}: unsupported .npy version {version}")
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise DataError(f"{self.path}: x holds Python objects (refused: reading them would unpickle)")
        if not (dtype == np.uint8 or dtype.kind == "f"):
            raise DataError(f"{self.path}: x must be uint8 or float images, got dtype {dtype}")
        if fortran or len(shape) not in (3, 4) or 0 in shape:
            raise DataError(f"{self.path}: x must be a non-empty C-ordered (N, H, W), (N, H, W, C) or (N, C, H, W) "
                            f"array, got shape {shape}{' (Fortran order)' if fortran else ''}")
        self.offset = f.tell()
        self.row = int(np.prod(shape[1:])) * dtype.itemsize
        if self.offset + shape[0] * self.row != size:
            raise DataError(f"{self.path}: x declares shape {shape} ({dtype}) but holds {size - self.offset} bytes")
        self.n, self.dtype, self.array_shape = int(shape[0]), dtype, tuple(shape)

    def chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        check_alloc(min(chunk, self.n) * self.row * 3, f"a chunk of {chunk} images of {self.path.name}")
        with zipfile.ZipFile(self.path) as z, z.open("x.npy") as f:
            f.read(self.offset)
            for i in range(0, self.n, chunk):
                k = min(chunk, self.n - i)
                buf = f.read(k * self.row)
                if len(buf) != k * self.row:
                    raise DataError(f"{self.path}: x ends early at image {i}")
                a = np.frombuffer(buf, dtype=self.dtype).reshape((k, *self.array_shape[1:]))
                yield _to_nchw(a, self.shape, self.name), None


class FolderStream:
    """The images under a folder (any depth, sorted by path), converted to the model's channels
    and resized to its input size, read ``chunk`` at a time."""

    def __init__(self, root: Path, shape: tuple[int, int, int]) -> None:
        self.root, self.shape, self.name = root, shape, root.name
        if shape[0] not in (1, 3):
            raise DataError(f"images from a folder need a model of 1 or 3 channels, not {shape[0]}")
        self.files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file()),
                            key=lambda p: p.relative_to(root).parts)
        if not self.files:
            raise DataError(f"{root}: no images found")
        self.n = len(self.files)

    def chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.shape
        check_alloc(min(chunk, self.n) * c * h * w * 4, f"a chunk of {chunk} images")
        for i in range(0, self.n, chunk):
            files, xs = self.files[i:i + chunk], []
            for f in files:
                try:
                    with Image.open(f) as im:
                        if im.width * im.height > MAX_IMAGE_PIXELS:
                            raise DataError(f"image {f} has {im.width} x {im.height} pixels, over the budget of "
                                            f"{MAX_IMAGE_PIXELS}")
                        im = im.convert("L" if c == 1 else "RGB")
                        if (im.height, im.width) != (h, w):
                            im = im.resize((w, h), Image.BILINEAR)
                        a = np.asarray(im, dtype=np.float32) / 255.0
                except DataError:
                    raise
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                    raise DataError(f"cannot read image {f}: {e}") from None
                xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            yield torch.from_numpy(np.stack(xs)), [str(f.relative_to(self.root)) for f in files]


class MemoryStream:
    """A dataset already in memory (a bundled set), served in chunks."""

    def __init__(self, x: torch.Tensor, name: str) -> None:
        self.x, self.name, self.n = x, name, int(x.shape[0])

    def chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        for i in range(0, self.n, chunk):
            yield self.x[i:i + chunk], None


def open_stream(spec: str, lm: Any) -> NpzStream | FolderStream | MemoryStream:
    """``--data`` as a stream: an .npz or a folder read lazily, anything else loaded whole."""
    p = Path(spec)
    shape = tuple(lm.spec.input_shape)
    if p.suffix == ".npz" and p.is_file():
        return NpzStream(p, shape)  # type: ignore[arg-type]
    if p.is_dir():
        return FolderStream(p, shape)  # type: ignore[arg-type]
    data = fit_to_model(load_data(spec, default_split="test"), lm)
    return MemoryStream(data.x, data.name)
