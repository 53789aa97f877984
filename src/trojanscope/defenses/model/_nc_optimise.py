"""Neural Cleanse's optimisation kernel: the smallest trigger towards each target, all targets in one batch.

Each job ``j`` minimises ``CE(targets[j], f((1 - m) * x + m * p)) + lambda_j * |m|_1`` over the
clean images whose label differs from ``targets[j]``, with ``m = region * (tanh(w_m) / (2 - eps)
+ 0.5)`` and ``p = tanh(w_p) / (2 - eps) + 0.5`` and Adam. Following the authors' code,
``lambda_j`` starts at 0; after ``patience`` epochs with an epoch-average attack success of at
least ``attack_succ_threshold`` it is set to ``init_cost``; from then on it is multiplied by
``cost_multiplier`` after ``patience`` successive successful epochs and divided by
``cost_multiplier ** 1.5`` after ``patience`` successive failed ones. The kept mask is the
smallest (epoch-average norm) of an epoch reaching the threshold. A job stops early once lambda
went both up and down and the best norm has not dropped below ``early_stop_threshold`` times its
previous best for ``early_stop_patience`` epochs.

A job may also be **source-restricted** (``sources[j]``): it then optimises only over the clean
images of label ``sources[j]``, i.e. reverses the smallest trigger sending that source to
``targets[j]``. A source-specific backdoor (only some labels' stamped images go to the target)
or an all-to-all one (``i -> i + 1``) gives no small per-target trigger, since that must flip
every source, but a small trigger for its own (source, target) pairs; :func:`reverse_pairs` runs
all ``K (K - 1)`` pairs as one batch of jobs. Each step draws ``samples_per_step`` images of every
distinct source from that source's own seeded stream, and each job stamps its source's images.

All jobs are independent (the loss is a sum over jobs, lambda and the counters are per-job
vectors, Adam is elementwise), see the same mini-batches (those of their source) and start
from initial values drawn for all jobs at once, so the result does not depend on how jobs are
grouped: ``mode="sequential"`` runs them one at a time (the paper's way, the reference for the
batched mode) and ``batch_size`` only bounds the number of images in one forward pass (jobs are
chunked when ``J * samples_per_step`` exceeds it). Jobs that stopped early leave the batch.

``schedule="halving"`` schedules the jobs by successive halving (Jamieson & Talwalkar 2016; the
bandit view of K-Arm, Shen et al. 2021): at the rungs ``halving_first``, ``2 * halving_first``,
``4 * halving_first``... epochs, only the ``1 / halving_eta`` of the active jobs with the smallest
trigger so far go on (at least ``halving_keep``; jobs that have not reached the attack-success
threshold rank after those that have, by their current norm); the others stop with the mask they
had. A backdoor target's mask shrinks fastest, so it is kept, and the cost grows with ``log K``
rungs instead of ``K`` full runs. With more than 10 jobs the first rung, where every job runs,
uses fewer images per step (:meth:`OptimiserSettings.first_rung_samples`), so that it costs
about what a 10-label one does. ``schedule="all"`` optimises every job to its budget (the paper).

The kernel only needs the model's inputs and outputs (no hooks), so it works on TorchScript and
``torch.export`` programs.

References:
    Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. "Neural Cleanse: Identifying and Mitigating
    Backdoor Attacks in Neural Networks". IEEE S&P 2019. https://doi.org/10.1109/SP.2019.00031
    (the authors' code: https://github.com/bolunwang/backdoor, ``visualizer.py``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..._utils.batching import DeviceLike, eval_mode, generator, model_device, predict
from ..._utils.results import Result
from ..._utils.validation import Interval, Options, check_images, check_labels
from ...errors import ConfigError, DataError
from ...triggers import Trigger, TriggerBatch
from ._nc_steps import _init_state, _optimise_jobs

Callback = Callable[[dict[str, Any]], None]


#: up to this many jobs, the halving schedule's first rung runs at full mini-batches (see
#: :meth:`OptimiserSettings.first_rung_samples`)
FIRST_RUNG_JOBS = 10
#: the fewest images per job and step in a larger first rung
FIRST_RUNG_MIN_SAMPLES = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReversedTriggers(Result):
    """The output of :func:`reverse_engineer_triggers`: one trigger per job.

    Attributes:
        targets: ``(J,)`` the target label of each job.
        sources: ``(J,)`` the source label of each job for source-restricted jobs (its trigger
            sends images of that label to the target; see :func:`reverse_pairs`), else None.
        masks: ``(J, H, W)`` the best mask found (the smallest that reached the attack-success
            threshold, else the last one).
        patterns: ``(J, C, H, W)``.
        l1_norms: ``(J,)`` ``|m|_1`` of each mask.
        reached: ``(J,)`` bool, whether the attack-success threshold was reached at all.
        attack_success: ``(J,)`` the epoch-average attack success (on the optimisation images)
            of the kept mask.
        epochs: ``(J,)`` epochs run before the early stop (or the budget) ended the job.
        costs: ``(J,)`` the final lambda.
        image_passes: forward-and-backward passes of single images the optimisation ran (its
            cost, independent of the hardware).
        dropped: ``(J,)`` bool, jobs the label schedule stopped before the budget (see
            ``schedule`` in :func:`reverse_engineer_triggers`).
        norm_trace: ``(E, J)`` each job's best norm so far after each epoch (its current norm
            while it has not reached the threshold), carried forward once the job stopped; used
            to compare jobs at equal budgets (:func:`matched_norms`).
        seconds: wall time.
    """

    targets: torch.Tensor
    masks: torch.Tensor
    patterns: torch.Tensor
    l1_norms: torch.Tensor
    reached: torch.Tensor
    attack_success: torch.Tensor
    epochs: torch.Tensor
    costs: torch.Tensor
    image_passes: int = 0
    dropped: torch.Tensor | None = None
    norm_trace: torch.Tensor | None = None
    seconds: float = 0.0
    sources: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.numel())

    def _name(self, j: int) -> str:
        t = int(self.targets[j])
        if self.sources is None:
            return f"neural-cleanse:label{t}"
        return f"neural-cleanse:source{int(self.sources[j])}-label{t}"

    @property
    def batch(self) -> TriggerBatch:
        """The reversed triggers as a :class:`~trojanscope.triggers.TriggerBatch` (labels: the targets)."""
        return TriggerBatch(self.masks, self.patterns, self.targets, tuple(self._name(j) for j in range(len(self))))

    def trigger(self, j: int) -> Trigger:
        """Job ``j``'s trigger as a :class:`Trigger`."""
        return Trigger(self.masks[j], self.patterns[j], self._name(j))

    @property
    def triggers(self) -> list[Trigger]:
        return list(self.batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimiserSettings:
    """The optimiser's settings (the names of the authors' code; see the module docstring).

    Attributes:
        init_cost: lambda's initial value (paper code ``init_cost``, 1e-3).
        lr: Adam's learning rate (0.1), with ``betas`` (0.5, 0.9) as the authors' code.
        epochs: maximum number of epochs (paper code ``steps``, 1000).
        steps_per_epoch: mini-batches per epoch (paper code ``mini_batch``, ``1000 / 32``).
        samples_per_step: images per mini-batch and job (paper code ``batch_size``, 32).
        attack_succ_threshold: attack success that counts as reached (0.99).
        patience: epochs before lambda changes (5, as in the authors' example).
        cost_multiplier: lambda's multiplier up (1.5); down is ``cost_multiplier ** 1.5``.
        early_stop: whether to stop a job early.
        early_stop_threshold: relative improvement below which an epoch counts as stalled (0.99).
        early_stop_patience: stalled epochs before stopping (``2 * patience`` = 10).
        epsilon: the tanh box's epsilon (Keras' 1e-7).
        mode: ``"batched"`` (all jobs per forward pass) or ``"sequential"`` (one job at a time).
        schedule: ``"all"`` (every job to the end) or ``"halving"`` (successive halving).
        halving_first: the first rung (epochs), for ``schedule="halving"``.
        halving_eta: the share ``1 / eta`` of active jobs kept at each rung.
        halving_keep: the fewest jobs kept at a rung.
        halving_first_samples: images per job and step before the first rung (None: the
            budget rule of :meth:`first_rung_samples`).
        batch_size: the most images in one forward pass (the memory knob).
    """

    init_cost: float = 1e-3
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    epochs: int = 1000
    steps_per_epoch: int = 32
    samples_per_step: int = 32
    attack_succ_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 1.5
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 10
    epsilon: float = 1e-7
    mode: str = "batched"
    schedule: str = "all"
    halving_first: int = 10
    halving_eta: int = 3
    halving_keep: int = 2
    halving_first_samples: int | None = None
    batch_size: int = 4096

    def check(self) -> None:
        """Raise :class:`~trojanscope.errors.ConfigError` on a setting out of its range."""
        for name in ("epochs", "steps_per_epoch", "samples_per_step", "patience", "early_stop_patience",
                     "batch_size"):
            Interval(int, 1).check(name, getattr(self, name))
        Interval(float, 1.0, None, "neither").check("cost_multiplier", self.cost_multiplier)
        Interval(float, 0.0, None, "neither").check("lr", self.lr)
        Interval(float, 0.0, None, "left").check("init_cost", self.init_cost)
        Interval(float, 0.0, 1.0, "right").check("attack_succ_threshold", self.attack_succ_threshold)
        Options(("batched", "sequential")).check("mode", self.mode)
        Options(("all", "halving")).check("schedule", self.schedule)
        Interval(int, 1).check("halving_first", self.halving_first)
        Interval(int, 2).check("halving_eta", self.halving_eta)
        Interval(int, 1).check("halving_keep", self.halving_keep)
        if self.halving_first_samples is not None:
            Interval(int, 1, self.samples_per_step).check("halving_first_samples", self.halving_first_samples)

    def first_rung_samples(self, jobs: int) -> int:
        """Images per job and step before the first rung of ``schedule="halving"`` with ``jobs`` jobs.

        The first rung is where every job runs, so it is what makes the cost grow with the
        labels. Up to :data:`FIRST_RUNG_JOBS` jobs it runs at ``samples_per_step``; with more, at
        ``samples_per_step * FIRST_RUNG_JOBS / jobs`` (rounded up, at least
        :data:`FIRST_RUNG_MIN_SAMPLES`), so that it costs about what a 10-label rung does: a
        backdoor's target needs the rung's epochs (lambda only starts after ``patience``
        successful epochs) but not its full mini-batches to rank among the smallest triggers.
        The later rungs, where the few kept jobs are told apart, run at ``samples_per_step``.
        """
        if self.halving_first_samples is not None:
            return int(self.halving_first_samples)
        if jobs <= FIRST_RUNG_JOBS:
            return int(self.samples_per_step)
        return min(int(self.samples_per_step),
                   max(FIRST_RUNG_MIN_SAMPLES, math.ceil(self.samples_per_step * FIRST_RUNG_JOBS / jobs)))

    @property
    def per_chunk(self) -> int:
        """Jobs in one forward pass."""
        return 1 if self.mode == "sequential" else max(1, self.batch_size // self.samples_per_step)


def reverse_engineer_triggers(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    targets: Sequence[int] | torch.Tensor | None = None,
    sources: Sequence[int] | torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    init_cost: float = 1e-3,
    lr: float = 0.1,
    betas: tuple[float, float] = (0.5, 0.9),
    epochs: int = 1000,
    steps_per_epoch: int = 32,
    samples_per_step: int = 32,
    attack_succ_threshold: float = 0.99,
    patience: int = 5,
    cost_multiplier: float = 1.5,
    early_stop: bool = True,
    early_stop_threshold: float = 0.99,
    early_stop_patience: int = 10,
    epsilon: float = 1e-7,
    mode: Literal["batched", "sequential"] = "batched",
    schedule: Literal["all", "halving"] = "all",
    halving_first: int = 10,
    halving_eta: int = 3,
    halving_keep: int = 2,
    batch_size: int = 4096,
    seed: int | None = 0,
    device: DeviceLike = None,
    callback: Callback | None = None,
) -> ReversedTriggers:
    """Reverse-engineer the smallest trigger towards each target, all targets in one batch.

    The optimisation and its settings (``init_cost`` ... ``batch_size``) are described in the module
    docstring and :class:`OptimiserSettings` (:func:`optimise_triggers` takes them as one object).

    Args:
        model: the classifier (any module mapping ``(N, C, H, W)`` to logits ``(N, K)``). Its
            weights, gradients and train/eval mode are left as they were.
        x: ``(N, C, H, W)`` clean images in [0, 1].
        y: ``(N,)`` their labels; images of a job's own target are left out of its loss and
            attack success. None uses the model's predictions.
        targets: the target label of each job (default: every label, ``0..K-1``).
        sources: optional source label of each job (as many as ``targets``, which must then be
            given, ``sources[j] != targets[j]``): job ``j`` then optimises over the images of
            label ``sources[j]`` only (its loss and attack success), each of which must occur in
            ``y``. None: each job uses every image of another label than its target.
        region: optional fixed region ``(H, W)`` or ``(J, H, W)`` in [0, 1] multiplied into the
            mask, so the mask is zero outside it.
        seed: seeds the initial masks and patterns (uniform in [0, 1]) and the mini-batches
            (None: fresh entropy).
        device: where to compute (default: the model's device).
        callback: called after each epoch with per-job figures (progress).

    Returns:
        :class:`ReversedTriggers` (CPU tensors): masks ``(J, H, W)``, patterns ``(J, C, H, W)``.
    """
    settings = OptimiserSettings(
        init_cost=init_cost, lr=lr, betas=betas, epochs=epochs, steps_per_epoch=steps_per_epoch,
        samples_per_step=samples_per_step, attack_succ_threshold=attack_succ_threshold, patience=patience,
        cost_multiplier=cost_multiplier, early_stop=early_stop, early_stop_threshold=early_stop_threshold,
        early_stop_patience=early_stop_patience, epsilon=epsilon, mode=mode, schedule=schedule,
        halving_first=halving_first, halving_eta=halving_eta, halving_keep=halving_keep, batch_size=batch_size)
    return optimise_triggers(model, x, y, settings, targets=targets, sources=sources, region=region, seed=seed,
                             device=device, callback=callback)


def optimise_triggers(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, settings: OptimiserSettings, *,
                      targets: Sequence[int] | torch.Tensor | None = None,
                      sources: Sequence[int] | torch.Tensor | None = None, region: torch.Tensor | None = None,
                      seed: int | None = 0, device: DeviceLike = None,
                      callback: Callback | None = None) -> ReversedTriggers:
    """:func:`reverse_engineer_triggers` with its settings as one :class:`OptimiserSettings`."""
    t0 = time.perf_counter()
    x = check_images(x, name="clean images")
    settings.check()
    dev = model_device(model, device)
    n, c, h, w = x.shape
    if sources is not None and targets is None:
        raise ConfigError("source-restricted jobs need their targets: pass targets with sources")
    y, tg, k = _labels_and_targets(model, x, y, targets, settings.batch_size, dev)
    jn = tg.numel()
    src = None if sources is None else _check_sources(sources, tg, y, k)
    reg = _check_region(region, jn, h, w)
    if src is None:
        for t in tg.tolist():
            if not bool((y != t).any()):
                raise DataError(f"no clean image has a label other than {t}; Neural Cleanse needs images of "
                                "other labels")
    g = generator(seed)
    mask0 = torch.rand(jn, 1, h, w, generator=g)
    pattern0 = torch.rand(jn, c, h, w, generator=g)
    data_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    # one stream per distinct source, seeded in sorted-source order
    source_seeds = None if src is None else torch.randint(0, 2**62, (int(src.unique().numel()),), generator=g).tolist()
    st = _optimise_jobs(model, x, y, _init_state(tg, reg, mask0, pattern0, settings, dev, src), settings,
                        data_seed=data_seed, dev=dev, callback=callback, source_seeds=source_seeds)
    masks = st.best_m[:, 0].detach().float().cpu().clamp(0, 1)
    return ReversedTriggers(targets=tg.clone(), masks=masks, patterns=st.best_p.detach().float().cpu().clamp(0, 1),
                            l1_norms=masks.abs().sum((1, 2)), reached=torch.isfinite(st.reg_best).cpu(),
                            attack_success=st.best_asr.float().cpu(), epochs=st.epochs_run.cpu(),
                            costs=st.cost.float().cpu(), image_passes=int(st.passes), dropped=st.dropped.cpu(),
                            norm_trace=st.trace[:int(st.epochs_run.max()) if jn else 0],
                            seconds=time.perf_counter() - t0, sources=None if src is None else src.clone())


def reverse_pairs(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, settings: OptimiserSettings, *,
                  pairs: Sequence[tuple[int, int]] | torch.Tensor | None = None, seed: int | None = 0,
                  device: DeviceLike = None, callback: Callback | None = None) -> ReversedTriggers:
    """Reverse the smallest trigger for each ``(source, target)`` pair, all pairs in one batch.

    Job ``j`` is the source-restricted job of :func:`optimise_triggers` for ``pairs[j] = (s, t)``:
    the smallest mask and pattern sending the clean images of label ``s`` to ``t``. A backdoor
    that only some sources obey (source-specific) or that maps each label to another
    (all-to-all) needs no small per-target trigger, but small triggers for its own pairs.

    Args:
        model, x, y, settings, seed, device, callback: as :func:`optimise_triggers`. With
            ``K(K - 1)`` jobs, ``settings.schedule="halving"`` keeps the cost near one label scan.
        pairs: ``(P, 2)`` ``(source, target)`` pairs, ``source != target``, each source occurring
            in ``y``; default: every ordered pair of distinct labels in row-major order
            (``(0, 1), (0, 2), ..., (K-1, K-2)``).

    Returns:
        :class:`ReversedTriggers` with ``sources`` and ``targets`` the pairs'; :func:`pair_matrix`
        lays any of its per-job figures out as a ``(K, K)`` matrix.
    """
    if pairs is None:
        k = _num_labels(model, check_images(x, name="clean images"), model_device(model, device))
        pr = torch.tensor([(s, t) for s in range(k) for t in range(k) if s != t], dtype=torch.long).reshape(-1, 2)
    else:
        pr = torch.as_tensor(pairs, dtype=torch.long)
        if pr.ndim != 2 or pr.shape[1] != 2:
            raise ConfigError(f"pairs must be (source, target) pairs of shape (P, 2), got shape {tuple(pr.shape)}")
    if pr.shape[0] == 0:
        raise ConfigError("no (source, target) pairs to reverse-engineer")
    return optimise_triggers(model, x, y, settings, targets=pr[:, 1], sources=pr[:, 0], seed=seed, device=device,
                             callback=callback)


def pair_matrix(rev: ReversedTriggers, num_classes: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """``(K, K)`` float64: entry ``[s, t]`` is pair ``(s, t)``'s ``values`` (default: its ``l1_norms``),
    NaN on the diagonal and for pairs ``rev`` did not run (each pair may occur once).

    Example:
        >>> rev = ReversedTriggers(targets=torch.tensor([1, 0]), sources=torch.tensor([0, 1]),
        ...     masks=torch.zeros(2, 1, 1), patterns=torch.zeros(2, 1, 1, 1), l1_norms=torch.tensor([3.0, 4.0]),
        ...     reached=torch.ones(2, dtype=torch.bool), attack_success=torch.ones(2),
        ...     epochs=torch.ones(2, dtype=torch.long), costs=torch.zeros(2))
        >>> pair_matrix(rev, 3).tolist()
        [[nan, 3.0, nan], [4.0, nan, nan], [nan, nan, nan]]
    """
    if rev.sources is None:
        raise ConfigError("pair_matrix needs source-restricted jobs (ReversedTriggers.sources)")
    v = torch.as_tensor(rev.l1_norms if values is None else values, dtype=torch.float64).flatten()
    if v.numel() != len(rev):
        raise ConfigError(f"pair_matrix needs one value per job ({len(rev)}), got {v.numel()}")
    flat = rev.sources * num_classes + rev.targets
    if int(flat.unique().numel()) != len(rev):
        raise ConfigError("pair_matrix needs each (source, target) pair once")
    out = torch.full((num_classes, num_classes), math.nan, dtype=torch.float64)
    out[rev.sources, rev.targets] = v
    out.fill_diagonal_(math.nan)
    return out


def _labels_and_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                        targets: Sequence[int] | torch.Tensor | None, batch_size: int,
                        dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The checked labels (the model's predictions when ``y`` is None), the jobs' targets and
    the label count ``K``."""
    n = x.shape[0]
    with eval_mode(model), torch.inference_mode():
        k = int(model(x[:1].to(dev)).shape[1])
        if y is None:
            y = predict(model, x, batch_size=max(batch_size, 1), device=dev)
    y = check_labels(y, n, k, name="clean labels")
    tg = torch.arange(k) if targets is None else torch.as_tensor(targets, dtype=torch.long).flatten()
    if tg.numel() == 0:
        raise ConfigError("no target labels to reverse-engineer")
    if int(tg.min()) < 0 or int(tg.max()) >= k:
        raise ConfigError(f"target labels must lie in [0, {k}), got {tg.tolist()}")
    return y, tg, k


def _num_labels(model: nn.Module, x: torch.Tensor, dev: torch.device) -> int:
    """``K``, the width of the model's output on one image."""
    with eval_mode(model), torch.inference_mode():
        return int(model(x[:1].to(dev)).shape[1])


def _check_sources(sources: Sequence[int] | torch.Tensor, tg: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The checked ``(J,)`` source labels of source-restricted jobs."""
    src = torch.as_tensor(sources, dtype=torch.long).flatten()
    if src.numel() != tg.numel():
        raise ConfigError(f"sources must give one label per target: {src.numel()} sources for {tg.numel()} targets")
    if int(src.min()) < 0 or int(src.max()) >= k:
        raise ConfigError(f"source labels must lie in [0, {k}), got {src.tolist()}")
    same = (src == tg).nonzero().flatten().tolist()
    if same:
        raise ConfigError(f"a job's source must differ from its target; jobs {same} have source == target")
    present = set(y.unique().tolist())
    missing = sorted(set(src.tolist()) - present)
    if missing:
        raise DataError(f"no clean image has the source label(s) {missing}; a source-restricted job needs images "
                        f"of its source (labels present: {sorted(present)})")
    return src


def _check_region(region: torch.Tensor | None, jn: int, h: int, w: int) -> torch.Tensor:
    if region is None:
        return torch.ones(jn, 1, h, w)
    if not isinstance(region, torch.Tensor):
        raise ConfigError(f"region must be a tensor (H, W) or (J, H, W), got {type(region).__name__}")
    r = region.detach().float().cpu()
    if r.ndim == 2 and tuple(r.shape) == (h, w):
        r = r.expand(jn, h, w)
    if tuple(r.shape) != (jn, h, w):
        raise ConfigError(f"region must have shape ({h}, {w}) or ({jn}, {h}, {w}), got {tuple(region.shape)}")
    if not torch.isfinite(r).all() or float(r.min()) < 0 or float(r.max()) > 1:
        raise ConfigError("region values must lie in [0, 1]")
    return r[:, None].contiguous()
