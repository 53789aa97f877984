"""Triggers of unknown shape and place: a moving-window heat map, then a search bounded by it.

Neural Cleanse's search assumes a trigger that works anywhere; a trigger that only works at one
place, of any shape, among natural backdoor-like features, needs a search that is told where to
look. Following the CSAW HackML extension of MESA (Qiao, Yang, Li):

* **transparency**: the search optimises a transparency ``a`` per pixel together with the
  pattern, ``pixel_after = (1 - a) * pixel_before + a * trigger``; ``a`` is differentiable
  (``d pixel_after / d a = trigger - pixel_before``), so arbitrary shapes are found. In the
  toolkit's trigger formula this ``a`` is the mask ``m``;
* **moving window**: a trigger is reverse-engineered inside every ``w x w`` window on a grid
  (``w`` = 15/55 of the image side, the seed's 15 x 15 windows on 55 x 47 faces, scaled); each
  window's strength (its attack success per unit of transparency, ``ASR / |a|_1``) is spread
  over the pixels its transparency covers and accumulated into a heat map
  (:func:`accumulate_heatmap`);
* **final search**: the hot region (pixels above ``hot`` times the maximum, as a bounding box
  with a ``margin``) bounds one last, longer search for the complete trigger.

All windows are optimised in one batch by Neural Cleanse's kernel
(:func:`~trojanscope.defenses.model.neural_cleanse.reverse_engineer_triggers`, one job per
window with a per-job region), chunked only by ``batch_size``.

References:
    Qiao, Yang, Li. "Defending Neural Backdoors via Generative Distribution Modeling".
    NeurIPS 2019 (and the authors' CSAW'19 HackML slides: transparency channel, moving-window
    heat map). https://arxiv.org/abs/1910.04749
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike, generator, model_device
from ..._utils.results import Result
from ..._utils.validation import Interval, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError
from ...triggers import Trigger
from ..base import Explainer, register
from .neural_cleanse import reverse_engineer_triggers

log = logging.getLogger(__name__)

#: The seed's window: 15 x 15 on 55 x 47 faces, i.e. 15/55 of the (shorter) image side.
WINDOW_SCALE = 15 / 55


# --- pure kernels -----------------------------------------------------------------------------

def default_window(image_hw: tuple[int, int]) -> int:
    """The window side for an image: ``round(15 / 55 * min(H, W))``, at least 2.

    Example:
        >>> default_window((28, 28)), default_window((55, 47)), default_window((8, 8))
        (8, 13, 2)
    """
    return max(2, round(WINDOW_SCALE * min(image_hw)))


def window_positions(image_hw: tuple[int, int], window: int, stride: int) -> torch.Tensor:
    """Top-left corners ``(P, 2)`` of the ``window x window`` windows on a grid of ``stride``;
    the last row and column of windows touch the image border.

    Example:
        >>> window_positions((6, 6), 4, 2).tolist()
        [[0, 0], [0, 2], [2, 0], [2, 2]]
        >>> window_positions((5, 5), 4, 2).tolist()
        [[0, 0], [0, 1], [1, 0], [1, 1]]
    """
    h, w = image_hw
    if not 1 <= window <= min(h, w):
        raise ConfigError(f"window must be in [1, {min(h, w)}], got {window}")
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")
    def axis(n: int) -> list[int]:
        pos = list(range(0, n - window + 1, stride))
        if pos[-1] != n - window:
            pos.append(n - window)
        return pos
    rows, cols = axis(h), axis(w)
    return torch.tensor([[r, c] for r in rows for c in cols], dtype=torch.long)


def window_regions(image_hw: tuple[int, int], positions: torch.Tensor, window: int) -> torch.Tensor:
    """``(P, H, W)`` indicators of the windows at ``positions`` (broadcast, no loop)."""
    h, w = image_hw
    ii = torch.arange(h)[None, :, None]
    jj = torch.arange(w)[None, None, :]
    r = positions[:, 0, None, None]
    c = positions[:, 1, None, None]
    return ((ii >= r) & (ii < r + window) & (jj >= c) & (jj < c + window)).float()


def accumulate_heatmap(masks: torch.Tensor, strength: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The heat map: each window spreads its strength over the pixels of its transparency.

    ``heat = sum_p strength_p * a_p / (|a_p|_1 + eps)``, computed in float64. The sum is not
    normalised by how many windows cover a pixel: a trigger's pixels collect the votes of every
    window that contains it, while an average would dilute them with the windows that do not.

    Shape:
        masks ``(P, H, W)`` (the transparency found in each window), strength ``(P,)``;
        returns ``(H, W)``.

    Example:
        >>> m = torch.zeros(2, 2, 2); m[0, 0, 0] = 1.0; m[1, 1, 1] = 0.5; m[1, 0, 0] = 0.5
        >>> accumulate_heatmap(m, torch.tensor([1.0, 0.5])).round(decimals=4).tolist()
        [[1.25, 0.0], [0.0, 0.25]]
    """
    m = masks.double()
    votes = strength.double()[:, None, None] * m / (m.sum((1, 2), keepdim=True) + eps)
    return votes.sum(0).float()


def hot_region(heat: torch.Tensor, hot: float = 0.5, margin: int = 1) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The bounding box of the pixels above ``hot * max(heat)``, grown by ``margin`` pixels.

    Returns ``(region (H, W) float indicator, (row0, col0, row1, col1))`` with exclusive ends.

    Example:
        >>> h = torch.zeros(6, 6); h[2, 3] = 1.0; h[3, 3] = 0.8
        >>> hot_region(h, 0.5, 1)[1]
        (1, 2, 5, 5)
    """
    if not 0 < hot <= 1:
        raise ConfigError(f"hot must be in (0, 1], got {hot}")
    hh, ww = heat.shape
    if float(heat.max()) <= 0:
        raise DataError("the heat map is empty: no window found a trigger")
    rows, cols = (heat >= hot * heat.max()).nonzero(as_tuple=True)
    r0, r1 = max(0, int(rows.min()) - margin), min(hh, int(rows.max()) + 1 + margin)
    c0, c1 = max(0, int(cols.min()) - margin), min(ww, int(cols.max()) + 1 + margin)
    region = torch.zeros(hh, ww)
    region[r0:r1, c0:c1] = 1.0
    return region, (r0, c0, r1, c1)


# --- the search -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class HeatmapResult(Result):
    """The moving-window search and the final search bounded by its heat map.

    Attributes:
        target: the label searched for.
        heatmap: ``(H, W)`` accumulated window strength.
        window, stride: the windows' side and step.
        positions: ``(P, 2)`` top-left corners of the windows.
        strength: ``(P,)`` each window's strength, ``ASR / |a|_1``.
        window_asr: ``(P,)`` attack success each window reached (optimisation images).
        window_l1: ``(P,)`` ``|a|_1`` of each window's transparency.
        region: ``(H, W)`` the hot region bounding the final search; ``bbox``: its
            ``(row0, col0, row1, col1)``.
        peak: ``(row, col)`` of the heat map's maximum.
        trigger: the trigger found by the final search (transparency as mask).
        trigger_asr: its attack success on the optimisation images.
        params: the search's settings.
        seconds: wall time.
    """

    target: int
    heatmap: torch.Tensor
    window: int
    stride: int
    positions: torch.Tensor = dataclasses.field(repr=False)
    strength: torch.Tensor = dataclasses.field(repr=False)
    window_asr: torch.Tensor = dataclasses.field(repr=False)
    window_l1: torch.Tensor = dataclasses.field(repr=False)
    region: torch.Tensor = dataclasses.field(repr=False)
    bbox: tuple[int, int, int, int]
    peak: tuple[int, int]
    trigger: Trigger
    trigger_asr: float
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@register("heatmap")
class MovingWindowSearch(Explainer):
    """Find a trigger of unknown shape and place for one target label: ``explain(model, clean_data, target)``.

    Args:
        window: the window side ``w`` (None: 15/55 of the shorter image side, the seed's scale).
        stride: the step between windows (None: ``max(1, w // 4)``).
        epochs, steps_per_epoch, samples_per_step: each window's search (Neural Cleanse's
            kernel, all windows in one batch).
        init_cost: Neural Cleanse's ``lambda`` once a window succeeds (its L1 weight on ``a``).
        success: the attack success at which a window counts as successful (``lambda`` engages
            and the transparency is kept; Neural Cleanse's 0.99 is too strict for short searches).
        patience: epochs of success before ``lambda`` engages or moves.
        hot: pixels above ``hot`` times the heat map's maximum form the hot region.
        margin: pixels added around the hot region's bounding box.
        final_epochs: epochs of the final search inside the hot region.
        final_success: the final search's success threshold (Neural Cleanse's 0.99: its trigger
            is the one reported, so it must really work on images it was not optimised on, which
            a trigger that only just reaches ``success`` on the search images may not; see
            ``benchmarks/README.md``).
        restarts: independent starts of the final search (one batch); the most successful (then
            the smallest) trigger is kept.
        n_images: how many clean images (of other labels) the searches use.
        batch_size: the most images in one forward pass (the memory knob).
        seed: seeds the image sample, the initial transparencies, patterns and mini-batches (None: fresh entropy).
        device: where to compute (default: the model's device).

    Example:
        >>> import sys; sys.path.insert(0, "tests")
        >>> from _models import PlantedPatchNet  # tests/_models.py: a hand-weighted planted net
        >>> from trojanscope.data import load_digits
        >>> d = load_digits("val")
        >>> res = MovingWindowSearch(epochs=2, final_epochs=2).explain(PlantedPatchNet(d.x, d.y, 10, patch=3), d, 0)
        >>> tuple(res.heatmap.shape)
        (8, 8)
    """

    needs_gradients: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "window": Types((int, type(None))), "stride": Types((int, type(None))),
        "epochs": Interval(int, 1, None), "steps_per_epoch": Interval(int, 1, None),
        "samples_per_step": Interval(int, 1, None), "init_cost": Interval(float, 0, None),
        "success": Interval(float, 0, 1, "right"), "patience": Interval(int, 1, None), "hot": Interval(float, 0, 1, "right"), "margin": Interval(int, 0, None),
        "final_epochs": Interval(int, 1, None), "final_success": Interval(float, 0, 1, "right"), "restarts": Interval(int, 1, None), "n_images": Interval(int, 1, None),
        "batch_size": Interval(int, 1, None), "seed": Types((int, type(None))),
    }

    def __init__(self, *, window: int | None = None, stride: int | None = None, epochs: int = 15,
                 steps_per_epoch: int = 4, samples_per_step: int = 16, init_cost: float = 5e-2, success: float = 0.9, patience: int = 1,
                 hot: float = 0.5, margin: int = 1, final_epochs: int = 40, final_success: float = 0.99,
                 restarts: int = 4, n_images: int = 500,
                 batch_size: int = 4096, seed: int | None = 0, device: DeviceLike = None) -> None:
        self.window = window
        self.stride = stride
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.samples_per_step = samples_per_step
        self.init_cost = init_cost
        self.success = success
        self.patience = patience
        self.hot = hot
        self.margin = margin
        self.final_epochs = final_epochs
        self.final_success = final_success
        self.restarts = restarts
        self.n_images = n_images
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _kernel(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int, regions: torch.Tensor,
                epochs: int, success: float, desc: str = "windows", callback: Any = None) -> Any:
        from ..._utils.progress import progress

        jobs = regions.shape[0]
        chunks = -(-jobs // max(1, self.batch_size // self.samples_per_step))  # as the kernel batches its jobs
        log.info("%s: %d searches for label %d, up to %d epochs", desc, jobs, target, epochs)
        with progress(total=epochs * chunks, desc=desc, unit="epoch") as bar:
            return reverse_engineer_triggers(
                model, x, y, targets=[target] * jobs, region=regions, init_cost=self.init_cost,
                epochs=epochs, steps_per_epoch=self.steps_per_epoch, samples_per_step=self.samples_per_step,
                patience=self.patience, early_stop_patience=2 * self.patience, batch_size=self.batch_size,
                attack_succ_threshold=success, callback=lambda info: _tick(bar, callback, info),
                seed=self.seed, device=model_device(model, self.device))

    def _images(self, data: ImageDataset, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = check_images(data.x, name="clean images")
        keep = (data.y != target).nonzero().flatten()
        if keep.numel() == 0:
            raise DataError(f"no clean image has a label other than the target {target}")
        keep = keep[torch.randperm(keep.numel(), generator=generator(self.seed))[:self.n_images]]
        return x[keep], data.y[keep]

    def window_map(self, model: nn.Module, clean_data: ImageDataset, target: int,
                   callback: Any = None) -> dict[str, Any]:
        """Only the moving-window stage: positions, per-window results and the heat map."""
        self._validate_params()
        _, h, w = clean_data.image_shape
        if not isinstance(target, int) or not 0 <= target < clean_data.num_classes:
            raise ConfigError(f"target must be a label in [0, {clean_data.num_classes}), got {target!r}")
        win = self.window if self.window is not None else default_window((h, w))
        stride = self.stride if self.stride is not None else max(1, win // 4)
        pos = window_positions((h, w), win, stride)
        regions = window_regions((h, w), pos, win)
        x, y = self._images(clean_data, target)
        rev = self._kernel(model, x, y, target, regions, self.epochs, self.success,
                           desc=f"moving window ({regions.shape[0]} windows)", callback=callback)
        strength = rev.attack_success / rev.l1_norms.clamp_min(1.0)
        heat = accumulate_heatmap(rev.masks, strength)
        return {"window": win, "stride": stride, "positions": pos, "regions": regions, "masks": rev.masks,
                "patterns": rev.patterns, "asr": rev.attack_success, "l1": rev.l1_norms, "strength": strength,
                "heatmap": heat, "x": x, "y": y}

    def _explain(self, model: nn.Module, clean_data: ImageDataset, target: int, *,
                 callback: Any) -> HeatmapResult:
        """Heat map over all windows, then the final search inside its hot region."""
        wm = self.window_map(model, clean_data, target, callback)
        heat = wm["heatmap"]
        region, bbox = hot_region(heat, self.hot, self.margin)
        flat = int(heat.flatten().argmax())
        peak = (flat // heat.shape[1], flat % heat.shape[1])
        log.info("heat map peak at %s, hot region rows %d-%d, cols %d-%d", peak, bbox[0], bbox[2] - 1, bbox[1],
                 bbox[3] - 1)
        final = self._kernel(model, wm["x"], wm["y"], target, region[None].expand(self.restarts, -1, -1),
                             self.final_epochs, self.final_success, desc="hot-region search", callback=callback)
        best = int((final.attack_success.double() - 1e-4 * final.l1_norms.double()).argmax())
        trig = Trigger(final.masks[best], final.patterns[best], f"heatmap:label{target}")
        return HeatmapResult(target=target, heatmap=heat, window=wm["window"], stride=wm["stride"],
                             positions=wm["positions"], strength=wm["strength"], window_asr=wm["asr"],
                             window_l1=wm["l1"], region=region, bbox=bbox, peak=peak, trigger=trig,
                             trigger_asr=float(final.attack_success[best]))


def _tick(bar: Any, callback: Any, info: dict[str, Any]) -> None:
    bar.update(1)
    if callback is not None:
        callback(info)


def locate_trigger(model: nn.Module, clean_data: ImageDataset, target: int, size: int, *, epochs: int = 10,
                   seed: int | None = 0, device: DeviceLike = None) -> tuple[int, int]:
    """Where a ``size x size`` trigger for ``target`` sits.

    Runs the moving-window stage with windows two pixels larger than the trigger (stride
    ``size // 2``), takes the strongest window, and returns the top-left corner of the
    ``size x size`` box holding the most of that window's transparency.
    """
    side = size + 2 if size + 2 <= min(clean_data.image_shape[1:]) else size
    search = MovingWindowSearch(window=side, stride=max(1, size // 2), epochs=epochs, n_images=200, seed=seed,
                                device=device)
    wm = search.window_map(model, clean_data, target)
    best = int(wm["strength"].argmax())
    box = torch.nn.functional.avg_pool2d(wm["masks"][best][None, None].double(), size, stride=1)[0, 0]
    flat = int(box.flatten().argmax())
    return flat // box.shape[1], flat % box.shape[1]


__all__ = ["HeatmapResult", "MovingWindowSearch", "WINDOW_SCALE", "accumulate_heatmap", "default_window",
           "hot_region", "locate_trigger", "window_positions", "window_regions"]
