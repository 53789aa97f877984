"""Every verb on a model the user received (issue 14): .pt2, TorchScript and ONNX, written back.

A BadNets run on mnist5k (4x4 white square, bottom right, target 0, 10 % of the training set)
trains two networks: a plain CNN (``mnist_cnn``) and a BatchNorm ResNet (``resnet18`` with 8
channels in its first stage). Each is written as the project's own model directory and, as a
vendor would ship it, as a ``.pt2`` program (``torch.export``, dynamic batch), TorchScript
(``torch.jit.script``) and ONNX (``torch.onnx.export``, dynamic batch): 6 received files. Then, for
every file, through the command line as a user would:

* ``inspect-data FILE --data train.npz --method clustering|spectral`` (default modes): poison
  recall and the share of clean samples removed;
* ``scan FILE`` (Neural Cleanse, once per file) for the repairs that take reversed triggers or a
  target, then ``repair FILE --method M --out DIR`` for every registered repair and
  ``evaluate DIR/<written file>``: CA and ASR of the repaired model, and whether the written file
  reloaded in its own format.

The same runs on the model directory give the reference figures. Ground truth (the poisoned
indices, the trigger, the target) enters only where the figures are scored.

    nice -n 10 python benchmarks/received_models.py [--out runs/received] [--epochs 5]
        [--models cnn,resnet] [--formats dir,pt2,ts,onnx] [--verbs inspect,repair]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import trojanscope as ts
from trojanscope.data import load_data, save_npz
from trojanscope.metrics import attack_success_rate, clean_accuracy
from trojanscope.models import ModelSpec, save_model
from trojanscope.training import train_new

TRIGGER = "square:4:white:bottom-right"
TARGET = 0
ARCHS = {"cnn": ("mnist_cnn", {}), "resnet": ("resnet18", {"width": 8})}
FILES = {"dir": "model", "pt2": "model.pt2", "ts": "model.ts.pt", "onnx": "model.onnx"}


def cli(args: list[str], log: Path) -> tuple[int, float]:
    """Run ``python -m trojanscope ARGS``; returns (exit code, seconds); output appended to ``log``."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "a") as f:
        f.write(f"\n$ trojanscope {' '.join(args)}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "trojanscope", *args], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    return rc, time.perf_counter() - t0


def export_all(model: torch.nn.Module, d: Path, shape: tuple[int, int, int]) -> None:
    """Write ``model`` as a vendor would: .pt2 (dynamic batch), TorchScript, ONNX (dynamic batch)."""
    model = model.cpu().eval()
    x = torch.zeros(2, *shape)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(d / FILES["pt2"]))
    torch.jit.script(model).save(str(d / FILES["ts"]))
    torch.onnx.export(model, (x,), str(d / FILES["onnx"]), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def make_models(out: Path, epochs: int, names: list[str]) -> dict:
    train = load_data("mnist5k:train")
    test = load_data("mnist5k:test")
    trig = ts.Trigger.parse(TRIGGER, train.image_shape)
    poisoned = ts.BadNets(trig, TARGET, rate=0.1, seed=0).poison(train)
    save_npz(poisoned, out / "train.npz")
    is_poison = torch.zeros(len(poisoned), dtype=torch.bool)
    is_poison[poisoned.poison_indices] = True
    info = {"n_train": len(poisoned), "n_poison": int(is_poison.sum()), "models": {}}
    for name in names:
        arch, kw = ARCHS[name]
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not (d / "model" / "model.safetensors").exists():
            model = train_new(arch, poisoned, seed=0, epochs=epochs, arch_kwargs=kw)
            save_model(model, d / "model", ModelSpec(arch, train.image_shape, train.num_classes, arch_kwargs=kw))
            export_all(model, d, train.image_shape)
        else:
            model = ts.load_model(d / "model").model
        info["models"][name] = {"arch": arch, "arch_kwargs": kw, "train_s": time.perf_counter() - t0,
                                "accuracy": clean_accuracy(model, test),
                                "attack_success": attack_success_rate(model, test, trig, TARGET)}
        print(f"{name}: CA {info['models'][name]['accuracy']:.4f} ASR {info['models'][name]['attack_success']:.4f}",
                  flush=True)
    return {"is_poison": is_poison, **info}


def du_from_scan(scan_dir: Path, flagged: list[int]) -> list[str]:
    """distribution-unlearn's target, trigger size and place from the scan, as ``bench`` does: the
    flagged label, the smallest square holding 80 % of its reversed mask, and where it lies."""
    from trojanscope.bench import SharedScan

    if not flagged:
        return ["-p", "target=0"]
    k = flagged[0]
    trig = ts.Trigger.load(scan_dir / f"trigger_{k}.safetensors")
    shared = SharedScan([k], torch.zeros(10), [trig if j == k else trig for j in range(10)], True)
    out = ["-p", f"target={k}"]
    size = shared.suspected_size()
    if size is not None:
        r, c = shared.suspected_position(size)
        out += ["-p", f"trigger_size={size}", "-p", f"position=[{r},{c}]"]
    return out


def score_inspect(js: Path, is_poison: torch.Tensor) -> dict:
    d = json.loads(js.read_text())
    flagged = torch.zeros_like(is_poison)
    flagged[torch.as_tensor(d["flagged_indices"], dtype=torch.long)] = True
    return {"poison_recall": float((flagged & is_poison).sum() / is_poison.sum()),
            "clean_removed": float((flagged & ~is_poison).sum() / (~is_poison).sum()),
            "fresh_model": d.get("fresh_model")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/received")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--models", default="cnn,resnet")
    ap.add_argument("--formats", default="dir,pt2,ts,onnx")
    ap.add_argument("--verbs", default="inspect,repair")
    ap.add_argument("--repairs", default="unlearn,nc-prune,fine-prune,prune,distribution-unlearn")
    ap.add_argument("--du-param", action="append", default=[],
                    help="KEY=VALUE for distribution-unlearn (e.g. steps=100 on a loaded CPU)")
    ap.add_argument("--inspect-methods", default="clustering,spectral")
    ap.add_argument("--tag", default="", help="results_TAG.json (runs of parts in parallel)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    setup = make_models(out, args.epochs, names)
    is_poison = setup.pop("is_poison")
    results_path = out / (f"results_{args.tag}.json" if args.tag else "results.json")
    rows: list[dict] = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    done = {(r["model"], r["format"], r["method"]) for r in rows if r["rc"] == 0}

    def record(row: dict) -> None:
        rows[:] = [r for r in rows if (r["model"], r["format"], r["method"]) != (row["model"], row["format"], row["method"])]
        rows.append(row)
        print(row, flush=True)
        results_path.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")

    for verb in ("repair", "inspect"):  # repairs first: the inspections retrain models and are the slow part
        if verb not in args.verbs:
            continue
        for name in names:
            for fmt in args.formats.split(","):
                f = out / name / FILES[fmt]
                log = out / name / f"{fmt}.log"
                if verb == "inspect":
                    for method in args.inspect_methods.split(","):
                        if (name, fmt, method) in done:
                            continue
                        js = out / name / f"inspect_{fmt}_{method}.json"
                        rc, sec = cli(["inspect-data", str(f), "--data", str(out / "train.npz"), "--method", method,
                                       "--json", str(js)], log)
                        row = {"model": name, "format": fmt, "method": method, "rc": rc, "seconds": round(sec, 1)}
                        if rc == 0:
                            row.update(score_inspect(js, is_poison))
                        record(row)
                    continue
                methods = [m for m in args.repairs.split(",") if (name, fmt, m) not in done]
                if not methods:
                    continue
                scan_dir = out / name / f"scan_{fmt}"
                rc = 0 if (scan_dir / "scan.json").exists() else cli(
                    ["scan", str(f), "--data", "mnist5k:val", "--out", str(scan_dir)], log)[0]
                flagged = json.loads((scan_dir / "scan.json").read_text()).get("flagged_labels", []) if rc in (0, 1) else []  # exit 1: found
                for method in methods:
                    rdir = out / name / f"repair_{fmt}_{method}"
                    extra: list[str] = []
                    if method in ("nc-prune", "unlearn") and flagged:
                        extra = ["--scan", str(scan_dir)]
                    if method == "unlearn":  # bench's setting: the unlearning set is all of the clean data
                        extra += ["-p", "share=1.0"]
                    if method == "distribution-unlearn":
                        extra = du_from_scan(scan_dir, flagged) + [*sum((["-p", kv] for kv in
                                                                                         args.du_param), [])]
                    rc, sec = cli(["repair", str(f), "--method", method, "--data", "mnist5k:val", "--out", str(rdir),
                                   "--json", str(rdir.with_suffix(".json")), *extra], log)
                    row = {"model": name, "format": fmt, "method": method, "rc": rc, "seconds": round(sec, 1),
                           "scan_flagged": flagged}
                    if rc == 0:
                        rj = json.loads(rdir.with_suffix(".json").read_text())
                        written = Path(rj["written"])
                        ej = rdir.with_suffix(".eval.json")
                        erc, _ = cli(["evaluate", str(written), "--data", "mnist5k:test", "--trigger", TRIGGER,
                                      "--target", str(TARGET), "--json", str(ej)], log)
                        row["reloaded"] = erc == 0
                        if erc == 0:
                            e = json.loads(ej.read_text())
                            row.update(accuracy=e["accuracy"], attack_success=e["attack_success_rate"],
                                       written_format=e.get("format"))
                    record(row)
    print_table(setup, rows)


def print_table(setup: dict, rows: list[dict]) -> None:
    for name, m in setup.get("models", {}).items():
        print(f"{name}: backdoored CA {m['accuracy']:.1%} ASR {m['attack_success']:.1%}")
    print(f"{'model':7} {'format':6} {'method':21} {'poison recall / CA':>18} {'clean removed / ASR':>19} "
          f"{'reloaded':>8} {'s':>6}")
    for r in rows:
        if r["rc"] != 0:
            a = b = f"exit {r['rc']}"
            rel = "-"
        elif "poison_recall" in r:
            a, b, rel = f"{r['poison_recall']:.1%}", f"{r['clean_removed']:.1%}", "-"
        elif r.get("reloaded"):
            a, b, rel = f"{r['accuracy']:.1%}", f"{r['attack_success']:.1%}", f"{r.get('written_format')}"
        else:
            a = b = "-"
            rel = "no"
        print(f"{r['model']:7} {r['format']:6} {r['method']:21} {a:>18} {b:>19} {rel:>8} {r['seconds']:>6}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":  # --table results*.json: one table of every part
        setup: dict = {}
        merged: dict = {}
        for fn in sys.argv[2:]:
            d = json.loads(Path(fn).read_text())
            setup = d["setup"] if d["setup"].get("models") else setup
            for r in d["rows"]:
                key = (r["model"], r["format"], r["method"])
                if key not in merged or r["rc"] == 0:
                    merged[key] = r
        order = {"dir": 0, "pt2": 1, "ts": 2, "onnx": 3}
        print_table(setup, sorted(merged.values(), key=lambda r: (r["model"], r["method"], order[r["format"]])))
    else:
        main()
