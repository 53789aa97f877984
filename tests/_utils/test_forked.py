"""Forked workers: answers in submission order, a failed job comes back as None, bars reach the parent."""

from __future__ import annotations

import os

import pytest

from trojanscope._utils import forked
from trojanscope._utils.progress import progress

pytestmark = pytest.mark.skipif(not forked.can_fork(), reason="forked workers run on Linux only")


def _job(i: int):
    def run() -> bytes:
        if i == 2:
            raise ValueError("this job fails")
        for _ in progress(range(3), desc="job"):  # reported to the parent, not drawn here
            pass
        return f"{i}:{os.getpid()}".encode()
    return run


def test_jobs_answer_in_order_and_a_failure_is_none(monkeypatch):
    from trojanscope._utils import progress as bars

    reported = []

    class Bar:  # the parent's bar, as run_forked makes it
        total = 0

        def update(self, n):
            reported.append(n)

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(bars, "progress", lambda **kw: Bar())
    out = forked.run_forked([_job(i) for i in range(4)], workers=2)
    assert [b.split(b":")[0] for b in out if b is not None] == [b"0", b"1", b"3"] and out[2] is None
    assert len({b.split(b":")[1] for b in out if b is not None} | {str(os.getpid()).encode()}) == 4  # other processes
    assert sum(reported) == 9  # three bars of three steps, drawn by the parent


def test_one_worker_or_one_job_forks_nothing():
    assert forked.run_forked([_job(0), _job(1)], workers=1) == [None, None]
    assert forked.run_forked([_job(0)], workers=4) == [None]
