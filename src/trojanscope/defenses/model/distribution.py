"""Modelling the distribution of valid triggers: the max-entropy staircase approximator (MESA).

Reverse-engineering one trigger by gradient descent finds one point of a set of valid triggers;
repairing against it leaves the rest. MESA (Qiao, Yang, Li, NeurIPS 2019) models the whole set:

* a trigger ``x`` is *valid* at level ``beta`` when its attack success ``ASR(x)`` (clean inputs
  of other labels sent to the target) exceeds ``beta``; the staircase has ``N`` levels
  ``beta_i = i / N`` (``i = 0 .. N-1``) and sets ``X_i = {x : ASR(x) > beta_i}``;
* for each level a generator ``G_i`` (noise ``z`` to a trigger patch) maximises the entropy of
  its output while staying in ``X_i``:

      L_i = -alpha * I(G_i(z); z) + max(0, beta_i - F(G_i(z)))

  where ``I`` is estimated by a statistics network ``T_i`` with the Donsker-Varadhan bound of
  MINE (Belghazi et al. 2018) and ``F`` is the *testing function*, a differentiable stand-in
  for ASR: the mean probability of the target on stamped clean inputs, ``E_x exp(-CE)``
  (:func:`testing_function`). For a deterministic generator ``h(G(z) | z) = 0``, so
  ``I(G(z); z) = h(G(z))``: maximising the estimate maximises the entropy;
* the generators form an ensemble. The density ``p(x) ∝ psi(ASR(x))`` is approximated by the
  staircase ``sum_i (psi(beta_{i+1}) - psi(beta_i)) 1[x in X_i]`` and each ``G_i`` is uniform on
  ``X_i`` (density ``exp(-h_i)``), so level ``i`` has weight
  ``pi_i ∝ (psi(beta_{i+1}) - psi(beta_i)) exp(h_i)`` (:func:`ensemble_weights`): the entropies
  reached and the shape ``psi`` of the ASR function.

All ``N`` generators and statistics networks are trained at once (batched weights ``(N, ...)``),
and every trigger of a step is stamped onto every image of the step in one broadcast. Per
generator step the statistics networks take ``critic_steps`` MINE steps on ``mine_batch`` fresh
noise samples (cheap: no model in the loop), so the MI estimate, and with it the entropy
gradient, is there from the first few dozen steps.

:class:`~trojanscope.defenses.repair.distribution_unlearning.DistributionUnlearning` (the
repair ``"distribution-unlearn"``) fine-tunes the model on clean data where a share of the samples carry triggers sampled from the
distribution, with their true labels. The patches are fitted at one place, found by a
moving-window search to a pixel or two; taking the place as part of the trigger, the repair
stamps each sampled trigger at a place drawn uniformly from those near the located one where the
samples stay valid (:meth:`TriggerDistribution.place_success`); the paper stamps at random places.

References:
    Qiao, Yang, Li. "Defending Neural Backdoors via Generative Distribution Modeling".
    NeurIPS 2019. https://arxiv.org/abs/1910.04749
    Belghazi et al. "Mutual Information Neural Estimation". ICML 2018. https://arxiv.org/abs/1801.04062
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..._utils.batching import DeviceLike, eval_mode, generator, model_device
from ..._utils.results import Result, not_serialised
from ..._utils.validation import Interval, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError, NotFittedError
from ...triggers import Trigger, TriggerBatch
from ..base import Explainer, register
from ._mesa_kernels import (BatchedMLP, _Networks, dv_bound, ensemble_weights, stamp, staircase_levels,
                            testing_function, trigger_success)

log = logging.getLogger(__name__)
_generator = generator  # sample_tensors' own argument is called generator


# --- the distribution -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledTriggers(Result):
    """A batch of sampled triggers.

    Attributes:
        masks: ``(n, H, W)``; patterns: ``(n, C, H, W)``; levels: ``(n,)`` the level of each;
        places: ``(n, 2)`` the top-left corner of each patch.
    """

    masks: torch.Tensor
    patterns: torch.Tensor
    levels: torch.Tensor
    places: torch.Tensor

    def __len__(self) -> int:
        return int(self.levels.numel())

    def batch(self, target: int) -> TriggerBatch:
        """The samples as a :class:`~trojanscope.triggers.TriggerBatch` towards ``target``."""
        return TriggerBatch(self.masks, self.patterns, torch.full((len(self),), int(target)),
                            tuple(f"mesa:level{int(v)}" for v in self.levels))

    def triggers(self) -> list[Trigger]:
        return list(self.batch(-1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributionReport(Result):
    """How well each level's samples meet their threshold.

    Attributes:
        betas: ``(N,)`` thresholds; entropies: ``(N,)`` entropies reached (MINE estimates, nats);
        weights: ``(N,)`` ensemble weights; asr: ``(N, n)`` attack success of ``n`` samples per
        level on the given clean data; valid_share: ``(N,)`` share of samples with ASR > beta;
        position, trigger_size: where and how large the fitted patch is; params: the estimator's
        settings; seconds: wall time of :meth:`TriggerDistribution.explain`; distribution: the
        fitted :class:`TriggerDistribution` itself (not part of :meth:`to_dict`).
    """

    target: int
    betas: torch.Tensor
    entropies: torch.Tensor
    weights: torch.Tensor
    asr: torch.Tensor
    valid_share: torch.Tensor
    position: tuple[int, int]
    trigger_size: int
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    #: the fitted estimator (not serialised), so that a repair can reuse it without refitting
    distribution: "TriggerDistribution | None" = not_serialised(default=None, repr=False, compare=False)


@register("trigger-distribution")
class TriggerDistribution(Explainer):
    """The max-entropy staircase approximator (MESA) of the valid triggers for one target.

    ``explain(model, clean_data, target)`` fits it (the state stays on the estimator, so that
    :meth:`sample`, :meth:`sample_tensors`, :meth:`report` ... work afterwards) and returns its
    :class:`DistributionReport`.

    Args:
        n_levels: ``N``, the number of staircase levels ``beta_i = i / N``.
        alpha: ``alpha``, the weight of the entropy (mutual information) term.
        trigger_size: the side ``s`` of the square trigger patch (3 in the paper; 3 to 5 on 28x28).
        transparency: also generate a transparency ``a`` per pixel of the patch
            (``x' = (1 - a) x + a p``); False stamps opaque patches (the paper).
        position: ``(row, col)`` of the patch's top-left corner; None locates it from the model
            with a moving-window search of size ``trigger_size``
            (:func:`~trojanscope.defenses.model.heatmap.locate_trigger`).
        noise_dim: the dimension of the generators' noise ``z ~ N(0, I)``.
        hidden: the width of the generators and statistics networks (two hidden layers each).
        steps: optimisation steps (all levels at once).
        lr: Adam's learning rate for the generators and the statistics networks.
        samples_per_step: ``M``, triggers drawn per level and step (also MINE's batch).
        images_per_step: ``B``, clean images each trigger is stamped on per step.
        shape_power: the exponent of ``psi(a) = a ** shape_power``, the density's shape as a
            function of ASR, used by the ensemble weights.
        ema_rate: the rate of MINE's moving average (bias-corrected gradient).
        mine_batch: noise samples per level and step for the MI term (the joint and the shuffled
            marginal pairs). The generators and statistics networks are small MLPs, so this costs
            little; only the first ``samples_per_step`` of them are stamped and tested on the model.
        critic_steps: statistics-network updates per generator step (the statistics networks
            must learn faster than the generators move, or the MI estimate, and with it the
            entropy gradient, stays at 0 and the generators collapse to a point).
        batch_size: the most stamped images in one forward pass (the memory knob).
        seed: seeds the networks, the noise and the image batches (None: fresh entropy).
        device: where to compute (default: the model's device).

    Example:
        >>> import torch
        >>> from trojanscope.data import load_digits
        >>> import sys; sys.path.insert(0, "tests")
        >>> from _models import PlantedPatchNet  # tests/_models.py: a hand-weighted planted net
        >>> d = load_digits("val")
        >>> net = PlantedPatchNet(d.x, d.y, 10, target=0, patch=3)
        >>> dist = TriggerDistribution(n_levels=2, trigger_size=3, position=(5, 5), steps=2)
        >>> dist.explain(net, d, 0).valid_share.shape
        torch.Size([2])
        >>> dist.sample_tensors(4).patterns.shape
        torch.Size([4, 1, 8, 8])

    References:
        Qiao, Yang, Li. "Defending Neural Backdoors via Generative Distribution Modeling".
        NeurIPS 2019. https://arxiv.org/abs/1910.04749
    """

    needs_gradients: ClassVar[bool] = True
    places_trigger: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "n_levels": Interval(int, 1, None), "alpha": Interval(float, 0, None),
        "trigger_size": Interval(int, 1, None), "transparency": Types((bool,)),
        "position": Types((tuple, list, type(None))), "noise_dim": Interval(int, 1, None),
        "hidden": Interval(int, 1, None), "steps": Interval(int, 0, None), "lr": Interval(float, 0, None, "neither"),
        "samples_per_step": Interval(int, 2, None), "images_per_step": Interval(int, 1, None),
        "shape_power": Interval(float, 0, None, "neither"), "ema_rate": Interval(float, 0, 1, "right"),
        "mine_batch": Interval(int, 2, None), "critic_steps": Interval(int, 1, None),
        "batch_size": Interval(int, 1, None), "seed": Types((int, type(None))),
    }

    def __init__(self, *, n_levels: int = 10, alpha: float = 0.1, trigger_size: int = 3, transparency: bool = False,
                 position: tuple[int, int] | None = None, noise_dim: int = 32, hidden: int = 128, steps: int = 400,
                 lr: float = 1e-3, samples_per_step: int = 16, images_per_step: int = 16, shape_power: float = 1.0,
                 ema_rate: float = 0.01, mine_batch: int = 64, critic_steps: int = 5, batch_size: int = 4096,
                 seed: int | None = 0, device: DeviceLike = None) -> None:
        self.n_levels = n_levels
        self.alpha = alpha
        self.trigger_size = trigger_size
        self.transparency = transparency
        self.position = position
        self.noise_dim = noise_dim
        self.hidden = hidden
        self.steps = steps
        self.lr = lr
        self.samples_per_step = samples_per_step
        self.images_per_step = images_per_step
        self.shape_power = shape_power
        self.ema_rate = ema_rate
        self.mine_batch = mine_batch
        self.critic_steps = critic_steps
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    # --- fitting ------------------------------------------------------------------------------
    def _explain(self, model: nn.Module, clean_data: ImageDataset, target: int, *,
                 callback: Callable[[dict[str, Any]], None] | None) -> DistributionReport:
        """Fit the distribution for ``target`` (the state stays on ``self``) and report it.

        Sets ``betas_``, ``generators_``, ``statistics_``, ``entropies_``, ``weights_``,
        ``position_``, ``image_shape_``, ``target_`` and ``history_`` (one dict per step with
        the mean testing function and MI estimate per level), then returns :meth:`report` (100
        samples per level, seeded with ``seed``).
        """
        x = self._setup(model, clean_data, target)
        nets = _Networks.build(self, model_device(model, self.device))
        log.info("fitting %d generators for label %d: a %dx%d trigger at %s, %d steps", self.n_levels, target,
                 self.trigger_size, self.trigger_size, self.position_, self.steps)
        req = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        from ..._utils.progress import progress

        bar = progress(total=self.steps, desc=f"trigger distribution (label {target})", unit="step")
        history: list[dict[str, Any]] = []
        try:
            with eval_mode(model):
                for step in range(self.steps):
                    history.append(self._step(model, x, nets, step))
                    bar.update(1)
                    if callback is not None:
                        callback(history[-1])
                    if (step + 1) % 50 == 0:
                        log.info("step %d: F %s, I %s", step + 1, [round(v, 3) for v in history[-1]["F"]],
                                 [round(v, 2) for v in history[-1]["mi"]])
                ent = nets.entropies()
        finally:
            bar.close()
            for p, r in zip(model.parameters(), req):
                p.requires_grad_(r)
        self.generators_ = nets.gen.eval()
        self.statistics_ = nets.stat.eval()
        self.betas_ = nets.betas.cpu()
        self.entropies_ = ent.cpu()
        self.weights_ = ensemble_weights(self.entropies_, self.betas_, self.shape_power)
        self.history_ = history
        return self.report(model, clean_data, seed=self.seed)

    def _setup(self, model: nn.Module, clean_data: ImageDataset, target: int) -> torch.Tensor:
        """Check the target and the patch, set ``position_`` / ``image_shape_`` / ``target_``;
        returns the clean images of other labels."""
        x_all = check_images(clean_data.x, name="clean images")
        c, h, w = clean_data.image_shape
        k = clean_data.num_classes
        if not isinstance(target, int) or not 0 <= target < k:
            raise ConfigError(f"target must be a label in [0, {k}), got {target!r}")
        x = x_all[clean_data.y != target]
        if x.shape[0] == 0:
            raise DataError(f"no clean image has a label other than the target {target}")
        s = self.trigger_size
        if s > min(h, w):
            raise ConfigError(f"a {s}x{s} trigger does not fit in {h}x{w} images")
        if self.position is None:
            from .heatmap import locate_trigger

            log.info("no position given: locating the trigger for label %d with a moving-window search", target)
            pos = locate_trigger(model, clean_data, target, s, seed=self.seed, device=model_device(model, self.device))
        else:
            if len(self.position) != 2:
                raise ConfigError(f"position must be (row, col), got {self.position!r}")
            pos = (int(self.position[0]), int(self.position[1]))
            if not (0 <= pos[0] <= h - s and 0 <= pos[1] <= w - s):
                raise ConfigError(f"position {self.position!r} does not fit a {s}x{s} trigger in {h}x{w} images")
        self.position_ = pos
        self.image_shape_ = (c, h, w)
        self.target_ = target
        return x

    def _step(self, model: nn.Module, x: torch.Tensor, nets: "_Networks", step: int) -> dict[str, Any]:
        """One generator step (after ``critic_steps`` statistics-network steps); its history row."""
        # statistics networks: maximise the DV bound on I(G(z); z) with MINE's moving-average
        # (bias-corrected) gradient; the generators are fixed and cheap, so the networks take
        # several steps on fresh noise per generator step
        for _ in range(self.critic_steps):
            nets.critic_step(self.ema_rate)
        # generators: -alpha * I + max(0, beta_i - F(G_i(z))); the MI term on the whole noise
        # batch (same corrected gradient), F on its first M samples
        n, m, d = self.n_levels, self.samples_per_step, self.noise_dim
        z = torch.randn(n, nets.mb, d, generator=nets.g).to(nets.dev)
        out = torch.sigmoid(nets.gen(z))                                     # (N, mb, D)
        tj, tm = nets.critic(out, z)
        et = tm.exp().mean(1)
        mi = dv_bound(tj, tm)
        mi_grad = tj.mean(1) - et / nets.ema
        idx = torch.randint(0, x.shape[0], (self.images_per_step,), generator=nets.g)
        xb = x[idx].to(nets.dev)
        masks, patterns = self._expand(out[:, :m].reshape(n * m, -1))
        f = self._testing(model, xb, masks, patterns).reshape(n, m)
        penalty = F.relu(nets.betas[:, None] - f).mean(1)
        loss_g = (-self.alpha * mi_grad + penalty).sum()
        nets.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        nets.opt_g.step()
        return {"step": step + 1, "F": f.detach().mean(1).cpu().tolist(), "mi": mi.detach().cpu().tolist(),
                "penalty": penalty.detach().cpu().tolist()}

    def _testing(self, model: nn.Module, xb: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
        per = max(1, self.batch_size // xb.shape[0])
        return torch.cat([testing_function(model, xb, masks[i:i + per], patterns[i:i + per], self.target_)
                          for i in range(0, masks.shape[0], per)])

    def _expand(self, out: torch.Tensor, places: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator outputs ``(n, D)`` to full-size masks ``(n, H, W)`` and patterns ``(n, C, H, W)``.

        ``places`` ``(n, 2)`` puts each patch's top-left corner there; None puts all at ``position_``.
        """
        c, h, w = self.image_shape_
        s = self.trigger_size
        nn_ = out.shape[0]
        patch = out[:, :c * s * s].reshape(nn_, c, s, s)
        a = out[:, c * s * s:].reshape(nn_, s, s) if self.transparency else torch.ones(nn_, s, s, device=out.device)
        if places is None:
            r, q = self.position_
            pad = (q, w - q - s, r, h - r - s)
            return F.pad(a, pad), F.pad(patch, pad)
        places = places.to(out.device)
        ar = torch.arange(s, device=out.device)
        i = torch.arange(nn_, device=out.device)[:, None, None]
        rows = (places[:, 0, None] + ar)[:, :, None]                              # (n, s, 1)
        cols = (places[:, 1, None] + ar)[:, None, :]                              # (n, 1, s)
        masks = out.new_zeros(nn_, h, w)
        masks[i, rows, cols] = a
        patterns = out.new_zeros(nn_, h, w, c)
        patterns[i, rows, cols] = patch.permute(0, 2, 3, 1)
        return masks, patterns.permute(0, 3, 1, 2).contiguous()

    def places_within(self, radius: int) -> torch.Tensor:
        """``(k, 2)`` every top-left corner within ``radius`` pixels (each axis) of ``position_``
        whose patch lies inside the image, ``position_`` first."""
        self._check_fitted()
        if not isinstance(radius, int) or radius < 0:
            raise ConfigError(f"radius must be an int >= 0, got {radius!r}")
        _, h, w = self.image_shape_
        s, (r, q) = self.trigger_size, self.position_
        rows = torch.arange(max(0, r - radius), min(h - s, r + radius) + 1)
        cols = torch.arange(max(0, q - radius), min(w - s, q + radius) + 1)
        grid = torch.cartesian_prod(rows, cols)
        here = (grid == torch.tensor([r, q])).all(1)
        return torch.cat([grid[here], grid[~here]])

    # --- sampling -----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "generators_"):
            raise NotFittedError("TriggerDistribution is not fitted yet: call explain(model, clean_data, target) first")

    def sample_tensors(self, n: int, *, level: int | None = None, min_beta: float = 0.0,
                       places: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       seed: int | None = 0) -> SampledTriggers:
        """Draw ``n`` triggers as tensors (CPU).

        Args:
            n: how many.
            level: draw all from generator ``G_level``; None draws each trigger's level from the
                ensemble weights, restricted to levels with ``beta_i >= min_beta``.
            min_beta: the lowest level the ensemble may draw from.
            places: ``(k, 2)`` top-left corners; each trigger goes to one drawn uniformly (e.g.
                :meth:`places_within` or :meth:`valid_places`). None puts all at ``position_``.
            generator, seed: the random source (a generator wins over a seed; seed None: fresh entropy).
        """
        self._check_fitted()
        if n < 0:
            raise ConfigError(f"n must be >= 0, got {n}")
        if places is not None:
            places = torch.as_tensor(places, dtype=torch.long).reshape(-1, 2)
            _, h, w = self.image_shape_
            s = self.trigger_size
            if places.shape[0] == 0 or places.min() < 0 or (places[:, 0] > h - s).any() or (places[:, 1] > w - s).any():
                raise ConfigError(f"places must be a non-empty (k, 2) set of corners of {s}x{s} patches in {h}x{w} images")
        g = generator if generator is not None else _generator(seed)
        nl = self.n_levels
        if level is not None:
            if not 0 <= level < nl:
                raise ConfigError(f"level must be in [0, {nl}), got {level}")
            levels = torch.full((n,), int(level), dtype=torch.long)
        else:
            w = self.weights_.double() * (self.betas_ >= min_beta - 1e-9).double()
            if float(w.sum()) <= 0:
                raise ConfigError(f"no level has beta >= {min_beta}")
            levels = torch.multinomial(w / w.sum(), n, replacement=True, generator=g) if n else \
                torch.empty(0, dtype=torch.long)
        dev = self.generators_.weights[0].device
        z = torch.randn(n, self.noise_dim, generator=g).to(dev)
        with torch.no_grad():
            out = torch.sigmoid(self.generators_(z[None].expand(nl, -1, -1)))     # (N, n, D)
            out = out[levels.to(dev), torch.arange(n, device=dev)]
            at = None if places is None else places[torch.randint(0, places.shape[0], (n,), generator=g)]
            masks, patterns = self._expand(out, at)
        if at is None:
            at = torch.tensor([self.position_], dtype=torch.long).expand(n, 2)
        return SampledTriggers(masks=masks.cpu(), patterns=patterns.cpu(), levels=levels, places=at.clone())

    def sample(self, n: int, **kwargs: Any) -> list[Trigger]:
        """Draw ``n`` triggers as :class:`Trigger` objects (see :meth:`sample_tensors`)."""
        return self.sample_tensors(n, **kwargs).triggers()

    # --- evaluation ---------------------------------------------------------------------------
    def place_success(self, model: nn.Module, clean_data: ImageDataset, places: torch.Tensor, *, n: int = 8,
                      min_beta: float = 0.0, n_images: int = 64, seed: int | None = 0) -> torch.Tensor:
        """Mean attack success of the same ``n`` sampled triggers moved to each of ``places``.

        The distribution is fitted at ``position_``, found to a pixel or two by a moving-window
        search. Taking the place as part of the trigger, a place is valid at level ``beta`` when
        the triggers still succeed there; this measures it on ``n_images`` clean non-target images.

        Shape:
            places ``(K, 2)`` top-left corners; returns ``(K,)``.
        """
        self._check_fitted()
        places = torch.as_tensor(places, dtype=torch.long).reshape(-1, 2)
        x = clean_data.x[clean_data.y != self.target_]
        if x.shape[0] == 0:
            raise DataError(f"no clean image has a label other than the target {self.target_}")
        g = generator(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:n_images]]
        st = self.sample_tensors(n, min_beta=min_beta, generator=g)
        c, _, _ = self.image_shape_
        s, (r, q) = self.trigger_size, self.position_
        patch = st.patterns[:, :, r:r + s, q:q + s].reshape(n, -1)
        if self.transparency:
            patch = torch.cat([patch, st.masks[:, r:r + s, q:q + s].reshape(n, -1)], 1)
        k = places.shape[0]
        masks, patterns = self._expand(patch.repeat(k, 1), places.repeat_interleave(n, 0))
        asr = trigger_success(model, x, masks, patterns, self.target_, batch_size=self.batch_size)
        return asr.reshape(k, n).mean(1)

    def report(self, model: nn.Module, clean_data: ImageDataset, *, n: int = 100, seed: int | None = 0) -> DistributionReport:
        """Attack success of ``n`` samples of every level on ``clean_data`` (its non-target images)."""
        self._check_fitted()
        x = clean_data.x[clean_data.y != self.target_]
        if x.shape[0] == 0:
            raise DataError(f"no clean image has a label other than the target {self.target_}")
        g = generator(seed)
        rows = [self.sample_tensors(n, level=i, generator=g) for i in range(self.n_levels)]
        masks = torch.cat([r.masks for r in rows])
        patterns = torch.cat([r.patterns for r in rows])
        asr = trigger_success(model, x, masks, patterns, self.target_, batch_size=self.batch_size)
        asr = asr.reshape(self.n_levels, n)
        return DistributionReport(target=self.target_, betas=self.betas_, entropies=self.entropies_,
                                  weights=self.weights_, asr=asr, valid_share=(asr > self.betas_[:, None]).float().mean(1),
                                  position=self.position_, trigger_size=self.trigger_size, distribution=self)


__all__ = ["BatchedMLP", "DistributionReport", "SampledTriggers", "TriggerDistribution", "dv_bound",
           "ensemble_weights", "stamp", "staircase_levels", "testing_function", "trigger_success"]
