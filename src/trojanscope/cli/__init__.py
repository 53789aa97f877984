"""The ``trojanscope`` command. It builds library objects and prints their results; it holds no
defence logic of its own.

Exit codes: 0 success (for ``scan``: no backdoor found), 1 ``scan`` found a backdoor,
2 bad input (one line on stderr), 3 an internal error (a bug: please report it; set
``TROJANSCOPE_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import logging
import sys
import warnings

import click

from .._utils import limits
from ._common import MEMORY_SIZE
from ._group import EXIT_BAD_INPUT, EXIT_INTERNAL, TrojanscopeGroup, one_line  # noqa: F401 (the exit codes, re-exported)


@click.group(cls=TrojanscopeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="trojanscope")
@click.option("-v", "--verbose", count=True, help="Log the phases of each step (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they are shown only when stderr is a terminal).")
@click.option("--max-memory", type=MEMORY_SIZE, default=None, envvar="TROJANSCOPE_MAX_MEMORY",
              help=f"Most memory one input (an array, a tensor, a decoded image set) may declare, e.g. 512M or 8G; "
                   f"larger ones are refused before they are read [default: {limits.human(limits.DEFAULT_MAX_MEMORY)}; "
                   f"env TROJANSCOPE_MAX_MEMORY].")
def cli(verbose: int, quiet: bool, max_memory: int | None) -> None:
    """trojanscope: find, explain, filter and remove backdoors in image classifiers."""
    import logging

    from .._utils.progress import set_quiet

    limits.set_max_memory(max_memory)
    set_quiet(quiet)
    # torch's own deprecation notice, raised inside torch whenever a graph rebuilt from a received
    # .pt2 / TorchScript / ONNX file is copied (every repair copies the model): not the user's business
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    logger = logging.getLogger("trojanscope")
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    if verbose:  # the phases of each step, on stderr (whatever handlers the root logger has)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        logger.propagate = False
    else:
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


class _StderrHandler(logging.StreamHandler):
    """A log handler writing to the ``sys.stderr`` of the moment (a test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# Command modules (one import line each):
from . import inspect_data  # noqa: E402,F401
from . import core  # noqa: E402,F401
from . import poison  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import demo  # noqa: E402,F401
from . import filter  # noqa: E402,F401
from . import pipeline  # noqa: E402,F401
from . import bench  # noqa: E402,F401
from . import report  # noqa: E402,F401
from . import scan  # noqa: E402,F401
from . import repair  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``trojanscope`` script."""
    cli.main(args=argv, prog_name="trojanscope")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
