"""STRIP: STRong Intentional Perturbation (Gao et al., ACSAC 2019).

An input ``x`` is superimposed with ``S`` clean held-out images; a trojaned input keeps
predicting the target label whatever is laid over it (the trigger dominates), so the entropy of
the predictions over the perturbed copies is low, while a clean input's predictions scatter.

The entropy is computed as the authors' reference code does: for each perturbed copy, the
Shannon entropy of the softmax output over the K classes, **in bits** (log base 2); then the mean
over the S copies. The reference code superimposes with ``cv2.addWeighted(x, 1, overlay, 1, 0)``
on float images: a plain 1:1 sum. ``alpha`` is the overlay's weight in that sum (``1.0``
reproduces the reference); by default the sum is clipped to [0, 1] (``clip``), which is what
``cv2.addWeighted`` does to 8-bit images and keeps the copies in the model's input domain.

Sign: the toolkit's input filters return **higher = more suspicious**, so the score is the
*negated* mean entropy, ``-H(x)``; ``threshold_`` lives on that scale (``-threshold_`` is the
entropy boundary of the paper).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils.batching import DeviceLike, eval_mode, generator, model_device
from ..._utils.validation import Interval, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import DataError
from ..base import InputFilter, register, threshold_for_rate


def overlay_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits over the last axis, with ``0 log 0 = 0``.

    Shape:
        ``(..., K)`` probabilities -> ``(...)``.
    """
    p = probs.double()
    return (-torch.special.xlogy(p, p).sum(-1) / math.log(2.0)).to(probs.dtype)


def strip_entropy(probs: torch.Tensor) -> torch.Tensor:
    """STRIP's normalised entropy of one input (Gao et al., Eq. 4-5, the reference code).

    For each of the S perturbed copies, the entropy of the predicted class distribution over the
    K classes (in bits, ``0 log 0 = 0``); then the mean over the S copies.

    Args:
        probs: softmax outputs, ``(..., S, K)``.

    Returns:
        The mean entropy, ``(...)``: in ``[0, log2 K]``; low means trojaned.

    Example:
        >>> strip_entropy(torch.tensor([[[0.5, 0.5], [1.0, 0.0]]]))
        tensor([0.5000])
    """
    if probs.ndim < 2:
        raise DataError(f"probs must be (..., S, K), got shape {tuple(probs.shape)}")
    return overlay_entropy(probs).mean(-1)


@register("strip")
class STRIP(InputFilter):
    """Flag inputs whose predictions stay confident under strong superimposition.

    Args:
        n_overlays: ``N`` in the paper (here S): clean images superimposed on each input (100).
        alpha: weight of the overlay in the superimposition ``x + alpha * overlay`` (the reference
            code's ``cv2.addWeighted(x, 1, overlay, 1, 0)``: 1.0).
        clip: clip the sum to the valid range [0, 1], as ``cv2.addWeighted`` saturates on 8-bit
            images (the reference code sums float images unclipped: ``clip=False``). Clipping keeps
            the perturbed copies in the model's input domain.
        frr: the target false-rejection rate on clean inputs that sets ``threshold_`` (1%).
        overlay_fraction: share of ``clean_data`` held out as the overlay pool; the rest are the
            clean inputs whose entropies calibrate the threshold (so no input is superimposed
            with itself).
        batch_size: perturbed copies per forward pass (results do not depend on it).
        seed: seeds the one ``torch.Generator`` that draws the overlays.
        device: where to compute (default: the model's device).

    Attributes:
        threshold_: inputs with ``score > threshold_`` are flagged (score = -entropy).
        clean_scores_: ``(M,)`` scores of the calibration inputs.
        overlays_: ``(P, C, H, W)`` the held-out overlay pool.

    Shape:
        ``score(x)``: ``x`` ``(N, C, H, W)`` in [0, 1] -> ``(N,)`` float.

    Example:
        >>> import torch
        >>> from trojanscope.data import load_digits
        >>> from trojanscope.models import create_model
        >>> net = create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> strip = STRIP(n_overlays=8).fit(net, load_digits("val"))
        >>> strip.score(load_digits("test").x[:3]).shape
        torch.Size([3])

    References:
        Gao, Xu, Wang, Chen, Ranasinghe, Nepal. STRIP: A Defence Against Trojan Attacks on Deep
        Neural Networks. ACSAC 2019. https://arxiv.org/abs/1902.06531
    """

    needs_hooks: ClassVar[bool] = False
    _constraints: ClassVar[dict[str, Any]] = {
        "n_overlays": Interval(int, 1, None),
        "alpha": Interval(float, 0, None, "neither"),
        "frr": Interval(float, 0, 1, "neither"),
        "clip": Types((bool,)),
        "overlay_fraction": Interval(float, 0, 1, "neither"),
        "batch_size": Interval(int, 1, None),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, n_overlays: int = 100, alpha: float = 1.0, frr: float = 0.01,
                 clip: bool = True, overlay_fraction: float = 0.5, batch_size: int = 1024,
                 seed: int | None = 0, device: DeviceLike = None) -> None:
        self.n_overlays = n_overlays
        self.alpha = alpha
        self.clip = clip
        self.frr = frr
        self.overlay_fraction = overlay_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _fit(self, model: nn.Module, clean_data: Any) -> None:
        x = clean_data.x if isinstance(clean_data, ImageDataset) else check_images(clean_data, name="clean data")
        n = x.shape[0]
        if n < 2:
            raise DataError(f"STRIP needs at least 2 clean images (overlays and calibration inputs), got {n}")
        g = generator(self.seed)
        perm = torch.randperm(n, generator=g)
        n_pool = min(max(1, round(self.overlay_fraction * n)), n - 1)
        self.model_ = model
        self.overlays_ = x[perm[:n_pool]].clone()
        calib = x[perm[n_pool:]]
        self.clean_scores_ = self._entropy_scores(calib)
        self.threshold_ = threshold_for_rate(self.clean_scores_, self.frr)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x, name="inputs")
        if tuple(x.shape[1:]) != tuple(self.overlays_.shape[1:]):
            raise DataError(f"inputs are {tuple(x.shape[1:])} but STRIP was fitted on {tuple(self.overlays_.shape[1:])}")
        return self._entropy_scores(x)

    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's normalised entropy ``H`` of each input, ``(N,)`` (= ``-score(x)``)."""
        return -self.score(x)

    def _entropy_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``-strip_entropy`` for every row of ``x``: N inputs x S overlays, one flat batched pass."""
        model, pool, S = self.model_, self.overlays_, int(self.n_overlays)
        n, P = x.shape[0], pool.shape[0]
        g = generator(self.seed)
        if P >= S:  # S distinct overlays per input (uniform, without replacement)
            draws = torch.rand(n, P, generator=g).argsort(1)[:, :S]
        else:
            draws = torch.randint(0, P, (n, S), generator=g)
        flat = draws.reshape(-1)
        dev = model_device(model, self.device)
        ent = torch.empty(n * S, dtype=torch.float32)
        with eval_mode(model), torch.inference_mode():
            for i in range(0, n * S, int(self.batch_size)):
                j = min(i + int(self.batch_size), n * S)
                rows = torch.arange(i, j) // S
                batch = x[rows].to(dev) + float(self.alpha) * pool[flat[i:j]].to(dev)
                if self.clip:
                    batch = batch.clamp_(0.0, 1.0)
                probs = model(batch).float().softmax(1)
                ent[i:j] = overlay_entropy(probs).cpu()
        return -ent.view(n, S).mean(1)
