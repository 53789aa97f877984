"""STRIP: STRong Intentional Perturbation (Gao et al., ACSAC 2019).

An input ``x`` is superimposed with ``S`` clean held-out images; a trojaned input keeps
predicting the target label whatever is laid over it (the trigger dominates), so the entropy of
the predictions over the perturbed copies is low, while a clean input's predictions scatter.

The entropy is computed as the authors' reference code does: for each perturbed copy, the
Shannon entropy of the softmax output over the K classes, **in bits** (log base 2); then the mean
over the S copies. The reference code superimposes with ``cv2.addWeighted(x, 1, overlay, 1, 0)``
on float images: a plain 1:1 sum. ``alpha`` is the overlay's weight in that sum (``1.0``
reproduces the reference).

Clipping the sum to [0, 1] (``clip``) is what ``cv2.addWeighted`` does to 8-bit images. By default
a single-channel (greyscale) sum is clipped and a colour one is not (see :func:`superimpose`):
- A bright greyscale trigger stays at full brightness under the clipped sum.
- Clipping a colour sum saturates each channel apart: a magenta patch under a bright overlay turns
  towards white and is erased. The unclipped sum keeps every pixel's difference from its
  neighbours, so it keeps the trigger.
- benchmarks/README.md ("STRIP's superimposition on colour images") has the FAR each way: on
  mnist5k the clipped sum is far better, on cmnist and signs43 the unclipped one.

The overlay's weight follows the sum (``alpha=None``, the default): 1.5 on a clipped sum, the
reference's 1.0 on an unclipped one (:data:`CLIPPED_ALPHA`). A clipped sum cannot brighten what is
already bright, so at weight 1 part of the perturbation is lost; a heavier overlay scatters clean
predictions further while a saturated (bright) trigger stays whole. On greyscale digits this cut the
FAR of a BadNets ``gtsrb_cnn`` from 6.6% to 1.7%, and it did not raise it on mnist5k (BadNets the
same, a blended trigger 4.9% to 1.3%); on the unclipped colour sums a heavier overlay helped
nowhere (cmnist: 1.8% at 1.0, 2.2% at 1.5, 5.6% at 2.0). benchmarks/README.md ("STRIP's overlay
weight") has the figures.

The per-copy statistic (``statistic``): the paper's is the entropy of each copy's prediction
(``"entropy"``, the default). ``"own_label"`` (this toolkit's addition, not the paper's) is each
copy's surprisal at the input's own label, ``-log2 p(y_hat(x) | copy)``, where ``y_hat(x)`` is the
model's label for the input alone (:func:`own_label_surprisal`). It asks whether the label
survives the overlays rather than whether each copy is confident: a clean input whose copies are
each read confidently as some other label has low entropy but a high surprisal. Both are means
of per-copy values, so the threshold and the early decisions work the same on either. On the 8x8
digits and cmnist BadNets models of benchmarks/README.md ("STRIP's own-label statistic") it lets
less through on the ResNets and is mixed on ``gtsrb_cnn``.

The threshold's calibration (``calibration``): the paper sets one threshold on the statistic of
every clean calibration input (``"global"``). With many labels, the clean inputs of the few labels
whose images survive the overlays (low entropy) make up the low tail of that distribution, and the
threshold falls below triggered inputs that a label-by-label look would catch. The default,
``"label"``, adds a second boundary on the statistic less the mean of the calibration inputs that
the model gives the same label (:func:`label_means`, shrunk towards the overall mean by
:data:`LABEL_PRIOR` inputs); an input is flagged when it lies below either boundary, and the two are
set together so that they flag ``frr`` of the calibration inputs between them
(:func:`joint_thresholds`). The paper's boundary stays because a backdoor's target label is a sink:
perturbed copies of any input drift to it, so the target's own clean inputs have a low entropy,
and a boundary relative to their mean alone would be lenient exactly where the triggered inputs
are (on a digits ``gtsrb_cnn``, the target's clean mean was 0.34 bit against 0.42-0.50 for the
other labels). The own-label statistic keeps the paper's threshold alone by default: the sink is
stronger there, since the target's clean inputs keep their label under the overlays, and the second
boundary only spends the FRR budget (on the planted test model it let every triggered input
through). benchmarks/README.md ("STRIP's threshold by label") has the figures.

Sign: the toolkit's input filters return **higher = more suspicious**, so the score is the
*negated* mean entropy, ``-H(x)`` (with ``statistic="own_label"``, the negated mean surprisal);
``threshold_`` lives on that scale (``-threshold_`` is the entropy boundary of the paper).

Early decisions (``early_stop=True``, this toolkit's addition, not the paper's): the overlays are
laid in rounds of ``round_size``; after each round, every input still undecided is tested with a
one-sided confidence bound on its running mean entropy (:func:`sequential_decision`). An input
whose bound lies wholly below the entropy threshold is decided triggered, wholly above it clean;
the others go on to the next round (the batch shrinks; nothing loops over single inputs), and an
input still undecided after ``n_overlays`` copies is decided by the fixed rule. The overlays an
input gets are the first ones of the ``n_overlays`` the fixed filter would give it, so the two
modes differ only where the bound errs. ``early_stop=False`` lays all ``n_overlays`` on every
input (the paper's procedure).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..._utils.batching import DeviceLike, eval_mode, generator, model_device, predict
from ..._utils.results import Result
from ..._utils.validation import Interval, Options, OrNone, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError
from ..base import InputFilter, ScanUse, register, threshold_for_rate

#: Inputs per block of overlay draws: input ``i``'s overlays depend only on ``seed`` and ``i``
#: (not on how the inputs are batched, chunked or streamed).
DRAW_BLOCK = 256

#: The overlay weight ``alpha=None`` gives a clipped (greyscale) sum; an unclipped one gets 1.0.
CLIPPED_ALPHA = 1.5

#: Orders of the calibration overlays the early rule is replayed in to pick its floor.
CALIBRATION_REPLAYS = 8

#: ``calibration="label"``: the pseudo-count of calibration inputs, at the mean of all of them, that
#: each label's mean statistic is shrunk with (:func:`label_means`); a label that few calibration
#: inputs get stays near the overall mean.
LABEL_PRIOR = 5.0


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


def own_label_surprisal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Surprisal in bits of each perturbed copy's prediction at its input's own label.

    ``-log2 softmax(logits)[label]``, computed from the logits (``log_softmax``), so it stays
    finite where the softmax underflows to 0.

    Args:
        logits: ``(..., S, K)`` model outputs for the ``S`` copies of each input.
        labels: ``(...)`` the label each input gets alone.

    Returns:
        ``(..., S)``: 0 where a copy keeps the label for certain; ``log2 K`` where it is uniform.

    Example:
        >>> own_label_surprisal(torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]]), torch.tensor([0]))
        tensor([[1.0000, 0.4150]])
    """
    if logits.ndim < 2 or tuple(labels.shape) != tuple(logits.shape[:-2]):
        raise DataError(f"logits must be (..., S, K) and labels (...), got {tuple(logits.shape)} "
                        f"and {tuple(labels.shape)}")
    logp = logits.double().log_softmax(-1)
    idx = labels.long()[..., None, None].expand(*logits.shape[:-1], 1)
    return (-logp.gather(-1, idx).squeeze(-1) / math.log(2.0)).to(logits.dtype)


def label_means(stats: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                prior: float = LABEL_PRIOR) -> torch.Tensor:
    """Each label's mean statistic over the calibration inputs given that label, shrunk towards the
    mean of all of them: ``(sum_k + prior * m) / (n_k + prior)`` (``m`` for a label no input got).

    Example:
        >>> label_means(torch.tensor([1.0, 1.0, 4.0]), torch.tensor([0, 0, 1]), 3, prior=1.0)
        tensor([1.3333, 3.0000, 2.0000], dtype=torch.float64)
    """
    x, y = stats.double(), labels.long()
    if x.numel() == 0:
        raise DataError("no calibration inputs to average")
    m = x.mean()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, x)
    n = torch.bincount(y, minlength=num_classes).double()
    return (sums + prior * m) / (n + prior)


def joint_thresholds(scores: torch.Tensor, centred: torch.Tensor, frr: float, *,
                     steps: int = 40) -> tuple[float, float, float]:
    """Thresholds on two scores of the same calibration inputs, flagged when *either* lies above its
    own: both at the ``1 - r`` quantile of their own scores, with the largest ``r <= frr`` (found by
    bisection) at which the two together flag at most ``frr`` of the inputs, each then moved to the
    middle of the gap between scores it lies in (the same inputs flagged). Returns ``(t_scores,
    t_centred, r)``.

    Example (the same scores twice: the union is either one, so ``r = frr``):
        >>> s = torch.arange(100.0)
        >>> joint_thresholds(s, s, 0.1)[2]
        0.1
    """
    a, b = scores.double(), centred.double()

    def at(r: float) -> tuple[float, float, float]:
        ta, tb = threshold_for_rate(a, r), threshold_for_rate(b, r)
        return ta, tb, float(((a > ta) | (b > tb)).double().mean())

    ta, tb, rate = at(frr)
    if rate <= frr:
        return _gap_middle(a, ta), _gap_middle(b, tb), float(frr)
    lo, hi = 0.0, float(frr)  # the union flags at most twice r, so r = frr / 2 is always allowed
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if mid <= 0.0:
            break
        if at(mid)[2] <= frr:
            lo = mid
        else:
            hi = mid
    r = lo if lo > 0 else 0.5 * frr
    ta, tb, _ = at(r)
    # the bisection ends where a threshold meets an input's score: move each to the middle of the
    # gap between scores it lies in (the same inputs flagged), so that rounding cannot flip one
    return _gap_middle(a, ta), _gap_middle(b, tb), r


def _gap_middle(x: torch.Tensor, t: float) -> float:
    """The middle of the gap between the values of ``x`` in which ``t`` lies (``t`` itself when no
    value lies on one side): ``x > t`` holds for the same values."""
    below, above = x[x <= t], x[x > t]
    if below.numel() == 0 or above.numel() == 0:
        return float(t)
    return float(0.5 * (below.max() + above.min()))


def superimpose(x: torch.Tensor, overlay: torch.Tensor, alpha: float = 1.0, *, clip: bool) -> torch.Tensor:
    """STRIP's perturbed copies: ``x + alpha * overlay``, clipped to [0, 1] when ``clip``.

    Example (a magenta pixel under a bright overlay pixel: clipped, its colour is lost):
        >>> x, o = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.9, 0.5]])
        >>> superimpose(x, o, clip=True)
        tensor([[1.0000, 0.9000, 1.0000]])
        >>> superimpose(x, o, clip=False)
        tensor([[1.5000, 0.9000, 1.5000]])
    """
    out = x + alpha * overlay
    return out.clamp_(0.0, 1.0) if clip else out


def sequential_decision(mean: torch.Tensor, std: torch.Tensor, n: int, threshold: float | torch.Tensor, *,
                        delta: float = 0.01, min_std: float = 0.05) -> torch.Tensor:
    """Decide inputs early from the running mean of their per-copy entropies.

    With ``n`` copies seen, the half-width of a one-sided ``1 - delta`` confidence bound on the
    mean entropy is ``c = t_{n-1}(1 - delta) * max(std, min_std) / sqrt(n)`` (Student's t with
    ``n - 1`` degrees of freedom; ``min_std`` keeps a run of near-identical copies from claiming
    certainty it has not earned). The input is decided *triggered* when ``mean + c < threshold``
    (its entropy is surely below the boundary), *clean* when ``mean - c > threshold``, and left
    undecided otherwise.

    Args:
        mean: ``(N,)`` running mean entropies (bits).
        std: ``(N,)`` their sample standard deviations (ddof 1).
        n: copies seen so far (the same for every input of a round).
        threshold: the entropy boundary (``-threshold_`` of :class:`STRIP`), or ``(N,)`` one per input.
        delta: error rate of each one-sided bound.
        min_std: floor on the standard deviation (bits).

    Returns:
        ``(N,)`` int8: ``1`` triggered, ``-1`` clean, ``0`` undecided (always 0 when ``n < 2``).

    Example:
        >>> sequential_decision(torch.tensor([0.01, 0.9, 0.2]), torch.tensor([0.01, 0.5, 0.5]), 16, 0.15)
        tensor([ 1, -1,  0], dtype=torch.int8)
    """
    out = torch.zeros(mean.shape, dtype=torch.int8)
    if n < 2:
        return out
    from scipy.stats import t as student_t

    c = float(student_t.ppf(1.0 - delta, n - 1)) * std.double().clamp_min(min_std) / math.sqrt(n)
    m = mean.double()
    out[m + c < threshold] = 1
    out[m - c > threshold] = -1
    return out


def replay_early(per_copy: torch.Tensor, threshold: float | torch.Tensor, *, round_size: int = 8, delta: float = 0.01,
                 min_std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The early rule replayed on known per-copy entropies ``(N, S)`` (bits; column order = the
    order the overlays are laid): ``(flagged, overlays used)``, each ``(N,)``. Flagged means the
    mean entropy over the copies used is below ``threshold``, the rule :class:`STRIP` applies."""
    n, S = per_copy.shape
    e = per_copy.double()
    used = torch.full((n,), S, dtype=torch.long)
    open_ = torch.ones(n, dtype=torch.bool)
    for hi in range(round_size, S, round_size):
        head = e[:, :hi]
        v = sequential_decision(head.mean(1), head.std(1), hi, threshold, delta=delta, min_std=min_std)
        stop = open_ & (v != 0)
        used[stop] = hi
        open_ &= ~stop
    csum = torch.cat([torch.zeros(n, 1, dtype=torch.float64), e.cumsum(1)], 1)
    mean = csum.gather(1, used[:, None]).squeeze(1) / used
    return (-mean).float() > -threshold, used


@dataclasses.dataclass(frozen=True, kw_only=True)
class StripDecisions(Result):
    """STRIP's verdicts on a run of inputs.

    Attributes:
        scores: ``(N,)`` negated mean per-copy statistic (the entropy, or the own-label
            surprisal) over the overlays each input got (higher = more suspicious).
        flagged: ``(N,)`` bool, ``scores > threshold``.
        n_overlays: ``(N,)`` int, the overlays (forward passes) each input used.
        threshold: the filter's ``threshold_``.
        start: index of the first of these inputs in the stream (0 for an in-memory call).
    """

    scores: torch.Tensor
    flagged: torch.Tensor
    n_overlays: torch.Tensor
    threshold: float
    start: int = 0

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def mean_overlays(self) -> float:
        return float(self.n_overlays.double().mean()) if len(self) else 0.0

    @staticmethod
    def concat(parts: list["StripDecisions"]) -> "StripDecisions":
        """One result from consecutive parts of a stream."""
        if not parts:
            raise DataError("no decisions to concatenate")
        return StripDecisions(scores=torch.cat([p.scores for p in parts]), flagged=torch.cat([p.flagged for p in parts]),
                              n_overlays=torch.cat([p.n_overlays for p in parts]), threshold=parts[0].threshold,
                              start=parts[0].start)


@register("strip")
class STRIP(InputFilter):
    """Flag inputs whose predictions stay confident under strong superimposition.

    Args:
        n_overlays: ``N`` in the paper (here S): clean images superimposed on each input (100);
            with ``early_stop`` the most any input gets.
        alpha: weight of the overlay in the superimposition ``x + alpha * overlay`` (the reference
            code's ``cv2.addWeighted(x, 1, overlay, 1, 0)``: 1.0). None (default) follows the sum:
            :data:`CLIPPED_ALPHA` (1.5) where it is clipped, 1.0 where it is not (the module notes
            say why).
        clip: clip the sum to the valid range [0, 1], as ``cv2.addWeighted`` saturates on 8-bit
            images (the reference code sums float images unclipped: ``clip=False``). None (default)
            clips single-channel inputs and not colour ones (the module notes say why).
        frr: the target false-rejection rate on clean inputs that sets ``threshold_`` (1%).
        statistic: what is averaged over an input's copies: ``"entropy"`` (default, the paper's:
            each copy's prediction entropy) or ``"own_label"`` (each copy's surprisal at the
            label the model gives the input alone; see the module notes). Low means trojaned
            either way, in bits.
        calibration: ``"label"``: the paper's threshold on the statistic of every clean
            calibration input, and a second one on the statistic less the mean of the calibration
            inputs that get the same label from the model (:func:`label_means`); an input is
            flagged when below either boundary, the two set together so that they flag ``frr`` of
            the calibration inputs between them (:func:`joint_thresholds`). ``"global"``: the
            paper's threshold alone. None (default): ``"label"`` for the entropy, ``"global"`` for
            the own-label statistic (``calibration_``; the module notes say why).
        overlay_fraction: share of ``clean_data`` held out as the overlay pool; the rest are the
            clean inputs whose entropies calibrate the threshold (so no input is superimposed
            with itself).
        early_stop: decide each input as soon as a confidence bound on its running mean entropy
            clears the threshold (see the module notes and :func:`sequential_decision`); False
            lays all ``n_overlays`` on every input, as the paper does. The threshold is
            calibrated with all ``n_overlays`` either way.
        round_size: overlays laid per round before each input is tested again (8).
        delta: error rate of each round's one-sided bound (0.01).
        min_std: floor, in bits, on the standard deviation in the bound; None (default) picks it in
            ``fit``: the smallest of ``0.0125 * 2**k`` bits under which the early rule, replayed on
            the calibration inputs' overlays (in 8 orders), decides them as the fixed rule does
            but for at most ``frr / 10`` of the replays (``min_std_``). A run of near-identical low entropies then cannot decide a clean input
            whose rarer overlays would have lifted its mean.
        channels_last: run the forward passes on a ``channels_last`` copy of the model (the
            caller's is untouched); None (default) does so on a CPU, for plain modules only.
        batch_size: perturbed copies per forward pass, rounded down to whole rounds of inputs and
            at least one round (results do not depend on it).
        seed: seeds the overlay draws: input ``i`` of a call or stream always gets the same ones
            (None: fresh entropy, drawn once per ``fit``).
        device: where to compute (default: the model's device).

    Attributes:
        threshold_: inputs with ``score > threshold_`` are flagged (score = -entropy, or minus
            the mean own-label surprisal; with ``calibration="label"`` plus the input's label's
            ``label_shift_``).
        label_threshold_: ``(K,)`` with ``calibration="label"``: the threshold on the (negated)
            statistic of an input given each label: the smaller of ``threshold_`` and the second
            boundary's ``t - label_means_[k]``.
        label_shift_: ``(K,)`` ``threshold_ - label_threshold_`` (bits, >= 0), added to the
            score of an input given label ``k``, so that ``score > threshold_`` is its decision.
        label_means_: ``(K,)`` each label's mean statistic on the calibration inputs (shrunk).
        clean_scores_: ``(M,)`` scores of the calibration inputs (all ``n_overlays`` each).
        clip_: whether the sums are clipped (``clip``, or its default for the input's channels).
        calibration_: the calibration used (``calibration``, or its default for ``statistic``).
        alpha_: the overlay weight used (``alpha``, or its default for ``clip_``).
        min_std_: the floor the early rule uses (``min_std`` or the calibrated one).
        calibration_overlays_: mean overlays the early rule used on the calibration inputs.
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
        >>> strip.decide(load_digits("test").x[:3]).n_overlays.shape
        torch.Size([3])

    References:
        Gao, Xu, Wang, Chen, Ranasinghe, Nepal. STRIP: A Defence Against Trojan Attacks on Deep
        Neural Networks. ACSAC 2019. https://arxiv.org/abs/1902.06531
    """

    uses_scan: ClassVar[ScanUse] = "never"
    needs_hooks: ClassVar[bool] = False
    _constraints: ClassVar[dict[str, Any]] = {
        "n_overlays": Interval(int, 1, None),
        "alpha": OrNone(Interval(float, 0, None, "neither")),
        "frr": Interval(float, 0, 1, "neither"),
        "statistic": Options(("entropy", "own_label")),
        "calibration": OrNone(Options(("global", "label"))),
        "clip": Types((bool, type(None))),
        "overlay_fraction": Interval(float, 0, 1, "neither"),
        "early_stop": Types((bool,)),
        "round_size": Interval(int, 1, None),
        "delta": Interval(float, 0, 0.5, "neither"),
        "min_std": Types((float, int, type(None))),
        "channels_last": Types((bool, type(None))),
        "batch_size": Interval(int, 1, None),
        "seed": Types((int, type(None))),
    }

    def __init__(self, *, n_overlays: int = 100, alpha: float | None = None, frr: float = 0.01,
                 statistic: str = "entropy", calibration: str | None = None, clip: bool | None = None,
                 overlay_fraction: float = 0.5,
                 early_stop: bool = True, round_size: int = 8, delta: float = 0.01, min_std: float | None = None,
                 channels_last: bool | None = None, batch_size: int = 256, seed: int | None = 0,
                 device: DeviceLike = None) -> None:
        self.n_overlays = n_overlays
        self.alpha = alpha
        self.clip = clip
        self.frr = frr
        self.statistic = statistic
        self.calibration = calibration
        self.overlay_fraction = overlay_fraction
        self.early_stop = early_stop
        self.round_size = round_size
        self.delta = delta
        self.min_std = min_std
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    # --- the InputFilter template ---------------------------------------------------------------

    def _fit(self, model: nn.Module, clean_data: ImageDataset, *, scan: Any) -> None:
        x = clean_data.x
        n = x.shape[0]
        if self.min_std is not None and not (math.isfinite(self.min_std) and self.min_std >= 0):
            raise ConfigError(f"min_std must be None or a number >= 0, got {self.min_std!r}")
        if n < 2:
            raise DataError(f"STRIP needs at least 2 clean images (overlays and calibration inputs), got {n}")
        g = torch.Generator().manual_seed(self._base_seed())
        perm = torch.randperm(n, generator=g)
        n_pool = min(max(1, round(self.overlay_fraction * n)), n - 1)
        self.model_ = model
        self.forward_model_ = self._forward_model(model)
        self.overlays_ = x[perm[:n_pool]].clone()
        self.draw_seed_ = self._base_seed()
        self.clip_ = bool(x.shape[1] == 1) if self.clip is None else bool(self.clip)
        self.alpha_ = float(self.alpha) if self.alpha is not None else (CLIPPED_ALPHA if self.clip_ else 1.0)
        calib = x[perm[n_pool:]]
        per_copy = torch.empty(calib.shape[0], int(self.n_overlays), dtype=torch.float64)
        self.label_shift_, labels = None, None
        raw = self._run(calib, start=0, early=False, record=per_copy).scores
        self.calibration_ = self.calibration if self.calibration is not None else \
            ("label" if self.statistic == "entropy" else "global")
        if self.calibration_ == "label":
            labels = self._labels(calib)
            k = self._num_classes()
            means = label_means(-raw.double(), labels, k)
            t_raw, t_centred, _ = joint_thresholds(raw, raw.double() + means[labels], float(self.frr))
            # flagged when -stat > t_raw or -stat + mean_y > t_centred: -stat above the smaller of
            # t_raw and t_centred - mean_y, the input's label's threshold
            self.label_means_ = means
            self.label_threshold_ = torch.minimum(torch.full_like(means, t_raw), t_centred - means)
            self.label_shift_ = t_raw - self.label_threshold_
            self.clean_scores_ = (raw.double() + self.label_shift_[labels]).float()
            self.threshold_ = float(t_raw)
        else:
            self.clean_scores_ = raw
            self.threshold_ = threshold_for_rate(self.clean_scores_, self.frr)
        self._calibrate_floor(per_copy, raw, labels if self.label_shift_ is not None else None)

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        """The label the model gives each input alone."""
        model = getattr(self, "forward_model_", self.model_)
        with eval_mode(model), torch.inference_mode():
            return predict(model, x, batch_size=int(self.batch_size), device=model_device(model, self.device)).cpu()

    def _entropy_boundary(self, labels: torch.Tensor | None) -> float | torch.Tensor:
        """The boundary on the inputs' mean statistic: ``-threshold_``, or with
        ``calibration="label"`` one per input, ``(n,)``: minus its label's ``label_threshold_``."""
        if getattr(self, "label_shift_", None) is not None and labels is not None:
            return -self.label_threshold_[labels.long()]
        return -float(getattr(self, "threshold_", math.nan))

    def _calibrate_floor(self, per_copy: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Set ``min_std_``: replay the early rule on the calibration inputs' per-copy entropies, in
        their drawn order and in :data:`CALIBRATION_REPLAYS` - 1 random orders (any order of an
        input's overlays is as likely a draw), and keep the smallest floor whose early decisions
        differ from the fixed rule's on at most ``frr / 10`` of the replays."""
        boundary = self._entropy_boundary(labels)
        fixed = self.clean_scores_ > self.threshold_ if labels is None else (-raw).double() < boundary
        m, s_ = per_copy.shape
        g = torch.Generator().manual_seed(self.draw_seed_ + 1)
        orders = [torch.arange(s_)] + [torch.randperm(s_, generator=g) for _ in range(CALIBRATION_REPLAYS - 1)]
        allowed = int(0.1 * float(self.frr) * m * len(orders))
        grid = [float(self.min_std)] if self.min_std is not None else \
            [0.0125 * 2 ** k for k in range(12) if 0.0125 * 2 ** k <= 2 * math.log2(max(2, self._num_classes()))]
        for floor in grid:
            wrong, used_all = 0, []
            for order in orders:
                flagged, used = replay_early(per_copy[:, order], boundary, round_size=int(self.round_size),
                                             delta=float(self.delta), min_std=floor)
                wrong += int((flagged != fixed).sum())
                used_all.append(used)
            if self.min_std is not None or wrong <= allowed:
                break
        self.min_std_ = floor
        self.calibration_overlays_ = float(torch.cat(used_all).double().mean())

    def _forward_model(self, model: nn.Module) -> nn.Module:
        """The model the overlays go through: a ``channels_last`` copy where that is asked for
        (or, by default, on a CPU), else the model itself."""
        use = self.channels_last
        if use is None:
            use = model_device(model, self.device).type == "cpu"
        if not use or isinstance(model, torch.jit.ScriptModule) or type(model).__name__ == "GraphModule":
            return model
        try:
            import copy

            return copy.deepcopy(model).to(memory_format=torch.channels_last)
        except Exception:  # a module that cannot be copied or converted: run it as it is
            return model

    def _num_classes(self) -> int:
        with eval_mode(self.model_), torch.inference_mode():
            dev = model_device(self.model_, self.device)
            return int(self.model_(self.overlays_[:1].to(dev)).shape[1])

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self.decide(x).scores

    # --- verdicts --------------------------------------------------------------------------------

    def decide(self, x: torch.Tensor, *, start: int = 0) -> StripDecisions:
        """Scores, decisions and overlays used for every row of ``x`` (``start``: the index of
        ``x[0]`` in a longer stream, which picks its overlays)."""
        self._check_fitted()
        x = check_images(x, name="inputs")
        if tuple(x.shape[1:]) != tuple(self.overlays_.shape[1:]):
            raise DataError(f"inputs are {tuple(x.shape[1:])} but STRIP was fitted on {tuple(self.overlays_.shape[1:])}")
        return self._run(x, start=int(start), early=bool(self.early_stop))

    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's normalised entropy ``H`` of each input, ``(N,)`` (= ``-score(x)``); with
        ``statistic="own_label"`` the mean own-label surprisal instead (bits either way)."""
        return -self.score(x)

    def flag_stream(self, inputs: Iterable[Any], *, chunk_size: int = 1024) -> Iterator[StripDecisions]:
        """Decide a stream of inputs of any length, ``chunk_size`` inputs at a time.

        ``inputs`` yields images ``(C, H, W)`` or batches ``(n, C, H, W)`` (tensors or arrays in
        [0, 1]); each yielded :class:`StripDecisions` covers the next ``chunk_size`` inputs
        (fewer at the end), with ``start`` its position in the stream. Memory is bounded by the
        chunk, and the decisions equal those of one in-memory :meth:`decide` call on the whole
        stream.
        """
        self._check_fitted()
        if int(chunk_size) < 1:
            raise DataError(f"chunk_size must be >= 1, got {chunk_size}")
        buf: list[torch.Tensor] = []
        held = 0
        start = 0
        for item in inputs:
            t = torch.as_tensor(item)
            if t.ndim == 3:
                t = t[None]
            if t.ndim != 4:
                raise DataError(f"a stream item must be (C, H, W) or (n, C, H, W), got shape {tuple(t.shape)}")
            buf.append(t)
            held += t.shape[0]
            while held >= chunk_size:
                allx = torch.cat(buf) if len(buf) > 1 else buf[0]
                chunk, rest = allx[:chunk_size], allx[chunk_size:]
                yield self.decide(chunk, start=start)
                start += chunk.shape[0]
                buf, held = ([rest] if rest.shape[0] else []), rest.shape[0]
        if held:
            yield self.decide(torch.cat(buf) if len(buf) > 1 else buf[0], start=start)

    # --- the computation -------------------------------------------------------------------------

    def _base_seed(self) -> int:
        """``seed``, or fresh entropy when it is None."""
        return int(generator(self.seed).initial_seed())

    def _draws(self, start: int, n: int) -> torch.Tensor:
        """``(n, S)`` overlay indices of inputs ``start .. start + n - 1``: block ``k`` of
        :data:`DRAW_BLOCK` inputs draws from its own generator, seeded from ``(seed, k)``."""
        P, S = self.overlays_.shape[0], int(self.n_overlays)
        out = []
        k0, k1 = start // DRAW_BLOCK, (start + n - 1) // DRAW_BLOCK
        for k in range(k0, k1 + 1):
            state = np.random.SeedSequence([self.draw_seed_, k]).generate_state(2, dtype=np.uint32)
            g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            if P >= S:  # S distinct overlays per input (uniform, without replacement)
                d = torch.rand(DRAW_BLOCK, P, generator=g).topk(S, dim=1, largest=False, sorted=True).indices
            else:
                d = torch.randint(0, P, (DRAW_BLOCK, S), generator=g)
            lo = max(start, k * DRAW_BLOCK) - k * DRAW_BLOCK
            hi = min(start + n, (k + 1) * DRAW_BLOCK) - k * DRAW_BLOCK
            out.append(d[lo:hi])
        return torch.cat(out)

    def _run(self, x: torch.Tensor, *, start: int, early: bool, record: torch.Tensor | None = None) -> StripDecisions:
        """Lay the overlays round by round on the inputs still undecided."""
        model, S = getattr(self, "forward_model_", self.model_), int(self.n_overlays)
        R = min(int(self.round_size), S)
        n = x.shape[0]
        draws = self._draws(start, n)
        dev = model_device(model, self.device)
        pool = self.overlays_.to(dev)
        sums = torch.zeros(n, dtype=torch.float64)
        sumsq = torch.zeros(n, dtype=torch.float64)
        used = torch.zeros(n, dtype=torch.long)
        active = torch.arange(n)
        shift = getattr(self, "label_shift_", None)
        with eval_mode(model), torch.inference_mode():
            # the label the model gives each input alone (the "own_label" statistic's, and the
            # label-calibrated boundary's)
            labels = self._labels(x) if (self.statistic == "own_label" or shift is not None) else None
            t_entropy = self._entropy_boundary(labels)
            for lo in range(0, S, R):
                if active.numel() == 0:
                    break
                hi = min(lo + R, S)
                mean_r, ent_r = self._round(model, x, pool, active, draws[active, lo:hi], dev,
                                            labels if self.statistic == "own_label" else None)
                sums[active] += mean_r * (hi - lo)
                sumsq[active] += ent_r.square().sum(1)
                if record is not None:
                    record[active, lo:hi] = ent_r
                used[active] = hi
                if early and hi < S:
                    m = sums[active] / hi
                    std = ((sumsq[active] - hi * m * m).clamp_min(0.0) / (hi - 1)).sqrt() if hi > 1 else torch.zeros_like(m)
                    verdict = sequential_decision(m, std, hi, t_entropy[active] if isinstance(t_entropy, torch.Tensor)
                                                  else t_entropy, delta=float(self.delta),
                                                  min_std=float(self.min_std_))
                    active = active[verdict == 0]
        scores = -(sums / used)
        thr = float(getattr(self, "threshold_", math.nan))
        if shift is not None and labels is not None:  # above the input's label's threshold
            flagged = scores > self.label_threshold_[labels.long()]
            scores = (scores + shift[labels.long()]).float()
        else:
            scores = scores.float()
            flagged = scores > thr
        return StripDecisions(scores=scores, flagged=flagged, n_overlays=used, threshold=thr, start=start)

    def _round(self, model: nn.Module, x: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor,
               draws: torch.Tensor, dev: torch.device,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One round: ``draws.shape[1]`` overlays on each input ``x[idx]``; the round's mean
        per-copy statistic of each, ``(A,)``, and the per-copy values, ``(A, r)``: the entropy
        (:func:`strip_entropy`), or with ``labels`` (each input's own label) the surprisal at it
        (:func:`own_label_surprisal`)."""
        r = draws.shape[1]
        per = max(1, int(self.batch_size) // r)  # whole inputs per forward pass
        means, sqs = [], []
        for i in range(0, idx.numel(), per):
            rows, d = idx[i:i + per], draws[i:i + per]
            batch = superimpose(x[rows].to(dev).repeat_interleave(r, dim=0), pool[d.reshape(-1).to(dev)],
                                self.alpha_, clip=self.clip_)
            if model is not self.model_:
                batch = batch.contiguous(memory_format=torch.channels_last)
            out = model(batch).float().view(rows.numel(), r, -1).cpu()
            if labels is None:  # the per-copy entropies once; their mean is strip_entropy's
                per_copy = overlay_entropy(out.softmax(-1))
                means.append(per_copy.mean(-1).double())
                sqs.append(per_copy.double())
            else:
                per_copy = own_label_surprisal(out, labels[rows]).double()
                means.append(per_copy.mean(1))
                sqs.append(per_copy)
        return torch.cat(means), torch.cat(sqs)
