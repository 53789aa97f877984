"""Synthetic colour datasets generated offline from shipped material (no download).

``signs43``: 43 classes of traffic-sign-like images, 3x32x32, in the spirit of GTSRB. Each class
is a fixed (shape, colour scheme, glyph) triple; shapes are circle, triangle, inverted triangle,
octagon, diamond and square; glyphs are handwritten digits drawn from the bundled MNIST subset
(a different writer in every image), arrows, bars, a cross, a ring, a dot or nothing. Every image
is rendered with a random scale, rotation, translation, shear and aspect (a perspective-like
skew), then composited over a background cut from scikit-learn's two bundled colour photographs
(``load_sample_images``) or a random texture, and degraded with blur, brightness / contrast /
saturation / white-balance jitter, an illumination gradient, sensor noise and, in some images, an
occluding rectangle. Rendering is vectorised (every pixel of a chunk of images evaluated at once
from analytic shape functions, at 2x resolution, then averaged down); the result is cached as ``uint8`` in the cache folder (``$TROJANSCOPE_CACHE``, default
``~/.cache/trojanscope``) keyed by the generator version, the seed and the size.

``cmnist``: the 5,000-image MNIST subset with each digit drawn in a random foreground colour on a
random background colour, padded to 3x32x32 (10 labels), a quick colour sanity set.

Both are synthetic: figures measured on them say how a method behaves on colour images with
many labels, not what it would score on the real GTSRB or CIFAR-10.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .dataset import ImageDataset

#: bump when the rendering changes, so old caches are not reused
GENERATOR_VERSION = 1
SIGNS43_PER_CLASS = 600  #: images per class (split 400 train / 100 val / 100 test)
_RES = 64  #: rendering resolution before the 2x2 average down to 32x32

_SCHEMES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]] = {
    # name: (rim, fill, glyph) colours
    "red_white": ((0.80, 0.08, 0.10), (0.95, 0.95, 0.93), (0.05, 0.05, 0.05)),
    "red_red": ((0.95, 0.95, 0.95), (0.80, 0.06, 0.08), (0.97, 0.97, 0.97)),
    "end": ((0.15, 0.15, 0.15), (0.93, 0.93, 0.93), (0.10, 0.10, 0.10)),
    "blue": ((0.95, 0.95, 0.95), (0.05, 0.25, 0.70), (0.97, 0.97, 0.97)),
    "yellow": ((0.97, 0.97, 0.97), (0.95, 0.75, 0.05), (0.05, 0.05, 0.05)),
    "orange": ((0.05, 0.05, 0.05), (0.95, 0.50, 0.05), (0.05, 0.05, 0.05)),
    "green": ((0.95, 0.95, 0.95), (0.05, 0.50, 0.20), (0.97, 0.97, 0.97)),
}

#: the 43 classes: (shape, scheme, glyph); a glyph "d<k>" is an MNIST digit k
SIGNS43_CLASSES: list[tuple[str, str, str]] = (
    [("circle", "red_white", f"d{k}") for k in range(10)]
    + [("circle", "red_white", "none"), ("circle", "red_white", "double_bar"), ("circle", "red_red", "hbar"),
       ("circle", "end", "diag"), ("circle", "blue", "arrow_up"), ("circle", "blue", "arrow_left"),
       ("circle", "blue", "arrow_right"), ("circle", "blue", "ring"), ("circle", "blue", "arrow_down")]
    + [("triangle", "red_white", g) for g in ("exclam", "arrow_left", "arrow_right", "arrow_up", "hbar", "vbar",
                                              "cross", "dot", "d3", "d7", "ring")]
    + [("inv_triangle", "red_white", "none"), ("inv_triangle", "red_white", "dot"),
       ("octagon", "red_red", "hbar"), ("octagon", "red_red", "cross"),
       ("diamond", "yellow", "none"), ("diamond", "yellow", "diag"), ("diamond", "orange", "d5"),
       ("diamond", "orange", "d8"),
       ("square", "blue", "arrow_up"), ("square", "blue", "d1"), ("square", "blue", "d2"), ("square", "blue", "hbar"),
       ("square", "green", "arrow_right")]
)
assert len(SIGNS43_CLASSES) == 43 and len(set(SIGNS43_CLASSES)) == 43

SHAPES = ("circle", "triangle", "inv_triangle", "octagon", "diamond", "square")
#: where the glyph sits in each shape: (centre x, centre y, half-size) in shape coordinates
_GLYPH_BOX = {"circle": (0.0, 0.0, 0.52), "triangle": (0.0, 0.22, 0.36), "inv_triangle": (0.0, -0.28, 0.34),
              "octagon": (0.0, 0.0, 0.52), "diamond": (0.0, 0.0, 0.40), "square": (0.0, 0.0, 0.58)}
_RIM = 0.74  #: the inner (fill) region is the shape scaled by this


def class_names() -> list[str]:
    """Human-readable names of the 43 ``signs43`` classes (``shape/scheme/glyph``)."""
    return [f"{s}/{c}/{g}" for s, c, g in SIGNS43_CLASSES]


def cache_dir() -> Path:
    """Where generated datasets are cached (``$TROJANSCOPE_CACHE`` or ``~/.cache/trojanscope``)."""
    return Path(os.environ.get("TROJANSCOPE_CACHE") or Path.home() / ".cache" / "trojanscope")


def _polygon(kind: str) -> np.ndarray:
    """Vertices (x, y; y points down) of the convex polygon shapes, fitting in [-1, 1]^2."""
    if kind == "triangle":
        return np.array([[0.0, -1.0], [1.0, 0.75], [-1.0, 0.75]])
    if kind == "inv_triangle":
        return np.array([[0.0, 1.0], [-1.0, -0.75], [1.0, -0.75]])
    if kind == "octagon":
        a = np.deg2rad(22.5 + 45 * np.arange(8))
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "diamond":
        a = np.deg2rad(90 * np.arange(4))
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "square":
        return np.array([[-0.88, -0.88], [0.88, -0.88], [0.88, 0.88], [-0.88, 0.88]])
    raise ValueError(kind)


def _polygon_field(u: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """max over edges of (n . p - c) / c: <= 0 inside, and <= s - 1 inside the shape scaled by s."""
    if kind == "circle":
        return torch.sqrt(u * u + v * v) - 1.0
    verts = _polygon(kind)
    centre = verts.mean(0)
    out = None
    for i in range(len(verts)):
        a, b = verts[i], verts[(i + 1) % len(verts)]
        n = np.array([b[1] - a[1], a[0] - b[0]])
        n = n / np.linalg.norm(n)
        if np.dot(n, centre - a) > 0:
            n = -n
        c = float(np.dot(n, a))  # distance of the edge from the origin (> 0: the origin is inside)
        f = (float(n[0]) * u + float(n[1]) * v - c) / c
        out = f if out is None else torch.maximum(out, f)
    assert out is not None
    return out


def _soft(field: torch.Tensor, sharp: float = 40.0) -> torch.Tensor:
    """A soft inside indicator of ``field <= 0``."""
    return torch.sigmoid(-sharp * field)


def _glyph_mask(gu: torch.Tensor, gv: torch.Tensor, glyph: str) -> torch.Tensor:
    """The glyph's coverage at glyph coordinates (gu, gv) in [-1, 1] (non-digit glyphs)."""
    z = torch.zeros_like(gu)
    if glyph == "none":
        return z
    if glyph.startswith("arrow_"):
        d = glyph[6:]
        # an up arrow in rotated coordinates
        a, b = {"up": (gu, gv), "down": (gu, -gv), "left": (gv, gu), "right": (gv, -gu)}[d]
        shaft = (a.abs() < 0.16) & (b > -0.25) & (b < 0.85)
        head = (b >= -0.9) & (b <= -0.15) & (a.abs() < (b + 0.9) * 0.95)
        return (shaft | head).float()
    if glyph == "hbar":
        return ((gv.abs() < 0.24) & (gu.abs() < 0.85)).float()
    if glyph == "vbar":
        return ((gu.abs() < 0.2) & (gv.abs() < 0.85)).float()
    if glyph == "double_bar":
        return ((((gu - 0.38).abs() < 0.15) | ((gu + 0.38).abs() < 0.15)) & (gv.abs() < 0.8)).float()
    r = torch.sqrt(gu * gu + gv * gv)
    if glyph == "diag":
        return (((gu + gv).abs() < 0.3) & (r < 1.0)).float()
    if glyph == "cross":
        return ((((gu + gv).abs() < 0.28) | ((gu - gv).abs() < 0.28)) & (r < 0.95)).float()
    if glyph == "dot":
        return (r < 0.38).float()
    if glyph == "ring":
        return ((r > 0.42) & (r < 0.78)).float()
    if glyph == "exclam":
        return (((gu.abs() < 0.17) & (gv > -0.85) & (gv < 0.35)) | (gu * gu + (gv - 0.68) ** 2 < 0.2 ** 2)).float()
    raise ValueError(glyph)


def _mnist_by_digit() -> list[torch.Tensor]:
    from .loaders import load_mnist5k

    d = load_mnist5k("all")
    return [d.x[d.y == k] for k in range(10)]


@functools.lru_cache(maxsize=1)
def _photos(scale: int = 2) -> torch.Tensor:
    """scikit-learn's two bundled colour photographs, (2, 3, H, W) in [0, 1], downscaled."""
    from sklearn.datasets import load_sample_images

    imgs = np.stack(load_sample_images().images).astype(np.float32) / 255.0
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    return F.avg_pool2d(t, scale)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (r, r, r, r), mode="replicate")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(xp, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _backgrounds(n: int, rng: np.random.Generator, photos: torch.Tensor) -> torch.Tensor:
    """n backgrounds at the rendering resolution: photo crops (60%) or random textures."""
    R = _RES
    out = torch.empty(n, 3, R, R)
    use_photo = rng.random(n) < 0.6
    which = rng.integers(0, photos.shape[0], n)
    # photo crops: an affine view of a random window (zoom, small rotation), sampled bilinearly
    ph, pw = photos.shape[2:]
    for k in range(photos.shape[0]):
        idx = np.flatnonzero(use_photo & (which == k))
        if idx.size == 0:
            continue
        m = idx.size
        zoom = rng.uniform(0.06, 0.3, m)  # window half-size as a fraction of the photo's height
        ang = rng.uniform(-0.3, 0.3, m)
        cx = rng.uniform(-1 + zoom * ph / pw, 1 - zoom * ph / pw)
        cy = rng.uniform(-1 + zoom, 1 - zoom)
        theta = np.zeros((m, 2, 3), dtype=np.float32)
        theta[:, 0, 0] = zoom * np.cos(ang) * ph / pw
        theta[:, 0, 1] = -zoom * np.sin(ang) * ph / pw
        theta[:, 1, 0] = zoom * np.sin(ang)
        theta[:, 1, 1] = zoom * np.cos(ang)
        theta[:, 0, 2], theta[:, 1, 2] = cx, cy
        grid = F.affine_grid(torch.from_numpy(theta), [m, 3, R, R], align_corners=False)
        out[torch.from_numpy(idx)] = F.grid_sample(photos[k:k + 1].expand(m, -1, -1, -1), grid,
                                                   mode="bilinear", padding_mode="reflection", align_corners=False)
    idx = np.flatnonzero(~use_photo)
    if idx.size:
        m = idx.size
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
        low = torch.rand(m, 3, 4, 4, generator=g)
        smooth = F.interpolate(low, size=(R, R), mode="bicubic", align_corners=False)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, R), torch.linspace(-1, 1, R), indexing="ij")
        ang = torch.from_numpy(rng.uniform(0, math.pi, m).astype(np.float32)).view(m, 1, 1)
        freq = torch.from_numpy(rng.uniform(2, 14, m).astype(np.float32)).view(m, 1, 1)
        stripes = 0.5 + 0.5 * torch.sin(freq * (xx * torch.cos(ang) + yy * torch.sin(ang)) * math.pi)
        amp = torch.from_numpy(rng.uniform(0, 0.35, m).astype(np.float32)).view(m, 1, 1, 1)
        fine = F.interpolate(torch.rand(m, 3, R // 4, R // 4, generator=g), size=(R, R), mode="bilinear",
                             align_corners=False)
        tex = smooth * (1 - amp) + amp * stripes[:, None] * torch.rand(m, 3, 1, 1, generator=g) + 0.15 * (fine - 0.5)
        out[torch.from_numpy(idx)] = tex.clamp(0, 1)
    return out


def _f32(a: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _pose(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sign's pose as the shape coordinates ``(u, v)`` (n, R, R) every output pixel shows:
    output pixel q (in [-1, 1]^2) shows shape point p = A^-1 (q - t)."""
    R = _RES
    scale = rng.uniform(0.5, 0.95, n)
    aspect = np.exp(rng.uniform(-0.15, 0.15, n))
    rot = np.deg2rad(rng.uniform(-12, 12, n))
    shear = rng.uniform(-0.18, 0.18, n)
    tx = rng.uniform(-1, 1, n) * (1.0 - scale) * 0.9
    ty = rng.uniform(-1, 1, n) * (1.0 - scale) * 0.9
    S = np.zeros((n, 2, 2))
    S[:, 0, 0], S[:, 1, 1] = scale * aspect, scale / aspect
    Sh = np.tile(np.eye(2), (n, 1, 1))
    Sh[:, 0, 1] = shear
    Rm = np.stack([np.stack([np.cos(rot), -np.sin(rot)], 1), np.stack([np.sin(rot), np.cos(rot)], 1)], 1)
    A_inv = np.linalg.inv(Rm @ Sh @ S)
    lin = (torch.arange(R, dtype=torch.float32) + 0.5) / R * 2 - 1
    qy, qx = torch.meshgrid(lin, lin, indexing="ij")
    qx = qx[None] - _f32(tx)[:, None, None]
    qy = qy[None] - _f32(ty)[:, None, None]
    Ai = _f32(A_inv)
    u = Ai[:, 0, 0, None, None] * qx + Ai[:, 0, 1, None, None] * qy
    v = Ai[:, 1, 0, None, None] * qx + Ai[:, 1, 1, None, None] * qy
    return u, v


def _paint(labels: np.ndarray, u: torch.Tensor, v: torch.Tensor, rng: np.random.Generator,
           digits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The signs' outline ``(n, R, R)`` (soft) and their painted faces ``(n, 3, R, R)``: rim, fill
    and glyph in the class's colours (jittered), with a smooth stain of faded paint."""
    n, R = len(labels), _RES
    outer, inner, glyph = torch.zeros(n, R, R), torch.zeros(n, R, R), torch.zeros(n, R, R)
    rim_c, fill_c, glyph_c = torch.zeros(n, 3), torch.zeros(n, 3), torch.zeros(n, 3)
    for k, (shape, scheme, gl) in enumerate(SIGNS43_CLASSES):
        sel = np.flatnonzero(labels == k)
        if sel.size == 0:
            continue
        ts = torch.from_numpy(sel)
        uu, vv = u[ts], v[ts]
        fld = _polygon_field(uu, vv, shape)
        outer[ts] = _soft(fld)
        inner[ts] = _soft(fld + (1 - _RIM))
        gx, gy, gs = _GLYPH_BOX[shape]
        gu, gv = (uu - gx) / gs, (vv - gy) / gs
        if gl[0] == "d" and gl[1:].isdigit():
            pool = digits[int(gl[1:])]
            pick = torch.from_numpy(rng.integers(0, pool.shape[0], sel.size))
            grid = torch.stack([gu, gv], -1) * 1.15  # MNIST digits fill ~70% of their box
            glyph[ts] = F.grid_sample(pool[pick], grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False)[:, 0]
        else:
            glyph[ts] = _glyph_mask(gu, gv, gl)
        rc, fc, gc = (torch.tensor(c) for c in _SCHEMES[scheme])
        rim_c[ts], fill_c[ts], glyph_c[ts] = rc, fc, gc
    jit = lambda c: (c + _f32(rng.normal(0, 0.04, c.shape))).clamp(0, 1)  # noqa: E731
    rim_c, fill_c, glyph_c = jit(rim_c), jit(fill_c), jit(glyph_c)
    glyph = glyph * inner
    sign = (rim_c[:, :, None, None] * (1 - inner[:, None]) + fill_c[:, :, None, None] * inner[:, None])
    sign = sign * (1 - glyph[:, None]) + glyph_c[:, :, None, None] * glyph[:, None]
    # faded paint / dirt: a smooth multiplicative stain on the sign
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
    stain = 1 - 0.25 * _f32(rng.random(n))[:, None, None, None] * F.interpolate(
        torch.rand(n, 1, 4, 4, generator=g), size=(R, R), mode="bilinear", align_corners=False)
    return outer, sign * stain


def _blur_levels(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image blurred at one of four levels (none, sigma 0.5, 0.85, 1.25)."""
    level = rng.choice(4, img.shape[0], p=[0.35, 0.3, 0.2, 0.15])
    out = img.clone()
    for lv, sigma in enumerate((0.0, 0.5, 0.85, 1.25)):
        sel = torch.from_numpy(np.flatnonzero(level == lv))
        if sel.numel() and sigma > 0:
            out[sel] = _blur(img[sel], sigma)
    return out


def _photometric(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, white balance and an illumination gradient, per image."""
    n = img.shape[0]
    bright = _f32(np.exp(rng.uniform(np.log(0.4), np.log(1.4), n)))[:, None, None, None]
    contrast = _f32(rng.uniform(0.55, 1.3, n))[:, None, None, None]
    sat = _f32(rng.uniform(0.45, 1.4, n))[:, None, None, None]
    wb = _f32(np.exp(rng.normal(0, 0.08, (n, 3))))[:, :, None, None]
    grey = img.mean(1, keepdim=True)
    img = grey + sat * (img - grey)
    mean = img.mean((1, 2, 3), keepdim=True)
    img = mean + contrast * (img - mean)
    lin32 = torch.linspace(-1, 1, 32)
    gy, gx = torch.meshgrid(lin32, lin32, indexing="ij")
    gdir = _f32(rng.uniform(0, 2 * np.pi, n))
    gamp = _f32(rng.uniform(0, 0.35, n))
    grad = 1 + gamp[:, None, None] * (gx[None] * torch.cos(gdir)[:, None, None] + gy[None] * torch.sin(gdir)[:, None, None])
    return img * bright * wb * grad[:, None]


def _occlude(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A rectangle of flat colour over part of the image, on 30% of the images (in place)."""
    occ = np.flatnonzero(rng.random(img.shape[0]) < 0.3)
    if occ.size:
        w = rng.integers(5, 13, occ.size)
        h = rng.integers(5, 13, occ.size)
        x0 = rng.integers(0, 32 - w + 1)
        y0 = rng.integers(0, 32 - h + 1)
        col = _f32(rng.random((occ.size, 3)))
        ys = torch.arange(32)[None, :, None]
        xs = torch.arange(32)[None, None, :]
        m = ((ys >= torch.from_numpy(y0)[:, None, None]) & (ys < torch.from_numpy(y0 + h)[:, None, None])
             & (xs >= torch.from_numpy(x0)[:, None, None]) & (xs < torch.from_numpy(x0 + w)[:, None, None])).float()
        t = torch.from_numpy(occ)
        img[t] = img[t] * (1 - m[:, None]) + col[:, :, None, None] * m[:, None]
    return img


def _render_chunk(labels: np.ndarray, rng: np.random.Generator, digits: list[torch.Tensor],
                  photos: torch.Tensor) -> np.ndarray:
    """Render signs of the given labels; returns uint8 (n, 32, 32, 3).

    The draws from ``rng`` come in a fixed order (pose, paint, background, blur, photometric,
    occlusion, noise), so a seed gives the same bytes.
    """
    n = len(labels)
    u, v = _pose(n, rng)
    outer, sign = _paint(labels, u, v, rng, digits)
    bg = _backgrounds(n, rng, photos)
    img = bg * (1 - outer[:, None]) + sign * outer[:, None]
    img = F.avg_pool2d(img, 2)  # anti-aliased 32x32
    img = _occlude(_photometric(_blur_levels(img, rng), rng), rng)
    noise = _f32(rng.uniform(0, 0.05, n))[:, None, None, None] * _f32(rng.standard_normal((n, 3, 32, 32)))
    img = (img + noise).clamp(0, 1)
    return (img.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def render_signs43(per_class: int = SIGNS43_PER_CLASS, *, seed: int = 0, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Render ``per_class`` images of each of the 43 sign classes (no caching).

    Returns ``(x, y)``: uint8 ``(43 * per_class, 32, 32, 3)`` and int64 labels, class-balanced and
    in a seeded random order. The same seed gives the same bytes.
    """
    if per_class < 1:
        raise DataError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(43, dtype=np.int64), per_class)
    y = y[rng.permutation(y.size)]
    digits, photos = _mnist_by_digit(), _photos()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        parts = [_render_chunk(y[i:i + chunk], np.random.default_rng([seed, i]), digits, photos)
                 for i in range(0, y.size, chunk)]
    return np.concatenate(parts), y


def signs43_arrays(per_class: int = SIGNS43_PER_CLASS, *, seed: int = 0, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_signs43`, cached in :func:`cache_dir` after the first build."""
    path = cache_dir() / f"signs43-v{GENERATOR_VERSION}-s{seed}-n{per_class}.npz"
    if cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["x"], f["y"]
            if x.shape == (43 * per_class, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (43 * per_class,):
                return x, y.astype(np.int64)
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is rebuilt
    x, y = render_signs43(per_class, seed=seed)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: just not cached
    return x, y


def load_signs43_full(per_class: int = SIGNS43_PER_CLASS, *, seed: int = 0) -> ImageDataset:
    """All of ``signs43`` as one :class:`ImageDataset` ``(N, 3, 32, 32)`` in [0, 1]."""
    x, y = signs43_arrays(per_class, seed=seed)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().div_(255.0)
    return ImageDataset(xt, torch.from_numpy(y), 43, class_names(), "signs43")


def colourise_mnist(x: torch.Tensor, *, seed: int = 0, min_distance: float = 0.5) -> torch.Tensor:
    """Grey digits ``(N, 1, H, W)`` drawn in a random foreground colour on a random background
    colour (the two at least ``min_distance`` apart in RGB), padded by 2 on each side to
    ``(N, 3, H + 4, W + 4)``."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    fg = rng.random((n, 3))
    bg = rng.random((n, 3))
    bad = np.linalg.norm(fg - bg, axis=1) < min_distance
    while bad.any():  # redraw the background of pairs that are too alike
        bg[bad] = rng.random((int(bad.sum()), 3))
        bad = np.linalg.norm(fg - bg, axis=1) < min_distance
    m = F.pad(x, (2, 2, 2, 2))
    fg_t = torch.from_numpy(fg.astype(np.float32))[:, :, None, None]
    bg_t = torch.from_numpy(bg.astype(np.float32))[:, :, None, None]
    return bg_t * (1 - m) + fg_t * m


_cache: dict[str, ImageDataset] = {}


def load_signs43(split: str = "train") -> ImageDataset:
    """``signs43`` (synthetic, 43 classes, 3x32x32): 600 per class, split 400 / 100 / 100 per class."""
    from .loaders import _split

    if "signs43" not in _cache:
        _cache["signs43"] = load_signs43_full()
    return _split(_cache["signs43"], split, [4, 1, 1])  # type: ignore[arg-type]


def load_cmnist(split: str = "train") -> ImageDataset:
    """``cmnist`` (synthetic): mnist5k in random colours on random colours, 3x32x32; split like mnist5k."""
    from .loaders import _split, load_mnist5k

    if "cmnist" not in _cache:
        m = load_mnist5k("all")
        _cache["cmnist"] = ImageDataset(colourise_mnist(m.x, seed=0), m.y, 10, m.class_names, "cmnist")
    return _split(_cache["cmnist"], split, [0.8, 0.1, 0.1])  # type: ignore[arg-type]
