"""Architectures (a registry by name) and safe model files."""

from .architectures import MODELS, create_model, list_models, register_model
from .io import LoadedModel, ModelSpec, detect_format, load_model, save_model

__all__ = ["MODELS", "LoadedModel", "ModelSpec", "create_model", "detect_format", "list_models", "load_model",
           "register_model", "save_model"]
