"""trojanscope: find, explain, filter and remove backdoors in image classifiers.

Example:
    >>> import trojanscope as ts
    >>> sorted(ts.list_models())[:2]
    ['bn_resnet', 'deepid']
"""

from . import attacks, data, defenses, metrics, models, training
from .attacks import BadNets
from .data import ImageDataset, PoisonedDataset, load_data
from .errors import (ConfigError, DataError, ModelLoadError, NotFittedError, TrojanscopeError, UnsafeModelError,
                     UnsupportedModelError)
from .metrics import attack_success_rate, clean_accuracy, detection_metrics
from .models import ModelSpec, create_model, list_models, load_model, save_model
from .training import fine_tune, train
from .triggers import Trigger

__version__ = "0.1.0"

__all__ = [
    "BadNets", "ConfigError", "DataError", "ImageDataset", "ModelLoadError", "ModelSpec", "NotFittedError",
    "PoisonedDataset", "Trigger", "TrojanscopeError", "UnsafeModelError", "UnsupportedModelError", "attack_success_rate",
    "attacks", "clean_accuracy", "create_model", "data", "defenses", "detection_metrics", "fine_tune", "list_models",
    "load_data", "load_model", "metrics", "models", "save_model", "train", "training",
]
