"""What ``scan`` does beyond one model's table: the progress bar, a population's rows, the
output folder and the ``--heatmap`` search."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..defenses.model.neural_cleanse import NeuralCleanse, NeuralCleanseResult
from ..triggers import save_png
from ._common import table, write_json

#: Exit code of ``scan`` when a backdoor is found.
EXIT_INFECTED = 1

log = logging.getLogger("trojanscope.scan")


def bar_enabled(quiet: bool) -> bool:
    """Progress bars go to stderr, only on a terminal and without --quiet."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress(nc: NeuralCleanse, quiet: bool) -> Iterator[Any]:
    """A progress bar over the optimisation's epochs (stderr, a terminal only); yields the callback."""
    if not bar_enabled(quiet):
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=nc.epochs, desc="scan", unit="epoch", file=sys.stderr, leave=False)

    def cb(info: dict[str, Any]) -> None:
        bar.update(info["epoch"] - bar.n)
        bar.set_postfix(labels=len(info["targets"]))

    try:
        yield cb
    finally:
        bar.close()


def scan_population(models: list[Path], data: Any, params: dict[str, Any], *, out: Path | None, workers: int,
                     address: str | None, backend: str, quiet: bool, json_path: Path | None) -> None:
    """Scan each model, one row per model; exit 2 only when every model failed."""
    from ..defenses.model.neural_cleanse import LOW_ACCURACY_ADVICE, LOW_CLEAN_ACCURACY
    from ..errors import ConfigError
    from ..population import scan_population

    if backend == "ray" and workers == 1:
        raise ConfigError("--backend ray needs --workers 2 or more")
    bar = None
    if bar_enabled(quiet):
        from tqdm.auto import tqdm
        bar = tqdm(total=len(models), desc="scan", unit="model", file=sys.stderr)

    def on_row(row: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)
        log.info("%s: %s", row["file"], row["error"] or f"probability {row['probability']:.3f}")

    rows = scan_population(models, data, params, workers=workers, out=out, address=address,
                           backend="auto" if backend == "auto" else backend, on_row=on_row)
    if bar is not None:
        bar.close()
    echo = click.echo if str(json_path) != "-" else (lambda m: click.echo(m, err=True))
    cols = ["file", "probability", "verdict", "flagged_labels", "seconds", "error"]
    if any(r.get("population_probability") is not None for r in rows):
        cols[2:2] = ["population_probability", "population_label"]
    echo(table(rows, cols, headers={"flagged_labels": "flagged", "population_probability": "population p",
                                    "population_label": "population label"}))
    failed = sum(r["verdict"] == "error" for r in rows)
    found = sum(r["verdict"] == "backdoor" for r in rows)
    pop = [r["population_probability"] for r in rows if isinstance(r.get("population_probability"), (int, float))]
    echo(f"\n{len(rows)} models: {found} backdoored, {len(rows) - found - failed} clean, {failed} failed"
         + (f" (the per-model verdict); by the population probability, {sum(v > 0.5 for v in pop)} of {len(pop)} "
            f"over 0.5" if pop else "")
         + (f"; table in {out / 'scan.csv'}" if out is not None else ""))
    low = [r["file"] for r in rows if isinstance(r.get("clean_accuracy"), float) and r["clean_accuracy"] < LOW_CLEAN_ACCURACY]
    if low:
        click.echo(f"warning: {len(low)} model(s) classify under {100 * LOW_CLEAN_ACCURACY:.0f}% of the clean images "
                   f"right ({', '.join(low[:5])}{', ...' if len(low) > 5 else ''}; clean_accuracy in their rows): "
                   f"{LOW_ACCURACY_ADVICE}", err=True)
    write_json(json_path, rows)
    if failed == len(rows):
        click.echo("error: every model failed to scan", err=True)
        click.get_current_context().exit(2)
    if found:
        click.get_current_context().exit(EXIT_INFECTED)


def write_scan_dir(result: NeuralCleanseResult, out: Path, example) -> None:
    """Write the result (:meth:`NeuralCleanseResult.save`: ``scan.json`` and ``scan.safetensors``,
    what ``repair --scan`` reads), each label's reversed trigger as a trigger file
    (``trigger_K.safetensors``, for ``evaluate --trigger``) and PNGs of its mask, pattern and a
    stamped example (``label_K_{mask,pattern,stamped}.png``)."""
    result.save(out)
    for k, t in enumerate(result.triggers):
        t.save(out / f"trigger_{k}.safetensors")
        save_png(t.mask[None], out / f"label_{k}_mask.png", scale=8)
        save_png(t.pattern, out / f"label_{k}_pattern.png", scale=8)
        save_png(t.apply(example), out / f"label_{k}_stamped.png", scale=8)


def heatmap(model, data, result: NeuralCleanseResult, path: Path, target: int | None, out: Path | None,
             batch_size: int, seed: int) -> dict:
    """``--heatmap``: the moving-window search on one label, its PNG and its final trigger."""
    from ..defenses.model.heatmap import MovingWindowSearch
    from ..errors import ConfigError
    from ..metrics import attack_success_rate
    from ..report._explain_plots import save_heatmap_png

    if target is None:
        target = result.flagged_labels[0] if result.flagged_labels else int(result.scores.argmax())
    if not 0 <= target < data.num_classes:
        raise ConfigError(f"--heatmap-target {target} is out of range for {data.num_classes} classes")
    hm = MovingWindowSearch(batch_size=batch_size, seed=seed).explain(model, data, target)
    asr = attack_success_rate(model, data, hm.trigger, target)
    save_heatmap_png(hm, path, background=data.x[0], asr=asr)  # the figure printed below, not the search's own
    r0, c0, r1, c1 = hm.bbox
    click.echo(f"\nheat map for label {target} ({hm.window}x{hm.window} windows, stride {hm.stride}) written to "
               f"{path}: peak at {hm.peak}, hot region rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1}; the trigger found "
               f"there has |a|_1 = {float(hm.trigger.l1_norm):.1f} and attack success {100 * asr:.1f}%")
    if out is not None:
        hm.trigger.save(out / "heatmap_trigger.safetensors")
    return {**hm.to_dict(), "attack_success": asr}
