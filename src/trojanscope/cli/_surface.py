"""Opening a model as a trainable surface for the verbs that train, hook or rewrite it (inspect-data,
repair, pipeline), whatever its format. No defence logic lives here."""

from __future__ import annotations

from pathlib import Path

from ..data import ImageDataset
from ..models import LoadedModel
from ..models.io import detect_format
from ..models.surface import ModelSurface, model_surface
from ._common import open_model, pick_device


def open_surface(path: str | Path, *, arch: str | None = None, input_shape: str | None = None,
                 num_classes: int | None = None, device: str | None = None, data: ImageDataset | None = None,
                 freeze_bn: bool = True) -> tuple[LoadedModel, ModelSurface]:
    """Load ``path`` safely and give its trainable surface, on the CLI's device.

    The input shape and the class count come from the file where it says them, else from ``data``
    (its image shape; its label count for a bare state dict); ``input_shape`` / ``num_classes``
    override both.
    """
    p = Path(path)
    if num_classes is None and data is not None and p.is_file() and detect_format(p) == "torch_zip":
        num_classes = data.num_classes
    lm = open_model(p, arch=arch, input_shape=input_shape, num_classes=num_classes, device=device, data=data)
    surface = model_surface(lm, freeze_bn=freeze_bn)
    surface.module.to(pick_device(device))
    return lm, surface
