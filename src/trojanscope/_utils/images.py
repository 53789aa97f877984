"""Image helpers of the trigger builders: colours, placement, resizing, reading and writing images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


def parse_color(color: str | float | Sequence[float], channels: int) -> torch.Tensor:
    """A colour as a ``(C,)`` tensor in [0, 1].

    Accepts a name (``"white"``, ``"red"``...), ``"#rrggbb"``, a grey level (``0.5``) or a
    sequence of C values. On one channel, RGB colours become their luma (0.299 R + 0.587 G + 0.114 B).
    """
    if isinstance(color, (int, float)):
        rgb = (float(color),) * 3
    elif isinstance(color, str):
        c = color.strip().lower()
        if c in _COLORS:
            rgb = _COLORS[c]
        elif c.startswith("#") and len(c) == 7:
            try:
                rgb = tuple(int(c[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
            except ValueError:
                raise ConfigError(f"bad colour {color!r}") from None
        else:
            try:
                rgb = (float(c),) * 3
            except ValueError:
                raise ConfigError(
                    f"unknown colour {color!r}: use a name ({', '.join(_COLORS)}), #rrggbb or a grey level in [0, 1]"
                ) from None
    else:
        vals = [float(v) for v in color]
        if len(vals) == channels:
            return torch.tensor(vals, dtype=torch.float32).clamp(0, 1)
        if len(vals) != 3:
            raise ConfigError(f"colour must have {channels} or 3 values, got {len(vals)}")
        rgb = tuple(vals)
    t = torch.tensor(rgb, dtype=torch.float32)
    if not (0 <= float(t.min()) and float(t.max()) <= 1):
        raise ConfigError(f"colour values must lie in [0, 1], got {color!r}")
    if channels == 3:
        return t
    if channels == 1:
        return (t * torch.tensor([0.299, 0.587, 0.114])).sum().reshape(1)
    return t.mean().repeat(channels)


def place(position: str | Sequence[int], size: tuple[int, int], image_hw: tuple[int, int],
          margin: int = 1) -> tuple[int, int]:
    """Top-left ``(row, col)`` of a ``size`` box at ``position`` inside an ``image_hw`` image.

    ``position`` is a corner (``"top-left"``, ``"top-right"``, ``"bottom-left"``,
    ``"bottom-right"``), ``"center"``, an explicit ``(row, col)`` or ``"row,col"``. Corners keep
    ``margin`` pixels from the border.
    """
    (h, w), (H, W) = size, image_hw
    if h > H or w > W:
        raise ConfigError(f"a {h}x{w} trigger does not fit in a {H}x{W} image")
    if isinstance(position, str) and position not in _CORNERS:
        try:
            position = tuple(int(v) for v in position.split(","))
        except ValueError:
            raise ConfigError(
                f"bad position {position!r}: use {', '.join(_CORNERS)} or 'row,col'"
            ) from None
    if isinstance(position, str):
        m = margin if (h + 2 * margin <= H and w + 2 * margin <= W) else 0
        r = {"top": m, "bottom": H - h - m}
        c = {"left": m, "right": W - w - m}
        if position == "center":
            return (H - h) // 2, (W - w) // 2
        vert, horiz = position.split("-")
        return r[vert], c[horiz]
    if len(position) != 2:
        raise ConfigError(f"position must be (row, col), got {position!r}")
    r, c = int(position[0]), int(position[1])
    if r < 0 or c < 0 or r + h > H or c + w > W:
        raise ConfigError(f"a {h}x{w} trigger at ({r}, {c}) does not fit in a {H}x{W} image")
    return r, c


def _resize(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(hw):
        return img
    return F.interpolate(img[None], size=hw, mode="bilinear", align_corners=False)[0].clamp(0, 1)


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    if img.shape[0] == channels:
        return img
    if channels == 1 and img.shape[0] == 3:
        return (img * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    if img.shape[0] == 1:
        return img.expand(channels, -1, -1).clone()
    raise ConfigError(f"cannot convert a {img.shape[0]}-channel image to {channels} channels")


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a float tensor ``(C, H, W)`` in [0, 1] (RGBA keeps its alpha)."""
    from PIL import Image, UnidentifiedImageError

    from .limits import MAX_IMAGE_PIXELS, require_regular_file
    from ..errors import ResourceLimitError

    if Path(path).exists():
        require_regular_file(path, "image file")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ResourceLimitError(f"image {path} is {im.width}x{im.height}, over the pixel budget of "
                                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx")
            mode = "RGBA" if im.mode in ("RGBA", "LA", "P") else ("L" if im.mode in ("L", "1", "I", "F") else "RGB")
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except Image.DecompressionBombError:
        raise ResourceLimitError(f"image {path} is over the pixel budget of {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def parse_size(text: str) -> int | tuple[int, int]:
    """A sticker size: ``HxW`` (e.g. ``6x15``) or one integer (the longer side)."""
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            size: int | tuple[int, int] = (h, w)
        else:
            size = int(text)
    except ValueError:
        raise ConfigError(f"a sticker SIZE is HxW or one integer (the longer side), got {text!r}") from None
    if min(size if isinstance(size, tuple) else (size,)) < 1:
        raise ConfigError(f"a sticker SIZE must be positive, got {text!r}")
    return size


def sticker_size(size: int | Sequence[int], hw: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` for resizing an ``hw`` sticker to ``size``: an int is the longer side (the
    aspect ratio kept, at least one pixel each way), a pair is used as it is."""
    if isinstance(size, int):
        h, w = hw
        scale = size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"a sticker size is an int or (h, w) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def save_png(img: torch.Tensor, path: str | Path, *, scale: int = 1) -> None:
    """Write an image ``(C, H, W)`` in [0, 1] (C in 1, 3, 4) as PNG, upscaled by nearest neighbour."""
    from PIL import Image

    img = img.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        img = img.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    arr = (img.numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(str(path))
