"""``trojanscope bench round``: generate a TrojAI-style population of clean and backdoored models."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from ..errors import ConfigError
from .bench import bench


@bench.command("round")
@click.option("--n", "n", type=int, default=40, show_default=True, help="Models in the round (half backdoored).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Round folder: models/*.pt2 (what a scanner reads) and truth/*.json (for scoring only). "
                   "An existing one is resumed.")
@click.option("--seed", type=int, default=0, show_default=True, help="The round's seed (fixes every draw).")
@click.option("--data", default="mnist5k", show_default=True, help="Bundled data set the models are trained on.")
@click.option("--epochs", type=int, default=3, show_default=True,
              help="Training epochs per model (an all-to-all one trains 8x as long on the whole train split).")
@click.option("--train-size", type=int, default=2000, show_default=True,
              help="Training images per model (a stratified subset of the train split; 0: all).")
@click.option("--arch", "archs", multiple=True, help="Architectures to draw from (repeat; default: all three).")
@click.option("--min-asr", type=float, default=0.8, show_default=True,
              help="Attack success a backdoor needs to count (else it is drawn again).")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def round_cmd(n: int, out: Path, seed: int, data: str, epochs: int, train_size: int, archs: tuple[str, ...], min_asr: float,
              threads: int, quiet: bool) -> None:
    """Train a round of N models (half clean, half backdoored with random triggers, targets, poison
    rates, attack modes and architectures) and write them as .pt2 programs plus a truth file."""
    from ..rounds import ARCHITECTURES, RoundSpec, generate_round

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    spec = RoundSpec(n=n, seed=seed, data=data, epochs=epochs, train_size=train_size or None, min_asr=min_asr,
                     architectures=tuple(archs) if archs else ARCHITECTURES)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="round", unit="model", file=sys.stderr)

    def progress(name: str, row: dict) -> None:
        if bar is not None:
            bar.update(1)
        else:
            kind = f"{row['mode']} ASR {100 * row['attack_success']:.0f}%" if row["backdoored"] else "clean"
            click.echo(f"{name}: {row['arch']}, {kind}, CA {100 * row['clean_accuracy']:.1f}%", err=True)

    rows = generate_round(out, spec, progress=progress)
    if bar is not None:
        bar.close()
    bad = sum(r["backdoored"] and "excluded" not in r for r in rows)
    excl = sum("excluded" in r for r in rows)
    click.echo(f"round of {len(rows)} models in {out}/models ({bad} backdoored, {len(rows) - bad - excl} clean"
               f"{f', {excl} excluded (attack too weak)' if excl else ''}); truth in {out}/truth.json")
