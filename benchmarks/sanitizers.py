"""Figures for the data sanitisers (issue 4) on mnist5k (4,000 training images).

For BadNets (4x4 white square, target 0) and the blended trigger (uniform noise, alpha 0.2), each
at 2 %, 5 % and 10 % poisoned: poison removed, clean removed, and after retraining from scratch on
what is left, clean accuracy and attack success, for the default (epsilon-free) modes and the
papers' modes. Then provenance filtering with four sources, and the default modes on clean data.
``--part source``: a source-specific square (labels 1 and 7 to 9, stamped cover samples of the
other labels keep theirs) at 10 %, measured on the sources' test images.

    nice python benchmarks/sanitizers.py [--part square|blend|source|provenance|clean|all] [--epochs 3]
    options: --side-rules spread,typicality,agreement (the default modes once per rule of
             ``poisoned_side``) --refine (the default modes with ``reclassify_refined``)

Ground truth enters only through ``trojanscope.metrics``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

import trojanscope as ts
from trojanscope.defenses import ActivationClustering, ProvenanceFilter, SpectralSignatures
from trojanscope.training import retrain
from trojanscope.metrics import attack_success_rate, clean_accuracy, detection_metrics
from trojanscope.models import create_model
from trojanscope.training import train_new


#: run only the methods whose name contains one of these (``--methods``); empty: all
ONLY: list[str] = []
#: the default modes' settings (``--side-rules``, ``--no-refine``): one row per side rule
AUTO: dict = {"side_rules": ["spread"], "refine": False}


def auto_methods() -> list[tuple[str, object, object]]:
    """AC and Spectral Signatures in their default modes, once per side rule asked for."""
    rows = []
    for rule in AUTO["side_rules"]:
        suffix = "" if rule == "spread" else f" ({rule})"
        kw = {"side_rule": rule, "refine": AUTO["refine"]}
        rows += [(f"AC auto{suffix}", ActivationClustering(**kw)), (f"spectral auto{suffix}", SpectralSignatures(**kw))]
    return rows


def methods(rate: float) -> list[tuple[str, object, bool]]:
    """(name, sanitiser, retrain after it?): retraining is the slow part on a shared CPU."""
    rows = [(name, m, True) for name, m in auto_methods()] + [
        ("AC paper (ex. reclass., T=1)", ActivationClustering(mode="paper"), False),
        ("AC paper (relative size 0.35)", ActivationClustering(mode="paper", analysis="relative-size"), False),
        (f"spectral paper (eps={rate:g})", SpectralSignatures(mode="paper", epsilon=rate), True),
    ]
    if rate != 0.05:  # the paper's bound at its usual value, beside the true rate
        rows.insert(4, ("spectral paper (eps=0.05)", SpectralSignatures(mode="paper", epsilon=0.05), False))
    return rows


def evidence(res, labels) -> dict:
    """The reclassification evidence of ``labels`` (a default mode's result; empty for a paper
    mode's): side sizes, own shares, and the label each side is read as, with its share."""
    keys = ("sizes", "own_share", "top_other_share", "source")
    return {k: {f: res.per_label[k][f] for f in keys if f in res.per_label[k]}
            for k in dict.fromkeys(labels) if k in getattr(res, "per_label", {})}


def trigger(kind: str, shape) -> ts.Trigger:
    return ts.Trigger.square(shape, 4, "white", "bottom-right") if kind == "square" else ts.Trigger.noise(shape, 0.2)


#: ``--part source``: the source labels and the target of the source-specific attack
SOURCES, SOURCE_TARGET = (1, 7), 9


def attack_rows(kind: str, rates: list[float], epochs: int, train, test, clean_acc: float) -> list[dict]:
    rows = []
    for rate in rates:
        trig = trigger("square" if kind == "source" else kind, train.image_shape)
        target, sources = (SOURCE_TARGET, SOURCES) if kind == "source" else (0, None)
        atk = ts.BadNets(trig, target=target, rate=rate, seed=0, source_labels=sources)
        poisoned = atk.poison(train)
        t0 = time.perf_counter()
        model = train_new("mnist_cnn", poisoned, seed=0, epochs=epochs)
        base = {"trigger": kind, "rate": rate}

        def asr(m):
            return attack_success_rate(m, test, trig, target, source_labels=sources)

        rows.append({**base, "method": "(backdoored model)", "accuracy": clean_accuracy(model, test),
                     "attack_success": asr(model), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
        for name, m, again in methods(rate):
            if ONLY and not any(o in name for o in ONLY):
                continue
            t0 = time.perf_counter()
            res = m.inspect(model, poisoned)
            secs = time.perf_counter() - t0
            dm = detection_metrics(res.scores, poisoned.is_poison, res.flagged)
            row = {**base, "method": name, "attacked_labels": res.attacked_labels,
                   "poison_removed": dm["recall"], "clean_removed": dm["fpr"], "auroc": dm["auroc"],
                   "n_flagged": dm["n_flagged"], "seconds": secs,
                   "evidence": evidence(res, [*res.attacked_labels, target])}
            if again:
                rr = retrain(model, poisoned, res, test=test, epochs=epochs, seed=0)
                row.update(accuracy=rr.accuracy, attack_success=asr(rr.model),
                           accuracy_vs_clean=rr.accuracy - clean_acc)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def provenance_rows(epochs: int, train, val, rate: float = 0.1) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    trig = trigger("square", train.image_shape)
    poisoned = ts.BadNets(trig, target=0, rate=rate, seed=0).poison(train)
    # four sources: every poisoned sample comes from source 3, the clean ones are spread over all four
    src = torch.randint(0, 4, (len(train),), generator=g)
    src_p = src.clone()
    src_p[poisoned.poison_indices] = 3
    for setting, data, groups in (("poison all in source 3", poisoned, src_p), ("all four clean", train, src)):
        # the filter only takes the architecture from the model (it retrains from scratch)
        model = create_model("mnist_cnn", input_shape=data.image_shape, num_classes=data.num_classes)
        for mode, variant, trusted in (("auto", "trusted", val), ("auto", "untrusted", None), ("paper", "trusted", val)):
            if mode == "paper" and setting != "poison all in source 3":
                continue  # the paper's rule is only measured where it has something to find (CPU time)
            t0 = time.perf_counter()
            res = ProvenanceFilter(mode=mode, retrain_epochs=epochs).inspect(model, dataclasses.replace(data, groups=groups),
                                                                             trusted=trusted)
            rows.append({"setting": setting, "mode": mode, "variant": variant,
                         "flagged_segments": res.flagged_segments,
                         "scores": {s: round(v["score"], 4) for s, v in res.per_segment.items()},
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def clean_rows(epochs: int, train, test) -> list[dict]:
    model = train_new("mnist_cnn", train, seed=0, epochs=epochs)
    rows = []
    for name, m in auto_methods():
        if ONLY and not any(o in name for o in ONLY):
            continue
        t0 = time.perf_counter()
        res = m.inspect(model, train)
        rows.append({"data": "clean", "method": name, "attacked_labels": res.attacked_labels,
                     "flagged_share": float(res.flagged.float().mean()), "n_flagged": int(res.flagged.sum()),
                     "seconds": time.perf_counter() - t0, "evidence": evidence(res, res.attacked_labels)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["square", "blend", "source", "provenance", "clean", "all"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rates", default="0.02,0.05,0.1")
    ap.add_argument("--blend-rates", default="0.02,0.05,0.1")
    ap.add_argument("--provenance-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="", help="comma-separated name fragments, e.g. 'spectral auto'")
    ap.add_argument("--side-rules", default="spread", help="the default modes' poisoned_side rules, e.g. spread,typicality")
    ap.add_argument("--refine", action="store_true", help="the default modes with reclassify_refined")
    a = ap.parse_args(argv)
    AUTO.update(side_rules=a.side_rules.split(","), refine=a.refine)
    ONLY[:] = [m for m in a.methods.split(",") if m]
    torch.set_num_threads(a.threads)
    train, val, test = (ts.load_data("mnist5k", s) for s in ("train", "val", "test"))
    rates = [float(r) for r in a.rates.split(",")]
    t0 = time.perf_counter()
    clean_acc = 0.0
    if a.part in ("square", "blend", "source", "all"):
        clean_model = train_new("mnist_cnn", train, seed=0, epochs=a.epochs)
        clean_acc = clean_accuracy(clean_model, test)
        print(json.dumps({"clean model accuracy": clean_acc, "epochs": a.epochs}), flush=True)
    rows: list[dict] = []
    if a.part in ("square", "all"):
        rows += attack_rows("square", rates, a.epochs, train, test, clean_acc)
    if a.part in ("blend", "all"):
        rows += attack_rows("blend", [float(r) for r in a.blend_rates.split(",")], a.epochs, train, test, clean_acc)
    if a.part == "source":
        rows += attack_rows("source", [0.1], a.epochs, train, test, clean_acc)
    if a.part in ("clean", "all"):
        rows += clean_rows(a.epochs, train, test)
    if a.part in ("provenance", "all"):
        rows += provenance_rows(a.provenance_epochs, train, val)
    cols = ["trigger", "rate", "method", "attacked_labels", "poison_removed", "clean_removed", "auroc", "accuracy",
            "attack_success", "accuracy_vs_clean", "seconds"]
    from trojanscope.cli._common import table

    att = [r for r in rows if "trigger" in r]
    if att:
        print(table(att, cols, percent=["rate", "poison_removed", "clean_removed", "accuracy", "attack_success",
                                        "accuracy_vs_clean"]))
    other = [r for r in rows if "trigger" not in r]
    for r in other:
        print(json.dumps(r))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
