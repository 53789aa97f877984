"""Issue 16: STRIP at the cost it deserves. Fixed S = 100 against early decisions, the
activation filter's one pass, CPU forward options, and ART's STRIP on the same models and inputs.

Run (one thread; the CPU is shared: be nice)::

    nice -n 10 .venv/bin/python benchmarks/strip_speed.py                # everything
    nice -n 10 .venv/bin/python benchmarks/strip_speed.py --models badnets --no-art
    nice -n 10 .venv/bin/python benchmarks/strip_speed.py --no-art --no-activation --no-forward --clip on,off
    nice -n 10 .venv/bin/python benchmarks/strip_speed.py --no-art --no-activation --no-forward --statistic entropy,own_label
    nice -n 10 .venv/bin/python benchmarks/strip_speed.py --no-art --no-activation --no-forward --calibration global,label

Models: mnist_cnn trained 3 epochs on mnist5k with BadNets (4x4 white square), blended (uniform
noise at 20%) and checkerboard (4x4) triggers, target 0, 10% poisoned, seed 0; cached under
runs/strip_speed/. The filter is fitted on the validation split (250 overlays + 250 calibration
inputs, FRR target 1%); it is measured on the 500 clean test images and the triggered test images
whose label is not the target. ms/input counts the decisions only (not ``fit``).

ART's STRIP runs in its own environment, never a dependency of trojanscope::

    python3.11 -m venv benchmarks/.venv-art
    benchmarks/.venv-art/bin/pip install torch==2.13.0 adversarial-robustness-toolbox packaging

(``--art-python PATH`` or ``$ART_PYTHON`` points elsewhere.) The model goes to ART as TorchScript
(``torch.jit.trace`` of the model followed by a softmax: ART's STRIP reads the classifier's outputs
as probabilities, and NaN entropies from logits stop its ``mitigate``), the inputs as an .npz; this script runs itself there with
``--art-worker DIR``, a mode that imports only torch, numpy and ART.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S = 100


# --- ART's side (runs in the ART environment: no trojanscope) --------------------------------------

def art_worker(d: Path) -> None:
    import numpy as np
    import torch
    from art.defences.transformer.poisoning import STRIP as ArtSTRIP
    from art.estimators.classification import PyTorchClassifier
    from scipy.stats import entropy

    torch.set_num_threads(1)
    np.random.seed(0)
    f = np.load(d / "inputs.npz")
    model = torch.jit.load(str(d / "model.pt"))
    model.eval()
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(f["x_val"].shape[1:]),
                            nb_classes=int(f["nb_classes"]), clip_values=(0.0, 1.0), device_type="cpu")
    defended = ArtSTRIP(clf)(num_samples=S, false_acceptance_rate=0.01)
    t0 = time.perf_counter()
    defended.mitigate(f["x_val"])
    fit_s = time.perf_counter() - t0
    seen: list[np.ndarray] = []
    inner = defended.predict_fn

    def recording(x: np.ndarray) -> np.ndarray:  # keeps ART's own perturbed predictions for the AUROC
        out = inner(x)
        seen.append(out)
        return out

    defended.predict_fn = recording
    x = f["x_test"]
    t0 = time.perf_counter()
    pred = defended.predict(x)
    secs = time.perf_counter() - t0
    abstain = ~pred.any(1)  # ART abstains with an all-zero row
    # the entropy exactly as ART computes it (calls after the first, one per input)
    ent = np.array([np.sum(entropy(p, base=2, axis=0)) / float(S) for p in seen[1:]])
    json.dump({"ms_per_input": 1000 * secs / len(x), "fit_s": fit_s, "flagged": abstain.tolist(),
               "score": (-ent).tolist(), "threshold_entropy": float(defended.entropy_threshold)},
              open(d / "art.json", "w"))


# --- trojanscope's side ---------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["badnets", "blended", "checkerboard"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument("--clip", default="auto", help="STRIP's clip of the superimposed copies, comma-separated: auto "
                                                   "(its default), on, off (the reference code's float sum)")
    ap.add_argument("--alpha", default="default", help="STRIP's overlay weight, comma-separated: default "
                    "(its own: 1.5 on a clipped sum, 1.0 unclipped) or numbers")
    ap.add_argument("--statistic", default="entropy", help="STRIP's per-copy statistic, comma-separated: entropy "
                    "(the paper's), own_label")
    ap.add_argument("--calibration", default="default", help="STRIP's threshold calibration, comma-separated: "
                    "default (its own: label for the entropy, global for the own label), global (the paper's), label")
    ap.add_argument("--no-activation", action="store_true", help="skip the activation filter (it runs a Neural Cleanse scan)")
    ap.add_argument("--no-forward", action="store_true", help="skip the forward-option timings")
    ap.add_argument("--art-python", default=os.environ.get("ART_PYTHON", str(ROOT / "benchmarks" / ".venv-art" / "bin" / "python")))
    ap.add_argument("--art-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.art_worker is not None:
        art_worker(args.art_worker)
        return

    import numpy as np
    import torch

    import trojanscope as ts
    from trojanscope.defenses import STRIP, ActivationFilter
    from trojanscope.defenses.model.neural_cleanse import NeuralCleanse
    from trojanscope.metrics import detection_metrics
    from trojanscope.training import train_new

    torch.set_num_threads(1)
    train, val, test = (ts.load_data("mnist5k", s) for s in ("train", "val", "test"))
    shape = train.image_shape
    triggers = {"badnets": ts.Trigger.square(shape, 4, "white", "bottom-right"),
                "blended": ts.Trigger.noise(shape, alpha=0.2, seed=1),
                "checkerboard": ts.Trigger.checkerboard(shape, 4, "bottom-right")}
    cache = ROOT / "runs" / "strip_speed"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); S = {S}; mnist5k, {args.epochs} epochs")

    def model_for(name: str, attack: ts.BadNets) -> torch.nn.Module:
        path = cache / f"{name}-e{args.epochs}"
        if (path / "model.safetensors").exists():
            return ts.load_model(path).model
        t0 = time.perf_counter()
        m = train_new("mnist_cnn", attack.poison(train), seed=0, epochs=args.epochs)
        ts.save_model(m, path, ts.ModelSpec("mnist_cnn", shape, 10))
        print(f"[trained {name} in {time.perf_counter() - t0:.0f} s]", flush=True)
        return m

    def figures(scores: torch.Tensor, flagged: torch.Tensor, truth: torch.Tensor) -> dict:
        m = detection_metrics(scores, truth, flagged)
        return {"FAR": float((~flagged[truth]).float().mean()), "FRR": float(flagged[~truth].float().mean()),
                "AUROC": m["auroc"]}

    rows, ratios = [], []
    for name in args.models:
        attack = ts.BadNets(triggers[name], target=0, rate=0.1, seed=0)
        model = model_for(name, attack)
        keep = test.y != 0
        x = torch.cat([test.x, attack.triggers[0].apply(test.x[keep])])
        truth = torch.cat([torch.zeros(len(test)), torch.ones(int(keep.sum()))]).bool()
        print(f"\n== {name}: CA {ts.clean_accuracy(model, test):.3f}, ASR {attack.success_rate(model, test):.3f}; "
              f"{int((~truth).sum())} clean + {int(truth.sum())} triggered inputs", flush=True)
        ms = {}
        for mode, kw in [(m + {"auto": "", "on": " clipped", "off": " unclipped"}[clip]
                          + ("" if alpha == "default" else f" alpha={alpha}")
                          + ("" if stat == "entropy" else f" {stat}")
                          + ("" if cal == "default" else f" {cal} calibration"),
                          {**k, "clip": {"auto": None, "on": True, "off": False}[clip],
                           "alpha": None if alpha == "default" else float(alpha), "statistic": stat,
                           "calibration": None if cal == "default" else cal})
                         for clip in args.clip.split(",")
                         for alpha in args.alpha.split(",")
                         for stat in args.statistic.split(",")
                         for cal in args.calibration.split(",")
                         for m, k in (("fixed S=100", {"early_stop": False}), ("early", {}))]:
            t0 = time.perf_counter()
            strip = STRIP(n_overlays=S, **kw).fit(model, val)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            d = strip.decide(x)
            secs = time.perf_counter() - t0
            ms[mode] = 1000 * secs / len(x)
            r = {"model": name, "filter": f"STRIP {mode}", "overlays/input": d.mean_overlays, "ms/input": ms[mode],
                 **figures(d.scores, d.flagged, truth), "fit s": fit_s}
            if mode.startswith("early"):
                r["note"] = (f"floor {strip.min_std_:g} bit; clean {float(d.n_overlays[~truth].double().mean()):.1f}, "
                             f"triggered {float(d.n_overlays[truth].double().mean()):.1f} overlays")
            rows.append(r)
            print("  " + show(r), flush=True)
        if not args.no_activation:
            t0 = time.perf_counter()
            scan = NeuralCleanse(seed=0).scan(model, val)
            af = ActivationFilter(frr=0.01).fit(model, val, scan=scan)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            s = af.score(x)
            secs = time.perf_counter() - t0
            r = {"model": name, "filter": "activation filter", "overlays/input": 1.0, "ms/input": 1000 * secs / len(x),
                 **figures(s, s > af.threshold_, truth), "fit s": fit_s,
                 "note": f"NC flagged {scan.flagged_labels}, frr=0.01"}
            rows.append(r)
            print("  " + show(r), flush=True)
        if not args.no_art:
            art = run_art(args.art_python, model, val, x, shape)
            if art is None:
                continue
            fl = torch.tensor(art["flagged"])
            r = {"model": name, "filter": "ART STRIP S=100", "overlays/input": float(S), "ms/input": art["ms_per_input"],
                 **figures(torch.tensor(art["score"]), fl, truth), "fit s": art["fit_s"],
                 "note": f"ART {art['version']}, TorchScript model"}
            rows.append(r)
            print("  " + show(r), flush=True)
            # trojanscope on the very TorchScript program ART got, for a like-for-like ratio
            traced = torch.jit.trace(model.eval(), x[:2])
            st = STRIP(n_overlays=S).fit(traced, val)
            t0 = time.perf_counter()
            st.decide(x)
            ms_traced = 1000 * (time.perf_counter() - t0) / len(x)
            ratios.append((name, art["ms_per_input"] / ms["fixed S=100"], art["ms_per_input"] / ms["early"],
                           art["ms_per_input"] / ms_traced))
            print(f"  ART / trojanscope ms per input: {ratios[-1][1]:.2f}x (fixed), {ratios[-1][2]:.2f}x (early), "
                  f"{ratios[-1][3]:.2f}x (early, same TorchScript model)", flush=True)
    print("\n== summary (FAR/FRR at the 1% FRR target; AUROC of the scores)")
    for r in rows:
        print("  " + show(r))
    early = {r["model"]: r for r in rows if r["filter"] == "STRIP early"}
    fixed = {r["model"]: r for r in rows if r["filter"] == "STRIP fixed S=100"}
    for k in early:
        print(f"  {k}: {fixed[k]['overlays/input'] / early[k]['overlays/input']:.1f}x fewer forward passes, "
              f"{fixed[k]['ms/input'] / early[k]['ms/input']:.1f}x less time, FAR {100 * early[k]['FAR']:.1f}% vs "
              f"{100 * fixed[k]['FAR']:.1f}%, FRR {100 * early[k]['FRR']:.1f}% vs {100 * fixed[k]['FRR']:.1f}%")
    if not args.no_forward:
        forward_options(ts, torch, model_for("badnets", ts.BadNets(triggers["badnets"], target=0, rate=0.1, seed=0)))


def show(r: dict) -> str:
    out = []
    for k, v in r.items():
        if k in ("FAR", "FRR"):
            out.append(f"{k} {100 * v:.1f}%")
        elif isinstance(v, float):
            out.append(f"{k} {v:.3f}" if k == "AUROC" else f"{k} {v:.1f}" if k != "ms/input" else f"{k} {v:.2f}")
        else:
            out.append(f"{k} {v}" if k not in ("model", "filter") else str(v))
    return ", ".join(out)


def run_art(python: str, model, val, x, shape) -> dict | None:
    import numpy as np
    import torch

    if not Path(python).exists():
        print(f"  ART: no interpreter at {python} (see the module docstring to create it); skipped")
        return None
    ver = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('adversarial-robustness-toolbox'))"],
                         capture_output=True, text=True)
    if ver.returncode:
        print(f"  ART: not importable with {python}: {ver.stderr.strip().splitlines()[-1:]}; skipped")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        # ART's STRIP takes the classifier's outputs for probabilities: give it the softmax
        probs = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
        torch.jit.trace(probs, x[:2]).save(str(d / "model.pt"))
        np.savez(d / "inputs.npz", x_val=val.x.numpy(), x_test=x.numpy(), nb_classes=10)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
        p = subprocess.run([python, __file__, "--art-worker", str(d)], capture_output=True, text=True, env=env)
        if p.returncode:
            print(f"  ART worker failed: {p.stderr.strip()[-2000:]}")
            return None
        out = json.loads((d / "art.json").read_text())
    out["version"] = ver.stdout.strip()
    return out


def forward_options(ts, torch, model) -> None:
    """ms per perturbed copy for the forward settings STRIP could use (one thread)."""
    import copy

    print("\n== forward options (badnets model, one thread, us per copy, best of 5)")
    x = torch.rand(4096, 1, 28, 28)

    def best(f, rows: int) -> float:
        f()
        ts_ = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            ts_.append(time.perf_counter() - t0)
        return 1e6 * min(ts_) / rows

    model.eval()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for bs in (256, 1024, 4096):
        xb = x[:bs]
        xc = xb.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            a = best(lambda: model(xb), bs)
        with torch.inference_mode():
            b = best(lambda: model(xb), bs)
            c = best(lambda: cl(xc), bs)
        print(f"  batch {bs:5d}: no_grad {a:6.1f}, inference_mode {b:6.1f}, channels_last (model and input) {c:6.1f}")


if __name__ == "__main__":
    main()
