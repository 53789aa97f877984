"""The training loop: seeded, freezes what it is told to, restores the caller's mode."""

from __future__ import annotations

import pytest
import torch

import trojanscope as ts
from trojanscope.errors import ConfigError, DataError
from trojanscope.training import fine_tune, train, train_new


@pytest.fixture(scope="module")
def small(digits):
    return digits["train"].subset(torch.arange(300))


def _net(seed: int = 0):
    return ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=seed, hidden=32)


def test_deterministic_given_a_seed(small):
    a, b, c = _net(), _net(), _net()
    ra = train(a, small, epochs=1, seed=7)
    train(b, small, epochs=1, seed=7)
    train(c, small, epochs=1, seed=8)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.fc2.weight, c.fc2.weight)
    assert len(ra.history) == 1 and set(ra.history[0]) == {"epoch", "loss", "accuracy"}
    assert ra.to_dict()["params"]["seed"] == 7
    # the global RNG is left alone
    state = torch.get_rng_state()
    train(_net(), small, epochs=1, seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_train_new_is_seeded_and_learns(small, digits):
    m1 = train_new("mnist_cnn", small, seed=3, epochs=5, lr=1e-2, arch_kwargs={"hidden": 32})
    m2 = train_new("mnist_cnn", small, seed=3, epochs=5, lr=1e-2, arch_kwargs={"hidden": 32})
    assert torch.equal(m1.fc2.weight, m2.fc2.weight)
    assert not m1.training  # a new model comes back ready for evaluation
    untrained = ts.clean_accuracy(_net(3), digits["test"])
    assert ts.clean_accuracy(m1, digits["test"]) > max(0.6, untrained + 0.4)


def test_trainable_freezes_the_rest(small):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    req = {n: p.requires_grad for n, p in net.named_parameters()}
    train(net, small, epochs=1, trainable=lambda name: name.startswith("fc2"))
    after = net.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("fc2"), k
    assert {n: p.requires_grad for n, p in net.named_parameters()} == req


@pytest.mark.parametrize("was_training", [True, False])
def test_restores_the_callers_mode(small, was_training):
    net = _net()
    net.train(was_training)
    fine_tune(net, small, epochs=1, optimizer="sgd")
    assert net.training is was_training


def test_batch_transform_sees_every_batch(small):
    seen = []

    def stamp(x, y, g):
        seen.append(len(x))
        return x, torch.zeros_like(y)

    net = _net()
    train(net, small, epochs=1, batch_size=128, batch_transform=stamp)
    assert seen == [128, 128, 44]
    assert (ts.metrics.predict(net, small.x) == 0).float().mean() > 0.9


def test_bad_arguments(small):
    with pytest.raises(DataError, match="empty"):
        train(_net(), small.subset(torch.arange(0)), epochs=1)
    with pytest.raises(ConfigError, match="optimizer"):
        train(_net(), small, epochs=1, optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        train(_net(), small, epochs=1, lr=0)
    with pytest.raises(ConfigError, match="unknown architecture"):
        train_new("no_such_net", small)
