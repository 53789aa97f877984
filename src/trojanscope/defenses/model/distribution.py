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

:class:`DistributionUnlearning` (registered as the repair ``"distribution-unlearn"``) fine-tunes
the model on clean data where a share of the samples carry triggers sampled from the
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

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..._utils.batching import DeviceLike, eval_mode, model_device
from ..._utils.results import Result
from ..._utils.validation import Interval, Types, check_images
from ...data.dataset import ImageDataset
from ...errors import ConfigError, DataError, NotFittedError
from ...training import train
from ...triggers import Trigger
from ..base import Defense, Repair, RepairResult, register

log = logging.getLogger(__name__)


# --- pure kernels -----------------------------------------------------------------------------

def staircase_levels(n_levels: int) -> torch.Tensor:
    """The staircase thresholds ``beta_i = i / N`` for ``i = 0 .. N-1``.

    Example:
        >>> staircase_levels(4).tolist()
        [0.0, 0.25, 0.5, 0.75]
    """
    if n_levels < 1:
        raise ConfigError(f"n_levels must be >= 1, got {n_levels}")
    return torch.arange(n_levels, dtype=torch.float32) / n_levels


def ensemble_weights(entropies: torch.Tensor, betas: torch.Tensor, shape_power: float = 1.0) -> torch.Tensor:
    """Mixture weights of the staircase generators.

    With the density ``p(x) ∝ psi(ASR(x))``, ``psi(a) = a ** shape_power``, the staircase puts
    height ``psi(beta_{i+1}) - psi(beta_i)`` (``beta_N = 1``) on the set ``X_i``, whose volume is
    ``exp(h_i)`` when ``G_i`` is uniform on it. So ``pi_i ∝ (psi(beta_{i+1}) - psi(beta_i)) exp(h_i)``,
    computed in log space (float64).

    Args:
        entropies: ``(N,)`` the entropies ``h_i`` reached (nats).
        betas: ``(N,)`` increasing thresholds.
        shape_power: the exponent of ``psi``.

    Example:
        >>> ensemble_weights(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.5])).tolist()
        [0.5, 0.5]
        >>> w = ensemble_weights(torch.tensor([math.log(3), 0.0]), torch.tensor([0.0, 0.5]))
        >>> [round(v, 4) for v in w.tolist()]
        [0.75, 0.25]
    """
    h = torch.as_tensor(entropies, dtype=torch.float64)
    b = torch.as_tensor(betas, dtype=torch.float64)
    if h.shape != b.shape or h.ndim != 1:
        raise ConfigError(f"entropies {tuple(h.shape)} and betas {tuple(b.shape)} must be (N,) vectors")
    edges = torch.cat([b, torch.ones(1, dtype=torch.float64)])
    steps = edges.clamp(0, 1).pow(shape_power).diff()
    logw = steps.clamp_min(1e-300).log() + h
    return torch.softmax(logw, 0).float()


def stamp(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Stamp ``n`` triggers onto ``B`` images in one broadcast: ``(1 - m) x + m p``.

    Shape:
        x: ``(B, C, H, W)``; masks: ``(n, H, W)``; patterns: ``(n, C, H, W)``;
        returns ``(n, B, C, H, W)``.
    """
    m = masks[:, None, None]                                   # (n, 1, 1, H, W)
    return (1 - m) * x[None] + m * patterns[:, None]


def testing_function(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor,
                     target: int) -> torch.Tensor:
    """The testing function ``F``: a differentiable stand-in for each trigger's attack success.

    ``F(trigger) = mean_b exp(-CE(f(stamp(x_b)), target))``, the mean probability of the target
    over the stamped images (one forward pass over all ``n * B`` stamped images). It lies in
    [0, 1] like ASR and meets it when the model is confident.

    Shape:
        x: ``(B, C, H, W)`` clean images (of labels other than ``target``); masks ``(n, H, W)``;
        patterns ``(n, C, H, W)``; returns ``(n,)``.
    """
    xs = stamp(x, masks, patterns)
    n, b = xs.shape[:2]
    logp = F.log_softmax(model(xs.reshape(n * b, *x.shape[1:])).float(), 1)[:, target]
    return logp.reshape(n, b).exp().mean(1)


def dv_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """MINE's Donsker-Varadhan lower bound ``E_joint[T] - log E_marginal[exp T]`` along the last dim.

    Example:
        >>> float(dv_bound(torch.zeros(5), torch.zeros(5)))
        0.0
    """
    m = t_marginal.shape[-1]
    return t_joint.mean(-1) - (torch.logsumexp(t_marginal, -1) - math.log(m))


class BatchedMLP(nn.Module):
    """``N`` independent MLPs evaluated in one batched matrix product.

    Shape:
        input ``(N, M, d_in)``, output ``(N, M, d_out)``.
    """

    def __init__(self, n: int, sizes: Sequence[int], *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(a)
            self.weights.append(nn.Parameter((torch.rand(n, a, b, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(n, 1, b, generator=generator) * 2 - 1) * bound))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.elu(h)
        return h


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

    def triggers(self) -> list[Trigger]:
        return [Trigger(self.masks[i], self.patterns[i], f"mesa:level{int(self.levels[i])}") for i in range(len(self))]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributionReport(Result):
    """How well each level's samples meet their threshold.

    Attributes:
        betas: ``(N,)`` thresholds; entropies: ``(N,)`` entropies reached (MINE estimates, nats);
        weights: ``(N,)`` ensemble weights; asr: ``(N, n)`` attack success of ``n`` samples per
        level on the given clean data; valid_share: ``(N,)`` share of samples with ASR > beta.
    """

    target: int
    betas: torch.Tensor
    entropies: torch.Tensor
    weights: torch.Tensor
    asr: torch.Tensor
    valid_share: torch.Tensor
    position: tuple[int, int]
    trigger_size: int


class TriggerDistribution(Defense):
    """The max-entropy staircase approximator (MESA) of the valid triggers for one target.

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
        critic_steps: statistics-network updates per generator step. With one update on a batch
            of 8 the statistics networks never learn in a few hundred steps: the MI estimate stays
            at 0, the entropy term has no gradient and the generators collapse to a point.
        batch_size: the most stamped images in one forward pass (the memory knob).
        seed: seeds the networks, the noise and the image batches.
        device: where to compute (default: the model's device).

    Example:
        >>> import torch
        >>> from trojanscope.data import load_digits
        >>> import sys; sys.path.insert(0, "tests")
        >>> from _models import PlantedPatchNet  # tests/_models.py: a hand-weighted planted net
        >>> d = load_digits("val")
        >>> net = PlantedPatchNet(d.x, d.y, 10, target=0, patch=3)
        >>> dist = TriggerDistribution(n_levels=2, trigger_size=3, position=(5, 5), steps=2).fit(net, d, 0)
        >>> dist.sample_tensors(4).patterns.shape
        torch.Size([4, 1, 8, 8])

    References:
        Qiao, Yang, Li. "Defending Neural Backdoors via Generative Distribution Modeling".
        NeurIPS 2019. https://arxiv.org/abs/1910.04749
    """

    family: ClassVar[str] = "model"
    needs_gradients: ClassVar[bool] = True
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
    def fit(self, model: nn.Module, clean_data: ImageDataset, target: int) -> "TriggerDistribution":
        """Train the ``N`` generators (and their statistics networks) for ``target``; returns self.

        Sets ``betas_``, ``generators_``, ``statistics_``, ``entropies_``, ``weights_``,
        ``position_``, ``image_shape_``, ``target_`` and ``history_`` (one dict per step with
        the mean testing function and MI estimate per level).
        """
        self._validate_params()
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
        dev = model_device(model, self.device)
        if self.position is None:
            from .heatmap import locate_trigger

            log.info("no position given: locating the trigger for label %d with a moving-window search", target)
            pos = locate_trigger(model, clean_data, target, s, seed=self.seed, device=dev)
        else:
            if len(self.position) != 2:
                raise ConfigError(f"position must be (row, col), got {self.position!r}")
            pos = (int(self.position[0]), int(self.position[1]))
            if not (0 <= pos[0] <= h - s and 0 <= pos[1] <= w - s):
                raise ConfigError(f"position {self.position!r} does not fit a {s}x{s} trigger in {h}x{w} images")
        self.position_ = pos
        self.image_shape_ = (c, h, w)
        self.target_ = target
        n, m, d = self.n_levels, self.samples_per_step, self.noise_dim
        out_dim = (c + int(self.transparency)) * s * s
        g = torch.Generator().manual_seed(0 if self.seed is None else int(self.seed))
        gen = BatchedMLP(n, [d, self.hidden, self.hidden, out_dim], generator=g).to(dev)
        stat = BatchedMLP(n, [out_dim + d, self.hidden, self.hidden, 1], generator=g).to(dev)
        betas = staircase_levels(n).to(dev)
        opt_g = torch.optim.Adam(gen.parameters(), lr=self.lr)
        opt_t = torch.optim.Adam(stat.parameters(), lr=self.lr)
        ema = torch.ones(n, device=dev)
        mb = max(self.mine_batch, m)
        history: list[dict[str, Any]] = []
        req = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)

        def critic(out: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """``T`` on joint pairs ``(G(z), z)`` and on marginal pairs (``z`` shuffled within the batch)."""
            z_marg = z[:, torch.randperm(z.shape[1], generator=g).to(dev)]
            return stat(torch.cat([out, z], -1))[..., 0], stat(torch.cat([out, z_marg], -1))[..., 0]

        from ..._utils.progress import progress

        log.info("fitting %d generators for label %d: a %dx%d trigger at %s, %d steps", n, target, s, s, pos,
                 self.steps)
        bar = progress(total=self.steps, desc=f"trigger distribution (label {target})", unit="step")
        try:
            with eval_mode(model):
                for step in range(self.steps):
                    # statistics networks: maximise the DV bound on I(G(z); z) with MINE's
                    # moving-average (bias-corrected) gradient; the generators are fixed and cheap,
                    # so the networks take several steps on fresh noise per generator step
                    for _ in range(self.critic_steps):
                        zc = torch.randn(n, mb, d, generator=g).to(dev)
                        with torch.no_grad():
                            oc = torch.sigmoid(gen(zc))
                        tj, tm = critic(oc, zc)
                        et = tm.exp().mean(1)
                        ema = (1 - self.ema_rate) * ema + self.ema_rate * et.detach()
                        loss_t = -(tj.mean(1) - et / ema).sum()
                        opt_t.zero_grad(set_to_none=True)
                        loss_t.backward()
                        opt_t.step()
                    # generators: -alpha * I + max(0, beta_i - F(G_i(z))); the MI term on the whole
                    # noise batch (same corrected gradient), F on its first M samples
                    z = torch.randn(n, mb, d, generator=g).to(dev)
                    out = torch.sigmoid(gen(z))                                     # (N, mb, D)
                    tj, tm = critic(out, z)
                    et = tm.exp().mean(1)
                    mi = dv_bound(tj, tm)
                    mi_grad = tj.mean(1) - et / ema
                    idx = torch.randint(0, x.shape[0], (self.images_per_step,), generator=g)
                    xb = x[idx].to(dev)
                    masks, patterns = self._expand(out[:, :m].reshape(n * m, -1))
                    f = self._testing(model, xb, masks, patterns).reshape(n, m)
                    penalty = F.relu(betas[:, None] - f).mean(1)
                    loss_g = (-self.alpha * mi_grad + penalty).sum()
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    history.append({"step": step + 1, "F": f.detach().mean(1).cpu().tolist(),
                                    "mi": mi.detach().cpu().tolist(), "penalty": penalty.detach().cpu().tolist()})
                    bar.update(1)
                    if (step + 1) % 50 == 0:
                        log.info("step %d: F %s, I %s", step + 1, [round(v, 3) for v in history[-1]["F"]],
                                 [round(v, 2) for v in history[-1]["mi"]])
                with torch.no_grad():
                    # the entropies reached: the bound on fresh noise, averaged over a few batches
                    ests = []
                    for _ in range(4):
                        ze = torch.randn(n, 512, d, generator=g).to(dev)
                        ests.append(dv_bound(*critic(torch.sigmoid(gen(ze)), ze)))
                    ent = torch.stack(ests).mean(0)
        finally:
            bar.close()
            for p, r in zip(model.parameters(), req):
                p.requires_grad_(r)
        self.generators_ = gen.eval()
        self.statistics_ = stat.eval()
        self.betas_ = betas.cpu()
        self.entropies_ = ent.cpu()
        self.weights_ = ensemble_weights(self.entropies_, self.betas_, self.shape_power)
        self.history_ = history
        return self

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
            raise NotFittedError("TriggerDistribution is not fitted yet: call fit(model, clean_data, target) first")

    def sample_tensors(self, n: int, *, level: int | None = None, min_beta: float = 0.0,
                       places: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       seed: int | None = None) -> SampledTriggers:
        """Draw ``n`` triggers as tensors (CPU).

        Args:
            n: how many.
            level: draw all from generator ``G_level``; None draws each trigger's level from the
                ensemble weights, restricted to levels with ``beta_i >= min_beta``.
            min_beta: the lowest level the ensemble may draw from.
            places: ``(k, 2)`` top-left corners; each trigger goes to one drawn uniformly (e.g.
                :meth:`places_within` or :meth:`valid_places`). None puts all at ``position_``.
            generator, seed: the random source (a generator wins over a seed).
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
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
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
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
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
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        rows = [self.sample_tensors(n, level=i, generator=g) for i in range(self.n_levels)]
        masks = torch.cat([r.masks for r in rows])
        patterns = torch.cat([r.patterns for r in rows])
        asr = trigger_success(model, x, masks, patterns, self.target_, batch_size=self.batch_size)
        asr = asr.reshape(self.n_levels, n)
        return DistributionReport(target=self.target_, betas=self.betas_, entropies=self.entropies_,
                                  weights=self.weights_, asr=asr, valid_share=(asr > self.betas_[:, None]).float().mean(1),
                                  position=self.position_, trigger_size=self.trigger_size)

    def save_grid(self, path: str | Path, *, n_per_level: int = 10, seed: int | None = 0,
                  report: DistributionReport | None = None) -> Path:
        """Write a PNG grid of samples: one row per level (its beta, weight and, with a report,
        the share of valid samples), one column per sample; each cell shows the patch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._check_fitted()
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        c, _, _ = self.image_shape_
        s, (r, q) = self.trigger_size, self.position_
        fig, axes = plt.subplots(self.n_levels, n_per_level, figsize=(n_per_level * 0.8 + 1.6, self.n_levels * 0.8 + 0.4),
                                 squeeze=False)
        for i in range(self.n_levels):
            st = self.sample_tensors(n_per_level, level=i, generator=g)
            for j in range(n_per_level):
                ax = axes[i, j]
                a = st.masks[j, r:r + s, q:q + s]
                p = st.patterns[j, :, r:r + s, q:q + s]
                img = (1 - a) * 0.5 + a * p                                   # on a grey background
                img = img[0] if c == 1 else img[:3].permute(1, 2, 0)
                ax.imshow(img.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            label = f"β={float(self.betas_[i]):.2f}\nw={float(self.weights_[i]):.2f}"
            if report is not None:
                label += f"\nvalid {100 * float(report.valid_share[i]):.0f}%"
            axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle(f"MESA trigger samples, target {self.target_}, {s}x{s} at {self.position_}", fontsize=9)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out


def trigger_success(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor, target: int,
                    *, batch_size: int = 4096, device: DeviceLike = None) -> torch.Tensor:
    """Attack success (argmax = ``target``) of each of ``n`` triggers over the images ``x``.

    Shape:
        x ``(B, C, H, W)``, masks ``(n, H, W)``, patterns ``(n, C, H, W)``; returns ``(n,)``.
    """
    dev = model_device(model, device)
    b = x.shape[0]
    per_img = max(1, min(b, batch_size))
    per_trig = max(1, batch_size // per_img)
    hits = torch.zeros(masks.shape[0])
    with eval_mode(model), torch.inference_mode():
        for i in range(0, masks.shape[0], per_trig):
            m, p = masks[i:i + per_trig].to(dev), patterns[i:i + per_trig].to(dev)
            for j in range(0, b, per_img):
                xb = x[j:j + per_img].to(dev)
                xs = stamp(xb, m, p)
                pred = model(xs.reshape(-1, *xb.shape[1:])).argmax(1).reshape(m.shape[0], -1)
                hits[i:i + per_trig] += (pred == target).sum(1).float().cpu()
    return hits / b


# --- the repair -------------------------------------------------------------------------------

@register("distribution-unlearn")
class DistributionUnlearning(Repair):
    """Unlearn a backdoor against the whole distribution of valid triggers (MESA's defence).

    Fits a :class:`TriggerDistribution` for the target (from a scan or the user), then
    fine-tunes a copy of the model on clean data where a share ``rate`` of every batch carries
    a trigger sampled from the distribution (levels with ``beta >= min_beta``) and keeps its
    true label.

    Args:
        target: the target label (may also be given to :meth:`repair`).
        n_levels, alpha, trigger_size, transparency, position, steps: the distribution's
            settings (see :class:`TriggerDistribution`).
        min_beta: the lowest staircase level whose triggers are used.
        shift: where the sampled triggers are stamped. None (default): at the places within
            ``trigger_size`` pixels of the located one where they stay valid (their mean attack
            success there exceeds ``min_beta``, :meth:`TriggerDistribution.place_success`), each
            drawn uniformly (the maximum-entropy choice over the valid set; the paper stamps at
            random places). An int: every place within ``shift`` pixels; 0: the located place only.
        rate: share of each fine-tuning batch stamped with a sampled trigger.
        epochs, lr, batch_size: the fine-tuning (Adam).
        seed: seeds the distribution and the fine-tuning.
        device: where to compute.

    References:
        Qiao, Yang, Li. "Defending Neural Backdoors via Generative Distribution Modeling".
        NeurIPS 2019. https://arxiv.org/abs/1910.04749
    """

    needs_gradients: ClassVar[bool] = True
    _constraints: ClassVar[dict[str, Any]] = {
        "target": Types((int, type(None))), "min_beta": Interval(float, 0, 1), "shift": Types((int, type(None))),
        "rate": Interval(float, 0, 1, "right"), "epochs": Interval(int, 0, None),
        "lr": Interval(float, 0, None, "neither"), "batch_size": Interval(int, 1, None),
    }

    def __init__(self, *, target: int | None = None, n_levels: int = 10, alpha: float = 0.1, trigger_size: int = 3,
                 transparency: bool = False, position: tuple[int, int] | None = None, steps: int = 400,
                 min_beta: float = 0.5, shift: int | None = None, rate: float = 0.2, epochs: int = 2, lr: float = 1e-3,
                 batch_size: int = 64, seed: int | None = 0, device: DeviceLike = None) -> None:
        self.target = target
        self.n_levels = n_levels
        self.alpha = alpha
        self.trigger_size = trigger_size
        self.transparency = transparency
        self.position = position
        self.steps = steps
        self.min_beta = min_beta
        self.shift = shift
        self.rate = rate
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def repair(self, model: nn.Module, clean_data: Any, *, target: int | None = None,
               distribution: TriggerDistribution | None = None, **kwargs: Any) -> RepairResult:
        """Return a repaired copy of ``model``.

        Args:
            model: the backdoored network (left untouched).
            clean_data: clean labelled data for the distribution and the fine-tuning.
            target: the target label (overrides the constructor's).
            distribution: an already fitted distribution to sample from (skips fitting).
        """
        t0 = time.perf_counter()
        self._validate_params()
        if not isinstance(clean_data, ImageDataset) or len(clean_data) == 0:
            raise DataError("distribution-unlearn needs non-empty clean labelled data (an ImageDataset)")
        t = target if target is not None else (distribution.target_ if distribution is not None and
                                               hasattr(distribution, "target_") else self.target)
        if t is None:
            raise ConfigError("distribution-unlearn needs the target label: from a scan (e.g. Neural Cleanse's "
                              "flagged label) or given by the user")
        if distribution is None:
            distribution = TriggerDistribution(n_levels=self.n_levels, alpha=self.alpha, trigger_size=self.trigger_size,
                                               transparency=self.transparency, position=self.position,
                                               steps=self.steps, seed=self.seed,
                                               device=self.device).fit(model, clean_data, int(t))
        else:
            distribution._check_fitted()
        repaired = copy.deepcopy(model)
        if self.shift is not None and self.shift < 0:
            raise ConfigError(f"shift must be None or an int >= 0, got {self.shift}")
        dist, rate, min_beta = distribution, self.rate, self.min_beta
        if self.shift is None:
            log.info("testing the sampled triggers at the places near %s", tuple(dist.position_))
            cands = dist.places_within(dist.trigger_size)
            place_asr = dist.place_success(model, clean_data, cands, min_beta=min_beta, seed=self.seed)
            keep = place_asr > min_beta
            keep[0] = True                                              # the located place itself
            places = cands[keep]
        else:
            cands = places = dist.places_within(self.shift)
            place_asr = None

        def carry_triggers(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            k = int(round(rate * x.shape[0]))
            if k == 0:
                return x, y
            idx = torch.randperm(x.shape[0], generator=g)[:k]
            st = dist.sample_tensors(k, min_beta=min_beta, places=places, generator=g)
            x = x.clone()
            m = st.masks[:, None]
            x[idx] = (1 - m) * x[idx] + m * st.patterns
            return x, y

        log.info("fine-tuning on %d clean images, %.0f%% of each batch carrying a sampled trigger at one of %d "
                 "places (%d epochs)", len(clean_data), 100 * rate, len(places), self.epochs)
        tr = train(repaired, clean_data, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                   seed=self.seed, device=self.device, batch_transform=carry_triggers, progress="fine-tune")
        details = {"target": int(t), "position": list(dist.position_), "trigger_size": dist.trigger_size,
                   "betas": dist.betas_.tolist(), "entropies": dist.entropies_.tolist(),
                   "weights": dist.weights_.tolist(), "places": places.tolist(),
                   "place_success": None if place_asr is None else
                   {f"{int(a)},{int(b)}": float(v) for (a, b), v in zip(cands.tolist(), place_asr)}}
        return RepairResult(model=repaired, history=tr.history, details=details, params=self.get_params(),
                            seconds=time.perf_counter() - t0)


__all__ = ["BatchedMLP", "DistributionReport", "DistributionUnlearning", "SampledTriggers", "TriggerDistribution",
           "dv_bound", "ensemble_weights", "stamp", "staircase_levels", "testing_function", "trigger_success"]
