"""One cell: one defence on one attacked model, scored against the ground truth.

This is the only place a defence's result meets the truth of the attack (the planted trigger, the
target, which samples were poisoned), through :mod:`trojanscope.metrics`. Each family has one
scorer in :data:`SCORERS`; a defence is built with :func:`make_defense` and called through its
family's verb only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._utils.batching import DeviceLike, generator, predict
from .._utils.results import to_jsonable, trigger_tensors
from ..data import ImageDataset, PoisonedDataset
from ..defenses import DEFENSES, Defense
from ..errors import ConfigError, TrojanscopeError
from ..metrics import attack_inputs, clean_accuracy, detection_metrics
from ..training import train_new
from ..triggers import Trigger
from .scan import SCAN_PROVIDER, SharedScan, consumes_scan
from .spec import CHAIN, BenchConfig, DefenseSpec
from .store import COLUMNS, CellRecord, cell_id, cell_record
from .victims import AttackedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Scored:
    """What :func:`evaluate_cell` gives: the cell's record, and the result of a scan the run stores
    with the result's own ``save()`` (a model detector's), for the defences that build on it."""

    record: CellRecord
    scan: Any = None


@dataclasses.dataclass
class Cell:
    """What a scorer needs: the attacked model (with its truth), the run's data and settings, the
    built defence (None for a chain) and the record it fills (``row``, ``result``, ``extras``, ``tensors``)."""

    am: AttackedModel
    cfg: BenchConfig
    val: ImageDataset
    test: ImageDataset
    seed: int
    device: DeviceLike
    record: dict[str, Any]
    spec: DefenseSpec
    defense: Any = None
    shared: SharedScan | None = None
    scan: Any = None  #: a scan result the run stores (set by the model scorer)

    @property
    def row(self) -> dict[str, Any]:
        return self.record["row"]

    def scan_for(self) -> SharedScan | None:
        """The shared scan, for a defence that takes one (``uses_scan`` not ``"never"``)."""
        return self.shared if self.defense.uses_scan != "never" else None

    def suspected_target(self, name: str) -> int:
        if self.shared is None:
            raise ConfigError(f"{name} needs a suspected target label: add {SCAN_PROVIDER!r} to the run, whose "
                              f"scan supplies it")
        return self.shared.suspected_target


def make_defense(spec: DefenseSpec, seed: int, shared: SharedScan | None = None) -> Defense:
    """Build the defence of ``spec``; its ``seed`` follows the cell's seed unless set (the scan
    itself goes to the verb, as ``scan=``)."""
    cls = DEFENSES.get(spec.defense)
    params = dict(spec.params)
    defaults = cls.param_defaults()
    if "seed" in defaults and "seed" not in params:
        params["seed"] = seed
    if shared is not None and cls.places_trigger and params.get("position") is None:
        # trigger-distribution tools: size and place the trigger from the scan's reversed mask,
        # instead of a moving-window search per cell (about 10x slower on a CPU); a size left to
        # the class default (3) under-covers the bench's 4x4 patches, and the repair then leaves
        # the real trigger working (quick badnets-patch model, 1 epoch: ASR 27% with size 4, 41% with 3)
        if "trigger_size" not in params and (guess := shared.suspected_size()) is not None:
            params["trigger_size"] = guess
        size = params.get("trigger_size", defaults["trigger_size"])
        params["position"] = shared.suspected_position(int(size))
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"defence {spec.name!r}: {e}") from None


def evaluate_cell(am: AttackedModel, spec: DefenseSpec, cfg: BenchConfig, *, val: ImageDataset, test: ImageDataset,
                  seed: int, device: DeviceLike = None, shared: SharedScan | None = None) -> Scored:
    """Run one defence on one attacked model and score it against the ground truth.

    Args:
        shared: the provider's scan of the same model, for defences that build on one.

    Returns:
        A :class:`Scored`: the cell's :class:`CellRecord` (its table row; the defence's result as a
        dict; ``extras``, evaluation data for the report such as scores of clean vs stamped inputs
        and the ground truth; the defence's settings; the triggers to store). A defence that
        raises gives a row with ``error`` set.
    """
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(attack=am.name, defense=spec.name, seed=seed, ca_before=am.ca, asr_before=am.asr)
    record: dict[str, Any] = {"row": row, "result": None, "extras": {}, "params": {}, "tensors": {},
                              "defense_name": spec.defense, "id": cell_id(am.name, spec.name, seed)}
    cell = Cell(am, cfg, val, test, seed, device, record, spec)
    t0 = time.perf_counter()
    try:
        _prepare(cell, shared)
        scorer = SCORERS.get(row["family"])
        if scorer is None:
            raise ConfigError(f"defence {spec.name!r} has an unknown family {row['family']!r}")
        scorer(cell)
    except Exception as e:  # a failing defence is recorded in its row; the matrix goes on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row["error"] = f"{type(e).__name__}: {msg}"
        log.warning("cell %s x %s (seed %d) failed: %s", am.name, spec.name, seed, row["error"], exc_info=True)
    row["seconds"] = time.perf_counter() - t0
    return Scored(cell_record(record, tensors=record["tensors"]), cell.scan)


def _prepare(c: Cell, shared: SharedScan | None) -> None:
    """Build the cell's defence (none for a chain) and record its family, class and settings."""
    spec, record = c.spec, c.record
    if spec.defense == CHAIN:
        c.row["family"] = CHAIN
        record["params"] = to_jsonable(spec.params)
        record["defense_class"] = "Pipeline"
        return
    use = shared if consumes_scan(spec) else None
    c.defense = make_defense(spec, c.seed, use)
    c.shared = use
    c.row["family"] = c.defense.family
    record["params"] = {k: (f"<{SCAN_PROVIDER} scan of this model>" if v is use and use is not None
                            else to_jsonable(v)) for k, v in c.defense.get_params().items()}
    if use is not None:
        record["extras"]["builds_on"] = SCAN_PROVIDER
    record["defense_class"] = type(c.defense).__name__


# --- the scorers, one per family ------------------------------------------------------------------

def _score_detector(c: Cell) -> None:
    res = c.defense.scan(c.am.model, c.val)
    flagged = sorted(int(v) for v in res.flagged_labels)
    c.row["verdict"] = "infected" if res.infected else "clean"
    c.row["flagged_labels"] = " ".join(map(str, flagged))
    targets = c.am.true_targets()
    c.row["target_found"] = bool(targets & set(flagged)) if targets else None
    c.record["result"] = res.to_dict()
    c.record["extras"]["true_targets"] = sorted(targets)
    c.record["tensors"].update(trigger_tensors(res))
    if hasattr(res, "save"):
        c.scan = res  # stored by the run with its own save(), not in the cell's JSON


def _score_explainer(c: Cell) -> None:
    """Model-level tools that explain a suspected target (the moving-window heat map, the trigger
    distribution): the target comes from the provider's scan, never from the attack."""
    defense = c.defense
    target = c.suspected_target(type(defense).__name__)
    targets = c.am.true_targets()
    c.row["flagged_labels"] = str(target)
    c.row["target_found"] = (target in targets) if targets else None
    c.record["extras"].update(true_targets=sorted(targets), searched_target=target)
    res = defense.explain(c.am.model, c.val, target)
    c.record["result"] = res.to_dict()
    c.record["tensors"].update(trigger_tensors(res))
    _explain_verdict(c, res, target)
    if hasattr(defense, "sample_tensors"):
        smp = defense.sample_tensors(24, generator=generator(c.seed))
        imgs = (smp.masks[:, None] * smp.patterns).clamp(0, 1)
        c.record["tensors"]["samples.images"] = imgs
        c.record["result"]["samples"] = imgs.tolist()


def _explain_verdict(c: Cell, res: Any, target: int) -> None:
    """A heat map's peak on or off the planted trigger; a distribution's share of valid samples."""
    peak = getattr(res, "peak", None)
    heat = getattr(res, "heatmap", None)
    if peak is not None and heat is not None:
        if c.am.triggers and c.am.triggers[0].shape[1:] == tuple(heat.shape):
            on = bool(c.am.triggers[0].mask[int(peak[0]), int(peak[1])] > 0.05)
            c.row["verdict"] = f"label {target}: peak {'on' if on else 'off'} the trigger"
        else:
            c.row["verdict"] = f"label {target} searched"
    vs = getattr(res, "valid_share", None)
    if vs is not None:
        c.row["verdict"] = f"label {target}: {100 * float(torch.as_tensor(vs).mean()):.0f}% valid samples"


def _training_set(am: AttackedModel) -> ImageDataset:
    """The training set as the defender sees it (no poison flags)."""
    return am.poisoned.clean if isinstance(am.poisoned, PoisonedDataset) else am.poisoned


def _score_sanitizer(c: Cell) -> None:
    am, defense = c.am, c.defense
    data = _training_set(am)
    trusted = c.val if defense.uses_trusted else None  # the defender's clean data, as every family gets
    res = defense.inspect(am.model, data, trusted=trusted)
    is_poison = am.is_poison
    flagged = torch.as_tensor(res.flagged).bool()
    m = detection_metrics(res.scores, is_poison, flagged)
    if m["n_poison"]:
        c.row["poison_removed"] = m["recall"]
    c.row["clean_removed"] = m["fpr"]
    c.row["auroc"] = m["auroc"]
    c.row["verdict"] = f"removed {int(flagged.sum())}"
    keep = (~flagged).nonzero().flatten()
    if keep.numel() == 0:
        raise ConfigError(f"{defense!r} flagged every training sample; nothing left to retrain on")
    model = _retrain(c, am.poisoned.subset(keep))
    c.row["ca_after"] = clean_accuracy(model, c.test)
    c.row["asr_after"] = am.success_rate(model, c.test)
    c.record["result"] = res.to_dict()
    c.record["extras"].update(is_poison=is_poison.nonzero().flatten().tolist(), metrics=m,
                              projection=_projection(am, data, flagged, is_poison))


def _retrain(c: Cell, kept: ImageDataset) -> nn.Module:
    """A fresh model trained on the samples a sanitiser kept."""
    cfg = c.cfg
    if c.am.received:  # a fresh copy of the received graph (there is no architecture to build)
        from ..training import Retrainer

        model, res = Retrainer(epochs=max(cfg.epochs, 1), lr=cfg.lr, batch_size=cfg.batch_size, seed=c.seed,
                               device=c.device).train_with_history(c.am.model, kept)
        c.record["extras"]["fresh_model"] = "re-initialised copy of the received graph"
        if "chance_runs" in res.params:  # the first copies stayed at chance and were trained again
            c.record["extras"]["retrain_runs"] = res.params["chance_runs"]
        return model
    return train_new(cfg.arch, kept, seed=c.seed, device=c.device, epochs=cfg.epochs, lr=cfg.lr,
                     batch_size=cfg.batch_size, recipe=cfg.recipe)


def _projection(am: AttackedModel, data: ImageDataset, flagged: torch.Tensor, is_poison: torch.Tensor,
                max_points: int = 600) -> dict[str, Any] | None:
    """2-D PCA of the penultimate activations of the samples labelled as the (main) target, for the
    report: which of them were poisoned (ground truth) and which the defence flagged."""
    from .._utils.batching import activations

    if is_poison.any():
        label = int(torch.mode(data.y[is_poison]).values)
    else:
        label = int(torch.mode(data.y[flagged]).values) if flagged.any() else 0
    idx = (data.y == label).nonzero().flatten()
    if idx.numel() < 3:
        return None
    if idx.numel() > max_points:
        idx = idx[torch.randperm(idx.numel(), generator=generator(0))[:max_points]].sort().values
    try:
        a = activations(am.model, data.x[idx], "penultimate").double()
    except TrojanscopeError:
        return None
    from sklearn.decomposition import PCA

    xy = PCA(2, svd_solver="randomized", random_state=0).fit_transform(a.numpy())
    return {"label": label, "xy": xy.astype("float32").tolist(), "poison": is_poison[idx].tolist(),
            "flagged": flagged[idx].tolist()}


def _stamped(am: AttackedModel, test: ImageDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stamped test inputs of non-target (and, if any, source) labels, and the attacker's targets."""
    trigs = am.triggers
    if not trigs or am.target is None:
        return None
    keep, tgt = attack_inputs(test, am.target, source_labels=am.source_labels)
    x = trigs[0].apply(test.x[keep])
    return x, tgt[keep]


def _score_filter(c: Cell) -> None:
    am, test, device, defense = c.am, c.test, c.device, c.defense
    defense.fit(am.model, c.val, scan=c.scan_for())
    clean_s = defense.score(test.x).float().cpu()
    thr = float(defense.threshold_)
    clean_f = clean_s > thr
    c.row["frr"] = float(clean_f.float().mean())
    pred = predict(am.model, test.x, device=device)
    c.row["ca_after"] = float(((~clean_f) & (pred == test.y)).float().mean())
    extras: dict[str, Any] = {"clean_scores": clean_s.tolist(), "threshold": thr}
    st = _stamped(am, test)
    if st is not None:
        xs, tgt = st
        trig_s = defense.score(xs).float().cpu()
        trig_f = trig_s > thr
        c.row["far"] = float((~trig_f).float().mean())
        m = detection_metrics(torch.cat([clean_s, trig_s]), torch.cat([torch.zeros(len(clean_s), dtype=torch.bool),
                                                                       torch.ones(len(trig_s), dtype=torch.bool)]))
        c.row["auroc"] = m["auroc"]
        hit = predict(am.model, xs, device=device) == tgt
        c.row["asr_after"] = float(((~trig_f) & hit).float().mean())
        extras["triggered_scores"] = trig_s.tolist()
    c.row["verdict"] = f"rejects {100 * (1 - c.row['far']):.0f}% stamped" if c.row["far"] is not None else \
        f"rejects {100 * c.row['frr']:.0f}% clean"
    c.record["extras"].update(extras)
    c.record["result"] = {"threshold": thr, **{k: to_jsonable(v) for k, v in vars(defense).items()
                                              if k.endswith("_") and not k.startswith("_") and _small(v)}}


def _small(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() <= 4096
    return not isinstance(v, (nn.Module, SharedScan, Trigger, list, tuple, dict))


def _score_repair(c: Cell) -> None:
    am, test = c.am, c.test
    c.record["extras"]["evaluated"] = True  # histories carry the planted trigger's ASR

    def monitor(model: nn.Module) -> dict[str, float]:
        """Figures along the repair's history (ground truth stays here, in the glue)."""
        out = {"test_accuracy": clean_accuracy(model, test)}
        asr = am.success_rate(model, test)
        if asr is not None:
            out["attack_success"] = asr
        return out

    res = c.defense.repair(am.model, c.val, scan=c.scan_for(), monitor=monitor)
    c.row["ca_after"] = clean_accuracy(res.model, test)
    c.row["asr_after"] = am.success_rate(res.model, test)
    c.row["verdict"] = None if c.row["asr_after"] is None else \
        f"ASR {100 * (am.asr or 0):.0f}% → {100 * c.row['asr_after']:.0f}%"
    c.record["result"] = res.to_dict()
    c.record["tensors"].update(trigger_tensors(res))


def _score_chain(c: Cell) -> None:
    """A chain of defences (:class:`trojanscope.pipeline.Pipeline`): the figures after the last step."""
    from ..pipeline import Pipeline

    am = c.am
    steps = [(n, {**({"seed": c.seed} if "seed" in DEFENSES.get(n).param_defaults() and "seed" not in p else {}), **p})
             for n, p in c.spec.params["steps"]]
    pipe = Pipeline(steps, retrain=c.spec.params.get("retrain", "scratch"), epochs=c.cfg.epochs, lr=c.cfg.lr,
                    batch_size=c.cfg.batch_size, seed=c.seed, device=c.device)
    res = pipe.run(am.model, c.val, train_data=_training_set(am), evaluate=_system_evaluator(c))
    last = res.history[-1]
    c.row["ca_after"] = last.get("test_accuracy")
    c.row["asr_after"] = last.get("attack_success") if (am.attack is not None or am.received) else None
    removed = [r.get("n_removed") for r in res.history if r.get("n_removed") is not None]
    c.row["verdict"] = " > ".join(str(r["defense"]) for r in res.history[1:])
    if removed and isinstance(am.poisoned, PoisonedDataset) and am.poisoned.poison_indices.numel():
        c.row["verdict"] += f" (removed {sum(removed)})"
    c.record["result"] = {"history": res.history, "params": res.params}


def _system_evaluator(c: Cell) -> Callable[[nn.Module, Sequence[Any]], dict[str, Any]]:
    """The chain's figures after each step: CA and ASR of the defended system."""
    from ..pipeline import rejected

    stamped = _stamped(c.am, c.test)

    def evaluate(model: nn.Module, filters: Sequence[Any]) -> dict[str, Any]:
        """CA and ASR of the defended system: inputs a filter rejects neither count as right nor
        as a success of the attack (the input family's "after" figures)."""
        pred = predict(model, c.test.x, device=c.device)
        acc = pred == c.test.y
        rej = rejected(filters, c.test.x)
        out: dict[str, Any] = {"test_accuracy": float((acc & ~rej).float().mean())}
        if stamped is not None:
            xs, tgt = stamped
            hit = predict(model, xs, device=c.device) == tgt
            out["attack_success"] = float((hit & ~rejected(filters, xs)).float().mean())
        return out

    return evaluate


#: One scorer per family (and one for a chain of defences), by the family a cell's defence declares.
SCORERS: dict[str, Callable[[Cell], None]] = {
    "model": _score_detector,
    "data": _score_sanitizer,
    "input": _score_filter,
    "repair": _score_repair,
    "explain": _score_explainer,
    CHAIN: _score_chain,
}
