"""Neural Cleanse over a population of models: probability, schedule cost, decision rules, fan-out.

Scans every model of a round (``trojanscope bench round``) with the configurations of
``--configs`` (default: successive halving and ``schedule="all"``, the paper's optimisation;
``halving+pairs`` adds the K x K pair scan), one thread each; the rows are cached under
``--work`` so a rerun only scans what is missing. Each round is scanned with the clean
validation split of the data it was trained on (its ``round.json``).

    # the rounds (training: calibration; held-out: the figures)
    trojanscope bench round --data digits --epochs 15 --train-size 0 --n 30 --seed 1 --out runs/digits1
    trojanscope bench round --data mnist5k --n 30 --seed 1 --out runs/mnist1
    trojanscope bench round --data digits --epochs 15 --train-size 0 --n 40 --seed 2 --out runs/digits2
    trojanscope bench round --data digits --epochs 15 --train-size 0 --n 24 --seed 3 --out runs/digits3
    trojanscope bench round --data mnist5k --n 40 --seed 2 --out runs/mnist2
    # fresh held-out rounds, made after the settings were chosen on the ones above
    trojanscope bench round --data digits --epochs 15 --train-size 0 --n 48 --seed 4 --out runs/digits4
    trojanscope bench round --data mnist5k --n 48 --seed 3 --out runs/mnist3
    trojanscope bench round --data mnist5k --n 48 --seed 4 --out runs/mnist4   # drawn after every choice
    # fit the calibration on the training rounds (prints CALIBRATION for _nc_evidence.py)
    python benchmarks/population.py --calibrate runs/digits1 runs/mnist1
    # the figures on the held-out rounds, scored together (and the decision rules' table)
    python benchmarks/population.py runs/digits2 runs/digits3 runs/mnist2
    # the pair scans, one population per data set (the figures of issue 15), and on the fresh rounds
    python benchmarks/population.py --configs all+pairs --calibrate runs/digits1 runs/mnist1 --population
    python benchmarks/population.py --configs all+pairs runs/digits2 runs/digits3 runs/mnist2 --population --pool
    python benchmarks/population.py --configs all+pairs runs/digits4 runs/mnist3 --population --pool
    python benchmarks/population.py --configs all+pairs runs/mnist4 --population --pool
    python benchmarks/population.py runs/mnist4 --population --pool      # the other scans and the old binary one
    # the same with the per-label population normalisation (pop_z; POP_CALIBRATION)
    python benchmarks/population.py --calibrate runs/digits1 runs/mnist1 --population
    python benchmarks/population.py runs/digits2 runs/digits3 runs/mnist2 --population
    # cost of 43 labels vs 10 (same architecture, synthetic 43-class data)
    python benchmarks/population.py --labels43
    # the same in seconds on colour.py's cached gtsrb_cnn models (signs43 vs cmnist)
    python benchmarks/population.py --colour43
    # fan-out: --workers 2 on Ray and on local processes vs --workers 1, and a resumed run
    python benchmarks/population.py --fanout runs/digits2

Ground truth (``truth/*.json``) is read here, for scoring only; the scanner never sees it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import trojanscope as ts
from trojanscope.defenses.model.neural_cleanse import CALIBRATION, EVIDENCE, trojan_probability
from trojanscope.defenses.model._nc_evidence import PAIR_EVIDENCE
from trojanscope.models import load_model
from trojanscope.population import (add_population_probability, expand_models, model_structure, population_scores,
                                    scan_population)
from trojanscope.rounds import load_truth

torch.set_num_threads(1)

#: the two configurations compared: the new default and the paper's schedule + the old rule
CONFIGS = {
    "halving": dict(schedule="halving"),
    "all": dict(schedule="all"),
    "halving+pairs": dict(schedule="halving", pairs=True),
    "all+pairs": dict(schedule="all", pairs=True),
}
#: the configurations this run scans (--configs)
ACTIVE = ["halving", "all"]
#: the evidence each configuration's calibration may use
FEATURES = {"halving": EVIDENCE, "all": EVIDENCE, "halving+pairs": EVIDENCE + PAIR_EVIDENCE,
            "all+pairs": EVIDENCE + PAIR_EVIDENCE}
#: ``--population``: the per-label population normalisation (:func:`population_label_z`), computed
#: within each round, added to the evidence (``pop_z``: minus the lowest z of the model's labels)
POP_FEATURES = ("pop_z",)
#: the same for a pair scan: also ``pair_pop_z``, the normalisation over the K x K pairs, and
#: ``pair_rows_pop_z``, its mean over the sources of each source's lowest pair z
POP_PAIR_FEATURES = ("pop_z", "pair_pop_z", "pair_rows_pop_z")
#: ``--population``'s calibration, fitted by ``--calibrate runs/digits1 runs/mnist1 --population``
#: (the same logistic fit as CALIBRATION); ``scan FOLDER`` uses it for ``population_probability``
from trojanscope.defenses.model._nc_evidence import POPULATION_CALIBRATION as POP_CALIBRATION  # noqa: E402


def pop_features(name: str) -> tuple[str, ...]:
    return POP_PAIR_FEATURES if CONFIGS[name].get("pairs") else POP_FEATURES


def round_data(round_dir: Path, data: str | None) -> str:
    """The bundled data set a round was trained on (its ``round.json``), unless given."""
    return data or json.loads((round_dir / "round.json").read_text())["data"]


def scan_round(round_dir: Path, data: str | None, work: Path) -> dict[str, list[dict]]:
    val = ts.load_data(round_data(round_dir, data), "val")
    models = expand_models([str(round_dir / "models")])
    out = {}
    for name in ACTIVE:
        params = CONFIGS[name]
        t0 = time.perf_counter()
        out[name] = scan_population(models, val, params, out=work / round_dir.name / name)
        for r in out[name]:  # rows scanned before log_gap existed: it needs only the stored norms
            if r["error"] is None and "log_gap" not in r["evidence"]:
                two = sorted(r["l1_norms"])
                r["evidence"]["log_gap"] = math.log(max(two[1], 1e-6) / max(two[0], 1e-6))
            if r["error"] is None and "structure" not in r:  # rows scanned before the fingerprint existed
                r["structure"] = model_structure(load_model(r["file"]).model)
        print(f"# {round_dir.name} / {name}: {len(models)} models ({time.perf_counter() - t0:.0f} s this run)",
              file=sys.stderr)
        add_population_z(out[name], params["schedule"])
    return out


def add_population_z(rows: list[dict], schedule: str) -> None:
    """``pop_z`` (and, for pair scans, ``pair_pop_z``) in each scanned row's evidence, from
    :func:`trojanscope.population.add_population_probability` over the round's scanned models
    (their norms only, never their truth)."""
    add_population_probability(rows, schedule)
    for r in rows:
        if r.get("population_z") is not None:
            r["evidence"]["pop_z"] = r["population_z"]
        if r.get("population_pair_z") is not None:
            r["evidence"]["pair_pop_z"] = r["population_pair_z"]
        if r.get("population_pair_rows_z") is not None:
            r["evidence"]["pair_rows_pop_z"] = r["population_pair_rows_z"]


def truth_rows(round_dir: Path, rows: list[dict]) -> list[tuple[dict, dict]]:
    truth = load_truth(round_dir)
    pairs = []
    for r in rows:
        t = truth[Path(r["file"]).stem]
        if "excluded" not in t:
            pairs.append((r, t))
    return pairs


def fit_calibration(pairs: list[tuple[dict, dict]], features: tuple[str, ...] = EVIDENCE) -> dict:
    """Logistic regression of the truth on the evidence, refitted without any feature whose
    coefficient comes out negative (so the probability stays monotone in the evidence)."""
    from sklearn.linear_model import LogisticRegression

    feats = list(features)
    y = np.array([t["backdoored"] for _, t in pairs])
    while True:
        X = np.array([[r["evidence"][f] for f in feats] for r, _ in pairs if r["evidence"] is not None])
        lr = LogisticRegression(C=10.0, max_iter=5000).fit(X, y)
        neg = [f for f, c in zip(feats, lr.coef_[0]) if c < 0]
        if not neg:
            break
        feats = [f for f in feats if f not in neg]
    coef = {f: round(float(c), 4) for f, c in zip(feats, lr.coef_[0])}
    coef.update({f: 0.0 for f in features if f not in coef})
    return {"intercept": round(float(lr.intercept_[0]), 4), "coef": coef}


def feature_aurocs(pairs: list[tuple[dict, dict]], features: tuple[str, ...]) -> dict:
    """ROC-AUC of each piece of evidence alone as a score of "backdoored", over the round, and
    per attack mode (that mode's backdoors against all clean models)."""
    from sklearn.metrics import roc_auc_score

    ok = [(r, t) for r, t in pairs if r["error"] is None]
    out = {}
    for f in features:
        sub = {}
        for mode in (None, "all-to-one", "source-specific", "all-to-all"):
            sel = [(r, t) for r, t in ok if not t["backdoored"] or mode is None or t["mode"] == mode]
            y = [t["backdoored"] for _, t in sel]
            if 0 < sum(y) < len(y):
                sub[mode or "all"] = round(float(roc_auc_score(y, [r["evidence"][f] for r, _ in sel])), 3)
        out[f] = sub
    return out


def figures(pairs: list[tuple[dict, dict]], cal: dict | None, label: str, *, population: bool = False) -> dict:
    """The round's table row for a calibration; ``population``: the flagged labels also hold the
    label most anomalous against the population (``population_label``, as ``bench score`` counts)."""
    ok = [(r, t) for r, t in pairs if r["error"] is None]
    truth = np.array([t["backdoored"] for _, t in ok])
    prob = np.array([trojan_probability(r["evidence"], cal) if cal else r["probability"] for r, _ in ok])
    verdict = prob > 0.5
    s = population_scores(prob, truth)
    a2o = [(r, t, p) for (r, t), p in zip(ok, prob) if t["backdoored"] and t["mode"] == "all-to-one"]
    # flagged labels of a model called backdoored: the smallest-norm label and the MAD suspects
    hit = sum(p > 0.5 and (t["target"] == r["evidence"]["label"] or t["target"] in r["suspects"]
                           or (population and t["target"] == r.get("population_label"))) for r, t, p in a2o)
    by_mode = {}
    for mode in ("all-to-one", "source-specific", "all-to-all"):
        sel = [v for (r, t), v in zip(ok, verdict) if t["backdoored"] and t["mode"] == mode]
        by_mode[mode] = f"{sum(sel)}/{len(sel)}"
    by_arch = {}
    for arch in sorted({t["arch"] for _, t in ok}):
        sel = [v == t["backdoored"] for (r, t), v in zip(ok, verdict) if t["arch"] == arch]
        by_arch[arch] = f"{sum(sel)}/{len(sel)}"
    return {"scan": label, **s, "false_positives": int((verdict & ~truth).sum()),
            "true_positives": int((verdict & truth).sum()), "a2o_target_flagged": f"{hit}/{len(a2o)}",
            "detected_by_mode": by_mode, "correct_by_arch": by_arch, "errors": len(pairs) - len(ok),
            "_prob": prob.tolist(), "_truth": truth.tolist()}


def old_binary(pairs: list[tuple[dict, dict]]) -> dict:
    """The old scan: schedule "all", the MAD rule at 2 on the L1 norms (its score: the largest
    low-side L1 index; the probability of a binary verdict is 0 or 1)."""
    ok = [(r, t) for r, t in pairs if r["error"] is None]
    truth = np.array([t["backdoored"] for _, t in ok])
    l1 = np.array([r["old_l1_index"] for r, _ in ok])
    verdict = l1 > 2.0
    from sklearn.metrics import roc_auc_score

    s = population_scores(verdict.astype(float), truth)
    a2o = [(r, t, v) for (r, t), v in zip(ok, verdict) if t["backdoored"] and t["mode"] == "all-to-one"]
    hit = sum(bool(v) and t["target"] in r["old_l1_flagged"] for r, t, v in a2o)
    by_mode = {m: f"{sum(v for (r, t), v in zip(ok, verdict) if t['backdoored'] and t['mode'] == m)}/"
                  f"{sum(1 for r, t in ok if t['backdoored'] and t['mode'] == m)}"
               for m in ("all-to-one", "source-specific", "all-to-all")}
    return {"scan": "old binary (all, L1 MAD > 2)", "roc_auc": float(roc_auc_score(truth, l1)),
            "cross_entropy": s["cross_entropy"], "n": s["n"], "positives": s["positives"],
            "false_positives": int((verdict & ~truth).sum()), "true_positives": int((verdict & truth).sum()),
            "a2o_target_flagged": f"{hit}/{len(a2o)}", "detected_by_mode": by_mode}


def add_old_rule(rows: list[dict], round_dir: Path, data: str) -> None:
    """The L1-scale MAD index of each "all" scan (recomputed from the stored norms)."""
    from trojanscope.defenses.model.neural_cleanse import mad_anomaly_index

    for r in rows:
        if r["error"] is not None:
            continue
        n = torch.tensor(r["l1_norms"], dtype=torch.float64)
        idx = mad_anomaly_index(n).double()
        below = n < float(np.median(n.numpy()))
        low = torch.where(below, idx, torch.zeros_like(idx))
        r["old_l1_index"] = float(low.max())
        r["old_l1_flagged"] = [int(k) for k in (below & (idx > 2.0)).nonzero().flatten()]


#: the decision rules compared on the "all" scans' norms (issue 17): (scale, threshold, min_ratio)
MAD_RULES = (("l1", 2.0, 1.0), ("log", 2.0, 1.0), ("log", 3.0, 1.0), ("log", 3.0, 1.5), ("log", 2.0, 1.5))


def mad_rules(pairs: list[tuple[dict, dict]]) -> list[dict]:
    """The binary verdict of each rule (:func:`flag_labels`) on the stored L1 norms of the "all"
    scans: false positives, true positives, and backdoored all-to-one models whose target is
    flagged. ``("log", 3.0, 1.5)`` is ``NeuralCleanse``'s default; ``("l1", 2.0, 1.0)`` the paper's."""
    from trojanscope.defenses.model.neural_cleanse import flag_labels

    ok = [(r, t) for r, t in pairs if r["error"] is None]
    out = []
    for scale, thr, ratio in MAD_RULES:
        fp = tp = hit = 0
        for r, t in ok:
            flagged = flag_labels(torch.tensor(r["l1_norms"], dtype=torch.float64), scale=scale, threshold=thr,
                                  min_ratio=ratio)
            called = bool(flagged.any())
            fp += called and not t["backdoored"]
            tp += called and t["backdoored"]
            hit += bool(t["backdoored"] and t["mode"] == "all-to-one" and flagged[t["target"]])
        a2o = sum(t["backdoored"] and t["mode"] == "all-to-one" for _, t in ok)
        out.append({"rule": f"{scale} index > {thr:g}, {ratio:g}x below the median", "false_positives": fp,
                    "clean": sum(not t["backdoored"] for _, t in ok), "true_positives": tp,
                    "backdoored": sum(t["backdoored"] for _, t in ok), "a2o_target_flagged": f"{hit}/{a2o}"})
    return out


def reliability(prob: list[float], truth: list[bool], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, t = np.array(prob), np.array(truth, dtype=float)
    bins = np.linspace(0, 1, 6)
    ix = np.clip(np.digitize(p, bins) - 1, 0, 4)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    xs = [p[ix == b].mean() for b in range(5) if (ix == b).any()]
    ys = [t[ix == b].mean() for b in range(5) if (ix == b).any()]
    ns = [int((ix == b).sum()) for b in range(5) if (ix == b).any()]
    ax.plot(xs, ys, "o-")
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("share backdoored")
    ax.set_title("reliability (held-out round)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("round", nargs="*", type=Path, help="held-out round(s), scored together")
    ap.add_argument("--data", default=None, help="clean data to scan with (default: each round's own)")
    ap.add_argument("--work", type=Path, default=Path("runs/popbench"))
    ap.add_argument("--calibrate", type=Path, nargs="+", default=None,
                    help="fit CALIBRATION on these (training) rounds, together")
    ap.add_argument("--labels43", action="store_true")
    ap.add_argument("--colour43", action="store_true",
                    help="43 vs 10 labels on colour.py's cached gtsrb_cnn models (signs43 vs cmnist)")
    ap.add_argument("--fanout", type=Path, default=None)
    ap.add_argument("--fanout-n", type=int, default=8, help="models of the round the fan-out runs scan")
    ap.add_argument("--population", action="store_true",
                    help="also the per-label population normalisation of the norms (pop_z; POP_CALIBRATION)")
    ap.add_argument("--pool", action="store_true",
                    help="with --population: one population per data set over the given rounds, not one per round")
    ap.add_argument("--configs", default="halving,all", help=f"configurations to scan, of {', '.join(CONFIGS)}")
    a = ap.parse_args()
    ACTIVE[:] = a.configs.split(",")
    if a.calibrate is not None:
        per = [(d, scan_round(d, a.data, a.work)) for d in a.calibrate]
        train = {name: [pr for d, sc in per for pr in truth_rows(d, sc[name])] for name in ACTIVE}
        cal = {name: fit_calibration(rows, FEATURES[name]) for name, rows in train.items()}
        print("CALIBRATION =", json.dumps(cal, indent=1))
        for name, rows in train.items():
            f = figures(rows, cal[name], f"{name} (fitted, training rounds)")
            print(json.dumps({k: v for k, v in f.items() if not k.startswith("_")}))
        if a.population:
            pop = {name: fit_calibration(rows, FEATURES[name] + pop_features(name)) for name, rows in train.items()}
            print("POP_CALIBRATION =", json.dumps(pop, indent=1))
            for name, rows in train.items():
                f = figures(rows, pop[name], f"{name} + population z (fitted, training rounds)", population=True)
                print(json.dumps({k: v for k, v in f.items() if not k.startswith("_")}))
    if a.round:
        report_round(a.round, a.data, a.work, population=a.population, pool=a.pool)
    if a.labels43:
        labels43(a.work)
    if a.colour43:
        colour43()
    if a.fanout is not None:
        fanout(a.fanout, round_data(a.fanout, a.data), a.work, a.fanout_n)


def pool_population(per_round: list[tuple[Path, dict[str, list[dict]]]], data: str | None) -> None:
    """``--pool``: the population statistics over every given round of the same data set (one
    held-out population per data set, as a TrojAI round is one population) instead of per round."""
    by_data: dict[str, list[dict[str, list[dict]]]] = {}
    for d, sc in per_round:
        by_data.setdefault(round_data(d, data), []).append(sc)
    for scs in by_data.values():
        for name in ACTIVE:
            add_population_z([r for sc in scs for r in sc[name]], CONFIGS[name]["schedule"])


def report_round(round_dirs: list[Path], data: str, work: Path, *, population: bool = False,
                 pool: bool = False) -> None:
    per_round = [(d, scan_round(d, data, work)) for d in round_dirs]
    if pool:
        pool_population(per_round, data)
    scans = {name: [r for _, sc in per_round for r in sc[name]] for name in ACTIVE}
    pairs_by = {name: [pr for d, sc in per_round for pr in truth_rows(d, sc[name])] for name in ACTIVE}
    kept = [t for _, t in pairs_by[ACTIVE[0]]]
    n_all = sum(len(load_truth(d)) for d in round_dirs)
    print(f"held-out round(s) {', '.join(map(str, round_dirs))}: {len(kept)} models "
          f"({sum(t['backdoored'] for t in kept)} backdoored; modes "
          f"{ {m: sum(t.get('mode') == m for t in kept) for m in ('all-to-one', 'source-specific', 'all-to-all')} }; "
          f"architectures { {a: sum(t['arch'] == a for t in kept) for a in sorted({t['arch'] for t in kept})} }; "
          f"{n_all - len(kept)} excluded for ASR < 80%)")
    table = []
    for name in ACTIVE:
        pairs = pairs_by[name]
        feats = FEATURES[name] + (pop_features(name) if population else ())
        print(json.dumps({"config": name, "feature_auroc": feature_aurocs(pairs, feats)}))
        if population and name in POP_CALIBRATION:
            table.append(figures(pairs, POP_CALIBRATION[name], f"{name}, probability with population z",
                                 population=True))
        if name not in CALIBRATION:
            continue
        f = figures(pairs, CALIBRATION[name], f"{name} schedule, probability")
        table.append(f)
        if name == "halving":
            reliability(f["_prob"], f["_truth"], work / "reliability.png")
        if name == "all":
            add_old_rule([r for r, _ in pairs], None, data)
            table.append(old_binary(pairs))
            for row in mad_rules(pairs):
                print(json.dumps(row))
    for f in table:
        print(json.dumps({k: v for k, v in f.items() if not k.startswith("_")}))
    for name, rows in scans.items():
        ok = [r for r in rows if r["error"] is None]
        print(f"{name}: {np.mean([r['seconds'] for r in ok]):.2f} s/model (1 thread), "
              f"{np.mean([r['image_passes'] for r in ok]):.0f} image passes/model")
    if not {"halving", "all"} <= set(ACTIVE):
        return
    fh = figures(pairs_by["halving"], CALIBRATION["halving"], "")["_prob"]
    fa = figures(pairs_by["all"], CALIBRATION["all"], "")["_prob"]
    agree = sum((x > 0.5) == (y > 0.5) for x, y in zip(fh, fa))
    print(f"verdicts equal between schedules: {agree}/{len(fh)}; pass ratio all/halving "
          f"{np.mean([r['image_passes'] for r in scans['all']]) / np.mean([r['image_passes'] for r in scans['halving']]):.2f}")
    print(f"reliability plot: {work / 'reliability.png'}")


def labels43(work: Path) -> None:
    """Cost of a 43-label scan against a 10-label scan of the same architecture (mnist_cnn on
    synthetic digits data: 43 classes = a digit and one of 5 transforms), on a clean and a BadNets
    model (3x3 white patch, 10%) of each: image passes, seconds, the target's rank among the
    norms and the verdicts, for schedule="all", "halving" (its first rung at fewer images per step
    beyond 10 labels) and "halving" with the full first rung (``halving_first_samples=16``, the
    schedule before that rule)."""
    from trojanscope.defenses.model.neural_cleanse import NeuralCleanse
    from trojanscope.rounds import build_architecture
    from trojanscope.training import train

    base = ts.load_data("digits", "all")
    x, y = base.x, base.y
    tf = [lambda v: v, lambda v: 1 - v, lambda v: v.flip(-1), lambda v: v.transpose(-1, -2), lambda v: v.flip(-2)]
    xs, ys = [], []
    for t, f in enumerate(tf):
        keep = y < (10 if t < 4 else 3)
        xs.append(f(x[keep]))
        ys.append(y[keep] + 10 * t)
    x43, y43 = torch.cat(xs), torch.cat(ys)
    d43 = ts.ImageDataset(x43, y43, 43, None, "digits43")
    tr43, va43 = d43.split(0.8, seed=0)
    tr10, va10 = ts.load_data("digits", "train"), ts.load_data("digits", "val")
    schedules = {"all": {"schedule": "all"}, "halving": {"schedule": "halving"},
                 "halving, full first rung": {"schedule": "halving", "halving_first_samples": 16}}
    res = {}
    for name, tr, va in (("10", tr10, va10), ("43", tr43, va43)):
        trig = ts.Trigger.parse("square:3:white:bottom-right", tr.image_shape)
        for kind in ("clean", "badnets"):
            data = tr if kind == "clean" else ts.BadNets(trig, target=0, rate=0.1, seed=0).poison(tr)
            m = build_architecture("mnist_cnn", tr.image_shape, tr.num_classes, 0)
            train(m, data, epochs=15, seed=0)
            m.eval()
            asr = ts.metrics.attack_success_rate(m, va, trig, 0) if kind == "badnets" else None
            for sched, kw in schedules.items():
                t0 = time.perf_counter()
                r = NeuralCleanse(**kw, decision="probability").scan(m, va)
                secs = time.perf_counter() - t0
                res[(name, kind, sched)] = (secs, r.image_passes)
                rank = int((r.l1_norms < r.l1_norms[0]).sum())
                print(f"{name} labels, {kind}{f' (ASR {asr:.2f})' if asr is not None else ''}, {sched}: {secs:.1f} s, "
                      f"{r.image_passes} image passes, label 0's norm rank {rank}, probability {r.probability:.2f}, "
                      f"flagged {r.flagged_labels}, CA {ts.metrics.clean_accuracy(m, va):.2f}", flush=True)
    for sched in schedules:
        p = [res[("43", k, sched)][1] / res[("10", k, sched)][1] for k in ("clean", "badnets")]
        sec = [res[("43", k, sched)][0] / res[("10", k, sched)][0] for k in ("clean", "badnets")]
        print(f"{sched}: 43-vs-10 cost ratio {p[0]:.2f} / {p[1]:.2f} (passes, clean / badnets), "
              f"{sec[0]:.2f} / {sec[1]:.2f} (seconds)")


def colour43(repeats: int = 2) -> None:
    """Seconds of a halving scan on 43 labels against 10, same architecture: the ``gtsrb_cnn``
    models (clean and BadNets) that ``benchmarks/colour.py`` trained and cached on signs43 and on
    cmnist, each scanned ``repeats`` times, the two sets interleaved (the median is reported):
    seconds, optimisation and held-out image passes, probability and flagged labels."""
    from trojanscope.defenses.model.neural_cleanse import NeuralCleanse

    cache = Path(__file__).resolve().parent.parent / "runs" / "colour"
    sets = {"signs43": "signs43-gtsrb_cnn-n17200-e10-adam", "cmnist": "cmnist-gtsrb_cnn-n4000-e10-adam"}
    secs: dict[tuple[str, str], list[float]] = {}
    for rep in range(repeats):
        for kind in ("clean", "badnets0.1"):
            for ds, tag in sets.items():
                path = cache / f"{tag}-{kind}"
                if not (path / "model.safetensors").exists():
                    sys.exit(f"error: {path} is missing: train it with `python benchmarks/colour.py --datasets {ds} "
                             f"--archs gtsrb_cnn --recipe adam --epochs 10 --rates 0.1 --train-only`")
                model, val = ts.load_model(path).model, ts.load_data(f"{ds}:val")
                t0 = time.perf_counter()
                r = NeuralCleanse(schedule="halving", decision="probability").scan(model, val)
                secs.setdefault((ds, kind), []).append(time.perf_counter() - t0)
                print(f"{ds} {kind} (repeat {rep}): {secs[(ds, kind)][-1]:.1f} s, {r.image_passes} optimisation passes, "
                      f"{r.details['holdout_image_passes']} held-out passes ({len(r.details['holdout_labels'])} labels), "
                      f"probability {r.probability:.2f}, flagged {r.flagged_labels}", flush=True)
    for kind in ("clean", "badnets0.1"):
        a, b = (float(np.median(secs[(ds, kind)])) for ds in sets)
        print(f"{kind}: 43-vs-10 seconds {a / b:.2f} ({a:.1f} s / {b:.1f} s, medians of {repeats})")


def fanout(round_dir: Path, data: str, work: Path, n: int) -> None:
    """Wall time of `scan` over (the first ``n`` models of) the round folder: --workers 1, 2 on
    Ray, 2 on processes; a resumed run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folder = work / "fanout_models"
    folder.mkdir(parents=True, exist_ok=True)
    for m in expand_models([str(round_dir / "models")])[:n]:
        link = folder / m.name
        if not link.exists():
            link.symlink_to(m.resolve())
    base = [sys.executable, "-m", "trojanscope", "scan", str(folder), "--data", data, "-q"]
    for label, extra in (("workers 1", ["--workers", "1"]), ("workers 2, ray", ["--workers", "2", "--backend", "ray"]),
                         ("workers 2, processes", ["--workers", "2", "--backend", "processes"])):
        out = work / "fanout" / label.replace(" ", "_").replace(",", "")
        subprocess.run(["rm", "-rf", str(out)])
        t0 = time.perf_counter()
        p = subprocess.run(base + extra + ["--out", str(out)], env=env, capture_output=True, text=True)
        print(f"{label}: {time.perf_counter() - t0:.1f} s wall, exit {p.returncode}")
    out = work / "fanout" / "resumed"
    subprocess.run(["rm", "-rf", str(out)])
    proc = subprocess.Popen(base + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_models = len(expand_models([str(folder)]))
    while len(list((out / "rows").glob("*.json"))) < n_models // 2 if (out / "rows").exists() else True:
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    done = len(list((out / "rows").glob("*.json")))
    t0 = time.perf_counter()
    p = subprocess.run(base + ["--out", str(out)], env=env, capture_output=True, text=True)
    rows = json.loads((out / "scan.json").read_text())
    print(f"killed after {done}/{n_models} models; the rerun scanned {n_models - done} in "
          f"{time.perf_counter() - t0:.1f} s, exit {p.returncode}, {len(rows)} rows")


if __name__ == "__main__":
    main()
