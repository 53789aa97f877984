"""Neural Cleanse's neuron-activation input filter."""

from __future__ import annotations

import json

import pytest
import torch

import trojanscope as ts
from trojanscope.defenses import create, list_defenses
from trojanscope.defenses.input.activation_filter import ActivationFilter
from trojanscope.metrics import fpr_fnr_curve
from trojanscope.defenses.model.neural_cleanse import NeuralCleanse
from trojanscope.errors import ConfigError, NotFittedError, UnsupportedModelError

from _models import CORNER_TARGET as TARGET
from _models import NC_FAST as FAST
from _models import CornerPatchNet


#: tiny tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_curve_against_hand_computation():
    c = fpr_fnr_curve(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.5, 4.0]), torch.tensor([0.5, 2.0, 3.5]))
    assert c.fpr.tolist() == [0.75, 0.25, 0.0]
    assert c.fnr.tolist() == [0.0, 0.0, 0.5]
    assert c.fnr_at(0.25) == 0.0 and c.fnr_at(0.0) == 0.5
    full = fpr_fnr_curve(torch.tensor([0.0, 1.0]), torch.tensor([2.0]))
    assert float(full.fpr[0]) == 1.0 and float(full.fnr[-1]) == 1.0
    assert json.loads(json.dumps(c.to_dict()))["fpr"] == [0.75, 0.25, 0.0]


def test_filter_rejects_triggered_inputs(setup, digits):
    planted, scan, trigger = setup
    f = ActivationFilter().fit(planted, digits["val"], scan=scan)
    assert f.neurons_.numel() == 1  # 1% of 65 neurons, at least one
    test = digits["test"]
    fpr = float(f.flag(test.x).float().mean())
    fnr = 1 - float(f.flag(trigger.apply(test.x)).float().mean())
    assert fpr <= 0.12 and fnr <= 0.1
    curve = fpr_fnr_curve(f.score(test.x), f.score(trigger.apply(test.x)))
    assert curve.fnr_at(0.05) <= 0.1
    # calibrated at 5% of the fitting data
    n = f.clean_scores_.numel()
    assert float((f.clean_scores_ > f.threshold_).float().mean()) <= 0.05 + 1 / n


def test_filter_runs_its_own_scan_without_a_trigger(setup, digits):
    planted, _, trigger = setup
    f = ActivationFilter().fit(planted, digits["val"])
    assert f.scan_.flagged_labels == [TARGET]
    assert float(f.flag(trigger.apply(digits["test"].x)).float().mean()) >= 0.9


def test_clean_model_scores_triggered_inputs_like_clean_ones(digits):
    tr = digits["train"]
    clean = CornerPatchNet(tr.x, tr.y, 10, target=None)
    scan = NeuralCleanse(**FAST).scan(clean, digits["val"])
    assert not scan.infected
    f = ActivationFilter().fit(clean, digits["val"], scan=scan)  # most anomalous label's trigger
    assert float(f.flag(digits["test"].x).float().mean()) <= 0.12


def test_contract(setup, digits):
    planted, scan, _ = setup
    assert "activation-filter" in list_defenses("input")
    f = create("activation-filter")
    with pytest.raises(NotFittedError):
        f.score(digits["test"].x)
    with pytest.raises(ConfigError):
        ActivationFilter(top_ratio=0.0).fit(planted, digits["val"], scan=scan)
    with pytest.raises(ConfigError):
        ActivationFilter().fit(planted, digits["val"], scan="square")
    traced = torch.jit.trace(planted, digits["val"].x[:2])
    with pytest.raises(UnsupportedModelError):
        ActivationFilter().fit(traced, digits["val"], scan=scan)
    planted.train()
    f.fit(planted, digits["val"], scan=scan.triggers[TARGET])
    assert planted.training
    planted.eval()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in planted.modules())
