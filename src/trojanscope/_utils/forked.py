"""Independent jobs run at once in forked child processes, each answering with bytes.

A forked child shares the parent's memory copy-on-write, so a job can close over a model and a
dataset without either being serialised; only the bytes it returns cross a pipe. That is what
lets the sanitisers train their two reclassification models at once, each on one thread
(:meth:`~trojanscope.training.Retrainer.train_many`), instead of one after the other on two.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def can_fork() -> bool:
    """Whether this process may fork workers: on Linux (macOS has ``fork`` but its system
    libraries are not safe across it, which is why Python spawns there) and not in a daemonic
    process (which may not have children)."""
    return sys.platform.startswith("linux") and not mp.current_process().daemon


def run_forked(jobs: Sequence[Callable[[], bytes]], workers: int, *, desc: str | None = None) -> list[bytes | None]:
    """Run ``jobs`` in forked children, at most ``workers`` at a time.

    Each child runs torch on one thread: GNU OpenMP's thread pool does not survive a fork, and a
    parallel region in a child whose parent had used it hangs for ever. A child's progress bars
    are drawn by the parent, as one bar labelled ``desc`` over all the jobs (a child's own stderr
    may be a copy of an object that only the parent reads, such as a captured stream).

    Returns each job's bytes, or None where its child failed (raised, was killed, or could not
    be started): the caller runs that job again in-process, where its error surfaces as usual.
    With ``workers <= 1``, one job, or no ``fork``, nothing is forked and every entry is None.
    """
    from multiprocessing.connection import wait

    from .progress import progress

    out: list[bytes | None] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1 or not can_fork():
        return out
    ctx = mp.get_context("fork")
    pending = list(range(len(jobs)))
    running: dict[Any, tuple[int, Any]] = {}  # the parent's end of a pipe -> (job, process)
    bar = progress(total=0, desc=desc or f"{len(jobs)} jobs", unit="batch")
    try:
        while pending or running:
            while pending and len(running) < workers:
                i = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(jobs[i], send), daemon=True)
                try:
                    p.start()
                except OSError as e:  # out of processes or memory: the job runs in-process later
                    log.warning("could not fork a worker (%s); running the job in this process", e)
                    recv.close()
                    continue
                finally:
                    send.close()
                running[recv] = (i, p)
            for recv in wait(list(running)):
                i, p = running[recv]
                try:
                    msg = recv.recv_bytes()
                except (EOFError, OSError):
                    msg = b"f"
                kind, body = msg[:1], msg[1:]
                if kind == b"t":
                    bar.total += int(body)
                    bar.refresh()
                elif kind == b"u":
                    bar.update(int(body))
                else:
                    out[i] = body if kind == b"k" else None
                    del running[recv]
                    recv.close()
                    p.join()
                    if out[i] is None:
                        log.warning("a forked worker failed (exit code %s); its job runs again in this process",
                                    p.exitcode)
    finally:
        bar.close()
        for recv, (_, p) in running.items():  # only after an error in this loop
            p.kill()
            recv.close()
    return out


def _child(job: Callable[[], bytes], conn: Any) -> None:
    """A worker: one thread, bars reported over ``conn``, then ``k`` + the job's bytes or ``f``."""
    import torch

    from . import progress

    torch.set_num_threads(1)
    progress.set_sink(lambda kind, n: conn.send_bytes((b"t" if kind == "total" else b"u") + str(n).encode()))
    try:
        blob = job()
    except BaseException:  # noqa: BLE001 - reported as a failure; the parent reruns the job
        conn.send_bytes(b"f")
        conn.close()
        os._exit(1)
    conn.send_bytes(b"k" + blob)
    conn.close()
