"""One trigger type for the whole toolkit.

Every trigger, planted by an attack or reverse-engineered by a defence, is a pair
(mask ``m``, pattern ``p``) applied as

    x' = (1 - m) * x + m * p

with ``m`` of shape ``(H, W)`` in [0, 1] and ``p`` of shape ``(C, H, W)`` in [0, 1]. A patch, a
checkerboard, a single pixel, a blended image (``m = alpha`` everywhere) and an RGBA sticker are
all such pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

ImageShape = tuple[int, int, int]

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

    from ._utils.limits import MAX_IMAGE_PIXELS, require_regular_file
    from .errors import ResourceLimitError

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


@dataclass(frozen=True, eq=False)
class Trigger:
    """A trigger ``x' = (1 - m) * x + m * p``.

    Args:
        mask: ``m``, shape ``(H, W)``, values in [0, 1].
        pattern: ``p``, shape ``(C, H, W)``, values in [0, 1].
        name: a short description (e.g. ``"square:4:white:bottom-right"``).

    Example:
        >>> t = Trigger.square((1, 6, 6), size=2, color="white", position="bottom-right", margin=0)
        >>> x = torch.zeros(1, 1, 6, 6)
        >>> t.apply(x)[0, 0, 4:, 4:].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        >>> float(t.l1_norm)
        4.0
    """

    mask: torch.Tensor
    pattern: torch.Tensor
    name: str = "trigger"

    def __post_init__(self) -> None:
        m, p = self.mask, self.pattern
        if not isinstance(m, torch.Tensor) or not isinstance(p, torch.Tensor):
            raise DataError("trigger mask and pattern must be tensors")
        if m.ndim != 2 or p.ndim != 3 or tuple(p.shape[1:]) != tuple(m.shape):
            raise DataError(
                f"trigger needs mask (H, W) and pattern (C, H, W) of the same H, W; got "
                f"{tuple(m.shape)} and {tuple(p.shape)}"
            )
        for t, n in ((m, "mask"), (p, "pattern")):
            if not torch.isfinite(t).all():
                raise DataError(f"trigger {n} contains NaN or infinite values")
            if float(t.min()) < -1e-6 or float(t.max()) > 1 + 1e-6:
                raise DataError(f"trigger {n} must lie in [0, 1]")
        object.__setattr__(self, "mask", m.detach().float().clamp(0, 1))
        object.__setattr__(self, "pattern", p.detach().float().clamp(0, 1))

    def __repr__(self) -> str:
        return f"Trigger({self.name!r}, shape={self.shape}, l1_norm={float(self.l1_norm):.4g})"

    # --- the formula ---------------------------------------------------------------------
    @property
    def shape(self) -> ImageShape:
        """The image shape ``(C, H, W)`` this trigger applies to."""
        return tuple(self.pattern.shape)  # type: ignore[return-value]

    @property
    def l1_norm(self) -> torch.Tensor:
        """``|m|_1``, the size of the trigger as Neural Cleanse measures it."""
        return self.mask.abs().sum()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp ``x`` ``(N, C, H, W)`` or ``(C, H, W)``; returns a new tensor on ``x``'s device."""
        if tuple(x.shape[-3:]) != self.shape:
            raise DataError(f"trigger of shape {self.shape} cannot be applied to inputs of shape {tuple(x.shape[-3:])}")
        m = self.mask.to(device=x.device, dtype=x.dtype)
        p = self.pattern.to(device=x.device, dtype=x.dtype)
        return (1 - m) * x + m * p

    __call__ = apply

    def to_image(self, background: float = 0.0) -> torch.Tensor:
        """The trigger stamped on a uniform ``background``: ``(C, H, W)``."""
        return self.apply(torch.full(self.shape, float(background)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "l1_norm": float(self.l1_norm)}

    # --- builders --------------------------------------------------------------------------
    @classmethod
    def from_patch(cls, image_shape: ImageShape, patch: torch.Tensor, position: str | Sequence[int] = "bottom-right",
                   *, patch_mask: torch.Tensor | None = None, margin: int = 1, name: str = "patch") -> "Trigger":
        """Place ``patch`` ``(C, h, w)`` (with an optional ``(h, w)`` mask, 1 by default) at ``position``."""
        C, H, W = image_shape
        patch = _to_channels(patch.float(), C)
        h, w = patch.shape[-2:]
        r, c = place(position, (h, w), (H, W), margin)
        mask = torch.zeros(H, W)
        pattern = torch.zeros(C, H, W)
        mask[r:r + h, c:c + w] = 1.0 if patch_mask is None else patch_mask.float()
        pattern[:, r:r + h, c:c + w] = patch
        return cls(mask, pattern, name)

    @classmethod
    def square(cls, image_shape: ImageShape, size: int = 4, color: Any = "white",
               position: str | Sequence[int] = "bottom-right", *, margin: int = 1) -> "Trigger":
        """A solid ``size x size`` square (BadNets' sticker)."""
        if size < 1:
            raise ConfigError(f"square size must be >= 1, got {size}")
        col = parse_color(color, image_shape[0])
        patch = col[:, None, None].expand(-1, size, size)
        return cls.from_patch(image_shape, patch, position, margin=margin,
                              name=f"square:{size}:{color}:{_pos_name(position)}")

    @classmethod
    def checkerboard(cls, image_shape: ImageShape, size: int = 4, position: str | Sequence[int] = "bottom-right",
                     colors: tuple[Any, Any] = ("white", "black"), *, margin: int = 1) -> "Trigger":
        """A ``size x size`` checkerboard pattern (BadNets' pattern trigger); the top-left cell takes ``colors[0]``."""
        if size < 1:
            raise ConfigError(f"checkerboard size must be >= 1, got {size}")
        a, b = (parse_color(c, image_shape[0]) for c in colors)
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        even = ((ii + jj) % 2 == 0).float()
        patch = a[:, None, None] * even + b[:, None, None] * (1 - even)
        return cls.from_patch(image_shape, patch, position, margin=margin,
                              name=f"checkerboard:{size}:{_pos_name(position)}")

    @classmethod
    def pixel(cls, image_shape: ImageShape, color: Any = "white", position: str | Sequence[int] = "bottom-right",
              *, margin: int = 1) -> "Trigger":
        """A single pixel."""
        t = cls.square(image_shape, 1, color, position, margin=margin)
        return cls(t.mask, t.pattern, f"pixel:{color}:{_pos_name(position)}")

    @classmethod
    def blend(cls, image: torch.Tensor, image_shape: ImageShape, alpha: float = 0.2, *, name: str = "blend") -> "Trigger":
        """A whole-image blend: ``x' = (1 - alpha) x + alpha * image`` (Chen et al. 2017)."""
        if not 0 < alpha <= 1:
            raise ConfigError(f"alpha must be in (0, 1], got {alpha}")
        C, H, W = image_shape
        img = image.float()
        if img.ndim == 2:
            img = img[None]
        img = _to_channels(_resize(img[:3] if img.shape[0] == 4 else img, (H, W)), C)
        return cls(torch.full((H, W), float(alpha)), img, f"{name}:{alpha:g}")

    @classmethod
    def noise(cls, image_shape: ImageShape, alpha: float = 0.2, *, seed: int = 0) -> "Trigger":
        """Uniform random noise blended over the whole input with transparency ``alpha``."""
        g = torch.Generator().manual_seed(int(seed))
        return cls.blend(torch.rand(image_shape, generator=g), image_shape, alpha, name="blend:noise")

    @classmethod
    def from_rgba(cls, rgba: torch.Tensor | str | Path, image_shape: ImageShape,
                  position: str | Sequence[int] = "center", *, size: int | tuple[int, int] | None = None,
                  margin: int = 0) -> "Trigger":
        """An RGBA image (sunglasses, a watermark): colour as pattern, alpha channel as mask.

        Args:
            rgba: a ``(4, h, w)`` tensor in [0, 1] or a path to a PNG with an alpha channel
                (an image without one is opaque).
            image_shape: ``(C, H, W)`` of the inputs.
            position: where the image's top-left corner goes (see :func:`place`).
            size: resize the sticker first: an int is its longer side, the aspect ratio kept (a
                40x16 sticker with ``size=20`` becomes 20x8); ``(h, w)`` is an exact size.
        """
        name = "rgba"
        if isinstance(rgba, (str, Path)):
            name = f"rgba:{Path(rgba).name}"
            rgba = read_image(rgba)
        img = rgba.float()
        if img.shape[0] in (1, 3):
            img = torch.cat([img, torch.ones(1, *img.shape[1:])])
        if img.shape[0] == 2:  # luminance + alpha
            img = torch.cat([img[:1].expand(3, -1, -1), img[1:]])
        if size is not None:
            img = _resize(img, sticker_size(size, tuple(img.shape[1:])))
        t = cls.from_patch(image_shape, img[:3], position, patch_mask=img[3], margin=margin)
        return cls(t.mask, t.pattern, name)

    @classmethod
    def parse(cls, spec: str, image_shape: ImageShape) -> "Trigger":
        """Build a trigger from a short text spec (the CLI's ``--trigger``).

        Specs::

            square:SIZE[:COLOR[:POSITION]]        square:4:white:bottom-right
            checkerboard:SIZE[:POSITION]          checkerboard:4:top-left
            pixel[:COLOR[:POSITION]]              pixel:white:bottom-right
            blend:noise[:ALPHA[:SEED]]            blend:noise:0.2
            blend:IMAGE_PATH[:ALPHA]              blend:kitty.png:0.2
            rgba:PNG_PATH[:POSITION[:SIZE]]       rgba:glasses.png:10,4:12 or rgba:glasses.png:10,4:6x15
            PATH.safetensors                      a trigger saved with Trigger.save

        POSITION is a corner, ``center`` or ``row,col`` (top-left corner of the patch). An rgba
        SIZE is ``HxW``, or one number for the longer side (the sticker's aspect ratio kept).
        """
        if spec.endswith(".safetensors"):
            return cls.load(spec)
        parts = spec.split(":")
        kind, args = parts[0].lower(), parts[1:]
        try:
            if kind == "square":
                size = int(args[0]) if args else 4
                t = cls.square(image_shape, size, args[1] if len(args) > 1 else "white",
                               args[2] if len(args) > 2 else "bottom-right")
            elif kind == "checkerboard":
                size = int(args[0]) if args else 4
                t = cls.checkerboard(image_shape, size, args[1] if len(args) > 1 else "bottom-right")
            elif kind == "pixel":
                t = cls.pixel(image_shape, args[0] if args else "white", args[1] if len(args) > 1 else "bottom-right")
            elif kind == "blend":
                if not args:
                    raise ConfigError("blend needs 'noise' or an image path: blend:noise:0.2")
                alpha = float(args[1]) if len(args) > 1 else 0.2
                if args[0] == "noise":
                    t = cls.noise(image_shape, alpha, seed=int(args[2]) if len(args) > 2 else 0)
                else:
                    t = cls.blend(read_image(args[0]), image_shape, alpha, name=f"blend:{Path(args[0]).name}")
            elif kind == "rgba":
                if not args:
                    raise ConfigError("rgba needs a PNG path: rgba:glasses.png:center")
                t = cls.from_rgba(args[0], image_shape, args[1] if len(args) > 1 else "center",
                                  size=parse_size(args[2]) if len(args) > 2 else None)
            else:
                raise ConfigError(
                    f"unknown trigger kind {kind!r} in {spec!r}: use square, checkerboard, pixel, blend, rgba or a .safetensors file"
                )
        except ValueError as e:
            if isinstance(e, (ConfigError, DataError)):
                raise
            raise ConfigError(f"bad trigger spec {spec!r}: {e}") from None
        return cls(t.mask, t.pattern, spec)

    # --- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the trigger as a safetensors file (mask, pattern, and its name as metadata)."""
        from safetensors.torch import save_file

        save_file({"mask": self.mask.contiguous(), "pattern": self.pattern.contiguous()}, str(path),
                  metadata={"format": "trojanscope.trigger", "name": self.name})

    @classmethod
    def load(cls, path: str | Path) -> "Trigger":
        """Read a trigger written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        from ._utils.limits import require_regular_file

        p = require_regular_file(path, "trigger file")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if not {"mask", "pattern"} <= keys:
                    raise DataError(f"{p} is not a trigger file (needs tensors 'mask' and 'pattern')")
                return cls(f.get_tensor("mask"), f.get_tensor("pattern"), meta.get("name", p.stem))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read trigger file {p}: {e}") from None

    def save_png(self, path: str | Path, *, scale: int = 8) -> None:
        """Write the trigger as an RGBA PNG (colour = pattern, alpha = mask), upscaled ``scale`` x."""
        save_png(torch.cat([_to_channels(self.pattern, 3), self.mask[None]]), path, scale=scale)


def _pos_name(position: Any) -> str:
    return position if isinstance(position, str) else f"{position[0]},{position[1]}"


def save_png(img: torch.Tensor, path: str | Path, *, scale: int = 1) -> None:
    """Write an image ``(C, H, W)`` in [0, 1] (C in 1, 3, 4) as PNG, upscaled by nearest neighbour."""
    from PIL import Image

    img = img.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        img = img.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    arr = (img.numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(str(path))
