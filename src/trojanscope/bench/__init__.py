"""The benchmark matrix: every attack against every defence, over seeds, as one tidy table.

A run trains one model per (attack, seed), caches it in the run folder, then evaluates each
defence on it. One JSON file per finished cell is written as soon as the cell finishes, so an
interrupted run resumes where it stopped: finished cells and trained models are reused.

The package: :mod:`~trojanscope.bench.spec` (what a run covers), :mod:`~trojanscope.bench.presets`
(the default and ``--quick`` matrices), :mod:`~trojanscope.bench.config` (reading and checking a
config), :mod:`~trojanscope.bench.victims` (the attacked models), :mod:`~trojanscope.bench.scan`
(the scan other defences build on), :mod:`~trojanscope.bench.cells` (scoring a cell),
:mod:`~trojanscope.bench.store` (the run folder, written and read) and
:mod:`~trojanscope.bench.run` (the run itself).

Defences never see the attack. Ground truth (the planted trigger, the target, which samples
were poisoned) enters only in :mod:`trojanscope.bench.cells`, through :mod:`trojanscope.metrics`:

============  =====================================================================================
family        how a cell is scored
============  =====================================================================================
``model``     ``scan(model, val)``: the verdict, the flagged labels, whether the true target is
              among them.
``data``      ``inspect(model, poisoned train)``: poison removed (recall) and clean removed (false
              positive rate), AUROC of the scores; then a model is retrained on the samples kept
              and its CA / ASR are the "after" figures.
``input``     ``fit(model, val)``, then ``flag`` on clean test inputs (FRR) and stamped test inputs
              (FAR: stamped inputs let through), AUROC over both; "after": the share of clean
              inputs accepted and correctly classified, and of stamped inputs accepted and sent to
              the target.
``repair``    ``repair(model, val)``: CA / ASR of the repaired model (unlearning fine-tunes on
              all of val: :data:`BENCH_PARAMS`).
``explain``   ``explain(model, val, target)`` of the label the provider's scan suspects: whether
              it is a true target.
``chain``     the defences in order (:class:`trojanscope.pipeline.Pipeline`): CA / ASR of the
              defended system after the last step.
============  =====================================================================================

A config (TOML; YAML when PyYAML is installed) looks like::

    dataset = "mnist5k"          # a bundled name, an .npz file or an image folder
    arch = "mnist_cnn"
    epochs = 3
    seeds = [0]
    attacks = ["clean", "badnets-patch", "badnets-blended"]
    defenses = ["all"]           # registry names, a family ("model", "data", "input", "repair") or "all"

    [[attack]]                   # a custom attack, in addition to the presets named above
    name = "red-corner"
    trigger = "square:3:red:top-left"
    target = 2
    rate = 0.05

    [params.neural-cleanse]      # settings for a defence (its constructor arguments)
    init_cost = 1e-3

    [[victim]]                   # a model file the user received, benchmarked as it is (never trained)
    name = "vendor-resnet"
    model = "vendor/model.pt2"   # anything the safe loader reads: .pt2, TorchScript, ONNX, a model directory
    trigger = "square:4:white:bottom-right"   # the known backdoor: scoring only
    target = 0
    train = "train.npz"          # optional: its training set, for the data sanitisers
    poison = "poison.json"       # optional: which samples of train were poisoned (scoring only)

A victim's clean data are the ``dataset``'s splits (val for the defender, test for the figures); its
repairs run on its trainable surface (:func:`trojanscope.models.surface.model_surface`, BatchNorm
statistics frozen) and a data sanitiser's retraining trains a re-initialised copy of its graph.

The example is a valid config (here with a stand-in for the received model file):

    >>> import tempfile, textwrap, tomllib
    >>> from pathlib import Path
    >>> example = textwrap.dedent(__doc__.split("looks like::")[1].split("A victim's")[0])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     model = Path(tmp) / "model.pt2"
    ...     _ = model.write_bytes(b"")
    ...     cfg = parse_config(tomllib.loads(example.replace("vendor/model.pt2", model.as_posix())))
    >>> [a.name for a in cfg.attacks]
    ['clean', 'badnets-patch', 'badnets-blended', 'red-corner', 'vendor-resnet']
    >>> {d.name: dict(d.params) for d in cfg.defenses}["neural-cleanse"]
    {'init_cost': 0.001}
"""

from .cells import SCORERS, Cell, Scored, evaluate_cell, make_defense
from .config import check_defense_params, load_config, parse_config, validate_config
from .presets import (BENCH_PARAMS, FINE_PRUNE_UNITS, PRESET_ATTACKS, QUICK_ATTACK_PARAMS, QUICK_EXCLUDE, QUICK_PARAMS,
                      VARIANTS, default_config, preset_attack_spec, quick_config)
from .run import BenchResult, RunLock, applicable, run_bench
from .scan import SCAN_PROVIDER, SharedScan, consumes_scan, mask_box, stored_scan
from .spec import CHAIN, FAMILIES, RECEIVED, AttackSpec, BenchConfig, DefenseSpec, expand_defenses
from .store import COLUMNS, CellRecord, RunData, cell_id, load_cells, load_run, run_metadata, write_table
from .victims import AttackedModel, build_attack

__all__ = ["BENCH_PARAMS", "CHAIN", "COLUMNS", "FAMILIES", "FINE_PRUNE_UNITS", "PRESET_ATTACKS", "QUICK_ATTACK_PARAMS",
           "QUICK_EXCLUDE", "QUICK_PARAMS", "RECEIVED", "SCAN_PROVIDER", "SCORERS", "VARIANTS", "AttackSpec",
           "AttackedModel", "BenchConfig", "BenchResult", "Cell", "CellRecord", "DefenseSpec", "RunData", "RunLock",
           "Scored", "SharedScan", "applicable", "build_attack", "cell_id", "check_defense_params", "consumes_scan",
           "default_config", "evaluate_cell", "expand_defenses", "load_cells", "load_config", "load_run",
           "make_defense", "mask_box", "parse_config", "preset_attack_spec", "quick_config", "run_bench",
           "run_metadata", "stored_scan", "validate_config", "write_table"]
