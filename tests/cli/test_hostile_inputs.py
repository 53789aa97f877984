"""The hostile-input corpus for data files, arguments and output paths: every case, run by the
CLI in its own process (forked from a server that imported torch once), ends with exit code 2 and one ``error:`` line, no traceback, no file
created, no hang, and a peak memory under the corpus budget (see ``tests/hostile_inputs.py``)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from corpus import PEAK_RSS_BUDGET_MB, check, run_case
from hostile_inputs import cases

# The corpus is built once per test run (a few MB, a second or two) in a folder of its own; the
# ids must be known when the tests are collected.
_ROOT = Path(tempfile.mkdtemp(prefix="trojanscope-hostile-inputs-"))
atexit.register(shutil.rmtree, _ROOT, True)
CASES = cases(_ROOT)


def test_corpus_covers_every_kind():
    kinds = {c.kind for c in CASES}
    assert {"npz", "npy-header", "labels", "image", "special-file", "aux-file", "memory", "argument", "usage",
            "output-path"} <= kinds
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused(case):
    outcome = run_case(case, _ROOT, fork=True)
    problems = check(outcome)
    assert outcome.peak_rss_mb < PEAK_RSS_BUDGET_MB, f"peak RSS {outcome.peak_rss_mb:.0f} MB"
    assert not problems, (problems, outcome.stderr[-2000:])
