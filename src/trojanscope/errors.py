"""Exceptions. Every failure a user can cause is a :class:`TrojanscopeError` with one clear
sentence; the CLI prints that sentence and exits with code 2."""

from __future__ import annotations


class TrojanscopeError(Exception):
    """Base class for every error trojanscope raises on bad input."""


class DataError(TrojanscopeError, ValueError):
    """A dataset is empty, malformed, of the wrong shape, holds NaN or out-of-range labels."""


class ModelLoadError(TrojanscopeError):
    """A model file is missing, corrupt, of an unknown format or does not fit its spec."""


class UnsafeModelError(ModelLoadError):
    """A model file would execute code when loaded (a pickle with arbitrary globals)."""


class UnsupportedModelError(TrojanscopeError):
    """The method needs something this model cannot give (e.g. hooks on TorchScript)."""


class ConfigError(TrojanscopeError, ValueError):
    """A parameter or configuration value is out of its allowed range."""


class NotFittedError(TrojanscopeError, RuntimeError):
    """A fitted estimator's verb was called before ``fit``."""


class ResourceLimitError(TrojanscopeError):
    """An input declares more memory than the budget allows (``--max-memory``), or a
    compression ratio that only a bomb has."""
