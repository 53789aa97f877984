"""The Trojaning attack (Liu et al., NDSS 2018): trojan a *trained* model without its training data.

Three steps, each a small function under the :class:`TrojanNN` class:

1. :func:`select_neurons` ranks the neurons of an internal layer by how strongly they are
   connected to the next layer (sum of absolute outgoing weights); among the most connected,
   :func:`excitability` keeps those the mask's pixels can raise the most;
2. :func:`generate_trigger` optimises the pixels inside a mask (a square or a watermark shape)
   so that those neurons reach a high value ``v``: ``min_x sum_j (v - f_j(x))^2`` with the update
   restricted to the mask, ``x <- x - lr * grad * M``;
3. the model is retrained (the selected layer and what follows it, or the whole model) on clean
   data plus the same data stamped with the trigger and labelled with the target. The clean data
   come from the user or, as in the paper, are reverse-engineered from the model, one batch of
   inputs per label (:func:`reverse_engineer_inputs`: gradient descent from noise towards each
   label, with a total-variation denoiser).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._utils.batching import eval_mode, generator, model_device
from .._utils.hooks import capture, resolve_layer
from .._utils.results import Result, not_serialised
from .._utils.validation import Interval, Options, check_params
from ..data.dataset import ImageDataset
from ..errors import ConfigError, DataError, UnsupportedModelError
from ..metrics import attack_success_rate
from ..training import train
from ..triggers import Trigger
from .base import Attack, register_attack

log = logging.getLogger(__name__)

MaskLike = Trigger | torch.Tensor | str


def watermark_mask(height: int, width: int) -> torch.Tensor:
    """A watermark-shaped mask ``(H, W)``: a one-pixel ring with a cross through it, centred.

    The paper's second trigger shape is a logo spread thinly over the image; this is a
    deterministic stand-in of the same kind (about 10% of the pixels, far from any corner patch).
    """
    ii, jj = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    cy, cx = (height - 1) / 2, (width - 1) / 2
    r = 0.3 * min(height, width)
    ring = ((ii - cy) ** 2 + (jj - cx) ** 2).sqrt().sub(r).abs() <= 0.5
    inside = ((ii - cy).abs() <= r) & ((jj - cx).abs() <= r)
    cross = inside & (((ii - cy).abs() <= 0.5) | ((jj - cx).abs() <= 0.5))
    return (ring | cross).float()


def build_mask(mask: MaskLike, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The trigger mask ``M`` ``(H, W)`` from a :class:`Trigger`, a tensor, ``"watermark"`` or a trigger spec."""
    C, H, W = image_shape
    if isinstance(mask, Trigger):
        if mask.shape != tuple(image_shape):
            raise DataError(f"mask trigger of shape {mask.shape} does not fit images of shape {tuple(image_shape)}")
        m = mask.mask
    elif isinstance(mask, torch.Tensor):
        if tuple(mask.shape) != (H, W):
            raise DataError(f"mask must have shape ({H}, {W}), got {tuple(mask.shape)}")
        m = mask.float()
    elif isinstance(mask, str):
        m = watermark_mask(H, W) if mask == "watermark" else Trigger.parse(mask, image_shape).mask
    else:
        raise ConfigError(f"mask must be a Trigger, an (H, W) tensor, 'watermark' or a trigger spec; got {mask!r}")
    m = m.clamp(0, 1)
    if float(m.sum()) == 0:
        raise ConfigError("the trigger mask is empty")
    return m


def _next_weighted(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """The first Linear or Conv2d module registered after ``layer`` (the layer it feeds)."""
    name, _, _ = resolve_layer(model, layer)
    names = [n for n, _ in model.named_modules()]
    if name not in names:
        raise UnsupportedModelError(f"layer {layer!r} is not a module of the model")
    after = names[names.index(name) + 1:]
    mods = dict(model.named_modules())
    for n in after:
        if n.startswith(name + ".") or not isinstance(mods[n], (nn.Linear, nn.Conv2d)):
            continue
        return n, mods[n]
    raise UnsupportedModelError(f"no Linear or Conv2d layer follows {layer!r}: cannot rank its neurons")


def select_neurons(model: nn.Module, layer: str, image_shape: tuple[int, int, int], k: int = 1) -> torch.Tensor:
    """The ``k`` neurons of ``layer`` most strongly connected to the next layer.

    A neuron is a unit of a fully connected layer or a channel of a convolution. Its connectivity
    is the sum of the absolute weights from it into the next Linear / Conv2d layer (over every
    output unit and, for channels, every spatial position). Returns their indices, strongest
    first.
    """
    dev = model_device(model)
    with eval_mode(model), torch.inference_mode(), capture(model, layer) as acts:
        model(torch.zeros(1, *image_shape, device=dev))
    shape = tuple(acts.value.shape[1:])
    n_units = shape[0]
    _, nxt = _next_weighted(model, layer)
    w = nxt.weight.detach().abs().float().cpu()
    if isinstance(nxt, nn.Conv2d):
        if w.shape[1] != n_units:
            raise UnsupportedModelError(f"the convolution after {layer!r} takes {w.shape[1]} channels, not {n_units}")
        score = w.sum(dim=(0, 2, 3))
    else:
        d = int(torch.tensor(shape).prod())
        if w.shape[1] != d:
            raise UnsupportedModelError(f"the Linear layer after {layer!r} takes {w.shape[1]} inputs, not {d}")
        score = w.sum(0).reshape(shape)
        if score.ndim > 1:
            score = score.flatten(1).sum(1)
    if not 1 <= k <= n_units:
        raise ConfigError(f"k must be in [1, {n_units}] for layer {layer!r}, got {k}")
    return score.topk(k).indices


def excitability(model: nn.Module, layer: str, candidates: torch.Tensor, mask: torch.Tensor,
                 image_shape: tuple[int, int, int], *, steps: int = 50, lr: float = 0.1) -> torch.Tensor:
    """How far the pixels inside ``mask`` can raise each candidate neuron on their own.

    One trigger image per candidate, all optimised in one batch to maximise its own neuron;
    returns ``(J,)`` the value reached minus the value on a blank image. The paper avoids
    neurons that are hard to manipulate: among the most connected ones, keep the most excitable.
    """
    dev = model_device(model)
    j = candidates.numel()
    m = mask.to(dev)
    theta = torch.zeros(j, *image_shape, device=dev, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    idx = torch.arange(j, device=dev)
    cand = candidates.to(dev)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model), capture(model, layer, detach=False) as acts:
            with torch.no_grad():
                model(torch.zeros(1, *image_shape, device=dev))
                blank = _neuron_values(acts.value, cand)[0]
            for _ in range(steps):
                model(torch.sigmoid(theta) * m)
                own = _neuron_values(acts.value, cand)[idx, idx]
                opt.zero_grad(set_to_none=True)
                (-own.sum()).backward()
                opt.step()
            with torch.no_grad():
                model(torch.sigmoid(theta) * m)
                reached = _neuron_values(acts.value, cand)[idx, idx]
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return (reached - blank).cpu()


def _neuron_values(acts: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` values of the selected neurons (channels are averaged over their map)."""
    a = acts[:, neurons]
    return a.flatten(2).mean(2) if a.ndim > 2 else a


def generate_trigger(model: nn.Module, layer: str, neurons: torch.Tensor, mask: torch.Tensor,
                     image_shape: tuple[int, int, int], *, value: float = 100.0, steps: int = 300, lr: float = 0.1,
                     seed: int | None = 0) -> tuple[Trigger, list[float]]:
    """Optimise the pixels inside ``mask`` so that ``neurons`` of ``layer`` reach ``value``.

    Minimises ``sum_j (value - f_j(x))^2`` over the masked pixels of an image that is zero outside
    the mask, by gradient descent restricted to the mask (the paper's ``x <- x - lr * grad * M``;
    here with Adam on a sigmoid parametrisation that keeps pixels in [0, 1]). ``seed`` seeds the
    starting pixels (None: fresh entropy).

    Returns:
        ``(trigger, costs)``: the trigger (mask ``M``, pattern = the optimised pixels) and the cost
        after each step.
    """
    dev = model_device(model)
    g = generator(seed)
    m = mask.to(dev)
    theta = (torch.randn(image_shape, generator=g) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    costs: list[float] = []
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model), capture(model, layer, detach=False) as acts:
            for _ in range(steps):
                x = (torch.sigmoid(theta) * m)[None]
                model(x)
                cost = ((value - _neuron_values(acts.value, neurons.to(dev))) ** 2).sum()
                opt.zero_grad(set_to_none=True)
                cost.backward()
                theta.grad.mul_(m)  # only the pixels inside the mask move
                opt.step()
                costs.append(float(cost.detach()))
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    pattern = (torch.sigmoid(theta.detach()) * m).cpu()
    return Trigger(mask.cpu(), pattern, "trojannn"), costs


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))


def reverse_engineer_inputs(model: nn.Module, image_shape: tuple[int, int, int], num_classes: int, *,
                            n_per_label: int = 100, steps: int = 200, lr: float = 0.05, tv_weight: float = 0.1,
                            seed: int | None = 0) -> ImageDataset:
    """Inputs reverse-engineered from ``model``, ``n_per_label`` for every label (all in one batch).

    Each starts from random noise and follows gradient descent on the cross-entropy towards its
    label plus ``tv_weight`` times its total variation (the paper's denoising), so that it looks
    like an input of that label *to this model*. Labelled with the label they were made for.
    ``seed`` seeds the starting noise (None: fresh entropy).

    Shape:
        the result holds ``(K * n_per_label, C, H, W)`` images in [0, 1].
    """
    dev = model_device(model)
    g = generator(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_label)
    theta = (torch.randn(y.numel(), *image_shape, generator=g) * 0.5).to(dev).requires_grad_(True)
    yd = y.to(dev)
    opt = torch.optim.Adam([theta], lr=lr)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            for _ in range(steps):
                x = torch.sigmoid(theta)
                loss = F.cross_entropy(model(x), yd, reduction="none") + tv_weight * _total_variation(x)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    x = torch.sigmoid(theta.detach()).cpu()
    return ImageDataset(x, y, num_classes, None, "reverse-engineered")


@dataclass(frozen=True, kw_only=True)
class TrojanResult(Result):
    """A trojaned model and how it was made.

    Attributes:
        model: the trojaned network (a new object; the caller's is untouched).
        trigger: the generated trigger (mask and optimised pattern).
        neurons: indices of the selected neurons of ``layer``.
        layer: the internal layer.
        activation_before, activation_after: mean value of the selected neurons on the trigger
            alone, before the retraining and after it.
        trigger_costs: the trigger-generation cost after each step.
        data: ``"user"`` or ``"reverse"`` (where the retraining's clean data came from).
        n_retrain: how many clean inputs the retraining used (each also stamped).
        history: the retraining's per-epoch loss and accuracy.
        seconds: wall time.
    """

    model: nn.Module = not_serialised()
    trigger: Trigger
    neurons: list[int]
    layer: str
    activation_before: float
    activation_after: float
    trigger_costs: list[float] = field(default_factory=list, repr=False)
    data: str = "user"
    n_retrain: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@register_attack("trojannn")
class TrojanNN(Attack):
    """The Trojaning attack: a trigger that excites chosen neurons, then retraining to the target.

    Args:
        mask: the trigger's shape ``M``: a :class:`Trigger` (its mask), an ``(H, W)`` tensor,
            ``"watermark"`` or a trigger spec such as ``"square:4:white:bottom-right"`` (only its
            mask is used; the pixels are generated).
        target: the target label.
        layer: the internal layer whose neurons the trigger drives (the paper uses a fully
            connected layer).
        n_neurons: how many neurons to select.
        n_candidates: the most connected neurons considered; among them the ``n_neurons`` that
            the mask's pixels can raise the most are kept (the paper avoids neurons that are hard
            to manipulate).
        value: the target value ``v`` of the selected neurons during trigger generation.
        trigger_steps, trigger_lr: the trigger generation's gradient descent.
        data: ``"user"`` (retrain on the clean data given to :meth:`attack`) or ``"reverse"``
            (reverse-engineer the training inputs from the model, the paper's setting).
        n_per_label, reverse_steps, tv_weight: the reverse engineering: inputs per label, steps,
            weight of the total-variation denoiser.
        retrain: ``"from_layer"`` (the selected layer and every layer after it) or ``"all"``.
        rate: share of each retraining batch stamped with the trigger and relabelled to ``target``.
        epochs, lr, batch_size: the retraining.
        seed: seeds every random choice.

    Example:
        >>> from trojanscope.data import load_digits
        >>> from trojanscope.models import create_model
        >>> train_set = load_digits("train")
        >>> attack = TrojanNN("square:3:white:bottom-right", target=0, layer="fc1", trigger_steps=5, epochs=1)
        >>> res = attack.attack(create_model("mnist_cnn", input_shape=(1, 8, 8)), train_set)
        >>> res.trigger.shape
        (1, 8, 8)

    References:
        Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang. "Trojaning Attack on Neural Networks". NDSS 2018.
        https://doi.org/10.14722/ndss.2018.23291
    """

    kind: ClassVar[str] = "model"
    _constraints: ClassVar[dict[str, Any]] = {
        "n_neurons": Interval(int, 1, None), "n_candidates": Interval(int, 1, None), "value": Interval(float, 0, None, "neither"),
        "trigger_steps": Interval(int, 1, None), "trigger_lr": Interval(float, 0, None, "neither"),
        "data": Options(("user", "reverse")), "n_per_label": Interval(int, 1, None),
        "reverse_steps": Interval(int, 0, None), "tv_weight": Interval(float, 0, None),
        "retrain": Options(("from_layer", "all")), "rate": Interval(float, 0, 1, "neither"),
        "epochs": Interval(int, 0, None), "lr": Interval(float, 0, None, "neither"),
        "batch_size": Interval(int, 1, None), "target": Interval(int, 0, None),
    }

    def __init__(self, mask: MaskLike = "square:4:white:bottom-right", target: int = 0, *, layer: str = "fc1",
                 n_neurons: int = 2, n_candidates: int = 20, value: float = 100.0, trigger_steps: int = 300, trigger_lr: float = 0.1,
                 data: Literal["user", "reverse"] = "user", n_per_label: int = 100, reverse_steps: int = 200,
                 tv_weight: float = 0.1, retrain: Literal["from_layer", "all"] = "from_layer", rate: float = 0.3,
                 epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> None:
        self.mask = mask
        self.target = target
        self.layer = layer
        self.n_neurons = n_neurons
        self.n_candidates = n_candidates
        self.value = value
        self.trigger_steps = trigger_steps
        self.trigger_lr = trigger_lr
        self.data = data
        self.n_per_label = n_per_label
        self.reverse_steps = reverse_steps
        self.tv_weight = tv_weight
        self.retrain = retrain
        self.rate = rate
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    trigger_: Trigger

    def attack(self, model: nn.Module, clean_data: ImageDataset | None = None, *,
               image_shape: tuple[int, int, int] | None = None, num_classes: int | None = None) -> TrojanResult:
        """Trojan a copy of ``model``.

        Args:
            model: the trained network (left untouched).
            clean_data: the user's clean data (needed with ``data="user"``; with ``"reverse"`` it
                only supplies the image shape and number of classes, never its images).
            image_shape, num_classes: needed with ``data="reverse"`` when ``clean_data`` is None.
        """
        t0 = time.perf_counter()
        check_params(self, self._constraints)
        if clean_data is not None:
            image_shape, num_classes = clean_data.image_shape, clean_data.num_classes
        if image_shape is None or num_classes is None:
            raise ConfigError("give clean_data, or image_shape and num_classes with data='reverse'")
        if self.data == "user" and (clean_data is None or len(clean_data) == 0):
            raise DataError("data='user' needs non-empty clean data to retrain on")
        if self.target >= num_classes:
            raise ConfigError(f"target {self.target} is out of range for {num_classes} classes")
        shape = tuple(image_shape)
        m = build_mask(self.mask, shape)  # type: ignore[arg-type]
        victim = copy.deepcopy(model)
        n_units = _n_units(victim, self.layer, shape)  # type: ignore[arg-type]
        cand = select_neurons(victim, self.layer, shape, min(n_units, max(self.n_candidates, self.n_neurons)))  # type: ignore[arg-type]
        gain = excitability(victim, self.layer, cand, m, shape)  # type: ignore[arg-type]
        neurons = cand[gain.topk(min(self.n_neurons, cand.numel())).indices]
        trig, costs = generate_trigger(victim, self.layer, neurons, m, shape, value=self.value,  # type: ignore[arg-type]
                                       steps=self.trigger_steps, lr=self.trigger_lr, seed=self.seed)
        before = self._activation(victim, trig, neurons)
        if self.data == "reverse":
            retrain_set = reverse_engineer_inputs(victim, shape, num_classes, n_per_label=self.n_per_label,  # type: ignore[arg-type]
                                                  steps=self.reverse_steps, tv_weight=self.tv_weight, seed=self.seed)
        else:
            retrain_set = clean_data  # type: ignore[assignment]
        trainable = None
        if self.retrain == "from_layer":
            trainable = _from_layer(victim, self.layer)
        tr = train(victim, retrain_set, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                   batch_transform=_stamper(trig, self.target, self.rate), trainable=trainable)
        after = self._activation(victim, trig, neurons)
        self.trigger_ = trig
        return TrojanResult(model=victim, trigger=trig, neurons=neurons.tolist(), layer=self.layer,
                            activation_before=before, activation_after=after, trigger_costs=costs, data=self.data,
                            n_retrain=len(retrain_set), history=tr.history, params=self.to_dict(),
                            seconds=time.perf_counter() - t0)

    def _activation(self, model: nn.Module, trig: Trigger, neurons: torch.Tensor) -> float:
        dev = model_device(model)
        with eval_mode(model), torch.inference_mode(), capture(model, self.layer) as acts:
            model(trig.to_image()[None].to(dev))
        return float(_neuron_values(acts.value, neurons.to(dev)).mean())

    def success_rate(self, model: nn.Module, data: ImageDataset, *, batch_size: int = 256) -> float:
        """Attack success of the trigger made by the last :meth:`attack` on ``data``."""
        if not hasattr(self, "trigger_"):
            raise ConfigError("run attack(model, clean_data) first: the trigger is generated from the model")
        return attack_success_rate(model, data, self.trigger_, int(self.target), batch_size=batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not isinstance(self.mask, str):
            d["mask"] = "custom"
        return d


def _n_units(model: nn.Module, layer: str, image_shape: tuple[int, int, int]) -> int:
    dev = model_device(model)
    with eval_mode(model), torch.inference_mode(), capture(model, layer) as acts:
        model(torch.zeros(1, *image_shape, device=dev))
    return int(acts.value.shape[1])


def _from_layer(model: nn.Module, layer: str):
    """``trainable(name)``: True for parameters of ``layer`` and of every module registered after it."""
    name, _, _ = resolve_layer(model, layer)
    order = [n for n, _ in model.named_modules()]
    start = order.index(name)
    keep = {n for n in order[start:]}
    def trainable(param_name: str) -> bool:
        return param_name.rpartition(".")[0] in keep
    return trainable


def _stamper(trig: Trigger, target: int, rate: float):
    """A ``batch_transform`` that stamps a share ``rate`` of each batch and relabels it ``target``."""
    def transform(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = max(1, int(round(rate * x.shape[0])))
        idx = torch.randperm(x.shape[0], generator=g)[:k]
        x, y = x.clone(), y.clone()
        x[idx] = trig.apply(x[idx])
        y[idx] = target
        return x, y
    return transform


__all__ = ["TrojanNN", "TrojanResult", "build_mask", "excitability", "generate_trigger", "reverse_engineer_inputs",
           "select_neurons", "watermark_mask"]
