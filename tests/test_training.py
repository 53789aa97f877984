"""The training loop: seeded, freezes what it is told to, restores the caller's mode."""

from __future__ import annotations

import pytest
import torch

import trojanscope as ts
from trojanscope.errors import ConfigError, DataError
from trojanscope.training import fine_tune, mean_loss, stable_fine_tune, train, train_new


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


def test_stop_ends_the_run_early(small):
    a, b = _net(), _net()
    ra = train(a, small, epochs=6, seed=2, stop=lambda row: row["epoch"] >= 2)
    assert [h["epoch"] for h in ra.history] == [1, 2]
    train(b, small, epochs=2, seed=2)  # the same two epochs (constant schedule)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_retrainer_trains_on_until_it_fits(small):
    from trojanscope.training import Retrainer

    model = _net()
    slow = Retrainer(epochs=1, lr=1e-4, fit_target=0.6, max_epochs=12)
    new, res = slow.train_with_history(model, small)
    accs = [h["accuracy"] for h in res.history]
    assert len(accs) > 1  # one epoch at this rate does not fit 60% of the data
    assert accs[-1] >= 0.6 or len(accs) == 12
    assert all(a < 0.6 for a in accs[:-1])  # it stopped at the first epoch that fits
    assert not new.training
    # where `epochs` already fit, the fit target changes nothing: same weights as without it
    plain = Retrainer(epochs=3, lr=1e-2).train(model, small)
    fitted, r3 = Retrainer(epochs=3, lr=1e-2, fit_target=0.5).train_with_history(model, small)
    assert len(r3.history) == 3 and r3.history[-1]["accuracy"] >= 0.5
    for (n, pa), pb in zip(plain.state_dict().items(), fitted.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert Retrainer(epochs=2, fit_target=0.9).epoch_cap == 16 and Retrainer(epochs=2).epoch_cap == 2
    with pytest.raises(ConfigError, match="fit target"):
        Retrainer(fit_target=1.5)
    with pytest.raises(ConfigError, match="max_epochs"):
        Retrainer(epochs=3, fit_target=0.9, max_epochs=2)


def test_train_from_scratch_runs_again_while_the_model_stays_at_chance():
    from trojanscope.training import TrainResult, train_from_scratch

    def run(accs):
        built, fitted = [], []

        def fresh(seed, init):
            built.append((seed, init))
            return torch.nn.Linear(1, 1)

        def fit(net, seed):
            fitted.append(seed)
            return TrainResult(history=[{"epoch": 1, "loss": 1.0, "accuracy": accs[len(fitted) - 1]}])

        net, res, rows = train_from_scratch(fresh, fit, seed=5, num_classes=10)
        return built, fitted, res, rows

    # 10 labels: at most 2 x chance (0.2) has learnt nothing; He initialisation, then the next seed
    built, fitted, res, rows = run([0.1, 0.2, 0.9])
    assert built == [(5, None), (5, "he"), (6, "he")] and fitted == [5, 5, 6]
    assert [(r["seed"], r["init"], r["train_accuracy"]) for r in rows] == [(5, "default", 0.1), (5, "he", 0.2),
                                                                          (6, "he", 0.9)]
    assert res.history[-1]["accuracy"] == 0.9
    built, _, _, rows = run([0.21])  # a run above twice chance is the only one
    assert built == [(5, None)] and len(rows) == 1
    built, _, res, rows = run([0.05, 0.15, 0.1])  # never leaves chance: three runs, the best one returned
    assert len(rows) == 3 and res.history[-1]["accuracy"] == 0.15


def test_retrainer_trains_again_a_copy_that_stays_at_chance(small, monkeypatch):
    import trojanscope.training as training
    from trojanscope.models.surface import reinitialised_copy

    real, calls, stuck = training.train, [], [True]

    def stuck_first(model, data, **kw):  # the next training ends at chance while `stuck` says so
        out = real(model, data, **kw)
        calls.append(kw.get("seed"))
        if stuck[0]:
            out.history[-1]["accuracy"] = 0.05
            stuck[0] = False
        return out

    monkeypatch.setattr(training, "train", stuck_first)
    model = _net()
    new, res = training.Retrainer(epochs=2, lr=1e-2, seed=3).train_with_history(model, small)  # no fit target
    assert calls == [3, 3]
    assert [(r["seed"], r["init"]) for r in res.params["chance_runs"]] == [(3, "default"), (3, "he")]
    he = reinitialised_copy(model, 3, init="he")  # the kept model is the He run's
    with training.torch_threads(1):
        real(he, small, epochs=2, lr=1e-2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(he.state_dict().values(), new.state_dict().values()))
    # a named architecture keeps its own initialisation: the next seed instead
    calls.clear()
    stuck[0] = True
    _, named = training.Retrainer(arch="mnist_cnn", epochs=1, seed=3).train_with_history(model, small)
    assert calls == [3, 4] and [r["init"] for r in named.params["chance_runs"]] == ["default", "default"]
    calls.clear()  # a training that learns is run once, with no record of retries
    _, ok = training.Retrainer(epochs=2, lr=1e-2, seed=3).train_with_history(model, small)
    assert calls == [3] and "chance_runs" not in ok.params


def test_retrainer_tries_he_initialisation_when_a_copy_does_not_fit(small):
    from trojanscope.models.surface import reinitialised_copy
    from trojanscope.training import Retrainer, torch_threads

    model = _net()
    # two epochs never fit every sample (and leave chance: 0.22 > 2 x 0.1, so no chance retry)
    r = Retrainer(epochs=2, lr=1e-3, fit_target=1.0, max_epochs=2)
    new, res = r.train_with_history(model, small)
    first = res.params["unfitted_run"]
    assert first["init"] == "default" and first["epochs"] == 2 and 0.2 < first["accuracy"] < 1.0
    assert "chance_runs" not in res.params
    # the kept run is the better of the two; the He one is the same as training a He copy directly
    he = reinitialised_copy(model, 0, init="he")
    with torch_threads(1):  # the Retrainer's thread count, so the same sums
        he_res = train(he, small, epochs=2, lr=1e-3, seed=0)
    assert res.params["init"] == "he"  # on this net He fits one epoch better than torch's default
    assert res.history[-1]["accuracy"] == he_res.history[-1]["accuracy"] > first["accuracy"]
    assert all(torch.equal(p, q) for p, q in zip(he.state_dict().values(), new.state_dict().values()))
    # a run that fits, or one of a named architecture, is not tried again
    _, ok = Retrainer(epochs=3, lr=1e-2, fit_target=0.5).train_with_history(model, small)
    assert "unfitted_run" not in ok.params
    _, named = Retrainer(arch="mnist_cnn", epochs=1, fit_target=1.0, max_epochs=1).train_with_history(model, small)
    assert "unfitted_run" not in named.params


def test_recalibrate_batchnorm_averages_the_batch_statistics():
    import numpy as np

    from trojanscope.training import recalibrate_batchnorm

    g = torch.Generator().manual_seed(0)
    x = torch.rand(23, 2, 3, 3, generator=g) * torch.tensor([0.2, 0.9])[None, :, None, None] + torch.tensor([0.7, 0.0])[None, :, None, None]
    data = ts.ImageDataset(x, torch.zeros(23, dtype=torch.long), 2, None, "bn")
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(18, 2))
    net.train()
    assert recalibrate_batchnorm(net, data, batch_size=10)
    bn = net[0]
    # batches of 10, then the last 3 (a last batch of one would join the one before)
    xs = x.numpy().transpose(1, 0, 2, 3).reshape(2, 23, 9)
    chunks = [xs[:, a:b].reshape(2, -1) for a, b in ((0, 10), (10, 20), (20, 23))]
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean([c.mean(1) for c in chunks], 0), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean([c.var(1, ddof=1) for c in chunks], 0), rtol=1e-4)
    assert bn.momentum == 0.1 and net.training  # settings and mode restored
    one_more = ts.ImageDataset(x[:21], torch.zeros(21, dtype=torch.long), 2, None, "bn")
    recalibrate_batchnorm(net, one_more, batch_size=10)  # 10 + 11: no batch of one image
    assert torch.isfinite(bn.running_var).all()
    assert not recalibrate_batchnorm(_net(), data.subset(torch.arange(3)))  # no BatchNorm: nothing to do
    # a layer whose statistics are frozen (a received model being fine-tuned) is left as it is
    from trojanscope.models.surface import freeze_bn_stats

    freeze_bn_stats(net)
    before = bn.running_mean.clone(), bn.running_var.clone()
    recalibrate_batchnorm(net, data, batch_size=10)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def _bn_net(seed: int = 0):
    return ts.create_model("resnet18", input_shape=(1, 8, 8), num_classes=10, seed=seed, width=4)


def test_trainings_at_once_are_the_trainings_one_after_the_other_on_any_thread_count(small, monkeypatch):
    """Two forked one-thread trainings give, bit for bit, the models of one-after-the-other
    trainings, whatever torch's thread count in the caller (BatchNorm statistics included)."""
    from trojanscope._utils import forked
    from trojanscope.training import Retrainer

    answered = []
    real = forked.run_forked

    def spy(jobs, workers, **kw):
        out = real(jobs, workers, **kw)
        answered.extend(b is not None for b in out)
        return out

    monkeypatch.setattr(forked, "run_forked", spy)
    model, parts = _bn_net(), [small.subset(torch.arange(150)), small.subset(torch.arange(150, 300))]
    at_once = Retrainer(epochs=1, workers=2).train_many(model, parts)
    assert answered == [True, True]  # both came back from the workers
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        in_turn = Retrainer(epochs=1, workers=1).train_many(model, parts)
    finally:
        torch.set_num_threads(n)
    for (a, ra), (b, rb) in zip(at_once, in_turn):
        assert not a.training and ra.history == rb.history
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
    assert not torch.equal(list(at_once[0][0].parameters())[-1], list(at_once[1][0].parameters())[-1])


def test_a_training_that_fails_in_a_worker_fails_as_in_process(small):
    from trojanscope.training import Retrainer

    with pytest.raises(ConfigError, match="no-such-arch"):
        Retrainer(arch="no-such-arch", epochs=1, workers=2).train_many(_net(), [small, small])
    with pytest.raises(ConfigError, match="workers"):
        Retrainer(workers=0)


def test_mean_loss_is_the_eval_mode_cross_entropy(small):
    net = _net()
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(net.eval()(small.x), small.y))
    assert mean_loss(net, small, batch_size=7) == pytest.approx(want, rel=1e-5)


def test_stable_fine_tune_is_fine_tune_when_it_does_not_diverge(small):
    a, b = _net(), _net()
    train(a, small, epochs=2, seed=0)
    b.load_state_dict(a.state_dict())
    fine_tune(a, small, lr=0.1, optimizer="sgd", seed=3)
    _, attempts = stable_fine_tune(b, small, lr=0.1, optimizer="sgd", seed=3)
    assert len(attempts) == 1 and attempts[0]["failed"] is None
    assert attempts[0]["loss_after"] < attempts[0]["loss_before"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_stable_fine_tune_backs_off_a_diverging_rate_and_keeps_the_weights_when_all_diverge(small):
    net = _net()
    train(net, small, epochs=2, seed=0)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    # SGD at lr 10 blows this model up (its loss rises from about 2.2 to about 7)
    _, attempts = stable_fine_tune(net, small, lr=10.0, tries=1, optimizer="sgd", seed=0)
    assert len(attempts) == 1 and attempts[0]["failed"].startswith("diverged (loss ")
    assert not attempts[0]["loss_after"] or attempts[0]["loss_after"] >= attempts[0]["loss_before"]
    assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items())
    # allowed a second try, it runs again from the same weights at a tenth of the rate
    twin = _net()
    twin.load_state_dict(start)
    fine_tune(twin, small, lr=1.0, optimizer="sgd", seed=0)
    _, attempts = stable_fine_tune(net, small, lr=10.0, tries=2, optimizer="sgd", seed=0)
    assert [(a["lr"], a["failed"] is None) for a in attempts] == [(10.0, False), (pytest.approx(1.0), True)]
    assert all(torch.equal(p, q) for p, q in zip(twin.state_dict().values(), net.state_dict().values()))
    # the caller's check fails a run that lowered its loss, too
    net.load_state_dict(start)
    attempts_seen: list[int] = []
    _, attempts = stable_fine_tune(net, small, lr=1.0, tries=2, optimizer="sgd", seed=0,
                                   check=lambda m: "too big a step" if attempts_seen.append(1) is None and
                                   len(attempts_seen) == 1 else None)
    assert [(a["lr"], a["failed"]) for a in attempts] == [(1.0, "too big a step"), (pytest.approx(0.1), None)]
    with pytest.raises(ConfigError):
        stable_fine_tune(net, small, lr=1.0, tries=0)
