"""``trojanscope demo``: the main job on bundled data."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..demo import run_demo
from . import cli
from ._common import columns, common_options, pick_device, table, write_json


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True,
              help="Where the demo writes its models, triggers and figures.")
@common_options
def demo(out: Path, json_path: Path | None, seed: int, device: str | None) -> None:
    """Train a clean and a BadNets model on mnist5k and run the defences on them."""
    t0 = time.perf_counter()
    ctx = run_demo(out, seed=seed, device=pick_device(device), on_step=lambda s: click.echo(f"... {s}", err=True))
    cols = columns(ctx.rows)
    cols = [c for c in cols if c != "seconds"] + (["seconds"] if "seconds" in cols else [])
    click.echo(table(ctx.rows, cols, headers={"attack_success": "ASR", "accuracy": "CA", "frr": "FRR", "far": "FAR",
                                              "poison_removed": "poison removed", "clean_removed": "clean removed",
                                              "target_index": "anomaly index"},
                     percent=["accuracy", "attack_success", "poison_removed", "clean_removed", "frr", "far"]))
    click.echo(f"\nBadNets: {ctx.trigger.name}, target {ctx.attack.targets[0]}, "  # type: ignore[union-attr]
               f"{100 * ctx.attack.rate:.0f}% of {len(ctx.train)} training images poisoned. "  # type: ignore[union-attr,arg-type]
               f"CA: clean accuracy; ASR: attack success rate (test images of other labels, stamped). "
               f"Outputs in {out}/. {time.perf_counter() - t0:.0f} s.")
    write_json(json_path, {"rows": ctx.rows, "results": ctx.results, "seconds": time.perf_counter() - t0})
