"""Pieces shared by the data sanitisers: per-label layouts, feature extraction, splits on one axis."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._utils.batching import DeviceLike, activations, logits
from ...data.dataset import ImageDataset
from ...errors import DataError


def features(model: nn.Module, dataset: ImageDataset, layer: str, *, batch_size: int,
             device: DeviceLike) -> torch.Tensor:
    """The flattened activations of ``layer`` for every sample, ``(N, D)`` float32 on CPU.

    Extracted in batches through a forward hook that is removed afterwards; the model's mode is
    restored.
    """
    feats = activations(model, dataset.x, layer, batch_size=batch_size, device=device)
    if not torch.isfinite(feats).all():
        raise DataError(f"the activations of layer {layer!r} contain NaN or infinite values")
    return feats


#: the sanitisers' default ``layer``: see :func:`resolve_feature_layer`
AUTO_LAYER = "auto"


def resolve_feature_layer(model: nn.Module, x: torch.Tensor, layer: str, *, device: DeviceLike) -> str:
    """The layer a sanitiser reads for ``layer="auto"``: the feature map that the model averages
    into its penultimate representation (``"pool_input"``), when it does, else ``"penultimate"``;
    where the map the representation is made from is 1x1 (a ResNet or ``gtsrb_cnn`` on 8x8
    images), the map before the last stage (below). Any other ``layer`` is returned unchanged.

    A global average over a ResNet's last feature map keeps what a patch trigger adds but not where:
    on the cmnist ResNet (width 8, BadNets 10%) the top singular direction of the target label's
    penultimate features separated poison from clean at AUROC 0.53, that of the 4x4 map before
    the pooling at 1.0. "Averages" is checked on ``x`` (a few of the inspected images): the
    penultimate vector must equal the map's spatial mean, so a pooling followed by more hidden
    layers keeps ``"penultimate"``.

    A 1x1 map has nothing spatial left: the pooled map of a ResNet on 8x8 images, or the map a
    network without global pooling flattens into its dense head when that map is 1x1 (its first
    dense layer receives as many values as its last convolution returns channels: ``gtsrb_cnn``'s
    third max-pool on 8x8 images). Then the map read is the input of the last stage
    (``"<conv>:input"``), the stage being the convolutions that return the last convolution's map
    size, and its input the first of them receives (:func:`last_stage_input`). In resnet18 that
    is ``layer4.0.conv1:input`` (``layer3``'s 2x2 output); in ``gtsrb_cnn`` ``features.conv5:input``
    (``features.pool2``, 2x2). It is found on ``x`` by the shapes the modules receive and return,
    so the same layer is found in a received graph, where a residual sum or a max-pool may be an
    operator, not a module. The first convolution (which reads the image) is never taken; without
    such a stage, ``"penultimate"``. On the 8x8 digits at 10% BadNets poison Activation
    Clustering found none of the poison at the penultimate layer of either architecture, and at
    this map all of it (benchmarks/README.md, "Digits: where the poison separates").
    """
    from ..._utils.hooks import POOL_INPUT, global_pool

    if layer != AUTO_LAYER:
        return layer
    probe = x[: min(4, len(x))]
    if global_pool(model) is None:
        shapes = _conv_and_dense_shapes(model, probe, device=device)
        convs, dense_in = shapes["convs"], shapes["first_dense_in"]
        # the dense head reads a 1x1 map: as many inputs as the last convolution has channels
        if convs and dense_in is not None and dense_in == convs[-1][3]:
            stage = last_stage_input(convs)
            return f"{stage}:input" if stage is not None else "penultimate"
        return "penultimate"
    pen = activations(model, probe, "penultimate", batch_size=len(probe), device=device).double()
    fmap = activations(model, probe, POOL_INPUT, batch_size=len(probe), device=device, flatten=False).double()
    if fmap.ndim != 4 or pen.shape != fmap.shape[:2]:
        return "penultimate"
    if not torch.allclose(fmap.mean((2, 3)), pen, rtol=1e-4, atol=1e-5):
        return "penultimate"
    if fmap.shape[2] * fmap.shape[3] > 1:
        return POOL_INPUT
    stage = last_stage_input(_conv_and_dense_shapes(model, probe, device=device)["convs"])
    return f"{stage}:input" if stage is not None else "penultimate"


def last_stage_input(convs: list[tuple[str, int, int, int]]) -> str | None:
    """The first convolution of the last stage: of ``convs`` (``(name, input H*W, output H*W,
    output channels)`` in the order a forward pass runs them), the first that returns the last
    one's map size. None when that is the first convolution run (its input is the image), or when
    its input is not larger than 1x1. The caller asks only where the map the representation is
    made from is 1x1."""
    if not convs:
        return None
    last_hw = convs[-1][2]
    i = next(i for i, c in enumerate(convs) if c[2] == last_hw)
    if i == 0 or convs[i][1] <= 1:
        return None
    return convs[i][0]


def _conv_and_dense_shapes(model: nn.Module, x: torch.Tensor, *, device: DeviceLike) -> dict:
    """One forward pass on ``x`` with hooks on every ``nn.Conv2d`` and ``nn.Linear``: the
    convolutions run, in order, as ``(name, input H*W, output H*W, output channels)``, and the
    number of features the first dense layer run receives (None if none). Hooks are removed on
    return."""
    from ..._utils.batching import eval_mode, model_device
    from ..._utils.hooks import _check_hookable, _is_a

    _check_hookable(model)
    convs: list[tuple[str, int, int, int]] = []
    dense_in: list[int] = []
    handles = []
    for name, module in model.named_modules():
        if name and _is_a(module, nn.Conv2d):
            def conv_hook(_m, args, out, name=name):
                a = args[0] if args else None
                if isinstance(a, torch.Tensor) and isinstance(out, torch.Tensor) and a.ndim == 4 and out.ndim == 4:
                    convs.append((name, a.shape[2] * a.shape[3], out.shape[2] * out.shape[3], out.shape[1]))
            handles.append(module.register_forward_hook(conv_hook))
        elif name and _is_a(module, nn.Linear):
            def dense_hook(_m, args, _out):
                a = args[0] if args else None
                if isinstance(a, torch.Tensor) and a.ndim == 2:
                    dense_in.append(int(a.shape[1]))
            handles.append(module.register_forward_hook(dense_hook))
    try:
        dev = model_device(model, device)
        with eval_mode(model), torch.inference_mode():
            model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
    return {"convs": convs, "first_dense_in": dense_in[0] if dense_in else None}


def padded_by_label(x: torch.Tensor, labels: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out the rows of ``x`` per label in a ``(K, n_max, ...)`` tensor padded with ``fill``.

    Returns:
        ``(padded, label_ids, slot)``: ``padded[k, j]`` is the ``j``-th row of label
        ``label_ids[k]``; ``slot[i] = (k, j)`` locates row ``i`` of ``x`` (shape ``(N, 2)``).
    """
    label_ids, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inverse)
    pos[order] = torch.arange(inverse.numel()) - starts[inverse[order]]
    padded = x.new_full((label_ids.numel(), int(counts.max()), *x.shape[1:]), fill)
    padded[inverse, pos] = x
    return padded, label_ids, torch.stack([inverse, pos], 1)


def exclusionary_reclassification(model: nn.Module, dataset: ImageDataset, side: torch.Tensor, trainer: Any,
                                  layer: str, *, batch_size: int, device: DeviceLike) -> dict[str, torch.Tensor]:
    """Exclusionary reclassification of both sides of every label's split, in two trainings.

    Chen et al.'s test asks a model that never saw a group of samples what those samples are.
    ``side[i]`` in ``{0, 1}`` says on which side of its label's split sample ``i`` fell. For each
    side ``s``, one model is trained from scratch without the side-``s`` samples of *every* label
    (each label keeps its other side) and classifies them.

    Returns:
        A dict of ``(K, 2)`` tensors indexed by ``[label, side]``: ``own`` (share classified as
        their label), ``top_other`` (share going to the most frequent other label), ``source``
        (that label), ``spread`` (:func:`label_spread` of the labels it goes to other than its
        own), ``typicality`` (median over the side's samples of the distance, in the new
        model's ``layer`` features, to the centroid of the label it was classified as, over the
        median such distance of that label's training samples: about 1 for samples that look like
        a known label, larger for samples unlike anything the model was trained on),
        ``agreement`` (share of the side's samples that the new model classifies as the model
        under test's most likely label *other than* their own: a relabelled image keeps its
        content as the model under test's second choice and a model that never saw it names that
        content, while for an image of its own label the two are unrelated guesses) and ``n``;
        and, per side, ``(2,)`` tensors ``fit_accuracy`` (the new model's accuracy on the samples
        it was trained on), ``top_share`` (the share of those it gives to its most frequent label),
        ``epochs`` (how many it trained: with a ``fit_target``, more where the data is small or
        hard) and ``collapsed`` (True when :func:`reclassifier_collapsed` judges the new model useless:
        its verdicts are then no evidence, see :func:`~.clustering.auto_verdict`); and ``(N,)``
        ``recognised``: whether the model trained without a sample's side gave it its own label.
        A sample whose ``side`` is neither 0 nor 1 is never removed (it is in both trainings).
        The two trainings are independent and run at once where the trainer has workers
        (:meth:`~trojanscope.training.Retrainer.train_many`).
    """
    y = dataset.y
    K = dataset.num_classes
    out = {k: torch.zeros(K, 2, dtype=torch.float64) for k in ("own", "top_other", "typicality", "agreement", "n")}
    out["source"] = torch.full((K, 2), -1, dtype=torch.long)
    out["spread"] = torch.full((K, 2), torch.nan, dtype=torch.float64)
    out["fit_accuracy"] = torch.full((2,), float("nan"), dtype=torch.float64)
    out["top_share"] = torch.full((2,), float("nan"), dtype=torch.float64)
    out["collapsed"] = torch.zeros(2, dtype=torch.bool)
    out["epochs"] = torch.zeros(2, dtype=torch.long)
    out["recognised"] = torch.zeros(len(y), dtype=torch.bool)
    sides = [s for s in (0, 1) if bool((side == s).any())]
    trained = trainer.train_many(model, [dataset.subset(side != s) for s in sides])
    for s, (new, run) in zip(sides, trained):
        removed = side == s
        out["epochs"][s] = len(run.history)
        _fit_health(out, s, new, dataset.x[~removed], y[~removed], K, batch_size=batch_size, device=device)
        x_rm, y_rm = dataset.x[removed], y[removed]
        pred = logits(new, x_rm, batch_size=batch_size, device=device).argmax(1)
        _reclassified(out, s, pred, y_rm, K)
        out["recognised"][removed] = pred == y_rm
        # content agreement: the new model's label vs the model under test's runner-up
        second = logits(model, x_rm, batch_size=batch_size, device=device).double()
        second[torch.arange(len(y_rm)), y_rm] = float("-inf")
        agree = torch.zeros(K, dtype=torch.float64).index_add_(0, y_rm, (pred == second.argmax(1)).double())
        n = out["n"][:, s]
        out["agreement"][:, s] = torch.where(n > 0, agree / n.clamp_min(1), torch.nan)
        out["typicality"][:, s] = _typicality(new, dataset.subset(~removed), x_rm, y_rm, pred, layer,
                                              batch_size=batch_size, device=device)
    return out


def _fit_health(out: dict[str, torch.Tensor], s: int, new: nn.Module, x_keep: torch.Tensor, y_keep: torch.Tensor,
                K: int, *, batch_size: int, device: DeviceLike) -> None:
    """Is the reclassifier of side ``s`` a classifier at all? (On 43 labels, a few epochs can leave
    it predicting one label for everything, and then every label looks attacked.)"""
    pred_keep = logits(new, x_keep, batch_size=batch_size, device=device).argmax(1)
    fit_acc = float((pred_keep == y_keep).double().mean())
    top_share = float(torch.bincount(pred_keep, minlength=K).max()) / max(1, pred_keep.numel())
    out["fit_accuracy"][s], out["top_share"][s] = fit_acc, top_share
    out["collapsed"][s] = reclassifier_collapsed(fit_acc, top_share, K)
    if bool(out["collapsed"][s]):
        logging.getLogger(__name__).warning(
            "exclusionary reclassification: the model trained without side %d collapsed (accuracy %.3f on "
            "its own training data, %.0f%% of it given one label); its verdicts are ignored", s, fit_acc,
            100 * top_share)


def label_spread(counts: torch.Tensor) -> torch.Tensor:
    """``(K,)``: over how many labels each row of ``counts`` (``(K, L)``, samples per label they
    were given) effectively spreads: the inverse Simpson index ``1 / sum_j p_j^2`` of the row's
    shares (1 for a row given one label, L for a row spread evenly; NaN for an empty row)."""
    n = counts.sum(1)
    p = counts / n.clamp_min(1e-12)[:, None]
    return torch.where(n > 0, 1.0 / (p * p).sum(1).clamp_min(1e-12), torch.nan)


def _reclassified(out: dict[str, torch.Tensor], s: int, pred: torch.Tensor, y_rm: torch.Tensor, K: int) -> None:
    """Fill ``n``, ``own``, ``top_other``, ``source`` and ``spread`` of side ``s`` from the new
    model's labels."""
    counts = torch.zeros(K, K, dtype=torch.float64).index_put_((y_rm, pred), torch.ones(len(y_rm), dtype=torch.float64),
                                                               accumulate=True)
    n = counts.sum(1)
    own = counts.diagonal().clone()
    other = counts.clone()
    other.fill_diagonal_(-1)
    top, src = other.max(1)
    out["n"][:, s] = n
    out["own"][:, s] = torch.where(n > 0, own / n.clamp_min(1), torch.nan)
    out["top_other"][:, s] = torch.where(n > 0, top.clamp_min(0) / n.clamp_min(1), torch.nan)
    out["source"][:, s] = torch.where(n > 0, src, -1)
    out["spread"][:, s] = label_spread(other.clamp_min(0))


def _typicality(new: nn.Module, kept: ImageDataset, x_rm: torch.Tensor, y_rm: torch.Tensor, pred: torch.Tensor,
                layer: str, *, batch_size: int, device: DeviceLike) -> torch.Tensor:
    """``(K,)`` per label: the median over the removed samples of their distance to the centroid
    of the label they were classified as, in ``new``'s ``layer`` features, over that label's
    median such distance among the kept samples (NaN for labels without removed samples)."""
    K = kept.num_classes
    f_keep = features(new, kept, layer, batch_size=batch_size, device=device).double()
    f_rm = activations_of(new, x_rm, layer, batch_size=batch_size, device=device).double()
    y_keep = kept.y
    cnt = torch.bincount(y_keep, minlength=K).double()
    cent = torch.zeros(K, f_keep.shape[1], dtype=torch.float64).index_add_(0, y_keep, f_keep) / cnt.clamp_min(1)[:, None]
    d_keep = (f_keep - cent[y_keep]).norm(dim=1)
    scale = torch.full((K,), float("nan"), dtype=torch.float64)
    pad, ids, _ = padded_by_label(d_keep, y_keep, float("nan"))
    scale[ids] = pad.nanmedian(1).values
    ratio = (f_rm - cent[pred]).norm(dim=1) / scale[pred].clamp_min(1e-12)
    pad, ids, _ = padded_by_label(ratio, y_rm, float("nan"))
    typ = torch.full((K,), float("nan"), dtype=torch.float64)
    typ[ids] = pad.nanmedian(1).values
    return typ


#: the reclassification models train past their epochs (up to 8x) until an epoch's running
#: accuracy on their own data reaches this (:class:`~trojanscope.training.Retrainer`'s ``fit_target``)
FIT_TARGET = 0.9
#: a reclassifier below this accuracy on its own training data is judged collapsed (a half-fitted
#: one misclassifies the held-out side of clean labels too, and they look attacked)
MIN_FIT_ACCURACY = 0.8
#: ... or when one label takes more than this share of its predictions (with 10 or more labels;
#: with a handful of labels, a weak but useful reclassifier can lean on one label that much)
MAX_TOP_SHARE = 0.5

#: the share of *each* side of a label's split that a model trained without it must give to one
#: and the same other label for the label to be judged a look-alike of that label, not attacked
#: (:func:`~.clustering.auto_verdict`); an all-to-one poison side spreads over its many source labels instead
LOOKALIKE_SHARE = 0.25
#: ... unless a side goes to that label at least this much: a side read almost wholly as another
#: label is that label's content (the poison of a source-specific attack), not a sub-style
LOOKALIKE_MAX_SHARE = 0.9
#: ... and unless a side is read as more than this many labels (:func:`label_spread`, the
#: effective number of other labels): an all-to-one poison side is the content of every source
#: label, and when the trigger resembles a stroke of one label (a white corner square, the foot of
#: a 2) that label takes a quarter to a half of the side, but the rest still spreads over the other
#: sources. Sub-styles of a clean label read as its look-alike spread over at most 3.5 labels on
#: digits (labels 1 and 9 of every model); the poisoned side of the demo's mnist5k target 6.1, of
#: a cmnist target at 3% 4.6 (figures: benchmarks/README.md, "The look-alike rule's spread cap")
LOOKALIKE_MAX_SPREAD = 4.0
#: the share of *each* side that must go to one other label (each side its own, not necessarily the
#: same) for the label to be judged two sub-styles, each like some other label, not attacked
#: (:func:`~.clustering.auto_verdict`); a poisoned side is read as its many sources, or almost
#: wholly as its one source (the figures: benchmarks/README.md, "Spectral's false flags")
STYLE_SHARE = 0.5

#: :func:`~.clustering.auto_verdict` also judges a label attacked when the side it picks as poison
#: is read as its label for at most ``max_own_share`` and as many other labels: a spread of at
#: least this share of the other labels present (``K - 1``). The relabelled images of an all-to-one
#: attack are the content of every other label, so a model that never saw them reads them as
#: most of those (0.67-0.94 of ``K - 1`` on the digits and mnist5k targets that only this rule
#: decides); a clean side not recognised without the other went to at most 0.56 of them on digits
#: and at most 0.19 of the 42 on signs43 (benchmarks/README.md, "A poisoned side read as most
#: other labels")
WIDE_SPREAD = 0.6
#: ... while the other side, the label's clean samples, is recognised for at most this share. The
#: model trained without the clean side learns the label from the poison alone, a mixture of every
#: other label's content, and gave the label to up to 36% of the clean side on the 8x8 digits targets
#: that the rule of both sides at ``max_own_share`` missed (27-34% where their split was exact)
WIDE_CLEAN_SIDE_SHARE = 0.4


def reclassifier_collapsed(fit_accuracy: float, top_share: float, num_classes: int) -> bool:
    """Whether a reclassification model is useless as evidence: it did not learn its own training
    data (accuracy below :data:`MIN_FIT_ACCURACY`), or it gives most of it one label (above
    :data:`MAX_TOP_SHARE`, with 10 or more labels). A model that collapsed to one label makes
    every other label look attacked (none of its samples is recognised) and misses the poison."""
    if not fit_accuracy == fit_accuracy:  # nan: nothing was trained
        return False
    return fit_accuracy < MIN_FIT_ACCURACY or (num_classes >= 10 and top_share > MAX_TOP_SHARE)


def activations_of(model: nn.Module, x: torch.Tensor, layer: str, *, batch_size: int, device: DeviceLike) -> torch.Tensor:
    return activations(model, x, layer, batch_size=batch_size, device=device)


def gaussian_split(points: np.ndarray, seed: int | None = 0,
                   covariance: str = "full") -> tuple[torch.Tensor, float]:
    """Two groups where ``points`` ``(n, k)`` separate: a two-component Gaussian mixture with
    ``covariance`` ``"full"`` or ``"diag"`` (scikit-learn's ``covariance_type``).

    Unlike k-means, the mixture lets the groups differ in size and spread (a tight group of
    poison beside a wide clean bulk). A diagonal covariance does not overfit the shape of a group
    of a few dozen samples in 10 dimensions (a full one took 8 clean samples into a group of 17
    poisoned ones on the sanitiser tests' data, where the diagonal one split them exactly). Side
    1 is the component with the larger mean on the first coordinate. Returns ``(side (n,) long,
    separation)``, separation being the share of the first coordinate's variance between the two
    groups.
    """
    from sklearn.mixture import GaussianMixture

    p = np.asarray(points, dtype=np.float64)
    n = p.shape[0]
    if n < 4 or np.allclose(p, p[0]):
        return torch.zeros(n, dtype=torch.long), 0.0
    gm = GaussianMixture(n_components=2, covariance_type=covariance, n_init=3, reg_covar=1e-6 * float(p.var()) + 1e-9,
                         random_state=seed).fit(p)
    c = gm.predict(p)
    if gm.means_[1, 0] < gm.means_[0, 0]:
        c = 1 - c
    first = p[:, 0]
    total = ((first - first.mean()) ** 2).sum()
    between = sum(((first[c == j].mean() - first.mean()) ** 2) * (c == j).sum() for j in (0, 1) if (c == j).any())
    return torch.from_numpy(c.astype(np.int64)), float(between / total) if total > 0 else 0.0
