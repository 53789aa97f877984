"""Spectral Signatures (Tran, Li, Madry, NeurIPS 2018): poisoned samples leave a trace in the top
singular direction of their label's learned representations.

Two modes:

* ``mode="paper"``: Algorithm 1 of the paper. For each label, score every sample by
  ``((R(x) - mean) . v)^2`` and remove the ``1.5 * epsilon * n`` highest scores, ``epsilon`` being
  an assumed upper bound on the poisoned share of the label.
* ``mode="auto"`` (default, no ``epsilon``): for each label, split the samples where they separate
  in the label's top singular subspace (a two-component Gaussian mixture on the signed projection
  ``(R(x) - mean) . v`` and the projections on the next singular vectors), then decide with
  exclusionary reclassification (see :mod:`.clustering`) whether the label is attacked: it is when
  a model trained without either side does not recognise that side as the label (or when the
  side taken as poison is read as most of the other labels and the other side is recognised for
  at most 40%: :func:`~.clustering.auto_verdict`). A label judged
  clean loses nothing. The poisoned side of an attacked label is the one the reclassification
  model reads as more labels (:func:`~.clustering.poisoned_side`): relabelled images keep the
  content of their many sources, while the label's own images go to its nearest look-alike.
  Neither decision uses the sides' sizes. With ``refine=True``, a split that leaked poison across
  is refined once (:func:`~.clustering.reclassify_refined`).

This mode exists because the paper's rule breaks down when a label is half poison: the score is
high on *both* sides of the split, and a ``1.5 * epsilon`` budget cannot reach the poison. The
split uses several singular directions because at low poison rates the top one is often the
label's natural variation rather than the poison, and the verdict needs a clean split: a few clean samples on the
poisoned side teach the reclassification model the label, a few poisoned ones on the clean side
re-implant the backdoor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..._utils.batching import DeviceLike
from ..._utils.validation import Interval, Options, OrNone, Types
from ...data.dataset import ImageDataset
from ...errors import DataError
from ...training import Retrainer
from ..base import DataSanitizer, SanitizeResult, register
from ._common import AUTO_LAYER, FIT_TARGET, LOOKALIKE_SHARE, features, gaussian_split, padded_by_label, resolve_feature_layer
from .clustering import SIDE_RULES, decide_sides

log = logging.getLogger(__name__)

#: :class:`SpectralSignatures`' ``min_separation``: a poisoned label's split stands apart along
#: ``v``, the split of a clean label that reclassification alone would flag need not (the figures:
#: benchmarks/README.md, "Spectral's false flags")
MIN_SEPARATION = 0.3


def spectral_projection(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The signed projection ``(R(x) - mean) . v`` of every sample on its label's top direction.

    For each label: centre the label's representations ``R`` (subtract their mean), take the top
    right singular vector ``v`` of the centred matrix, and project. All labels go through one
    batched SVD of zero-padded per-label matrices (zero rows leave ``v`` unchanged). The sign of
    ``v`` is fixed so that the projections' third moment is non-negative (the longer tail is
    positive); labels with fewer than two samples get 0. Computed in float64.

    Args:
        features: ``R``, the learned representations.
        labels: the integer label of each sample.

    Returns:
        ``(N,)`` float64 tensor on CPU.

    Shape:
        features ``(N, D)``, labels ``(N,)`` -> ``(N,)``.
    """
    r = torch.as_tensor(features).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()
    if r.ndim != 2 or y.shape != (r.shape[0],):
        raise DataError(f"need features (N, D) and labels (N,), got {tuple(r.shape)} and {tuple(y.shape)}")
    if r.shape[0] == 0:
        return r.new_zeros(0)
    padded, _, slot = padded_by_label(r, y)
    lab = slot[:, 0]
    counts = torch.bincount(lab).double()
    mean = padded.sum(1) / counts[:, None]
    centred = r - mean[lab]
    padded, _, _ = padded_by_label(centred, y)
    _, _, vh = torch.linalg.svd(padded, full_matrices=False)
    v = vh[:, 0]  # (K, D): each label's top right singular vector
    proj = (centred * v[lab]).sum(1)
    third = torch.zeros(v.shape[0], dtype=torch.float64).index_add_(0, lab, proj ** 3)
    proj = proj * torch.where(third < 0, -1.0, 1.0).double()[lab]
    return torch.where(counts[lab] > 1, proj, torch.zeros_like(proj))


def spectral_subspace(features: torch.Tensor, labels: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Projections of every sample's centred representation on its label's top ``k`` right
    singular vectors, ``(N, k)`` float64 (the first column is :func:`spectral_projection` up to
    its sign). One batched SVD over zero-padded per-label matrices."""
    r = torch.as_tensor(features).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()
    if r.ndim != 2 or y.shape != (r.shape[0],):
        raise DataError(f"need features (N, D) and labels (N,), got {tuple(r.shape)} and {tuple(y.shape)}")
    padded, _, slot = padded_by_label(r, y)
    lab = slot[:, 0]
    counts = torch.bincount(lab).double()
    centred = r - (padded.sum(1) / counts[:, None])[lab]
    padded, _, _ = padded_by_label(centred, y)
    _, _, vh = torch.linalg.svd(padded, full_matrices=False)
    k = min(k, vh.shape[1])
    return torch.einsum("nd,nkd->nk", centred, vh[lab, :k])


def spectral_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The spectral signature outlier score ``((R(x) - mean) . v)^2`` (Tran, Li, Madry 2018).

    For each label ``y``: ``R`` are the learned representations of the samples labelled ``y``,
    ``mean`` their average and ``v`` the top right singular vector of the centred matrix
    ``[R(x_i) - mean]``; the score is the squared projection of the *centred* representation on
    ``v`` (Algorithm 1 of the paper). Computed in float64.

    Args:
        features: ``R``, the learned representations.
        labels: the integer label of each sample.

    Returns:
        float32 scores on CPU (higher = more likely poisoned).

    Shape:
        features ``(N, D)``, labels ``(N,)`` -> ``(N,)``.

    Example:
        >>> import torch
        >>> r = torch.tensor([[0., 0.], [2., 0.], [4., 0.], [1., 1.]])
        >>> spectral_scores(r, torch.tensor([0, 0, 0, 1])).tolist()
        [4.0, 0.0, 4.0, 0.0]

    References:
        Tran, Li, Madry. Spectral Signatures in Backdoor Attacks. NeurIPS 2018.
        https://arxiv.org/abs/1811.00636
    """
    return (spectral_projection(features, labels) ** 2).float()


def top_share_per_label(scores: torch.Tensor, labels: torch.Tensor, share: float) -> torch.Tensor:
    """``(N,)`` bool: within each label, the ``floor(share * n_label)`` highest scores."""
    padded, _, slot = padded_by_label(scores.double(), labels, float("-inf"))
    order = padded.argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    counts = torch.bincount(slot[:, 0]).double()
    budget = torch.floor(share * counts + 1e-9).long()
    return rank[slot[:, 0], slot[:, 1]] < budget[slot[:, 0]]


@dataclass(frozen=True, kw_only=True)
class SpectralResult(SanitizeResult):
    """What :class:`SpectralSignatures` found.

    Attributes:
        attacked_labels: labels judged attacked (``mode="auto"``; every label with a removal
            budget in ``mode="paper"``).
        per_label: per label: its size, the sizes of the two sides of its split, the share of
            variance the split explains, the reclassification evidence and the verdict.
    """

    attacked_labels: list[int]
    per_label: dict[int, dict[str, Any]]


@register("spectral")
class SpectralSignatures(DataSanitizer):
    """Spectral Signatures: outliers along the top singular direction of each label.

    Args:
        mode: ``"auto"`` (default, no epsilon: split where the projections separate, per-label
            verdict by exclusionary reclassification, side chosen by the spread of its
            reclassified labels) or
            ``"paper"`` (remove the ``1.5 * epsilon * n`` highest scores of every label).
        epsilon: ``epsilon``, the paper's upper bound on the poisoned share of a label
            (``mode="paper"`` only).
        removal_factor: the paper's 1.5: how many times ``epsilon * n`` samples are removed.
        layer: the learned representation ``R``: ``"auto"`` (default: the last hidden layer, or
            the feature map a global average pooling turns into it, or the input of the last
            stage where the map it is made from is 1x1; see
            :func:`~._common.resolve_feature_layer`), a layer name,
            ``"penultimate"`` (the paper's) or
            ``"last_conv"``.
        n_directions: ``mode="auto"``: the split is a two-component Gaussian mixture on the
            projections onto the label's top ``n_directions`` singular vectors (the signed
            projection on ``v`` first; 10, the dimension Activation Clustering reduces to).
        max_own_share: ``mode="auto"``: a label is attacked when, for *both* sides of its split,
            a model trained without that side gives the label to at most this share of it
            (the two sides are mutually exclusive explanations of the label; the rule of
            :func:`~.clustering.auto_verdict`, which also takes a label whose poisoned side alone
            is below it but is read as most of the other labels).
        lookalike_share: ``mode="auto"``: a label whose two sides both go to one other label, with
            at least this share of each, is a look-alike of that label, not attacked (0.25; None
            turns the rule off; :func:`~.clustering.auto_verdict`).
        side_rule: ``mode="auto"``: how an attacked label's poisoned side is picked
            (:func:`~.clustering.poisoned_side`): ``"spread"`` (default: the side a model trained
            without it reads as more labels), ``"agreement"`` (the default until it took the
            clean side of the signs43 ``gtsrb_cnn`` target) or ``"typicality"``.
        refine: ``mode="auto"``: re-run the reclassification once for a label whose split leaked
            poison across it (:func:`~.clustering.reclassify_refined`; off by default, see there).
        min_separation: ``mode="auto"``: a label is attacked only if its split explains at least
            this share of the variance of its projection on the top singular direction ``v``.
            Below it the label has no spectral signature (the paper's premise: the poison stands
            apart along ``v``), and the split the mixture found lies elsewhere; whatever the
            reclassification says of it, it is not Spectral's evidence.
        arch, retrain_epochs, retrain_lr: how the reclassification models are trained (architecture: the
            model's own by default; see :class:`~trojanscope.training.Retrainer`).
        batch_size: the memory knob for feature extraction.
        seed: seeds the reclassification models.
        device: where to compute (default: the model's device).

    Shape:
        ``inspect(model, dataset)``: ``dataset.x`` ``(N, C, H, W)`` -> scores ``(N,)``, the
        paper's :func:`spectral_scores` in both modes (the decision is ``flagged``).

    References:
        Tran, Li, Madry. Spectral Signatures in Backdoor Attacks. NeurIPS 2018.
        https://arxiv.org/abs/1811.00636
    """

    uses_trusted: ClassVar[bool] = False
    needs_hooks: ClassVar[bool] = True
    _constraints = {"mode": Options(("auto", "paper")), "epsilon": Interval(float, 0, 1, "neither"),
                    "removal_factor": Interval(float, 0, None, "neither"), "layer": Types((str,)),
                    "max_own_share": Interval(float, 0, 1), "lookalike_share": OrNone(Interval(float, 0, 1)),
                    "side_rule": Options(SIDE_RULES), "refine": Types((bool,)), "min_separation": Interval(float, 0, 1),
                    "n_directions": Interval(int, 1, None), "arch": Types((str, type(None))),
                    "retrain_epochs": Interval(int, 1, None), "retrain_lr": Interval(float, 0, None, "neither"), "batch_size": Interval(int, 1, None),
                    "seed": Types((int, type(None)))}

    def __init__(self, *, mode: Literal["auto", "paper"] = "auto", epsilon: float = 0.05, removal_factor: float = 1.5,
                 layer: str = AUTO_LAYER, n_directions: int = 10, max_own_share: float = 0.15,
                 lookalike_share: float | None = LOOKALIKE_SHARE, side_rule: str = "spread",
                 refine: bool = False, min_separation: float = MIN_SEPARATION, arch: str | None = None,
                 retrain_epochs: int = 3, retrain_lr: float = 1e-3, batch_size: int = 256, seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.mode = mode
        self.epsilon = epsilon
        self.removal_factor = removal_factor
        self.layer = layer
        self.n_directions = n_directions
        self.max_own_share = max_own_share
        self.lookalike_share = lookalike_share
        self.side_rule = side_rule
        self.refine = refine
        self.min_separation = min_separation
        self.arch = arch
        self.retrain_epochs = retrain_epochs
        self.retrain_lr = retrain_lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    @property
    def trains_models(self) -> bool:
        """True when ``inspect`` trains models of its own (the automatic mode confirms each label by reclassification)."""
        return self.mode == "auto"

    def _inspect(self, model: nn.Module, dataset: ImageDataset, *, trusted: ImageDataset | None) -> SpectralResult:
        """Score every sample by :func:`spectral_scores` and flag the ones judged poisoned."""
        layer = resolve_feature_layer(model, dataset.x, self.layer, device=self.device)
        feats = features(model, dataset, layer, batch_size=self.batch_size, device=self.device)
        scores = spectral_scores(feats, dataset.y)
        health: dict[str, Any] = {}
        if self.mode == "paper":
            flagged, per_label = self._paper(scores, dataset)
        else:
            flagged, per_label = self._auto(model, dataset, feats, health, layer)
        attacked = [k for k in per_label if per_label[k]["attacked"]]
        return SpectralResult(scores=scores, flagged=flagged, attacked_labels=attacked, per_label=per_label,
                              details={"layer": layer, "mode": self.mode, **health})

    def _paper(self, scores: torch.Tensor, data: ImageDataset) -> tuple[torch.Tensor, dict[int, dict[str, Any]]]:
        """Algorithm 1: the ``removal_factor * epsilon`` highest scores of every label."""
        flagged = top_share_per_label(scores, data.y, min(1.0, self.removal_factor * self.epsilon))
        n_removed = torch.bincount(data.y[flagged], minlength=data.num_classes)
        n_label = torch.bincount(data.y, minlength=data.num_classes)
        return flagged, {k: {"n": int(n_label[k]), "removed": int(n_removed[k]), "attacked": bool(n_removed[k] > 0)}
                         for k in torch.unique(data.y).tolist()}

    def _auto(self, model: nn.Module, data: ImageDataset, feats: torch.Tensor,
              health: dict[str, Any], layer: str) -> tuple[torch.Tensor, dict[int, dict[str, Any]]]:
        """Split every label in its top singular subspace, then decide by exclusionary reclassification."""
        sub = spectral_subspace(feats, data.y, self.n_directions)
        sub[:, 0] = spectral_projection(feats, data.y)  # the signed projection on v comes first
        side = torch.zeros(len(data), dtype=torch.long)
        split: dict[int, float] = {}
        for k in torch.unique(data.y).tolist():  # one small mixture per label (sklearn)
            idx = (data.y == k).nonzero().flatten()
            side[idx], split[k] = gaussian_split(sub[idx].numpy(), self.seed)
        flagged, per_label, _ = decide_sides(model, data, side, self._retrainer(), layer, self.max_own_share,
                                             batch_size=self.batch_size, device=self.device,
                                             side_rule=self.side_rule, health=health,
                                             lookalike_share=self.lookalike_share, refine=self.refine)
        no_signature = torch.zeros(data.num_classes, dtype=torch.bool)
        for k in per_label:
            per_label[k]["separation"] = split[k]
            if per_label[k]["attacked"] and split[k] < self.min_separation:
                log.info("spectral: label %d's split explains %.3f of its variance along v (< %.2f): not attacked",
                         k, split[k], self.min_separation)
                per_label[k].update(attacked=False, poisoned_side=None, no_signature=True)
                no_signature[k] = True
        return flagged & ~no_signature[data.y], per_label

    def _retrainer(self) -> Retrainer:
        return Retrainer(arch=self.arch, epochs=self.retrain_epochs, lr=self.retrain_lr, seed=self.seed, device=self.device,
                         fit_target=FIT_TARGET)
