"""The ``trojanscope`` command. It builds library objects and prints their results; it holds no
defence logic of its own.

Exit codes: 0 success (for ``scan``: no backdoor found), 1 ``scan`` found a backdoor,
2 bad input (one line on stderr), 3 an internal error (a bug: please report it; set
``TROJANSCOPE_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..errors import TrojanscopeError
from ._common import debug

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class TrojanscopeGroup(click.Group):
    """A click group that turns every error into one clear line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except TrojanscopeError as e:
            if debug():
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except MemoryError:
            click.echo("error: out of memory; try a smaller --batch-size", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except Exception as e:  # a bug: one line, and the traceback on request
            if debug():
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: internal error ({type(e).__name__}: {msg}); set TROJANSCOPE_DEBUG=1 for the "
                       f"traceback and please report it", err=True)
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=TrojanscopeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="trojanscope")
@click.option("-v", "--verbose", count=True, help="Log the phases of each step (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they are shown only when stderr is a terminal).")
def cli(verbose: int, quiet: bool) -> None:
    """trojanscope: find, explain, filter and remove backdoors in image classifiers."""
    import logging

    from .._utils.progress import set_quiet

    set_quiet(quiet)
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
