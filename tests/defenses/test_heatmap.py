"""Moving-window heat map: pure kernels by hand, and a planted fixed-place trigger lights it up."""

from __future__ import annotations

import pytest
import torch

import trojanscope as ts
from trojanscope.defenses.model.heatmap import (MovingWindowSearch, accumulate_heatmap, default_window, hot_region,
                                                locate_trigger, window_positions, window_regions)
from trojanscope.report._explain_plots import save_heatmap_png

from _models import FIXED_PATCH_ORIGIN as ORIGIN
from _models import FixedPatchNet, PrototypeNet


@pytest.fixture(scope="module")
def fixed_net(digits):
    d = digits["val"]
    return FixedPatchNet(d.x, d.y, 10, target=0, patch=3)


def test_windows_by_hand():
    assert default_window((28, 28)) == 8 and default_window((55, 47)) == 13
    pos = window_positions((5, 6), 3, 2)
    assert pos.tolist() == [[0, 0], [0, 2], [0, 3], [2, 0], [2, 2], [2, 3]]
    reg = window_regions((5, 6), pos, 3)
    assert reg.shape == (6, 5, 6) and torch.all(reg.sum((1, 2)) == 9)
    assert reg[1, 0:3, 2:5].sum() == 9
    with pytest.raises(ts.ConfigError):
        window_positions((5, 5), 6, 1)


def test_accumulate_by_hand():
    masks = torch.zeros(2, 3, 3)
    masks[0, 0, 0] = 2.0          # |a|_1 = 2 -> the whole strength on one pixel
    masks[1, 1:, 1:] = 1.0        # |a|_1 = 4 -> a quarter on each of 4 pixels
    heat = accumulate_heatmap(masks, torch.tensor([1.0, 2.0]))
    expect = torch.zeros(3, 3)
    expect[0, 0] = 1.0
    expect[1:, 1:] = 0.5
    assert torch.allclose(heat, expect, atol=1e-5)
    region, bbox = hot_region(heat, 0.9, 0)
    assert bbox == (0, 0, 1, 1) and float(region.sum()) == 1
    assert hot_region(heat, 0.4, 1)[1] == (0, 0, 3, 3)


def test_planted_fixed_trigger_lights_up_heatmap(fixed_net, digits, tmp_path):
    d = digits["val"]
    # the backdoor works at ORIGIN only
    at = ts.Trigger.square(d.image_shape, 3, "white", ORIGIN)
    away = ts.Trigger.square(d.image_shape, 3, "white", (5, 0))
    assert ts.attack_success_rate(fixed_net, d, at, 0) == 1.0
    assert ts.attack_success_rate(fixed_net, d, away, 0) < 0.3
    assert ts.clean_accuracy(fixed_net, d) > 0.8
    res = MovingWindowSearch(window=4, stride=1, epochs=12, final_epochs=12, n_images=100).explain(fixed_net, d, 0)
    r, c = res.peak
    assert ORIGIN[0] <= r < ORIGIN[0] + 3 and ORIGIN[1] <= c < ORIGIN[1] + 3
    r0, c0, r1, c1 = res.bbox
    assert r0 <= ORIGIN[0] and c0 <= ORIGIN[1] and r1 >= ORIGIN[0] + 3 and c1 >= ORIGIN[1] + 3
    assert ts.attack_success_rate(fixed_net, d, res.trigger, 0) >= 0.9
    assert res.trigger_asr >= 0.99  # the final search keeps only a trigger at Neural Cleanse's threshold
    assert res.to_dict()["target"] == 0
    png = save_heatmap_png(res, tmp_path / "heat.png", background=d.x[0])
    assert png.stat().st_size > 1000
    lr, lc = locate_trigger(fixed_net, d, 0, 3, epochs=12)
    assert abs(lr - ORIGIN[0]) <= 2 and abs(lc - ORIGIN[1]) <= 2  # the located 3x3 box overlaps the patch


def test_clean_twin_has_no_strong_window(digits):
    d = digits["val"]
    clean = FixedPatchNet(d.x, d.y, 10, target=None, patch=3)
    bad = FixedPatchNet(d.x, d.y, 10, target=0, patch=3)
    search = MovingWindowSearch(window=4, stride=1, epochs=12, n_images=100)
    s_clean = search.window_map(clean, d, 0)["strength"].max()
    s_bad = search.window_map(bad, d, 0)["strength"].max()
    assert s_bad > 0.02 and s_bad > 2 * s_clean


def test_bad_arguments(fixed_net, digits):
    with pytest.raises(ts.ConfigError):
        MovingWindowSearch().explain(fixed_net, digits["val"], 12)
    with pytest.raises(ts.ConfigError):
        MovingWindowSearch(hot=0.0).explain(fixed_net, digits["val"], 0)
