"""The hostile-input corpus runner: one bad input, one CLI run in a child process, one verdict.

A corpus module (``tests/hostile_models.py``, ``tests/hostile_inputs.py``) exposes
``cases(root: Path) -> list[Case]``: it builds its bad files under ``root`` and returns one
``Case`` per bad input. ``run_case`` runs ``python -m trojanscope ARGV`` in a fresh child
(so a hang, a crash or a memory blow-up cannot take the test process with it) and ``check``
says what is wrong with the outcome, if anything: the promise is exit code 2, exactly one line
on stderr starting with ``error:``, no traceback, no file created (outside the ones the case
allows), no payload run (``canary`` absent), no hang, and peak memory under the budget.

Used by the corpus tests and by ``benchmarks/hostile_corpus.py``, which prints the summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PEAK_RSS_BUDGET_MB = 1024.0
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Case:
    """One bad input.

    ``id``: a short unique name (``pt2-expr-sympy-1``); ``kind``: the class it belongs to
    (``pt2-expression``, ``npz-malformed``, ``argument`` ...), used to group the summary;
    ``argv``: the ``trojanscope`` arguments; ``match``: a substring the error line must contain
    (case-insensitive), or None; ``canary``: a path the payload would create if it ran;
    ``stdin``: bytes fed to the child.
    """

    id: str
    kind: str
    argv: list[str]
    match: str | None = None
    canary: Path | None = None
    stdin: bytes | None = None
    allow_files: tuple[str, ...] = ()


@dataclass
class Outcome:
    case: Case
    returncode: int | None
    stderr: str
    stdout: str
    seconds: float
    peak_rss_mb: float
    hung: bool
    new_files: list[str] = field(default_factory=list)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


#: Runs ``python -m trojanscope ARGV`` and, at exit, writes the process's VmHWM to the fd named by
#: ``TROJANSCOPE_CORPUS_HWM_FD`` (a pipe the runner reads; stdout and stderr stay the CLI's own).
_HWM_WRAPPER = """
import atexit, os, runpy, sys
def _hwm():
    try:
        with open('/proc/self/status') as f:
            kib = next((l.split()[1] for l in f if l.startswith('VmHWM:')), '')
        os.write(int(os.environ['TROJANSCOPE_CORPUS_HWM_FD']), kib.encode())
    except (OSError, KeyError, ValueError):
        pass
atexit.register(_hwm)
sys.argv = ['trojanscope', *sys.argv[1:]]
runpy.run_module('trojanscope', run_name='__main__')
"""


def run_case(case: Case, cwd: Path, *, timeout: float = TIMEOUT_S, env: dict | None = None,
             fork: bool = False) -> Outcome:
    """Run one case in a child process from ``cwd``; files created under ``cwd`` are reported.

    ``fork=True`` asks a fork server (one interpreter that has imported ``trojanscope.cli`` and
    never runs a torch operator, so forking it is safe) to fork a child per case: the same CLI
    code in a process of its own, without paying the interpreter start and the torch import per
    case (the test suite's mode; the benchmark starts fresh interpreters).
    """
    if fork:
        return _via_server(case, Path(cwd), timeout)
    before = _snapshot(cwd)
    child_env = dict(os.environ if env is None else env)
    child_env.pop("TROJANSCOPE_DEBUG", None)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    hwm_r, hwm_w = os.pipe()
    child_env["TROJANSCOPE_CORPUS_HWM_FD"] = str(hwm_w)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _HWM_WRAPPER, *case.argv], cwd=cwd, env=child_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(hwm_w,))
    os.close(hwm_w)
    # Read both pipes on threads and reap the child with wait4, which gives this child's own
    # peak RSS (RUSAGE_CHILDREN would be the largest of every child so far).
    chunks: dict[str, bytes] = {}

    def drain(name: str, pipe) -> None:
        chunks[name] = pipe.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    if case.stdin:
        try:
            proc.stdin.write(case.stdin)
        except BrokenPipeError:
            pass
    proc.stdin.close()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    killer = threading.Timer(timeout, kill)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    killer.cancel()
    hung = timed_out.is_set()
    with os.fdopen(hwm_r, "rb") as f:
        hwm = f.read().strip()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    out, err = chunks.get("out", b""), chunks.get("err", b"")
    seconds = time.perf_counter() - t0
    # The child's own high-water mark (VmHWM, KiB) as it exits. wait4's ru_maxrss would include
    # the parent's RSS when the child was spawned by vfork from a large process (pytest).
    peak = (int(hwm) if hwm.isdigit() else usage.ru_maxrss) / 1024.0
    after = _snapshot(cwd)
    new = sorted(p for p in after - before if not any(p.startswith(a) for a in case.allow_files))
    return Outcome(case, None if hung else proc.returncode, err.decode(errors="replace"),
                   out.decode(errors="replace"), seconds, peak, hung, new)


# The warning filters of a fresh interpreter (python -W default off), so a forked child prints
# the warnings a real run would print, whatever filters pytest holds in the parent.
_FRESH_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                  ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                  ("ignore", ResourceWarning, None))


def _child(case: Case, cwd: Path, fds: tuple[int, int, int]) -> None:  # pragma: no cover - runs in the child
    import io
    import logging
    import traceback
    import warnings

    code = 1
    try:
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        os.chdir(cwd)
        os.environ.pop("TROJANSCOPE_DEBUG", None)
        logging.getLogger().handlers.clear()
        warnings.resetwarnings()
        for action, category, module in reversed(_FRESH_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings._showwarnmsg_impl = lambda m: sys.stderr.write(  # type: ignore[attr-defined]
            warnings.formatwarning(m.message, m.category, m.filename, m.lineno, m.line))
        from trojanscope.cli import main

        try:
            main(list(case.argv))
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                sys.stderr.write(f"{e.code}\n")
                code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_forked(case: Case, cwd: Path, timeout: float) -> Outcome:
    before = _snapshot(cwd)
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        _child(case, cwd, (in_r, out_w, err_w))
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    chunks: dict[str, bytes] = {}

    def drain(name: str, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            chunks[name] = f.read()

    readers = [threading.Thread(target=drain, args=(n, fd), daemon=True) for n, fd in (("out", out_r), ("err", err_r))]
    for t in readers:
        t.start()
    with os.fdopen(in_w, "wb") as f:
        try:
            if case.stdin:
                f.write(case.stdin)
        except BrokenPipeError:
            pass
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        os.kill(pid, 9)

    killer = threading.Timer(timeout, kill)
    killer.start()
    _, status, usage = os.wait4(pid, 0)
    killer.cancel()
    for t in readers:
        t.join()
    hung = timed_out.is_set()
    code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    after = _snapshot(cwd)
    new = sorted(p for p in after - before if not any(p.startswith(a) for a in case.allow_files))
    return Outcome(case, None if hung else code, chunks.get("err", b"").decode(errors="replace"),
                   chunks.get("out", b"").decode(errors="replace"), seconds, usage.ru_maxrss / 1024.0, hung, new)


_server: subprocess.Popen | None = None


def _via_server(case: Case, cwd: Path, timeout: float) -> Outcome:
    import pickle
    import struct

    global _server
    if _server is None or _server.poll() is not None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        here = str(Path(__file__).resolve().parent)
        _server = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); import corpus; "
                                    f"corpus._serve()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    blob = pickle.dumps((case, str(cwd), timeout))
    _server.stdin.write(struct.pack("<Q", len(blob)) + blob)
    _server.stdin.flush()
    head = _server.stdout.read(8)
    if len(head) != 8:
        raise RuntimeError("the corpus fork server died")
    (n,) = struct.unpack("<Q", head)
    fields = pickle.loads(_server.stdout.read(n))
    return Outcome(case, *fields)


def _serve() -> None:  # pragma: no cover - the fork server's loop
    """Read (case, cwd, timeout) requests on stdin, answer each with its outcome's fields."""
    import pickle
    import struct

    import importlib

    import trojanscope.cli  # noqa: F401  (the import every forked child shares)

    # What loading models and data imports later, imported once here (imports only: no operator runs)
    for name in ("torch.export", "torch._export.serde.serialize", "safetensors.torch", "sklearn.datasets",
                 "PIL.Image", "PIL.PngImagePlugin", "onnx", "matplotlib"):
        try:
            importlib.import_module(name)
        except Exception:  # an optional extra that is not installed
            pass

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(8)
        if len(head) != 8:
            return
        (n,) = struct.unpack("<Q", head)
        case, cwd, timeout = pickle.loads(inp.read(n))
        o = _run_forked(case, Path(cwd), timeout)
        blob = pickle.dumps((o.returncode, o.stderr, o.stdout, o.seconds, o.peak_rss_mb, o.hung, o.new_files))
        out.write(struct.pack("<Q", len(blob)) + blob)
        out.flush()


def check(o: Outcome) -> list[str]:
    """What is wrong with the outcome (empty when the promise holds)."""
    problems = []
    if o.hung:
        return [f"hung: killed after {o.seconds:.0f} s"]
    if o.returncode != 2:
        problems.append(f"exit {o.returncode}, not 2")
    lines = o.stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr is not one 'error:' line: {o.stderr.strip()[:300]!r}")
    elif o.case.match and o.case.match.lower() not in lines[0].lower():
        problems.append(f"error line lacks {o.case.match!r}: {lines[0][:300]!r}")
    if "Traceback" in o.stderr or "Traceback" in o.stdout:
        problems.append("traceback printed")
    if "internal error" in o.stderr:
        problems.append("internal error")
    if o.case.canary is not None and Path(o.case.canary).exists():
        problems.append(f"payload ran: {o.case.canary} exists")
    if o.new_files:
        problems.append(f"files created: {o.new_files[:5]}")
    return problems
