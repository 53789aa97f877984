"""The hostile model-file corpus (tests/hostile_models.py).

Every case runs through the CLI in this process (exit 2, one ``error:`` line, no traceback, no
payload run, no file created): on a shared two-core machine a child process costs 10-40 s, mostly
torch's import. One case of each class also runs in its own child process (tests/corpus.py), which
is what proves no hang and a bounded peak RSS; ``benchmarks/hostile_corpus.py`` runs them all so.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hostile_models
from corpus import PEAK_RSS_BUDGET_MB, Outcome, _snapshot, check, run_case
from trojanscope.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hostile_models")
    return root, {c.id: c for c in hostile_models.cases(root)}


# the ids and kinds, without building anything (kept in step with hostile_models by the test below)
CASE_IDS = hostile_models.CASE_IDS


def test_the_corpus_covers_every_class_with_three_variants(corpus):
    _, cases = corpus
    assert sorted(cases) == sorted(CASE_IDS)
    kinds = collections.Counter(c.kind for c in cases.values())
    assert len(cases) >= 35
    for kind in ("pt2-expression", "pt2-names", "pt2-operator", "torchscript-call-hiding", "torchscript-setstate",
                 "zip-duplicate", "zip-structure", "pickle-globals", "huge-declared-size", "corrupt", "nan-weights",
                 "onnx-external-data", "onnx-operator"):
        assert kinds[kind] >= 3, (kind, kinds[kind])


def _in_process(case, root: Path) -> Outcome:
    before = _snapshot(root)
    err, out = io.StringIO(), io.StringIO()
    code = None
    cwd = os.getcwd()
    try:
        os.chdir(root)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(list(case.argv))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(cwd)
    new = sorted(_snapshot(root) - before)
    return Outcome(case, code, err.getvalue(), out.getvalue(), 0.0, 0.0, False, new)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_hostile_model_file_is_refused_cleanly(corpus, case_id):
    root, cases = corpus
    o = _in_process(cases[case_id], root)
    assert check(o) == [], o.stderr[-600:]


def test_one_case_of_each_class_in_a_child_process(corpus):
    """No hang, bounded peak RSS, and the same verdict in a fresh process."""
    root, cases = corpus
    first: dict[str, object] = {}
    for c in cases.values():
        first.setdefault(c.kind, c)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH", "")])
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda c: run_case(c, root, env=env, timeout=120), first.values()))
    bad = {o.case.id: check(o) for o in outcomes if check(o) or o.peak_rss_mb >= PEAK_RSS_BUDGET_MB}
    assert not bad, bad
