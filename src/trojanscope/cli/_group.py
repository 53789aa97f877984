"""The ``trojanscope`` click group: every error becomes one ``error:`` line and an exit code."""

from __future__ import annotations

import errno
import sys
from typing import Any

import click

from .._utils import limits
from ..errors import TrojanscopeError
from ._common import debug

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
