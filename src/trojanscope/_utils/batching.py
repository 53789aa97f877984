"""Device handling and batched inference (the one memory knob: ``batch_size``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch
from torch import nn

DeviceLike = Union[str, torch.device, None]


def model_device(model: nn.Module, device: DeviceLike = None) -> torch.device:
    """The device to compute on: ``device`` if given, else the model's, else CPU."""
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore the caller's mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in chunks of ``batch_size`` on ``device``; concatenate on CPU."""
    outs = [fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
           device: DeviceLike = None) -> torch.Tensor:
    """The model's outputs for ``x`` (N, C, H, W), in eval mode without gradients, on CPU."""
    dev = model_device(model, device)
    with eval_mode(model), torch.inference_mode():
        return batched(lambda b: model(b).float(), x, batch_size, dev)


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
            device: DeviceLike = None) -> torch.Tensor:
    """Predicted labels ``(N,)`` for ``x``."""
    return logits(model, x, batch_size=batch_size, device=device).argmax(1)


def predict_proba(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                  device: DeviceLike = None) -> torch.Tensor:
    """Softmax probabilities ``(N, K)`` for ``x``."""
    return logits(model, x, batch_size=batch_size, device=device).softmax(1)


def accuracy(model: nn.Module, data: Any, *, batch_size: int = 256, device: DeviceLike = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (anything with ``x`` and ``y``)."""
    pred = predict(model, data.x, batch_size=batch_size, device=device)
    return float((pred == data.y).float().mean())


def activations(model: nn.Module, x: torch.Tensor, layer: str, *, batch_size: int = 256,
                device: DeviceLike = None, flatten: bool = True) -> torch.Tensor:
    """Activations of ``layer`` for ``x`` (batched, hooks removed afterwards), on CPU.

    With ``flatten`` the result is ``(N, D)``; otherwise the layer's own shape.
    """
    from ..errors import UnsupportedModelError
    from .hooks import capture

    dev = model_device(model, device)
    outs = []
    with eval_mode(model), torch.inference_mode(), capture(model, layer) as acts:
        for i in range(0, x.shape[0], batch_size):
            acts.value = None
            model(x[i:i + batch_size].to(dev))
            if not isinstance(acts.value, torch.Tensor):
                raise UnsupportedModelError(
                    f"layer {layer!r} did not run (or gave no tensor) in the model's forward pass; in a received "
                    "graph a container's name does not run: name one of the layers inside it")
            a = acts.value.float().cpu()
            outs.append(a.flatten(1) if flatten else a)
    return torch.cat(outs)


def generator(seed: int | None, device: DeviceLike = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (a random seed when None)."""
    g = torch.Generator(device=device or "cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
