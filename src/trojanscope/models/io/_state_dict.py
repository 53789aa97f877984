"""Weights-only formats: trojanscope model directories, safetensors files and ``torch.save`` state
dicts. The architecture comes from trojanscope's registry (never from the file), the weights are
tensors only.

* A **safetensors** file is a JSON header and raw bytes; the safetensors library checks that every
  declared tensor lies inside the file, so what it allocates is bounded by the file's size (checked
  against the memory budget first). Without a trojanscope spec in its metadata it needs ``arch``.
* A **state dict** zip is checked by :func:`~trojanscope._utils.archive.check_zip` (no duplicate,
  unsafe, linked or bomb members), its pickles against the allow-list, and only then read with
  ``weights_only=True``; torch compares every storage it declares with the size of its member
  before allocating it (a state dict cannot declare more than its zip holds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..._utils.limits import check_alloc
from ...errors import DataError, ModelLoadError, UnsafeModelError
from ..architectures import MODELS
from ._common import LoadedModel, ModelSpec, _build, _first_line, _load_state
from ._pickle_guard import check_archive_pickles


def load_trojanscope_dir(d: Path) -> LoadedModel:
    st = d / "model.safetensors"
    if not st.is_file():
        raise ModelLoadError(f"{d} is not a trojanscope model directory (no model.safetensors)")
    spec = None
    if (d / "model.json").is_file():
        from ..._utils.limits import read_json_file

        try:  # a spec is a few hundred bytes: 16 MiB is room for any class names
            spec = ModelSpec.from_dict(read_json_file(d / "model.json", "model spec", max_bytes=16 << 20))
        except DataError as e:
            raise ModelLoadError(str(e)) from None
        except AttributeError:
            raise ModelLoadError(f"{d / 'model.json'} is not a model spec (expected a JSON object)") from None
    lm = load_safetensors(st, spec)
    lm.path = d
    return lm


def _arch_spec(p: Path, arch: str | None, input_shape: tuple[int, int, int] | None,
               num_classes: int | None, what: str) -> ModelSpec:
    if arch is None:
        raise ModelLoadError(f"{p} is {what}: name its architecture (--arch, one of {', '.join(MODELS.names())}) "
                             f"with its input shape and classes")
    return ModelSpec(arch, tuple(input_shape or (1, 28, 28)), int(num_classes or 10))  # type: ignore[arg-type]


def load_safetensors(p: Path, spec: ModelSpec | None, arch: str | None = None,
                     input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None) -> LoadedModel:
    """A safetensors file; its spec from ``spec``, its metadata, or (a bare weights file) ``arch``."""
    from safetensors import SafetensorError, safe_open

    check_alloc(p.stat().st_size, f"model file {p.name}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if spec is None and "trojanscope_spec" not in meta:
                spec = _arch_spec(p, arch, input_shape, num_classes, "a safetensors file without a trojanscope spec")
            state = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{p}: corrupt safetensors file: {_first_line(e)}") from None
    if spec is None:
        try:
            spec = ModelSpec.from_dict(json.loads(meta["trojanscope_spec"]))
        except (json.JSONDecodeError, AttributeError) as e:
            raise ModelLoadError(f"{p}: bad spec in metadata: {e}") from None
    model = _build(spec, p)
    _load_state(model, state, p)
    return LoadedModel(model.eval(), spec, "trojanscope", p)


def load_state_dict(p: Path, arch: str | None, input_shape: tuple[int, int, int] | None,
                    num_classes: int | None) -> LoadedModel:
    """A ``torch.save`` zip of tensors for a named architecture (the zip was checked by the caller)."""
    # Refuse a pickled model object (torch.save(model)) before asking for an architecture.
    check_archive_pickles(p)
    spec = _arch_spec(p, arch, input_shape, num_classes, "a PyTorch state dict (or torch.save file)")
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # weights_only refuses anything but tensors
        raise UnsafeModelError(f"{p}: refusing to load: not a plain state dict of tensors ({_first_line(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelLoadError(f"{p}: expected a state dict of tensors")
    model = _build(spec, p)
    _load_state(model, state, p)
    return LoadedModel(model.eval(), spec, "state_dict", p)
