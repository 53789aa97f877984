"""The kernels of the trigger distribution (MESA): the staircase, the ensemble weights, the
stamping and testing functions, MINE's bound, the batched networks and their fitting state.

See :mod:`trojanscope.defenses.model.distribution` for the method and its references.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..._utils.batching import DeviceLike, generator
from ...errors import ConfigError
from ...triggers import TriggerBatch, stamp_batch, stamped_predictions

if TYPE_CHECKING:
    from .distribution import TriggerDistribution


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


#: Stamp ``n`` triggers onto ``B`` images in one broadcast (``(n, B, C, H, W)``): the toolkit's one formula.
stamp = stamp_batch


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



testing_function.__test__ = False  # the paper's name, not a pytest test (tests import it)

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


def trigger_success(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor, target: int,
                    *, batch_size: int = 4096, device: DeviceLike = None) -> torch.Tensor:
    """Attack success (argmax = ``target``) of each of ``n`` triggers over the images ``x``.

    Shape:
        x ``(B, C, H, W)``, masks ``(n, H, W)``, patterns ``(n, C, H, W)``; returns ``(n,)``.
    """
    batch = TriggerBatch(masks, patterns, torch.full((masks.shape[0],), int(target)))
    pred = stamped_predictions(model, x, batch, batch_size=batch_size, device=device)
    return (pred == target).sum(1).float() / x.shape[0]


@dataclasses.dataclass
class _Networks:
    """The ``N`` generators and statistics networks being fitted, their optimisers and noise source."""

    gen: BatchedMLP
    stat: BatchedMLP
    betas: torch.Tensor
    opt_g: torch.optim.Optimizer
    opt_t: torch.optim.Optimizer
    ema: torch.Tensor
    g: torch.Generator
    dev: torch.device
    mb: int
    noise_dim: int

    @classmethod
    def build(cls, dist: "TriggerDistribution", dev: torch.device) -> "_Networks":
        c = dist.image_shape_[0]
        s, n, d = dist.trigger_size, dist.n_levels, dist.noise_dim
        out_dim = (c + int(dist.transparency)) * s * s
        g = generator(dist.seed)
        gen = BatchedMLP(n, [d, dist.hidden, dist.hidden, out_dim], generator=g).to(dev)
        stat = BatchedMLP(n, [out_dim + d, dist.hidden, dist.hidden, 1], generator=g).to(dev)
        return cls(gen=gen, stat=stat, betas=staircase_levels(n).to(dev),
                   opt_g=torch.optim.Adam(gen.parameters(), lr=dist.lr),
                   opt_t=torch.optim.Adam(stat.parameters(), lr=dist.lr), ema=torch.ones(n, device=dev), g=g,
                   dev=dev, mb=max(dist.mine_batch, dist.samples_per_step), noise_dim=d)

    def critic(self, out: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``T`` on joint pairs ``(G(z), z)`` and on marginal pairs (``z`` shuffled within the batch)."""
        z_marg = z[:, torch.randperm(z.shape[1], generator=self.g).to(self.dev)]
        return self.stat(torch.cat([out, z], -1))[..., 0], self.stat(torch.cat([out, z_marg], -1))[..., 0]

    def critic_step(self, ema_rate: float) -> None:
        """One MINE step of the statistics networks on fresh noise (the generators fixed)."""
        n = self.betas.shape[0]
        zc = torch.randn(n, self.mb, self.noise_dim, generator=self.g).to(self.dev)
        with torch.no_grad():
            oc = torch.sigmoid(self.gen(zc))
        tj, tm = self.critic(oc, zc)
        et = tm.exp().mean(1)
        self.ema = (1 - ema_rate) * self.ema + ema_rate * et.detach()
        loss_t = -(tj.mean(1) - et / self.ema).sum()
        self.opt_t.zero_grad(set_to_none=True)
        loss_t.backward()
        self.opt_t.step()

    def entropies(self) -> torch.Tensor:
        """The entropies reached: the DV bound on fresh noise, averaged over a few batches."""
        n = self.betas.shape[0]
        with torch.no_grad():
            ests = []
            for _ in range(4):
                ze = torch.randn(n, 512, self.noise_dim, generator=self.g).to(self.dev)
                ests.append(dv_bound(*self.critic(torch.sigmoid(self.gen(ze)), ze)))
            return torch.stack(ests).mean(0)
