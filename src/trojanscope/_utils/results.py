"""Typed, serialisable results: frozen dataclasses with ``to_dict()``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: Field metadata of a field that is not data (a model, fitted filter objects, a whole data set):
#: ``to_dict()`` leaves it out. ``repr=False`` only keeps a field out of the printed form.
NOT_SERIALISED: dict[str, Any] = {"serialize": False}


def not_serialised(**kwargs: Any) -> Any:
    """A dataclass field that ``to_dict()`` leaves out (and ``repr`` does not print): a model,
    fitted objects, a data set. Takes :func:`dataclasses.field`'s keyword arguments."""
    kwargs.setdefault("repr", False)
    return dataclasses.field(metadata=NOT_SERIALISED, **kwargs)


def serialised(f: dataclasses.Field) -> bool:
    """Whether ``to_dict()`` writes the field ``f`` (every field not marked :data:`NOT_SERIALISED`)."""
    return f.metadata.get("serialize", True) is not False


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and nested containers into JSON-ready values."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return to_jsonable(float(value))
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    return value


def trigger_tensors(result: Any) -> dict[str, torch.Tensor]:
    """Masks and patterns of the triggers a result holds in its fields (or one or two levels down,
    in dicts and lists; a ``model`` field is not looked into): keys ``"<where>.mask"`` and
    ``"<where>.pattern"``, e.g. ``"details.triggers.3.mask"``. Empty for anything not a dataclass."""
    from ..triggers import Trigger

    out: dict[str, torch.Tensor] = {}

    def walk(key: str, v: Any, depth: int = 0) -> None:
        if isinstance(v, Trigger):
            out[f"{key}.mask"] = v.mask
            out[f"{key}.pattern"] = v.pattern
        elif depth < 2 and isinstance(v, Mapping):
            for kk, vv in v.items():
                walk(f"{key}.{kk}", vv, depth + 1)
        elif depth < 2 and isinstance(v, (list, tuple)):
            for i, vv in enumerate(v):
                walk(f"{key}.{i}", vv, depth + 1)

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        for f in dataclasses.fields(result):
            if f.name != "model":
                walk(f.name, getattr(result, f.name))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    """Base of every result: ``to_dict()`` gives a JSON-ready dict (tensors become lists).

    Every field is written, whether or not it is printed (``repr=False`` is about printing), except
    fields declared with :func:`not_serialised` (models and other objects that are not data). A
    model is never data: a field holding an ``nn.Module`` is left out even where it is not marked.
    """

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if serialised(f) and not isinstance(v, torch.nn.Module):
                out[f.name] = to_jsonable(v)
        return out
