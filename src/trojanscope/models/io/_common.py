"""What every loader shares: the spec, the loaded model, and the checks done on any model once built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...errors import ModelLoadError
from ..architectures import MODELS, create_model

Format = Literal["trojanscope", "export", "torchscript", "state_dict", "onnx"]
SPEC_FORMAT = "trojanscope.model/1"


@dataclass
class ModelSpec:
    """What is needed to rebuild and use a model.

    Attributes:
        arch: registered architecture name (``None`` for exported / TorchScript programs).
        input_shape: ``(C, H, W)``.
        num_classes: K.
        arch_kwargs: extra constructor arguments of the architecture.
        class_names: optional names of the K classes.
        extra: free-form provenance (training settings, attack...).
    """

    arch: str | None
    input_shape: tuple[int, int, int]
    num_classes: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["format"] = SPEC_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            shape = tuple(int(v) for v in d["input_shape"])
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"input_shape must be (C, H, W), got {d['input_shape']}")
            k = int(d["num_classes"])
            if k < 2:
                raise ValueError(f"num_classes must be >= 2, got {k}")
            return cls(arch=d.get("arch"), input_shape=shape, num_classes=k,  # type: ignore[arg-type]
                       arch_kwargs=dict(d.get("arch_kwargs") or {}), class_names=d.get("class_names"),
                       extra=dict(d.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"bad model spec: {e}") from None


@dataclass
class LoadedModel:
    """A loaded model with its spec and the format it came in."""

    model: nn.Module
    spec: ModelSpec
    format: Format
    path: Path

    @property
    def supports_hooks(self) -> bool:
        """False for TorchScript, whose internal layers cannot be hooked."""
        return self.format != "torchscript"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

def _check_weights(lm: LoadedModel) -> None:
    for name, t in list(lm.model.state_dict().items()):
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise ModelLoadError(f"{lm.path}: weight {name!r} contains NaN or infinite values")

def _build(spec: ModelSpec, p: Path) -> nn.Module:
    if spec.arch is None or spec.arch not in MODELS:
        raise ModelLoadError(f"{p}: unknown architecture {spec.arch!r}; known: {', '.join(MODELS.names())}")
    try:
        return create_model(spec.arch, input_shape=spec.input_shape, num_classes=spec.num_classes, seed=0,
                            **spec.arch_kwargs)
    except TypeError as e:
        raise ModelLoadError(f"{p}: bad architecture arguments {spec.arch_kwargs}: {e}") from None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], p: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(f"{p}: weights do not match the architecture (missing: {missing[:5]}, "
                             f"unexpected: {unexpected[:5]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelLoadError(f"{p}: weight {k!r} has shape {tuple(v.shape)}, the architecture expects "
                                 f"{tuple(own[k].shape)}")
    model.load_state_dict(state)


def _infer_spec(model: nn.Module, p: Path, input_shape: tuple[int, int, int] | None,
                num_classes: int | None, sample_shape: tuple[int, ...] | None) -> ModelSpec:
    shape = input_shape or (tuple(sample_shape[1:]) if sample_shape and len(sample_shape) == 4 else None)
    if shape is None:
        raise ModelLoadError(f"{p}: cannot tell the input shape; pass it (--input-shape C,H,W)")
    with torch.inference_mode():
        try:
            out = model(torch.zeros(2, *shape))
        except Exception as e:
            raise ModelLoadError(f"{p}: the model does not accept inputs of shape (N, {', '.join(map(str, shape))}): "
                                 f"{_first_line(e)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelLoadError(f"{p}: the model must return logits (N, K); got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if num_classes is not None and int(out.shape[1]) != int(num_classes):
        raise ModelLoadError(f"{p}: the model returns {out.shape[1]} logits, not {num_classes} classes")
    return ModelSpec(None, tuple(shape), int(out.shape[1]))  # type: ignore[arg-type]

