"""The ``trojanscope`` command. It builds library objects and prints their results; it holds no
defence logic of its own.

Exit codes: 0 success (for ``scan``: no backdoor found), 1 ``scan`` found a backdoor,
2 bad input (one line on stderr), 3 an internal error (a bug: please report it; set
``TROJANSCOPE_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import Any

import click

from .._utils import limits
from ..errors import TrojanscopeError
from ._common import MEMORY_SIZE, debug

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


#: ``OSError`` numbers that are the user's doing (a full disk, a read-only place, no permission),
#: not a bug: one line and exit code 2.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.ENAMETOOLONG, errno.EFBIG}


def one_line(text: str) -> str:
    """``text`` on one line (click's messages and some library ones span several)."""
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


class TrojanscopeGroup(click.Group):
    """A click group that turns every error into one clear line and an exit code.

    Usage errors (an unknown option, a missing argument, a value outside its range) print one
    ``error:`` line naming the command, not click's usage block; ``--help`` is unchanged.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `trojanscope`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "trojanscope")
            click.echo(f"error: {where}: {one_line(e.format_message())} (see '{where} --help')", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as e:
            click.echo(f"error: {one_line(e.format_message())}", err=True)
            sys.exit(EXIT_BAD_INPUT if e.exit_code in (1, 2) else e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second EPIPE at exit
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except TrojanscopeError as e:
            if debug():
                raise
            click.echo(f"error: {one_line(str(e))}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except MemoryError:
            click.echo(f"error: out of memory (the inputs are checked against a memory budget of "
                       f"{limits.human(limits.max_memory())}; give a smaller --max-memory to refuse inputs this big "
                       f"before they are read, or use a machine with more memory)", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except OSError as e:
            if e.errno == errno.EPIPE:  # `trojanscope ... | head`: the reader left; main() ends quietly
                raise
            if debug() or e.errno not in _USER_ERRNOS:
                return self._internal(ctx, e)
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error: cannot write or read{where}: {e.strerror or e}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except Exception as e:  # a bug: one line, and the traceback on request
            return self._internal(ctx, e)

    @staticmethod
    def _internal(ctx: click.Context, e: BaseException) -> None:
        if debug():
            raise e
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: internal error ({type(e).__name__}: {msg}); set TROJANSCOPE_DEBUG=1 for the "
                   f"traceback and please report it", err=True)
        ctx.exit(EXIT_INTERNAL)


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
