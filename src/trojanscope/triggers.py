"""One trigger type for the whole toolkit.

Every trigger, planted by an attack or reverse-engineered by a defence, is a pair
(mask ``m``, pattern ``p``) applied as

    x' = (1 - m) * x + m * p

with ``m`` of shape ``(H, W)`` in [0, 1] and ``p`` of shape ``(C, H, W)`` in [0, 1]. A patch, a
checkerboard, a single pixel, a blended image (``m = alpha`` everywhere) and an RGBA sticker are
all such pairs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._utils.batching import generator
from ._utils.images import (_to_channels, _resize, parse_color, parse_size, place, read_image, save_png,
                             sticker_size)
from .errors import ConfigError, DataError

ImageShape = tuple[int, int, int]

def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The trigger formula ``x' = (1 - mask) * x + mask * pattern``, broadcast as torch broadcasts.

    The toolkit's one copy of the formula (differentiable in ``mask`` and ``pattern``).

    Example:
        >>> stamp(torch.zeros(1, 2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.5]]), torch.ones(1, 2, 2)).tolist()
        [[[1.0, 0.0], [0.0, 0.5]]]
    """
    return (1 - mask) * x + mask * pattern


def stamp_batch(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Each of ``J`` triggers on each of ``B`` images, in one broadcast of :func:`stamp`.

    Shape:
        x: ``(B, C, H, W)``; masks: ``(J, H, W)``; patterns: ``(J, C, H, W)``; returns
        ``(J, B, C, H, W)``.
    """
    return stamp(x[None], masks[:, None, None], patterns[:, None])


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
        return stamp(x, self.mask.to(device=x.device, dtype=x.dtype), self.pattern.to(device=x.device, dtype=x.dtype))

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
    def noise(cls, image_shape: ImageShape, alpha: float = 0.2, *, seed: int | None = 0) -> "Trigger":
        """Uniform noise (``seed`` None: fresh) blended over the whole input with transparency ``alpha``."""
        g = generator(seed)
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
        with _safetensors(path, "trigger file") as (p, f):
            meta = f.metadata() or {}
            if not {"mask", "pattern"} <= set(f.keys()):
                raise DataError(f"{p} is not a trigger file (needs tensors 'mask' and 'pattern')")
            return cls(f.get_tensor("mask"), f.get_tensor("pattern"), meta.get("name", p.stem))

    def save_png(self, path: str | Path, *, scale: int = 8) -> None:
        """Write the trigger as an RGBA PNG (colour = pattern, alpha = mask), upscaled ``scale`` x."""
        save_png(torch.cat([_to_channels(self.pattern, 3), self.mask[None]]), path, scale=scale)


def _pos_name(position: Any) -> str:
    return position if isinstance(position, str) else f"{position[0]},{position[1]}"


@dataclass(frozen=True, eq=False)
class TriggerBatch:
    """``J`` triggers of one image shape, stacked: what a defence reverses or samples in a batch.

    Args:
        masks: ``(J, H, W)`` in [0, 1].
        patterns: ``(J, C, H, W)`` in [0, 1].
        labels: ``(J,)`` the label each trigger sends inputs to (a reversed trigger's target).
        names: one name per trigger (default ``"trigger:label{label}"``).

    Example:
        >>> b = TriggerBatch.from_triggers([Trigger.pixel((1, 4, 4)), Trigger.square((1, 4, 4), 2)], [3, 5])
        >>> b.apply(torch.zeros(7, 1, 4, 4)).shape, b[1].name, len(b)
        (torch.Size([2, 7, 1, 4, 4]), 'square:2:white:bottom-right', 2)
    """

    masks: torch.Tensor
    patterns: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        m, p, y = self.masks, self.patterns, self.labels
        if not all(isinstance(t, torch.Tensor) for t in (m, p, y)):
            raise DataError("a trigger batch's masks, patterns and labels must be tensors")
        if m.ndim != 3 or p.ndim != 4 or tuple(p.shape[2:]) != tuple(m.shape[1:]) or p.shape[0] != m.shape[0] \
                or tuple(y.shape) != (m.shape[0],):
            raise DataError(f"a trigger batch needs masks (J, H, W), patterns (J, C, H, W) and labels (J,); got "
                            f"{tuple(m.shape)}, {tuple(p.shape)} and {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(f"trigger batch labels must be integers, got {y.dtype}")
        for t, n in ((m, "masks"), (p, "patterns")):
            if not torch.isfinite(t).all():
                raise DataError(f"trigger batch {n} contain NaN or infinite values")
            if t.numel() and (float(t.min()) < -1e-6 or float(t.max()) > 1 + 1e-6):
                raise DataError(f"trigger batch {n} must lie in [0, 1]")
        names = tuple(self.names) or tuple(f"trigger:label{int(v)}" for v in y)
        if len(names) != m.shape[0] or not all(isinstance(v, str) for v in names):
            raise DataError(f"a trigger batch of {m.shape[0]} needs as many names, got {len(names)}")
        object.__setattr__(self, "masks", m.detach().float().clamp(0, 1))
        object.__setattr__(self, "patterns", p.detach().float().clamp(0, 1))
        object.__setattr__(self, "labels", y.detach().long().cpu())
        object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, j: int) -> Trigger:
        return Trigger(self.masks[j], self.patterns[j], self.names[j])

    def __iter__(self) -> Iterator[Trigger]:
        return (self[j] for j in range(len(self)))

    def __repr__(self) -> str:
        return f"TriggerBatch(J={len(self)}, shape={self.shape}, labels={self.labels.tolist()})"

    @property
    def shape(self) -> ImageShape:
        """The image shape ``(C, H, W)`` the triggers apply to."""
        return tuple(self.patterns.shape[1:])  # type: ignore[return-value]

    @property
    def l1_norms(self) -> torch.Tensor:
        """``(J,)`` each mask's ``|m|_1``."""
        return self.masks.abs().sum((1, 2))

    @classmethod
    def from_triggers(cls, triggers: Sequence[Trigger], labels: Sequence[int] | torch.Tensor) -> "TriggerBatch":
        """Stack ``triggers`` (one image shape), each with its label."""
        ts = list(triggers)
        if not ts or not all(isinstance(t, Trigger) for t in ts):
            raise DataError("a trigger batch is built from a non-empty list of Trigger objects")
        if len({t.shape for t in ts}) > 1:
            raise DataError(f"the triggers of a batch must share one image shape, got {sorted({t.shape for t in ts})}")
        return cls(torch.stack([t.mask for t in ts]), torch.stack([t.pattern for t in ts]),
                   torch.as_tensor(labels, dtype=torch.long).flatten(), tuple(t.name for t in ts))

    def select(self, index: Sequence[int]) -> "TriggerBatch":
        """The sub-batch of the triggers at ``index``."""
        i = torch.as_tensor(list(index), dtype=torch.long)
        return TriggerBatch(self.masks[i], self.patterns[i], self.labels[i], tuple(self.names[k] for k in i.tolist()))

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[-3:]) != self.shape:
            raise DataError(f"triggers of shape {self.shape} cannot be applied to inputs of shape {tuple(x.shape[-3:])}")
        return self.masks.to(device=x.device, dtype=x.dtype), self.patterns.to(device=x.device, dtype=x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Every trigger on every image of ``x`` ``(B, C, H, W)``: ``(J, B, C, H, W)``."""
        return stamp_batch(x, *self._on(x))

    def apply_flat(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` as ``(J * B, C, H, W)``, trigger-major."""
        return self.apply(x).reshape(-1, *x.shape[1:])

    def apply_each(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger ``j`` on image ``j`` of ``x`` ``(J, C, H, W)``: ``(J, C, H, W)``."""
        m, p = self._on(x)
        return stamp(x, m[:, None], p)

    # --- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the batch as a safetensors file (masks, patterns, labels; the names as metadata)."""
        from safetensors.torch import save_file

        save_file({"masks": self.masks.contiguous(), "patterns": self.patterns.contiguous(),
                   "labels": self.labels.contiguous()}, str(path),
                  metadata={"format": _BATCH_FORMAT, "names": json.dumps(list(self.names))})

    @classmethod
    def load(cls, path: str | Path) -> "TriggerBatch":
        """Read a batch written by :meth:`save`; a file of another layout, shape or dtype is a DataError."""
        with _safetensors(path, "trigger batch file") as (p, f):
            meta = f.metadata() or {}
            if meta.get("format") != _BATCH_FORMAT or set(f.keys()) != {"masks", "patterns", "labels"}:
                raise DataError(f"{p} is not a trigger batch file (written by TriggerBatch.save)")
            for k, (dtype, ndim) in {"masks": ("F32", 3), "patterns": ("F32", 4), "labels": ("I64", 1)}.items():
                sl = f.get_slice(k)
                if sl.get_dtype() != dtype or len(sl.get_shape()) != ndim:
                    raise DataError(f"{p}: {k} must be a {ndim}-d {dtype} tensor")
            try:
                names = json.loads(meta.get("names", "[]"))
            except (ValueError, RecursionError):
                raise DataError(f"{p}: its names are not a JSON list") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{p}: its names must be a list")
            return cls(f.get_tensor("masks"), f.get_tensor("patterns"), f.get_tensor("labels"), tuple(names))


@contextlib.contextmanager
def _safetensors(path: str | Path, what: str) -> Iterator[tuple[Path, Any]]:
    """``(path, open safetensors file)``; a file that is not regular or not safetensors is a DataError."""
    from safetensors import SafetensorError, safe_open

    from ._utils.limits import require_regular_file

    p = require_regular_file(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            yield p, f
    except DataError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read {what} {p}: {e}") from None


_BATCH_FORMAT = "trojanscope.trigger-batch"

# --- attack success -------------------------------------------------------------------------

def stamped_predictions(model: torch.nn.Module, x: torch.Tensor, triggers: Trigger | TriggerBatch, *,
                        batch_size: int = 256, device: Any = None) -> torch.Tensor:
    """``(J, N)`` the model's label for each image of ``x`` ``(N, C, H, W)`` stamped with each trigger.

    Triggers are taken a few at a time so that one chunk holds about ``batch_size`` stamped
    images (at least one trigger), each chunk classified in batches of ``batch_size``.
    """
    from ._utils.batching import eval_mode, model_device, predict

    batch = _as_batch(triggers)
    batch._on(x)  # the shape check
    jn, n = len(batch), x.shape[0]
    dev = model_device(model, device)
    out = torch.empty(jn, n, dtype=torch.long)
    per = max(1, batch_size // max(1, n))
    xd = x.to(dev)
    with eval_mode(model), torch.inference_mode():
        for s in range(0, jn, per):
            e = min(jn, s + per)
            m, p = batch.masks[s:e].to(dev, xd.dtype), batch.patterns[s:e].to(dev, xd.dtype)
            stamped = stamp_batch(xd, m, p).reshape(-1, *x.shape[1:])
            out[s:e] = predict(model, stamped, batch_size=batch_size, device=dev).reshape(e - s, n)
    return out


def success_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, triggers: Trigger | TriggerBatch,
                 target: int | torch.Tensor | None = None, *, where: torch.Tensor | None = None,
                 batch_size: int = 256, device: Any = None) -> torch.Tensor:
    """``(J,)`` attack success: the share of stamped images, among those whose label differs from the
    target, that the model classifies as the target.

    Args:
        x: ``(N, C, H, W)`` images; y: ``(N,)`` their labels (None: every image counts).
        triggers: one trigger or a batch.
        target: an int, ``(N,)`` per-image targets (an all-to-all map applied to ``y``), or None
            for each trigger's own label (a batch's ``labels``).
        where: ``(N,)`` bool, the only images that may count (e.g. a source-specific attack's sources).

    Returns:
        ``(J,)`` float32; NaN for a trigger with no image to count.
    """
    batch = _as_batch(triggers)
    out = torch.full((len(batch),), float("nan"))
    for j in range(len(batch)):
        tgt = torch.as_tensor(int(batch.labels[j]) if target is None else target, dtype=torch.long)
        tgt = tgt.expand(x.shape[0]) if tgt.ndim == 0 else tgt
        keep = torch.ones(x.shape[0], dtype=torch.bool) if y is None else y != tgt
        if where is not None:
            keep &= where
        if bool(keep.any()):
            pred = stamped_predictions(model, x[keep], batch.select([j]), batch_size=batch_size, device=device)[0]
            out[j] = (pred == tgt[keep]).float().mean()
    return out


def _as_batch(triggers: Trigger | TriggerBatch) -> TriggerBatch:
    if isinstance(triggers, TriggerBatch):
        return triggers
    if isinstance(triggers, Trigger):
        return TriggerBatch(triggers.mask[None], triggers.pattern[None], torch.zeros(1, dtype=torch.long), (triggers.name,))
    raise DataError(f"expected a Trigger or a TriggerBatch, got {type(triggers).__name__}")
