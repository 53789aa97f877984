"""Behavioural conformance of every registered defence and attack (scikit-learn ``estimator_checks`` style).

Each check is parametrised over the registries, so a defence added later is checked as soon as it
is registered; the only per-class knowledge here is ``FAST``, settings that make a run take about
a second on a tiny model (a new defence without an entry fails ``test_every_class_has_fast_settings``).
The verb is chosen by the class's ``family`` and what it takes by ``uses_scan``, never by reading
parameter names.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import trojanscope as ts
from trojanscope.attacks import ATTACKS
from trojanscope.data import ImageDataset
from trojanscope.defenses import DEFENSES

from _models import CornerPatchNet

pytestmark = pytest.mark.usefixtures("one_thread")

#: Settings that make each registered defence fast on 8x8 images (the defaults are the papers').
FAST: dict[str, dict] = {
    "neural-cleanse": dict(epochs=40, n_samples=160, n_holdout=200),
    "spectral": dict(),
    "activation-clustering": dict(retrain_epochs=1),
    "provenance": dict(retrain_epochs=1),
    "strip": dict(n_overlays=8),
    "activation-filter": dict(),
    "nc-prune": dict(),
    "unlearn": dict(epochs=1),
    "prune": dict(),
    "fine-prune": dict(epochs=1),
    "distribution-unlearn": dict(steps=4, epochs=1, n_levels=2),
    "heatmap": dict(epochs=1, final_epochs=1, restarts=1, n_images=64),
    "trigger-distribution": dict(steps=4, n_levels=2, critic_steps=1),
}

REGISTERED = DEFENSES.items()
IDS = [n for n, _ in REGISTERED]
TARGET = 2


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    """scikit-learn's 8x8 digits (the 270 validation images) in four provenance segments."""
    d = ts.load_data("digits", "val")
    return ImageDataset(d.x, d.y, d.num_classes, name="digits", groups=torch.arange(len(d)) % 4)


@pytest.fixture(scope="module")
def model(data) -> nn.Module:
    """A hand-weighted net whose bottom-right corner drives label ``TARGET``."""
    tr = ts.load_data("digits", "train")
    return CornerPatchNet(tr.x, tr.y, 10, target=TARGET)


@pytest.fixture(scope="module")
def scan(model, data):
    """What a model-level detector hands to the defences that take a scan: a real (short) scan."""
    result = DEFENSES.get("neural-cleanse")(**FAST["neural-cleanse"]).scan(model, data)
    assert result.flagged_labels == [TARGET], "the planted backdoor must be found"
    return result




def make(name: str, **extra):
    cls = DEFENSES.get(name)
    params = {**FAST.get(name, {}), **extra}
    return cls(**{k: v for k, v in params.items()})


def run(defense, model: nn.Module, data: ImageDataset, found):
    """Call the family's verb the one way the family declares; returns a JSON-able record."""
    fam = type(defense).family
    scan = found if defense.uses_scan != "never" else None
    if fam == "model":
        return defense.scan(model, data).to_dict()
    if fam == "data":
        return defense.inspect(model, data).to_dict()
    if fam == "input":
        defense.fit(model, data, scan=scan)
        return {"threshold": float(defense.threshold_), "scores": defense.score(data.x[-16:]).tolist()}
    if fam == "repair":
        r = defense.repair(model, data, scan=scan)
        return {**r.to_dict(), "weights": [float(p.detach().double().sum()) for p in r.model.parameters()]}
    if fam == "explain":
        return defense.explain(model, data, TARGET).to_dict()
    raise AssertionError(f"unknown family {fam!r}")


def _strip_times(d, drop=("seconds", "elapsed")):
    if isinstance(d, dict):
        return {k: _strip_times(v, drop) for k, v in d.items() if k not in drop and not k.endswith("seconds")}
    if isinstance(d, list):
        return [_strip_times(v, drop) for v in d]
    return d


def _diff(a, b, tol, path=""):
    """The first place where ``a`` and ``b`` differ (None when they agree within ``tol``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a.keys() ^ b.keys())}"
        return next((d for k in a if (d := _diff(a[k], b[k], tol, f"{path}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _diff(x, y, tol, f"{path}[{i}]"))), None)
    if isinstance(a, float) and isinstance(b, (int, float)):
        return None if math.isclose(a, b, rel_tol=tol, abs_tol=tol) else f"{path}: {a} != {b}"
    return None if a == b else f"{path}: {a!r} != {b!r}"


def _close(a, b, tol=1e-4) -> bool:
    diff = _diff(a, b, tol)
    assert diff is None, diff
    return True


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_every_class_has_fast_settings():
    assert sorted(FAST) == sorted(IDS), "add the new defence's fast settings to FAST"
    for name, params in FAST.items():
        make(name)._validate_params()


@pytest.mark.parametrize("name", IDS)
def test_verb_leaves_the_model_alone(name, model, data, scan):
    net = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run(make(name), net, data, scan)
    assert net.training, "the caller's training flag must come back"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "weights changed"
    assert all(p.grad is None for p in net.parameters()), "gradients left on the caller's model"
    assert _hooks(net) == 0, "hooks left on the model"


class Exploding(nn.Module):
    """Forwards to ``inner`` and raises on the ``after``-th call."""

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner = inner
        self.after = after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.after:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("name", IDS)
def test_hooks_and_mode_restored_when_the_model_raises(name, model, data, scan):
    net = Exploding(copy.deepcopy(model), after=2).train()
    with pytest.raises(RuntimeError, match="boom"):
        run(make(name), net, data, scan)
    assert net.training
    assert _hooks(net) == 0


@pytest.mark.parametrize("name", IDS)
def test_same_seed_same_result(name, model, data, scan):
    a = run(make(name), model, data, scan)
    b = run(make(name), model, data, scan)
    assert _close(_strip_times(a), _strip_times(b), tol=1e-6)


#: Where ``batch_size`` is also a training hyperparameter (the mini-batch of SGD), not only a
#: memory knob, results may legitimately depend on it.
TRAINS_WITH_BATCH = {"unlearn", "fine-prune", "distribution-unlearn", "trigger-distribution"}


@pytest.mark.parametrize("name", [n for n in IDS if n not in TRAINS_WITH_BATCH])
def test_batch_size_does_not_change_the_result(name, model, data, scan):
    if "batch_size" not in DEFENSES.get(name).param_defaults():
        pytest.fail(f"{name} has no batch_size memory knob")
    a = run(make(name, batch_size=7), model, data, scan)
    b = run(make(name, batch_size=256), model, data, scan)
    drop = ("seconds", "elapsed", "params", "batch_size")  # the knob itself is recorded
    assert _close(_strip_times(a, drop), _strip_times(b, drop), tol=1e-3)


@pytest.mark.parametrize("name", IDS)
def test_result_is_json_and_round_trips(name, model, data, scan):
    d = run(make(name), model, data, scan)
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d


@pytest.mark.parametrize("name", IDS)
def test_bad_data_is_a_data_error(name, model, scan):
    from trojanscope.errors import DataError

    with pytest.raises(DataError):  # bare tensors are not a labelled dataset
        run(make(name), model, torch.zeros(4, 1, 8, 8), scan)


# --- attacks -------------------------------------------------------------------------------

#: Per attack, how to build a fast one for 8x8 digits (attacks have required arguments: a trigger).
FAST_ATTACKS = {
    "badnets": lambda shape: ATTACKS.get("badnets")(ts.Trigger.square(shape, 2, "white", "bottom-right"),
                                                    target=TARGET, rate=0.1),
    "pruning-aware": lambda shape: ATTACKS.get("pruning-aware")(ts.Trigger.square(shape, 2, "white", "bottom-right"),
                                                                target=TARGET, epochs=1),
    "trojannn": lambda shape: ATTACKS.get("trojannn")("square:2:white:bottom-right", TARGET, trigger_steps=5,
                                                      n_candidates=4, epochs=1),
}
ATTACK_IDS = [n for n, _ in ATTACKS.items()]


@pytest.fixture(scope="module")
def cnn(data) -> nn.Module:
    """mnist_cnn trained for two epochs on digits (conv layers for the model-level attacks)."""
    from trojanscope.training import train_new

    return train_new("mnist_cnn", ts.load_data("digits", "train"), seed=0, epochs=2)


def run_attack(name: str, model: nn.Module, data: ImageDataset):
    atk = FAST_ATTACKS[name](data.image_shape)
    if type(atk).kind == "data":
        p = atk.poison(data)
        return atk, p, {"x": float(p.x.double().sum()), "y": p.y.tolist(),
                        "poisoned": p.poison_indices.tolist()}
    r = atk.attack(model, data)
    return atk, r, {**r.to_dict(), "weights": [float(t.detach().double().sum()) for t in r.model.parameters()]}


def test_every_attack_has_fast_settings():
    assert sorted(FAST_ATTACKS) == sorted(ATTACK_IDS), "add the new attack to FAST_ATTACKS"
    assert {cls.kind for _, cls in ATTACKS.items()} <= {"data", "model"}


@pytest.mark.parametrize("name", ATTACK_IDS)
def test_attack_leaves_its_inputs_alone_and_repeats(name, cnn, data):
    net = copy.deepcopy(cnn).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x0, y0 = data.x.clone(), data.y.clone()
    atk, out, a = run_attack(name, net, data)
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0), "the caller's data changed"
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert _hooks(net) == 0
    _, _, b = run_attack(name, net, data)
    assert _close(_strip_times(a), _strip_times(b), tol=1e-6)
    victim = net if atk.kind == "data" else out.model
    assert atk.success_rate(victim, data) == atk.success_rate(victim, data), "scoring must not be random"


@pytest.mark.parametrize("name", ATTACK_IDS)
def test_attack_describes_itself_as_json(name, data):
    atk = FAST_ATTACKS[name](data.image_shape)
    d = atk.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["attack"] == name
    assert repr(atk).startswith(type(atk).__name__ + "(")


@pytest.mark.parametrize("name", [n for n, c in REGISTERED if c.family == "repair"])
def test_a_monitor_only_watches(name, model, data, scan):
    """A repair records the caller's figures but never decides on them: a monitor that reports
    figures under the repair's own names (here: the attack already gone, accuracy ruined) must
    leave the repaired weights exactly as without it."""
    d = make(name)
    found = scan if d.uses_scan != "never" else None
    plain = d.repair(model, data, scan=found).model
    lying = d.repair(model, data, scan=found, monitor=lambda m: {"attack_success": 0.0, "accuracy": 0.0}).model
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), lying.state_dict().values()))
