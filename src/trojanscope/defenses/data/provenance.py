"""Provenance-based filtering (Baracaldo et al. 2018): judge the sources of a training set, not
its samples.

Each sample carries a provenance feature (the source, sensor or device it came from: the
dataset's ``groups``). The data is segmented by it and each segment is judged by training with and
without it. Two variants, as in the paper:

* with a trusted clean evaluation set (``inspect(..., trusted=clean_data)``);
* fully untrusted: a random ``holdout`` share of every segment is held out as evaluation data, and
  the segment under test is removed from the evaluation data too.

``mode="paper"`` follows the paper: for each segment in turn, train on the current data with and
without it, compare accuracy on the evaluation data, and permanently remove the segment when the
model without it is better by more than ``eps``. A backdoor barely moves clean accuracy, so this
rule rarely fires against one (the thesis in the references found the same).

``mode="auto"`` (default) asks the question that does separate them: trained without a segment,
does the rest of the data reproduce that segment's labels as well as it reproduces the evaluation
data's? A source that relabels stamped images to a target is contradicted by every other source;
a clean source is not. A segment is flagged when the model trained without it is at least
``margin`` less accurate on the segment than on the evaluation data.

References:
    Baracaldo, Chen, Ludwig, Safavi, Zhang. Detecting Poisoning Attacks on Machine Learning in
    IoT Environments. IEEE ICIoT 2018. https://doi.org/10.1109/ICIOT.2018.00015
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..._utils.batching import DeviceLike, accuracy, generator
from ..._utils.validation import Interval, Options, Types, check_labels
from ...data.dataset import ImageDataset, stratified_split
from ...errors import DataError
from ..base import DataSanitizer, SanitizeResult, register
from ...training import Retrainer


@dataclass(frozen=True, kw_only=True)
class ProvenanceResult(SanitizeResult):
    """What :class:`ProvenanceFilter` found.

    Attributes:
        groups: ``(N,)`` the provenance segment of each sample.
        flagged_segments: the segments judged poisoned (all their samples are flagged).
        per_segment: per segment: its size and the accuracies behind the decision.
        variant: ``"trusted"`` or ``"untrusted"``.
    """

    groups: torch.Tensor
    flagged_segments: list[int]
    per_segment: dict[int, dict[str, Any]]
    variant: str


@register("provenance")
class ProvenanceFilter(DataSanitizer):
    """Provenance-based filtering: remove the sources whose data the rest of the data contradicts.

    Args:
        mode: ``"auto"`` (default: segment reclassification, see the module docstring) or
            ``"paper"`` (with/without accuracy comparison on evaluation data, sequential removal).
        eps: ``mode="paper"``: a segment is removed when the accuracy without it exceeds the
            accuracy with it by more than ``eps`` (0: "performs better").
        margin: ``mode="auto"``: the accuracy gap (evaluation data minus the segment's own data,
            for a model trained without the segment) above which the segment is flagged.
        holdout: untrusted variant: the share of each segment held out as evaluation data.
        arch, retrain_epochs, retrain_lr: how the models are trained (see :class:`~trojanscope.training.Retrainer`).
        batch_size: the memory knob for evaluation.
        seed: seeds the held-out draw and the trainings (None: fresh entropy).
        device: where to train (default: the model's device).

    Shape:
        ``inspect(model, dataset, trusted=None)``: ``dataset.x`` ``(N, C, H, W)`` and
        ``dataset.groups`` ``(N,)`` -> scores ``(N,)``.

    References:
        Baracaldo et al. Detecting Poisoning Attacks on Machine Learning in IoT Environments.
        IEEE ICIoT 2018. https://doi.org/10.1109/ICIOT.2018.00015
    """

    uses_trusted: ClassVar[bool] = True
    _constraints = {"mode": Options(("auto", "paper")), "eps": Interval(float, 0, 1),
                    "margin": Interval(float, 0, 1), "holdout": Interval(float, 0, 1, "neither"),
                    "arch": Types((str, type(None))), "retrain_epochs": Interval(int, 1, None), "retrain_lr": Interval(float, 0, None, "neither"),
                    "batch_size": Interval(int, 1, None), "seed": Types((int, type(None)))}

    def __init__(self, *, mode: Literal["auto", "paper"] = "auto", eps: float = 0.0, margin: float = 0.1,
                 holdout: float = 0.2, arch: str | None = None, retrain_epochs: int = 3, retrain_lr: float = 1e-3, batch_size: int = 256,
                 seed: int | None = 0, device: DeviceLike = None) -> None:
        self.mode = mode
        self.eps = eps
        self.margin = margin
        self.holdout = holdout
        self.arch = arch
        self.retrain_epochs = retrain_epochs
        self.retrain_lr = retrain_lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    @property
    def trains_models(self) -> bool:
        """True when ``inspect`` trains models of its own (each segment is judged by training with and without it)."""
        return True

    def _inspect(self, model: nn.Module, dataset: ImageDataset, *, trusted: ImageDataset | None) -> ProvenanceResult:
        """Judge every provenance segment of ``dataset`` (its ``groups``) and flag the samples of the
        poisoned ones; ``trusted`` is the trusted clean evaluation set (the trusted variant), or
        None to hold out ``holdout`` of every segment instead (the untrusted variant)."""
        data = dataset
        if data.groups is None:
            raise DataError("provenance filtering needs a provenance segment per sample: a dataset with groups "
                            "(an .npz 'groups' array)")
        g = check_labels(torch.as_tensor(data.groups), len(data), None, name="provenance groups")
        segments = torch.unique(g).tolist()
        if len(segments) < 2:
            raise DataError(f"provenance filtering needs at least 2 segments, got {len(segments)}")
        train_mask = torch.ones(len(data), dtype=torch.bool)
        if trusted is not None:
            if trusted.image_shape != data.image_shape:
                raise DataError(f"the trusted data's images are {trusted.image_shape}, the training data's "
                                f"{data.image_shape}")
            variant = "trusted"
        else:
            seed = generator(self.seed).initial_seed()
            train_mask[stratified_split(g, [self.holdout, 1 - self.holdout], seed=seed)[0]] = False
            variant = "untrusted"
        decide = self._paper if self.mode == "paper" else self._auto
        flagged_segments, per_segment = decide(model, data, g, segments, train_mask, trusted)
        seg_score = torch.zeros(int(g.max()) + 1, dtype=torch.float64)
        for s in segments:
            seg_score[s] = per_segment[s]["score"]
        flagged = torch.isin(g, torch.tensor(flagged_segments, dtype=torch.long))
        return ProvenanceResult(scores=seg_score[g].float(), flagged=flagged, groups=g,
                                flagged_segments=flagged_segments, per_segment=per_segment, variant=variant,
                                details={"mode": self.mode, "variant": variant})

    def _evaluation(self, data: ImageDataset, g: torch.Tensor, train_mask: torch.Tensor, trusted: ImageDataset | None,
                    excluded: list[int]) -> ImageDataset:
        if trusted is not None:
            return trusted
        keep = ~train_mask & ~torch.isin(g, torch.tensor(excluded, dtype=torch.long))
        if not bool(keep.any()):
            raise DataError("no evaluation data left: every held-out sample belongs to an excluded segment")
        return data.subset(keep)

    def _auto(self, model: nn.Module, data: ImageDataset, g: torch.Tensor, segments: list[int], train_mask: torch.Tensor,
              trusted: ImageDataset | None) -> tuple[list[int], dict[int, dict[str, Any]]]:
        trainer = self._retrainer()
        per: dict[int, dict[str, Any]] = {}
        # one training per segment (leave one segment out), independent: run at once where the trainer can
        trained = trainer.train_many(model, [data.subset(train_mask & (g != s)) for s in segments])
        for s, (without, _) in zip(segments, trained):
            in_s = g == s
            evaluation = self._evaluation(data, g, train_mask, trusted, [s])
            acc_eval = accuracy(without, evaluation, batch_size=self.batch_size)
            acc_seg = accuracy(without, data.subset(in_s), batch_size=self.batch_size)
            per[s] = {"n": int(in_s.sum()), "accuracy_on_evaluation_without": acc_eval,
                      "accuracy_on_segment_without": acc_seg, "score": acc_eval - acc_seg}
        flagged = [s for s in segments if per[s]["score"] > self.margin]
        for s in segments:
            per[s]["flagged"] = s in flagged
        return flagged, per

    def _paper(self, model: nn.Module, data: ImageDataset, g: torch.Tensor, segments: list[int], train_mask: torch.Tensor,
               trusted: ImageDataset | None) -> tuple[list[int], dict[int, dict[str, Any]]]:
        trainer = self._retrainer()
        per: dict[int, dict[str, Any]] = {}
        removed: list[int] = []
        with_model: nn.Module | None = None
        for s in segments:  # sequential, as in the paper: a removed segment stays removed
            current = train_mask & ~torch.isin(g, torch.tensor(removed, dtype=torch.long))
            if with_model is None:
                with_model = trainer.train(model, data.subset(current))
            without = trainer.train(model, data.subset(current & (g != s)))
            evaluation = self._evaluation(data, g, train_mask, trusted, removed + [s])
            acc_with = accuracy(with_model, evaluation, batch_size=self.batch_size)
            acc_without = accuracy(without, evaluation, batch_size=self.batch_size)
            diff = acc_without - acc_with
            per[s] = {"n": int((g == s).sum()), "accuracy_with": acc_with, "accuracy_without": acc_without,
                      "score": diff, "flagged": diff > self.eps}
            if diff > self.eps:
                removed.append(s)
                with_model = None  # the data changed: retrain the reference
        return removed, per

    def _retrainer(self) -> Retrainer:
        return Retrainer(arch=self.arch, epochs=self.retrain_epochs, lr=self.retrain_lr, seed=self.seed, device=self.device)
