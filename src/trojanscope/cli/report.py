"""``trojanscope report RUN_DIR``: one self-contained HTML page from a bench run."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from . import cli


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (default: RUN_DIR/report.html).")
def report(run_dir: Path, out: Path | None) -> None:
    """Write RUN_DIR/report.html: the table, the verdicts, the plots, the settings (no network needed)."""
    from ..report import render_run

    from ._common import check_output_file

    if not run_dir.is_dir():
        raise ConfigError(f"run folder not found: {run_dir}")
    check_output_file(out if out is not None else run_dir / "report.html", "--out")
    path = render_run(run_dir, out)
    click.echo(str(path))
