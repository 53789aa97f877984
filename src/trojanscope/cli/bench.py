"""``trojanscope bench``: the attack x defence matrix, resumable, as CSV / JSON (and a report)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..bench import applicable, load_config, run_bench
from ..errors import ConfigError
from . import cli
from ._common import POSITIVE_INT, common_options, cpu_threads, pick_device, table, write_json


@cli.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML (or YAML) file naming attacks, defences, dataset, arch, seeds (see trojanscope.bench).")
@click.option("--quick", is_flag=True, help="The quick preset: mnist5k, 2 epochs, a clean baseline and 4 attacks, every "
                                           "defence with fast settings.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder: models, one JSON per cell, results.csv / results.json. An existing one is resumed.")
@click.option("--report/--no-report", default=True, show_default=True, help="Write OUT/report.html at the end.")
@click.option("--max-cells", type=POSITIVE_INT, default=None, help="Stop after this many new cells (resume later).")
@click.option("--threads", type=POSITIVE_INT, default=None,
              help="CPU threads for torch (default: 2, or 1 when the machine is already busy).")
@common_options
@click.pass_context
def bench(ctx: click.Context, config_path: Path | None, quick: bool, out: Path | None, report: bool,
          max_cells: int | None, threads: int | None, json_path: Path | None, seed: int, device: str | None) -> None:
    """Run every attack against every defence and tabulate CA, ASR, detection and removal figures.

    `bench round` generates a population of clean and backdoored models instead (see its --help).
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise click.UsageError("Missing option '--out'.")
    if threads is None:
        # threads fighting over busy cores are many times slower than one thread alone
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
        threads = 1 if busy else 2
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    cfg = load_config(config_path, quick=quick)
    dev = pick_device(device)
    n = len(cfg.seeds) * sum(applicable(a, d) for a in cfg.attacks for d in cfg.defenses)
    click.echo(f"bench: {len(cfg.attacks)} attacks x {len(cfg.defenses)} defences x {len(cfg.seeds)} seed(s): {n} "
               f"applicable cells on {cfg.dataset} ({cfg.arch}, {cfg.epochs} epochs) -> {out}", err=True)
    with cpu_threads(threads):  # torch's threads and numpy / scikit-learn's BLAS
        res = run_bench(cfg, out, device=dev, max_cells=max_cells)
    cols = ["attack", "defense", "seed", "ca_before", "asr_before", "ca_after", "asr_after", "verdict", "target_found",
            "poison_removed", "clean_removed", "auroc", "far", "frr", "seconds"]
    click.echo(table(res.rows, cols, headers={"ca_before": "CA", "asr_before": "ASR", "ca_after": "CA after",
                                              "asr_after": "ASR after", "target_found": "target",
                                              "poison_removed": "poison rm", "clean_removed": "clean rm"},
                     percent=["ca_before", "asr_before", "ca_after", "asr_after", "poison_removed", "clean_removed",
                              "far", "frr"]))
    for r in res.failed:
        click.echo(f"failed: {r['attack']} x {r['defense']} (seed {r['seed']}): {r['error']}", err=True)
    done = len(res.rows)
    click.echo(f"\n{done}/{n} cells ({len(res.computed)} computed, {len(res.reused)} reused; models: "
               f"{len(res.trained)} trained, {len(res.loaded)} reused) in {res.seconds:.0f} s; table in "
               f"{out / 'results.csv'}", err=True)
    if report:
        from ..report import render_run

        path = render_run(out)
        click.echo(f"report: {path}", err=True)
    write_json(json_path, {"rows": res.rows, "computed": res.computed, "reused": res.reused, "seconds": res.seconds})


from . import round as _round  # noqa: E402,F401  (registers `bench round`)
from . import score as _score  # noqa: E402,F401  (registers `bench score`)
