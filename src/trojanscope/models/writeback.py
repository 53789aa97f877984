"""Write a (repaired) model back in the format it came in, so it runs where the original ran.

* trojanscope directory / state dict in: a trojanscope model directory out (:func:`save_model`).
* ``.pt2`` in: ``model.pt2``, re-exported with ``torch.export`` with a dynamic batch dimension.
* TorchScript in: ``model.ts.pt``, traced with ``torch.jit.trace`` (checked on a second batch size).
* ONNX in: ``model.onnx``, exported with ``torch.onnx.export`` with a dynamic batch axis (needs the
  ``onnx`` extra).

Pruned units are zeroed weights, so the written graph has the same operators and shapes as the
input: any runtime that ran the original runs the repair. BatchNorm layers are written with the
running statistics they hold (frozen ones unchanged). Every file written is read back with the
project's own safe loader and compared with the module it came from; a file that does not load, or
computes something else, is an error (never a silent success). A ``model.json`` beside it records
the input shape, the class count and how the model was made.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._utils.results import to_jsonable
from ..errors import ConfigError, TrojanscopeError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from .surface import ModelSurface

#: File name written for each received format.
FILE_NAMES = {"export": "model.pt2", "torchscript": "model.ts.pt", "onnx": "model.onnx"}


def _plain_copy(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy of ``model`` with frozen BatchNorms turned back into torch's own classes
    (so exporters and tracers see only standard modules)."""
    import copy

    from .surface import unfreeze_bn_stats

    m = copy.deepcopy(model).cpu().eval()
    unfreeze_bn_stats(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def export_pt2(model: nn.Module, path: Path, input_shape: tuple[int, int, int]) -> Path:
    """``torch.export`` ``model`` with a dynamic batch dimension and save it to ``path``."""
    m = _plain_copy(model)
    x = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
        torch.export.save(ep, str(path))
    return path


def export_torchscript(model: nn.Module, path: Path, input_shape: tuple[int, int, int]) -> Path:
    """Trace ``model`` to TorchScript and save it; the trace must agree on a second batch size."""
    m = _plain_copy(model)
    x = torch.rand(3, *input_shape, generator=torch.Generator().manual_seed(0))
    x2 = torch.rand(5, *input_shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(m, (x,), check_trace=False)
        with torch.inference_mode():
            try:
                ok = torch.allclose(ts(x2), m(x2), rtol=1e-4, atol=1e-5)
            except RuntimeError:
                ok = False
        if not ok:
            ts = torch.jit.script(m)
        ts.save(str(path))
    return path


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, int, int]) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis (input ``"input"``, output ``"logits"``)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("writing ONNX needs the onnx package: pip install 'trojanscope[onnx]'") from None
    m = _plain_copy(model)
    x = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
                          opset_version=17)
    return path


_WRITERS = {"export": export_pt2, "torchscript": export_torchscript, "onnx": export_onnx}


def write_back(surface: "ModelSurface", model: nn.Module, out: str | Path, *, extra: dict[str, Any] | None = None,
               verify: bool = True) -> Path:
    """Write ``model`` (``surface.module`` or a repaired copy of it) to directory ``out`` in
    ``surface.format``; returns the model path (the directory for a trojanscope model).

    With ``verify`` the file is loaded back with :func:`~trojanscope.models.load_model` and must give
    the same logits as ``model`` on random inputs.

    Raises:
        UnsupportedModelError: the model could not be written in that format, or the written file
            does not load back as the same model.
    """
    from .io import ModelSpec, load_model, save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = surface.spec
    meta = ModelSpec(spec.arch, tuple(spec.input_shape), spec.num_classes, arch_kwargs=dict(spec.arch_kwargs),  # type: ignore[arg-type]
                     class_names=spec.class_names, extra={**spec.extra, **(extra or {})})
    if surface.format not in _WRITERS:
        if spec.arch is None:
            raise UnsupportedModelError(f"cannot write a {surface.format} model without a known architecture")
        from .surface import unfreeze_bn_stats

        save_model(unfreeze_bn_stats(_plain_copy(model)), out, meta)
        return out
    target = out / FILE_NAMES[surface.format]
    try:
        _WRITERS[surface.format](model, target, tuple(spec.input_shape))  # type: ignore[arg-type]
    except TrojanscopeError:
        raise
    except Exception as e:  # an exporter's own failure: one clear line
        text = str(e).strip()
        raise UnsupportedModelError(f"cannot write the model back as {surface.format}: "
                                    f"{text.splitlines()[0] if text else type(e).__name__}") from None
    info = {**meta.to_dict(), "written_as": surface.format, "file": target.name, "source": str(surface.path)}
    (out / "model.json").write_text(json.dumps(to_jsonable(info), indent=2) + "\n")
    if verify:
        verify_written(model, target, tuple(spec.input_shape), spec.num_classes, surface.format)  # type: ignore[arg-type]
    return target


def verify_written(model: nn.Module, path: Path, input_shape: tuple[int, int, int], num_classes: int,
                   fmt: str) -> None:
    """Load ``path`` with the project's safe loader and compare its logits with ``model``'s."""
    from ..errors import ModelLoadError
    from .io import load_model

    m = _plain_copy(model)
    x = torch.rand(7, *input_shape, generator=torch.Generator().manual_seed(2))
    try:
        lm = load_model(path, input_shape=input_shape, num_classes=num_classes)
    except ModelLoadError as e:
        if fmt != "onnx" or "unknown model format" not in str(e):
            raise
        run = _onnx_runtime(path)  # the safe loader has no ONNX reader yet: check with the ONNX runtime
    else:
        if lm.format != fmt:
            raise UnsupportedModelError(f"{path}: written as {fmt} but reads back as {lm.format}")
        run = lm.model.cpu().eval()
    with torch.inference_mode():
        a, b = m(x).float(), run(x).float()
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(a.abs().max()))):
        raise UnsupportedModelError(f"{path}: the written model does not compute what the repaired one does "
                                    f"(max difference {float((a - b).abs().max()):.3g})")


def _onnx_runtime(path: Path) -> Any:
    """``x -> logits`` through onnxruntime (when the safe loader cannot read ONNX)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise UnsupportedModelError(f"{path}: cannot read the written ONNX file back (no ONNX reader installed)") from None
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0])
