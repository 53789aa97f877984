"""One trainable model surface for every format a user may hold.

Defences need more than a callable: forward hooks on named layers (sanitisers, pruning), parameter
slices to zero (pruning masks) and gradients (fine-tuning, unlearning). A trojanscope model
directory or a state dict already is such a module. A received program is not: an unflattened
``torch.export`` program has interpreter modules instead of layers, a TorchScript module cannot be
hooked. :func:`model_surface` turns every :class:`~trojanscope.models.io.LoadedModel` into a
:class:`ModelSurface`, whose ``module`` is a plain ``torch.fx.GraphModule`` whose convolutions,
dense layers and BatchNorms are real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm{1,2}d`` modules
sharing the file's weights, named after the layers of the program (``stem``, ``layer1.0.conv1``...).
Everything else in the graph (activations, pooling, residual sums, reshapes) stays as the aten
operators the program already had.

How each format becomes a graph:

* ``.pt2`` (``torch.export``): the program, re-read by the project's safe reader
  (never ``torch.export.load``), gives its flat aten graph (``ExportedProgram.module()``).
* TorchScript: torch's TorchScript-to-export converter (``TS2EPConverter``) turns the scripted
  module's graph (already checked by the safe loader) into an exported program; then as for ``.pt2``.
* ONNX: the safe loader's rebuilt module is already made of standard layers; it is used as it is
  (a copy, BatchNorm statistics frozen).

Each rebuilt graph is checked against the loaded model on random inputs before it is used; a
mismatch is refused rather than silently repaired wrong.

**BatchNorm of received models.** Their running statistics are frozen during fine-tuning (the layers
stay in eval mode when the model is put in training mode; their affine weights still train), since a
defender's small clean set would otherwise overwrite statistics the vendor estimated on the full
training set. ``freeze_bn_stats=False`` (``repair --train-bn-stats``) lets them update. The project's
own models (trojanscope directories, state dicts) keep their usual BatchNorm behaviour.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ._rebuild import rebuild_graph
from .architectures import he_init
from .io import LoadedModel, ModelSpec

#: Formats that come from outside the project (written back by :mod:`~trojanscope.models.writeback`).
RECEIVED_FORMATS = ("export", "torchscript", "onnx")


class FrozenStatsBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose running statistics never update: it stays in eval mode."""

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm1d":
        return super().train(False)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics never update: it stays in eval mode."""

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm2d":
        return super().train(False)


_FROZEN = {nn.BatchNorm1d: FrozenStatsBatchNorm1d, nn.BatchNorm2d: FrozenStatsBatchNorm2d}


def _swap_classes(module: nn.Module, classes: dict[type, type], *, to_eval: bool) -> nn.Module:
    """Give every submodule whose exact type is a key of ``classes`` the class it maps to (in place)."""
    for m in module.modules():
        new = classes.get(type(m))
        if new is not None:
            m.__class__ = new
            if to_eval:
                m.eval()
    return module


def freeze_bn_stats(module: nn.Module) -> nn.Module:
    """Make every ``BatchNorm1d`` / ``BatchNorm2d`` of ``module`` keep its running statistics (in place).

    The layers keep their class for ``isinstance`` (they become subclasses) and their parameters.
    """
    return _swap_classes(module, _FROZEN, to_eval=True)


def unfreeze_bn_stats(module: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn_stats` (in place)."""
    return _swap_classes(module, {v: k for k, v in _FROZEN.items()}, to_eval=False)


@dataclass
class ModelSurface:
    """A model in any format, as a trainable module with named layers, and how to write it back.

    Attributes:
        module: the trainable ``nn.Module`` (standard layers, hookable, on the loaded model's device).
        format: the input's format (``"trojanscope"``, ``"state_dict"``, ``"export"``,
            ``"torchscript"``, ``"onnx"``); a repair is written back in it.
        spec: input shape and class count.
        path: the file it came from.
        rebuilt: True when ``module`` is a graph rebuilt from a program (not the loader's module).
        bn_stats_frozen: whether BatchNorm running statistics are frozen during training.
        layers: the named layers found in the graph, in graph order (``{name: kind}``).
    """

    module: nn.Module
    format: str
    spec: ModelSpec
    path: Path
    rebuilt: bool = False
    bn_stats_frozen: bool = False
    layers: dict[str, str] = field(default_factory=dict)

    @property
    def received(self) -> bool:
        """Whether the model came from outside the project (a program, not a trojanscope architecture)."""
        return self.format in RECEIVED_FORMATS

    def reinitialised(self, seed: int | None = 0) -> nn.Module:
        """A copy of the graph with every layer re-initialised (see :func:`reinitialised_copy`)."""
        return reinitialised_copy(self.module, seed)

    def write(self, model: nn.Module, out: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model`` (this surface's module or a repaired copy of it) to directory ``out`` in
        the input's format; returns the file written (see :func:`~trojanscope.models.writeback.write_back`)."""
        from .writeback import write_back

        return write_back(self, model, out, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.path), "rebuilt": self.rebuilt,
                "bn_stats_frozen": self.bn_stats_frozen, "layers": dict(self.layers)}


def _program_of(lm: LoadedModel) -> Any:
    """The ``ExportedProgram`` behind a ``.pt2`` or TorchScript model."""
    shape = tuple(lm.spec.input_shape)
    if lm.format == "export":
        try:  # the safe reader (never torch.export.load)
            from .io._pt2 import _read_pt2 as reader
        except ImportError:
            from .io import _read_pt2 as reader
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return reader(lm.path)
    if lm.format == "torchscript":
        from torch._export.converter import TS2EPConverter

        export_log = logging.getLogger("torch._export")  # its notes on the sample input's sizes
        level = export_log.level
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_log.setLevel(logging.ERROR)
            try:
                return TS2EPConverter(lm.model.cpu(), (torch.zeros(2, *shape),)).convert()
            except Exception as e:  # the converter covers most but not all TorchScript
                raise UnsupportedModelError(
                    f"{lm.path}: this TorchScript model cannot be turned into a trainable graph "
                    f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); output-only verbs "
                    f"(evaluate, scan, filter) still work on it") from None
            finally:
                export_log.setLevel(level)
    raise UnsupportedModelError(f"{lm.path}: no program behind a {lm.format} model")


def _check_same(a: nn.Module, b: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, *shape, generator=g)
    dev = next((p.device for p in b.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        ya = a(x.to(dev)).float().cpu()
        yb = b(x.to(dev)).float().cpu()
    if ya.shape != yb.shape or not torch.allclose(ya, yb, rtol=1e-3, atol=1e-4 * (1 + float(ya.abs().max()))):
        raise UnsupportedModelError(f"{path}: the trainable graph rebuilt from the program does not compute what the "
                                    f"program does (max difference {float((ya - yb).abs().max()):.3g}); refusing to use it")


def model_surface(lm: LoadedModel, *, freeze_bn: bool = True) -> ModelSurface:
    """The trainable surface of a loaded model (see the module docstring).

    Args:
        lm: what :func:`~trojanscope.models.load_model` returned.
        freeze_bn: for a received model, keep BatchNorm running statistics frozen during training.

    Raises:
        UnsupportedModelError: a program that cannot be turned into a graph of standard layers.
    """
    fmt = lm.format
    if fmt not in RECEIVED_FORMATS:
        return ModelSurface(lm.model, fmt, lm.spec, lm.path, rebuilt=False, bn_stats_frozen=False,
                            layers={n: type(m).__name__ for n, m in lm.model.named_modules()
                                    if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))})
    dev = next((p.device for p in lm.model.parameters()), torch.device("cpu"))
    if fmt == "onnx":
        module = copy.deepcopy(lm.model)
        layers = {n: type(m).__name__ for n, m in module.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))}
        rebuilt = False
    else:
        ep = _program_of(lm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                flat = ep.module()
                module, layers = rebuild_graph(flat)  # type: ignore[arg-type]
            except UnsupportedModelError:
                raise
            except Exception as e:
                raise UnsupportedModelError(f"{lm.path}: cannot turn the program into a trainable graph "
                                            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
                                            ) from None
        rebuilt = True
        module = module.to(dev).eval()
        _check_same(lm.model.eval(), module, tuple(lm.spec.input_shape), lm.path)
    if not layers:
        raise UnsupportedModelError(f"{lm.path}: the model has no convolution or dense layer with its own weights")
    for p in module.parameters():
        p.requires_grad_(True)
    if freeze_bn:
        freeze_bn_stats(module)
    return ModelSurface(module.eval(), fmt, lm.spec, lm.path, rebuilt=rebuilt, bn_stats_frozen=freeze_bn, layers=layers)


def reinitialised_copy(module: nn.Module, seed: int | None = 0, *, init: str | None = None) -> nn.Module:
    """A deep copy of ``module`` with every conv / linear / norm layer re-initialised by torch's
    default initialisers (``reset_parameters``, running statistics reset), seeded by ``seed``;
    then a trojanscope architecture's own ``init_weights`` (a method defined on its class, such as
    ``gtsrb_cnn``'s) runs again.

    ``init="he"`` then gives every convolution and linear layer He-uniform weights (for the ReLU
    that follows) and zero biases, and the last linear layer (the output layer) Glorot-uniform
    ones: what a plain deep ReLU stack without normalisation needs to leave chance, where torch's
    defaults leave a received ``gtsrb_cnn`` graph at chance (see :class:`~trojanscope.models.
    architectures.GTSRBCNN`).

    The graph (what calls what) is the received one: this is the "fresh model of the same
    architecture" that exclusionary reclassification, provenance filtering and retraining need.
    BatchNorm layers of the copy update their running statistics again (frozen statistics are for
    fine-tuning a received model, not for training one from scratch). Parameters held outside such
    layers (rare: a learned scale used by a bare operator) keep their values; their names are
    listed in ``kept`` of the copy's ``reinit_report``.

    Raises:
        UnsupportedModelError: a TorchScript module (not a graph of layers).
    """
    if init not in (None, "he"):
        raise ConfigError(f"init must be None or 'he', got {init!r}")
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedModelError("cannot re-initialise a TorchScript module; rebuild its graph first "
                                    "(trojanscope.models.model_surface)")
    with warnings.catch_warnings():  # torch's own deprecation notice from copying a graph's treespecs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        new = unfreeze_bn_stats(copy.deepcopy(module))  # a model trained from scratch learns its statistics
    dev = next((p.device for p in new.parameters()), torch.device("cpu"))
    kept: list[str] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if seed is None:
            torch.seed()  # fresh entropy, as batching.generator(None)
        else:
            torch.manual_seed(int(seed))
        for name, m in new.named_modules():
            own = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
            if not own:
                continue
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                kept += [f"{name}.{n}" if name else n for n in own]
        # a trojanscope architecture with its own initialisation (e.g. gtsrb_cnn's Glorot
        # weights, without which it does not train) applies it again; a received graph has none
        for m in new.modules():
            own_init = getattr(type(m), "init_weights", None)
            if callable(own_init):
                own_init(m)
        if init == "he":
            he_init(new)
    new.reinit_report = {"reinitialised": True, "kept": kept, "init": init or "default"}  # type: ignore[assignment]
    return new

