"""One ``Display`` per kind of result: the figures, trigger galleries and one-line verdict the report
shows for it (after scikit-learn's ``*Display`` objects).

A display holds panels, ``(title, CellRecord)`` pairs: every cell of one defence on a bench page
(small multiples, one panel per attack and seed), or one result on a command's page. Build one
with :meth:`Display.from_records` (cells of a bench run, kind read from the cells) or
:meth:`Display.from_result` (a typed result: the kind follows its class). :data:`DISPLAYS` maps
each kind of :data:`~trojanscope.report.store.KINDS` to its class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .._utils.results import to_jsonable, trigger_tensors
from . import figures, plots
from .store import KIND_OF_FAMILY, CellRecord, cell_record

Figure = dict[str, Any]


class Display:
    """The figures of results of one kind; this base draws none (a result the report cannot read).

    Args:
        panels: ``(title, cell)`` pairs; cells that failed or hold no result are left out.
    """

    kind: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def __init__(self, panels: Sequence[tuple[str, CellRecord]]) -> None:
        self.panels = [(t, c) for t, c in panels if not c.error and c.result is not None]

    @classmethod
    def from_records(cls, records: Sequence[CellRecord], *, multi_seed: bool = False) -> Display:
        """The display of one defence's cells, of the class their kind names (panels titled by attack,
        and seed where the run has several)."""
        kinds = [c.kind for c in records if not c.error and c.result is not None]
        klass = DISPLAYS.get(kinds[0], Display) if kinds and cls is Display else cls
        return klass([(f"{c.attack} (seed {c.seed})" if multi_seed else c.attack, c) for c in records])

    @classmethod
    def from_result(cls, result: Any, *, title: str, family: str | None = None, planted: Sequence[Any] = (),
                    extras: Mapping[str, Any] | None = None, cell_id: str = "s0") -> Display:
        """The display of one result: a result dataclass (its class picks the display) or a dict
        with ``family`` given; ``planted`` are known triggers, ``extras`` what the caller knows
        beside the result (``true_targets``, ``is_poison``, filter scores)."""
        kind, fam = result_kind(result, family)
        klass = DISPLAYS.get(kind, Display) if cls is Display else cls
        d = plots.as_dict(result)
        ex = klass.extras_of(d, {k: to_jsonable(v) for k, v in (extras or {}).items()})
        rec = {"id": cell_id, "row": {"attack": title, "defense": title, "seed": 0, "family": fam}, "result": d,
               "extras": ex, "params": d.get("params") or {}}
        cell = cell_record(rec, tensors=trigger_tensors(result), planted=tuple(planted))
        cell = _with_kind(cell, kind)
        return klass([(title, cell)])

    @classmethod
    def extras_of(cls, d: Mapping[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        """What a single result's panel needs beside the result (a filter: its score lists)."""
        return extras

    @property
    def params(self) -> Mapping[str, Any]:
        return self.panels[0][1].params if self.panels else {}

    def figures(self) -> list[Figure]:
        """``{"src": data URI, "caption": text}`` per figure."""
        return []

    def galleries(self) -> list[dict[str, Any]]:
        """``{"title", "thumbs"}`` per trigger gallery."""
        return []

    def verdict(self, title: str) -> tuple[str, str]:
        """The sentence on one result (a command's page) and its tone: ``good``, ``bad``, ``neutral``."""
        return f"{title}.", "neutral"


def _with_kind(cell: CellRecord, kind: str) -> CellRecord:
    import dataclasses

    return cell if cell.kind == kind else dataclasses.replace(cell, kind=kind)


def result_kind(result: Any, family: str | None = None) -> tuple[str, str]:
    """``(kind, family)`` of a result: from its class, or from ``family`` for a dict."""
    from ..defenses import RepairResult, SanitizeResult, ScanResult
    from ..defenses.model.distribution import DistributionReport
    from ..defenses.model.heatmap import HeatmapResult
    from ..pipeline import PipelineResult

    for cls, kind, fam in ((ScanResult, "scan", "model"), (HeatmapResult, "heatmap", "model"),
                           (DistributionReport, "distribution", "model"), (SanitizeResult, "sanitize", "data"),
                           (RepairResult, "repair", "repair"), (PipelineResult, "chain", "chain")):
        if isinstance(result, cls):
            return kind, family or fam
    return KIND_OF_FAMILY.get(family or "", ""), family or ""


class ScanDisplay(Display):
    """A detector's scans: the anomaly index of every label, the reversed triggers' sizes, the
    reversed triggers themselves."""

    kind, family = "scan", "model"

    def figures(self) -> list[Figure]:
        scored = [(t, c.result, c.extras.get("true_targets", [])) for t, c in self.panels
                  if isinstance(c.result.get("scores"), list) and len(c.result["scores"]) > 1]
        known = any(len(sc[2]) for sc in scored)  # a bench knows the planted targets; a scan alone does not
        figs = []
        if scored:
            thr = float(self.params.get("anomaly_threshold", self.params.get("threshold", 2.0)) or 2.0)
            ratio = self.params.get("min_ratio")
            guard = (f" A label above the line is flagged when its trigger is also at least {float(ratio):g}x smaller "
                     "than the median label's." if isinstance(ratio, (int, float)) and ratio > 1 else "")
            figs.append({"src": plots.anomaly_bars(scored, threshold=thr),
                         "caption": ("Anomaly index per label (red: flagged, amber: the planted target; dashed: the "
                                     "threshold). A backdoor target stands out above the line." if known else
                                     "Anomaly index per label (red: flagged; dashed: the threshold). A backdoor "
                                     "target stands out above the line.") + guard})
        normed = [s for s in scored if isinstance(s[1].get("l1_norms"), list)]
        if normed:
            figs.append({"src": plots.norm_box(normed),
                         "caption": ("L1 norm of the reversed trigger of each label: the box holds the other labels, "
                                     "red points the planted target(s); a backdoor needs a much smaller trigger."
                                     if known else "L1 norm of the reversed trigger of each label: a backdoor "
                                     "target needs a much smaller trigger than the others, an outlier below the "
                                     "box.")})
        return figs

    def galleries(self) -> list[dict[str, Any]]:
        return figures.galleries(self.panels)

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        labs = d.get("flagged_labels") or []
        if d.get("infected"):
            return (f"{title}: backdoor found. Suspected target label{'s' if len(labs) > 1 else ''}: "
                    f"{', '.join(map(str, labs))}.", "bad")
        return f"{title}: no backdoor found.", "good"


class HeatmapDisplay(Display):
    """A moving-window search: the heat map of the suspected target label and the trigger found."""

    kind, family = "heatmap", "model"

    def figures(self) -> list[Figure]:
        maps = [(t, np.asarray(c.result["heatmap"], dtype=float)) for t, c in self.panels
                if isinstance(c.result.get("heatmap"), list)]
        src = plots.heatmaps(maps[:8]) if maps else None
        if not src:
            return []
        return [{"src": src, "caption": "Heat map of the suspected target label: bright where a small window "
                                        "of trigger pixels sends inputs to that label."}]

    def galleries(self) -> list[dict[str, Any]]:
        return figures.galleries(self.panels)

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        return f"{title}: heat map of label {d.get('target')}, hottest at {tuple(d.get('peak') or ())}.", "neutral"


class DistributionDisplay(Display):
    """A trigger distribution: samples of the learnt triggers, each stamped on black."""

    kind, family = "distribution", "model"

    def figures(self) -> list[Figure]:
        figs = []
        for t, c in self.panels:
            samples = c.result.get("samples")
            src = plots.image_grid(np.asarray(samples, dtype=float), title=f"{t}: samples") \
                if isinstance(samples, list) and samples else None
            if src:
                figs.append({"src": src, "caption": "Samples (samples): triggers drawn from the learnt "
                                                    "distribution, each stamped on black."})
        return figs

    def galleries(self) -> list[dict[str, Any]]:
        return figures.galleries(self.panels)

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        return f"{title}: results for label {d.get('target', '?')}.", "neutral"


class SanitizerDisplay(Display):
    """A data sanitiser: the suspicion scores of the training samples, and a 2-D projection of the
    target label's activations where the bench made one."""

    kind, family = "sanitize", "data"

    def figures(self) -> list[Figure]:
        truth = all("is_poison" in c.extras for _, c in self.panels)
        panels = []
        for t, c in self.panels:
            s = c.result.get("scores") or []
            # the truth where the page knows it, else (one command's report) what the sanitiser flagged
            red = set(c.extras.get("is_poison", [])) if truth else set(c.result.get("flagged_indices") or [])
            if s:
                pm = np.isin(np.arange(len(s)), list(red))
                arr = np.asarray([np.nan if v is None else v for v in s], dtype=float)
                panels.append((t, arr[~pm], arr[pm], None))
        figs = []
        if panels:
            names = ("clean", "poisoned") if truth else ("kept", "flagged")
            figs.append({"src": plots.score_histograms(panels, xlabel="suspicion score", labels=names),
                         "caption": f"Scores of {names[0]} (blue) and {names[1]} (red) training samples, as the "
                                    f"sanitiser ranked them (higher = more suspicious)."})
        src = plots.projections([(t, c.extras.get("projection")) for t, c in self.panels
                                 if c.extras.get("projection")])
        if src:
            figs.append({"src": src, "caption": "2-D projection (PCA) of the penultimate activations of the target "
                                                "label's training samples: poisoned in red, flagged ringed."})
        return figs

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        f = d.get("flagged_indices") or []
        n = len(d.get("scores") or [])
        return f"{title}: {len(f)} of {n} samples flagged as poisoned.", "bad" if f else "good"


class FilterDisplay(Display):
    """An input filter: the scores of clean and stamped inputs, and its threshold."""

    kind, family = "filter", "input"

    @classmethod
    def extras_of(cls, d: Mapping[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        ex = dict(extras)
        if "clean_scores" not in ex and "clean_scores" in d:
            ex["clean_scores"] = d["clean_scores"]
        if "triggered_scores" not in ex and "scores" in d:
            ex["triggered_scores"] = d["scores"]
        if "threshold" not in ex:
            ex["threshold"] = d.get("threshold")
        return ex

    def figures(self) -> list[Figure]:
        panels = [(t, c.extras.get("clean_scores", []), c.extras.get("triggered_scores", []), c.extras.get("threshold"))
                  for t, c in self.panels if c.extras.get("clean_scores")]
        if not panels:
            return []
        labels = tuple(self.panels[0][1].extras.get("labels") or ("clean", "triggered"))
        return [{"src": plots.score_histograms(panels, xlabel="score", labels=labels),  # type: ignore[arg-type]
                 "caption": "Scores of clean (blue) and stamped (red) test inputs (higher = more suspicious); "
                            "inputs right of the dashed threshold are rejected. Well separated histograms mean a "
                            "good filter."}]

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        sc = d.get("scores") or []
        thr = d.get("threshold")
        if sc and thr is not None:
            k = sum(1 for v in sc if v is not None and v > thr)
            return f"{title}: {k} of {len(sc)} inputs flagged as carrying a trigger.", "bad" if k else "good"
        return f"{title}: filter fitted (threshold {thr}).", "neutral"


class PopulationDisplay(Display):
    """A detector scored over a population of models (:func:`trojanscope.population.score_scan`):
    its reliability diagram and its probabilities of clean and backdoored models."""

    kind, family = "population", "population"

    def figures(self) -> list[Figure]:
        panels = [(t, c.result) for t, c in self.panels if c.result.get("models")]
        if not panels:
            return []
        figs = [{"src": plots.reliability_diagram([(t, d["reliability"]) for t, d in panels]),
                 "caption": "Reliability: the share of backdoored models among those given about the same "
                            "probability (numbers: models per bin). A calibrated detector stays on the dashed "
                            "diagonal."}]
        hist = [(t, [m["probability"] for m in d["models"] if not m["backdoored"]],
                 [m["probability"] for m in d["models"] if m["backdoored"]], d.get("threshold")) for t, d in panels]
        figs.append({"src": plots.score_histograms(hist, xlabel="probability", labels=("clean", "backdoored")),
                     "caption": "The probability of each clean (blue) and backdoored (red) model; models right of "
                                "the dashed threshold are called backdoored."})
        return figs

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        if not d.get("models"):
            return f"{title}: nothing scored.", "neutral"
        return (f"{title}: ROC-AUC {d['roc_auc']:.3f}, cross-entropy {d['cross_entropy']:.3f} over {d['n']} models "
                f"({d['positives']} backdoored); {d['false_positives']} false positive(s), {d['true_positives']} "
                f"backdoor(s) found.", "neutral")


class RepairDisplay(Display):
    """A repair: clean accuracy and attack success along its curve (pruning ratio, epochs...)."""

    kind, family = "repair", "repair"

    def figures(self) -> list[Figure]:
        panels = [(t, (c.result.get("details") or {}).get("pruning_curve") or c.result.get("history") or [])
                  for t, c in self.panels]
        planted_asr = all(c.extras.get("evaluated", True) for _, c in self.panels)
        src = plots.curves(panels, names=None if planted_asr else {"attack_success": "ASR (reversed trigger)"})
        if not src:
            return []
        what = "the planted trigger's attack success" if planted_asr else \
            "the attack success of the defence's own reversed trigger (it never sees the planted one)"
        return [{"src": src, "caption": f"The repair's curve: clean accuracy and {what} as the repair "
                                        f"proceeds. Panels are missing where the repair had nothing to do."}]

    def verdict(self, title: str) -> tuple[str, str]:
        d = self.panels[0][1].result if self.panels else {}
        hist = d.get("history") or []
        last = hist[-1] if hist and isinstance(hist[-1], Mapping) else {}
        acc = last.get("test_accuracy", last.get("accuracy"))
        return (f"{title}: repaired model ready" + (f", accuracy {100 * acc:.0f}%." if acc is not None else "."),
                "neutral")


class ChainDisplay(RepairDisplay):
    """A chain of defences: clean accuracy and attack success of the defended system after each step."""

    kind, family = "chain", "chain"

    def figures(self) -> list[Figure]:
        src = plots.curves([(t, c.result.get("history") or []) for t, c in self.panels])
        if not src:
            return []
        return [{"src": src, "caption": "Clean accuracy and attack success of the defended system after each "
                                        "step of the chain (inputs a filter rejects count as neither)."}]


#: The display of each kind of result.
DISPLAYS: dict[str, type[Display]] = {c.kind: c for c in (ScanDisplay, HeatmapDisplay, DistributionDisplay,
                                                          SanitizerDisplay, FilterDisplay, RepairDisplay,
                                                          ChainDisplay, PopulationDisplay)}
