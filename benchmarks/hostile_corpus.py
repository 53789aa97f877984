"""The hostile-input corpus summary: every bad model file, data file, argument and output path,
run through the CLI in its own process, tabulated per kind.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/hostile_corpus.py [--fork] [--only KIND,...] [-v]

Builds ``tests/hostile_inputs.py``'s corpus and, when present, ``tests/hostile_models.py``'s, in a
temporary folder; runs every case (``tests/corpus.py``: exit code, stderr, files created, payload
canary, hang, the child's own peak RSS) and prints, per kind: cases, passed, the exit codes seen,
tracebacks, exit-3s, hangs, payload runs, the largest peak RSS and the largest input on disk; then
a total line and the issue's targets (0 code executions, tracebacks, exit-3s and hangs; no input
under 10 MB above 1 GiB peak). Exit status 1 when a case fails.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from corpus import PEAK_RSS_BUDGET_MB, Case, check, run_case  # noqa: E402

CORPORA = ("hostile_models", "hostile_inputs")
SMALL_INPUT = 10 << 20


def input_size(case: Case) -> int:
    """The largest file (or folder's total) named by an argument of the case, in bytes."""
    best = 0
    for a in case.argv:
        p = Path(a)
        try:
            if p.is_symlink() or not p.exists():
                continue
            if p.is_dir():
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            elif p.is_file():
                size = p.stat().st_size
            else:
                continue
        except OSError:
            continue
        best = max(best, size)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="Comma-separated kinds to run.")
    ap.add_argument("-v", "--verbose", action="store_true", help="Print every case's error line.")
    ap.add_argument("--fork", action="store_true", help="Fork each case from a server that imported trojanscope once "
                    "(the test suite's mode, ~10x faster) instead of starting a fresh interpreter per case.")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trojanscope-corpus-"))
    try:
        all_cases: list[tuple[str, Case]] = []
        for name in CORPORA:
            try:
                mod = importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name != name:
                    raise
                print(f"({name}: not present, skipped)")
                continue
            sub = root / name
            sub.mkdir()
            all_cases += [(name, c) for c in mod.cases(sub)]
        only = set(args.only.split(",")) if args.only else None
        rows: dict[str, dict] = defaultdict(lambda: {"cases": 0, "passed": 0, "codes": set(), "tracebacks": 0,
                                                     "exit3": 0, "hangs": 0, "payload": 0, "peak": 0.0, "size": 0,
                                                     "small_over": 0})
        failures = []
        for corpus_name, case in all_cases:
            if only and case.kind not in only:
                continue
            o = run_case(case, root / corpus_name, fork=args.fork)
            problems = check(o)
            size = input_size(case)
            if o.peak_rss_mb >= PEAK_RSS_BUDGET_MB and size < SMALL_INPUT:
                problems.append(f"peak RSS {o.peak_rss_mb:.0f} MB from a {size} B input")
            r = rows[case.kind]
            r["cases"] += 1
            r["passed"] += not problems
            r["codes"].add("hang" if o.hung else str(o.returncode))
            r["tracebacks"] += "Traceback" in o.stderr or "Traceback" in o.stdout
            r["exit3"] += o.returncode == 3
            r["hangs"] += o.hung
            r["payload"] += case.canary is not None and Path(case.canary).exists()
            r["peak"] = max(r["peak"], o.peak_rss_mb)
            r["size"] = max(r["size"], size)
            r["small_over"] += o.peak_rss_mb >= PEAK_RSS_BUDGET_MB and size < SMALL_INPUT
            if args.verbose:
                print(f"{'ok ' if not problems else 'BAD'} {case.id:40s} {o.returncode} {o.peak_rss_mb:6.0f} MB  "
                      f"{o.stderr.strip()[:150]}", flush=True)
            if problems:
                failures.append((case.id, problems, o.stderr.strip()[:300]))
        head = ["kind", "cases", "passed", "exit codes", "tracebacks", "exit-3", "hangs", "payload runs",
                "max peak RSS", "max input"]
        table = [[k, str(r["cases"]), str(r["passed"]), ",".join(sorted(r["codes"])), str(r["tracebacks"]),
                  str(r["exit3"]), str(r["hangs"]), str(r["payload"]), f"{r['peak']:.0f} MB", _human(r["size"])]
                 for k, r in sorted(rows.items())]
        tot = {key: sum(r[key] for r in rows.values()) for key in ("cases", "passed", "tracebacks", "exit3", "hangs",
                                                                   "payload", "small_over")}
        codes = set().union(*(r["codes"] for r in rows.values())) if rows else set()
        table.append(["TOTAL", str(tot["cases"]), str(tot["passed"]), ",".join(sorted(codes)), str(tot["tracebacks"]),
                      str(tot["exit3"]), str(tot["hangs"]), str(tot["payload"]),
                      f"{max((r['peak'] for r in rows.values()), default=0):.0f} MB",
                      _human(max((r["size"] for r in rows.values()), default=0))])
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        print("  ".join("-" * w for w in widths))
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        print(f"\ntargets: >= 60 cases: {tot['cases']}; code executions: {tot['payload']}; tracebacks: "
              f"{tot['tracebacks']}; exit-3: {tot['exit3']}; hangs: {tot['hangs']}; inputs under 10 MB above "
              f"{PEAK_RSS_BUDGET_MB:.0f} MB peak RSS: {tot['small_over']}")
        for cid, problems, err in failures:
            print(f"FAILED {cid}: {'; '.join(problems)}\n    {err}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
