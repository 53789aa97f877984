"""The steps of Neural Cleanse's optimiser (:func:`~trojanscope.defenses.model._nc_optimise.optimise_triggers`):
one state object for all jobs and one small function per stage of an epoch."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._utils.batching import eval_mode
from ...triggers import stamp

if TYPE_CHECKING:
    from ._nc_optimise import OptimiserSettings

log = logging.getLogger("trojanscope.defenses.model.neural_cleanse")

Callback = Callable[[dict[str, Any]], None]


def _tanh_box(w: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The authors' box constraint: ``tanh(w) / (2 - eps) + 0.5`` lies in (0, 1)."""
    return torch.tanh(w) / (2 - epsilon) + 0.5


def _atanh_box(v: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.atanh((v.clamp(0, 1) - 0.5) * (2 - epsilon))


@dataclasses.dataclass
class _Jobs:
    """Every job's optimisation state (tensors on the compute device unless noted)."""

    tg: torch.Tensor                       # (J,) targets, CPU
    tg_d: torch.Tensor                     # (J,) targets
    reg_d: torch.Tensor                    # (J, 1, H, W) regions
    w_m: torch.Tensor                      # (J, 1, H, W) mask logits
    w_p: torch.Tensor                      # (J, C, H, W) pattern logits
    adam: list[torch.Tensor]               # first and second moments of w_m, then of w_p
    cost: torch.Tensor                     # (J,) lambda
    reg_best: torch.Tensor                 # (J,) best norm of an epoch reaching the threshold
    es_reg_best: torch.Tensor              # (J,) the early stop's reference norm
    counters: dict[str, torch.Tensor]      # "set", "up", "down", "es": (J,) epoch counters
    up_flag: torch.Tensor
    down_flag: torch.Tensor
    done: torch.Tensor
    dropped: torch.Tensor
    epochs_run: torch.Tensor
    best_asr: torch.Tensor
    best_m: torch.Tensor
    best_p: torch.Tensor
    last_asr: torch.Tensor
    trace: torch.Tensor                    # (E, J) float64, CPU
    rung: int
    step_count: int = 0
    passes: int = 0
    src: torch.Tensor | None = None        # (J,) source labels, CPU (None: every label but the target)
    grp_d: torch.Tensor | None = None      # (J,) each job's index among the sorted distinct sources


def _init_state(tg: torch.Tensor, region: torch.Tensor, mask0: torch.Tensor, pattern0: torch.Tensor,
                cfg: OptimiserSettings, dev: torch.device, sources: torch.Tensor | None = None) -> _Jobs:
    jn = tg.numel()
    grp_d = None if sources is None else torch.unique(sources, sorted=True, return_inverse=True)[1].to(dev)
    f64 = dict(dtype=torch.float64, device=dev)
    reg_d = region.to(dev)
    w_m = _atanh_box(mask0, cfg.epsilon).to(dev)
    w_p = _atanh_box(pattern0, cfg.epsilon).to(dev)
    flag = torch.zeros(jn, dtype=torch.bool, device=dev)
    return _Jobs(
        tg=tg, tg_d=tg.to(dev), reg_d=reg_d, w_m=w_m, w_p=w_p,
        adam=[torch.zeros_like(w_m), torch.zeros_like(w_m), torch.zeros_like(w_p), torch.zeros_like(w_p)],
        cost=torch.zeros(jn, **f64), reg_best=torch.full((jn,), math.inf, **f64),
        es_reg_best=torch.full((jn,), math.inf, **f64),
        counters={k: torch.zeros(jn, dtype=torch.long, device=dev) for k in ("set", "up", "down", "es")},
        up_flag=flag, down_flag=torch.zeros_like(flag), done=torch.zeros_like(flag), dropped=torch.zeros_like(flag),
        epochs_run=torch.zeros(jn, dtype=torch.long, device=dev), best_asr=torch.zeros(jn, **f64),
        best_m=_tanh_box(w_m, cfg.epsilon) * reg_d, best_p=_tanh_box(w_p, cfg.epsilon),
        last_asr=torch.zeros(jn, **f64), trace=torch.full((cfg.epochs, jn), math.inf, dtype=torch.float64),
        rung=int(cfg.halving_first), src=sources, grp_d=grp_d)


class _Batches:
    """The mini-batches: consecutive slices of a seeded permutation, redrawn when exhausted."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.g)
        self.pos = 0

    def next(self, size: int) -> torch.Tensor:
        if self.pos + size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.perm[self.pos:self.pos + size]
        self.pos += size
        return idx


class _SourceBatches:
    """The mini-batches of source-restricted jobs: one :class:`_Batches` stream per distinct source
    label (sorted), over that label's images, each with its own seed.

    Each step draws ``min(size, n_s)`` images of every source ``s`` and stacks them into ``(S, B,
    C, H, W)`` with ``B`` the largest draw; a source with fewer images is padded by repeating its
    own draw, the repeats weighted 0 in the loss and the attack success (so the padding only
    feeds the model real images of the source)."""

    def __init__(self, y: torch.Tensor, sources: torch.Tensor, seeds: list[int]) -> None:
        self.labels = torch.unique(sources, sorted=True).tolist()
        self.index = [(y == s).nonzero().flatten() for s in self.labels]
        self.streams = [_Batches(int(ix.numel()), sd) for ix, sd in zip(self.index, seeds)]

    def next(self, x: torch.Tensor, size: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (S, B, C, H, W), weights (S, B))`` of one step, on ``dev``."""
        draws = [ix[st.next(size)] for ix, st in zip(self.index, self.streams)]
        b = max(int(d.numel()) for d in draws)
        rows, weights = [], torch.zeros(len(draws), b)
        for i, d in enumerate(draws):
            weights[i, :d.numel()] = 1.0
            rows.append(d.repeat(-(-b // d.numel()))[:b])
        return x[torch.stack(rows)].to(dev), weights.to(dev)


def _optimise_jobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, st: _Jobs, cfg: OptimiserSettings, *,
                   data_seed: int, dev: torch.device, callback: Callback | None,
                   source_seeds: list[int] | None = None) -> _Jobs:
    """Optimise all jobs; each step's forward pass is split into chunks of ``cfg.per_chunk`` jobs
    (the loss is a sum over jobs, so the gradients do not depend on the split). Jobs that never
    reached the threshold keep their last mask (the authors' choice). Source-restricted jobs
    (``st.src``) draw their images from one stream per source (``source_seeds``, in sorted-source
    order) instead of the shared one (``data_seed``)."""
    batches: _Batches | _SourceBatches
    if st.src is None:
        batches = _Batches(x.shape[0], data_seed)
    else:
        assert source_seeds is not None
        batches = _SourceBatches(y, st.src, source_seeds)
    first = cfg.first_rung_samples(int(st.tg.numel()))
    with eval_mode(model):
        for epoch in range(cfg.epochs):
            active = (~st.done).nonzero().flatten()
            if active.numel() == 0:
                break
            size = cfg.samples_per_step
            if cfg.schedule == "halving" and epoch < cfg.halving_first:
                size = first  # a cheaper first rung with many jobs: fewer images per step
            avg_acc, avg_reg = _run_epoch(model, x, y, st, active, batches, cfg, dev, size)
            _end_epoch(st, active, avg_acc, avg_reg, epoch, cfg)
            if callback is not None:
                info = {"epoch": epoch + 1, "targets": st.tg[active.cpu()].tolist(),
                        "attack_success": avg_acc.cpu().tolist(), "l1": avg_reg.cpu().tolist(),
                        "cost": st.cost[active].cpu().tolist()}
                if st.src is not None:
                    info["sources"] = st.src[active.cpu()].tolist()
                callback(info)
            log.debug("epoch %d: %d jobs active, attack success %s, |m| %s", epoch + 1, active.numel(),
                      [round(v, 3) for v in avg_acc.tolist()], [round(v, 1) for v in avg_reg.tolist()])
    last = ~torch.isfinite(st.reg_best)
    if bool(last.any()):
        st.best_m[last] = _tanh_box(st.w_m[last], cfg.epsilon) * st.reg_d[last]
        st.best_p[last] = _tanh_box(st.w_p[last], cfg.epsilon)
        st.best_asr[last] = st.last_asr[last]
    return st


def _run_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, st: _Jobs, active: torch.Tensor,
               batches: _Batches | _SourceBatches, cfg: OptimiserSettings,
               dev: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of the active jobs: ``(epoch-average attack success, epoch-average |m|_1)``.

    Each step's images are ``xg`` ``(G, B, C, H, W)`` with ``grp`` ``(A,)`` the group each active
    job reads (None: all read the one group ``G = 1``), and ``valid`` ``(A, B)`` the weight of each
    image in a job's loss and attack success: images of another label than the job's target, or
    for source-restricted jobs the (unpadded) images of the job's source. ``size`` images per
    step (fewer in a large first rung, see :meth:`OptimiserSettings.first_rung_samples`)."""
    an = active.numel()
    acc_sum = torch.zeros(an, dtype=torch.float64, device=dev)
    reg_sum = torch.zeros(an, dtype=torch.float64, device=dev)
    for _ in range(cfg.steps_per_epoch):
        if isinstance(batches, _SourceBatches):
            assert st.grp_d is not None
            xg, weights = batches.next(x, size, dev)
            grp: torch.Tensor | None = st.grp_d[active]
            b = xg.shape[1]
            tgt = st.tg_d[active][:, None].expand(an, b)
            valid = weights[grp]
        else:
            idx = batches.next(size)
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            xg, grp, b = xb[None], None, xb.shape[0]
            tgt = st.tg_d[active][:, None].expand(an, b)
            valid = (yb[None] != tgt).float()
        gm, gp, out, l1 = _gradients(model, xg, grp, valid, st, active, cfg)
        st.passes += an * b
        nvalid = valid.sum(1).clamp_min(1.0)
        st.step_count += 1
        with torch.no_grad():
            _adam_step(st, active, gm, gp, cfg)
            acc = ((out.argmax(-1) == tgt).float() * valid).sum(1) / nvalid
            acc_sum += acc.double()
            reg_sum += l1.double()
    return acc_sum / cfg.steps_per_epoch, reg_sum / cfg.steps_per_epoch


def _gradients(model: nn.Module, xg: torch.Tensor, grp: torch.Tensor | None, valid: torch.Tensor, st: _Jobs,
               active: torch.Tensor, cfg: OptimiserSettings) -> tuple[torch.Tensor, ...]:
    """The loss's gradients w.r.t. the active jobs' logits, their outputs and their ``|m|_1``
    (images, groups and weights as in :func:`_run_epoch`)."""
    b = xg.shape[1]
    gms, gps, outs, l1s = [], [], [], []
    for c0 in range(0, active.numel(), cfg.per_chunk):
        sub = active[c0:c0 + cfg.per_chunk]
        xs = xg if grp is None else xg[grp[c0:c0 + cfg.per_chunk]]            # (1 or A, B, C, H, W)
        sn = sub.numel()
        wm = st.w_m[sub].detach().requires_grad_(True)
        wp = st.w_p[sub].detach().requires_grad_(True)
        m = _tanh_box(wm, cfg.epsilon) * st.reg_d[sub]                      # (A, 1, H, W)
        p = _tanh_box(wp, cfg.epsilon)                                      # (A, C, H, W)
        mv = m[:, None]                                                     # (A, 1, 1, H, W)
        xa = stamp(xs, mv, p[:, None])                                      # (A, B, C, H, W)
        o = model(xa.reshape(sn * b, *xg.shape[2:])).float().reshape(sn, b, -1)
        t_s = st.tg_d[sub][:, None].expand(sn, b)
        ce = F.cross_entropy(o.reshape(sn * b, -1), t_s.reshape(-1), reduction="none").reshape(sn, b)
        v_s = valid[c0:c0 + cfg.per_chunk]
        l1_s = mv.abs().sum((1, 2, 3, 4))  # on the view the stamp reads: the gradients add up in the same order
        loss = ((ce * v_s).sum(1) / v_s.sum(1).clamp_min(1.0) + st.cost[sub].float() * l1_s).sum()
        g_m, g_p = torch.autograd.grad(loss, [wm, wp])
        gms.append(g_m)
        gps.append(g_p)
        outs.append(o.detach())
        l1s.append(l1_s.detach())
    return torch.cat(gms), torch.cat(gps), torch.cat(outs), torch.cat(l1s)


def _adam_step(st: _Jobs, active: torch.Tensor, gm: torch.Tensor, gp: torch.Tensor, cfg: OptimiserSettings) -> None:
    """Adam (elementwise, bias-corrected) on the active jobs' mask and pattern logits."""
    b1, b2 = cfg.betas
    for (wt, gr, mo, ve) in ((st.w_m, gm, st.adam[0], st.adam[1]), (st.w_p, gp, st.adam[2], st.adam[3])):
        mo[active] = b1 * mo[active] + (1 - b1) * gr
        ve[active] = b2 * ve[active] + (1 - b2) * gr * gr
        mhat = mo[active] / (1 - b1 ** st.step_count)
        vhat = ve[active] / (1 - b2 ** st.step_count)
        wt[active] = wt[active] - cfg.lr * mhat / (vhat.sqrt() + 1e-8)


def _end_epoch(st: _Jobs, active: torch.Tensor, avg_acc: torch.Tensor, avg_reg: torch.Tensor, epoch: int,
               cfg: OptimiserSettings) -> None:
    """Record the epoch, keep the best masks, then the early stop, lambda's schedule and the rungs."""
    st.epochs_run[active] += 1
    st.last_asr[active] = avg_acc
    if epoch > 0:
        st.trace[epoch] = st.trace[epoch - 1]
    rb = st.reg_best[active]
    cur_norm = torch.where(torch.isfinite(rb), torch.minimum(rb, avg_reg), avg_reg)
    st.trace[epoch, active.cpu()] = cur_norm.cpu()
    with torch.no_grad():
        succ = avg_acc >= cfg.attack_succ_threshold
        better = succ & (avg_reg < st.reg_best[active])
        if bool(better.any()):
            sel = active[better]
            st.best_m[sel] = _tanh_box(st.w_m[sel], cfg.epsilon) * st.reg_d[sel]
            st.best_p[sel] = _tanh_box(st.w_p[sel], cfg.epsilon)
            st.reg_best[sel] = avg_reg[better]
            st.best_asr[sel] = avg_acc[better]
        if cfg.early_stop:
            _early_stop(st, active, cfg)
        _update_cost(st, active, succ, cfg)
        if cfg.schedule == "halving" and epoch + 1 == st.rung:
            st.rung *= 2
            _halve(st, active, avg_reg, cfg)


def _early_stop(st: _Jobs, active: torch.Tensor, cfg: OptimiserSettings) -> None:
    """Stop a job once lambda went up and down and its best norm stalled for ``early_stop_patience`` epochs."""
    rb = st.reg_best[active]
    es = st.counters["es"]
    found = torch.isfinite(rb)
    stalled = rb >= cfg.early_stop_threshold * st.es_reg_best[active]
    es[active] = torch.where(found, torch.where(stalled, es[active] + 1, 0), es[active])
    st.es_reg_best[active] = torch.minimum(rb, st.es_reg_best[active])
    stop = st.up_flag[active] & st.down_flag[active] & (es[active] >= cfg.early_stop_patience)
    st.done[active[stop]] = True


def _update_cost(st: _Jobs, active: torch.Tensor, succ: torch.Tensor, cfg: OptimiserSettings) -> None:
    """lambda's schedule: set to ``init_cost`` after ``patience`` successes at 0, then up / down."""
    cnt, patience, mult = st.counters, cfg.patience, cfg.cost_multiplier
    c = st.cost[active]
    sc = torch.where((c == 0) & succ, cnt["set"][active] + 1, 0)
    init_now = sc >= patience
    c = torch.where(init_now, torch.full_like(c, cfg.init_cost), c)
    uc = torch.where(init_now, 0, cnt["up"][active])
    dc = torch.where(init_now, 0, cnt["down"][active])
    uf = st.up_flag[active] & ~init_now
    df = st.down_flag[active] & ~init_now
    uc = torch.where(succ, uc + 1, 0)
    dc = torch.where(succ, 0, dc + 1)
    up = uc >= patience
    down = ~up & (dc >= patience)
    c = torch.where(up, c * mult, torch.where(down, c / mult ** 1.5, c))
    uc = torch.where(up, 0, uc)
    dc = torch.where(down, 0, dc)
    cnt["set"][active], st.cost[active] = sc, c
    cnt["up"][active], cnt["down"][active] = uc, dc
    st.up_flag[active], st.down_flag[active] = uf | up, df | down


def _halve(st: _Jobs, active: torch.Tensor, avg_reg: torch.Tensor, cfg: OptimiserSettings) -> None:
    """A rung of successive halving: keep the ``1 / halving_eta`` live jobs with the smallest trigger."""
    live = (~st.done).nonzero().flatten()
    keep = max(int(cfg.halving_keep), math.ceil(live.numel() / int(cfg.halving_eta)))
    if live.numel() <= keep:
        return
    # rank: reached jobs by their best norm, then the others by their current norm
    cur = torch.full((st.tg.numel(),), math.inf, dtype=torch.float64, device=st.reg_best.device)
    cur[active] = avg_reg
    rank_key = torch.where(torch.isfinite(st.reg_best[live]), st.reg_best[live], 1e12 + cur[live])
    order = torch.argsort(rank_key, stable=True)
    stop_ix = live[order[keep:]]
    st.done[stop_ix] = True
    st.dropped[stop_ix] = True
