"""Triggers: the formula x' = (1 - m) x + m p against hand computations, builders, files, specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trojanscope.errors import ConfigError, DataError
from trojanscope.triggers import Trigger, TriggerBatch, parse_color, place, read_image, save_png


def test_formula_against_a_hand_computation():
    # one channel, 2x2: m = [[0, 1], [0.5, 0.25]], p = [[0.2, 0.4], [1.0, 0.0]], x = [[0.8, 0.6], [0.2, 1.0]]
    m = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    p = torch.tensor([[[0.2, 0.4], [1.0, 0.0]]])
    x = torch.tensor([[[[0.8, 0.6], [0.2, 1.0]]]])
    out = Trigger(m, p).apply(x)
    # (1-0)*0.8 + 0 = 0.8; 0*0.6 + 1*0.4 = 0.4; 0.5*0.2 + 0.5*1.0 = 0.6; 0.75*1.0 + 0.25*0 = 0.75
    torch.testing.assert_close(out, torch.tensor([[[[0.8, 0.4], [0.6, 0.75]]]]))
    # unbatched input, and the batch is stamped image by image with the same (m, p)
    torch.testing.assert_close(Trigger(m, p).apply(x[0]), out[0])
    xb = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(Trigger(m, p)(xb), (1 - m) * xb + m * p)


def test_three_channel_mask_broadcasts_over_channels():
    m = torch.zeros(3, 3)
    m[1, 1] = 1.0
    p = torch.stack([torch.full((3, 3), v) for v in (0.1, 0.2, 0.3)])
    out = Trigger(m, p).apply(torch.ones(2, 3, 3, 3))
    assert out[:, :, 1, 1].tolist() == [[pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]] * 2
    assert float(out.sum()) == pytest.approx(2 * (3 * 8 + 0.6))


@pytest.mark.parametrize("position, rows, cols", [
    ("bottom-right", slice(3, 5), slice(3, 5)),
    ("top-left", slice(1, 3), slice(1, 3)),
    ("top-right", slice(1, 3), slice(3, 5)),
    ("bottom-left", slice(3, 5), slice(1, 3)),
    ("center", slice(2, 4), slice(2, 4)),
    ((0, 4), slice(0, 2), slice(4, 6)),
    ("4,0", slice(4, 6), slice(0, 2)),
])
def test_square_positions(position, rows, cols):
    t = Trigger.square((1, 6, 6), 2, "white", position)  # corners keep a 1-pixel margin
    expected = torch.zeros(6, 6)
    expected[rows, cols] = 1
    assert torch.equal(t.mask, expected)
    assert torch.equal(t.pattern[0], expected)
    assert float(t.l1_norm) == 4.0
    stamped = t.apply(torch.zeros(1, 1, 6, 6))[0, 0]
    assert torch.equal(stamped, expected)


def test_square_colour_on_grey_and_rgb():
    t1 = Trigger.square((1, 5, 5), 1, "red", "top-left", margin=0)
    assert float(t1.pattern[0, 0, 0]) == pytest.approx(0.299)  # luma of pure red
    t3 = Trigger.square((3, 5, 5), 1, "#ff8000", "top-left", margin=0)
    torch.testing.assert_close(t3.pattern[:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    assert parse_color(0.5, 1).tolist() == [0.5]


def test_checkerboard_cells():
    t = Trigger.checkerboard((1, 6, 6), 3, "top-left", margin=0)
    patch = t.pattern[0, :3, :3]
    assert patch.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert torch.equal(t.mask[:3, :3], torch.ones(3, 3)) and float(t.mask.sum()) == 9
    stamped = t.apply(torch.full((1, 1, 6, 6), 0.5))[0, 0]
    assert stamped[0, 1] == 0 and stamped[1, 1] == 1 and stamped[5, 5] == 0.5


def test_pixel():
    t = Trigger.pixel((1, 4, 4), "white", "bottom-right")
    assert float(t.mask.sum()) == 1 and t.mask[2, 2] == 1  # margin 1 from the corner
    assert t.name.startswith("pixel")


def test_blend_and_noise():
    img = torch.linspace(0, 1, 16).reshape(1, 4, 4)
    t = Trigger.blend(img, (1, 4, 4), alpha=0.2)
    assert torch.equal(t.mask, torch.full((4, 4), 0.2))
    x = torch.full((1, 1, 4, 4), 0.5)
    torch.testing.assert_close(t.apply(x)[0], 0.8 * 0.5 + 0.2 * img)
    # RGB blended onto grey inputs becomes its luma; a smaller image is resized
    rgb = torch.zeros(3, 2, 2)
    rgb[1] = 1.0
    tg = Trigger.blend(rgb, (1, 4, 4), alpha=1.0)
    torch.testing.assert_close(tg.pattern, torch.full((1, 4, 4), 0.587))
    n1, n2, n3 = (Trigger.noise((3, 5, 5), 0.1, seed=s) for s in (1, 1, 2))
    assert torch.equal(n1.pattern, n2.pattern) and not torch.equal(n1.pattern, n3.pattern)
    assert float(n1.mask.min()) == float(n1.mask.max()) == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        Trigger.blend(img, (1, 4, 4), alpha=0.0)


def test_rgba_from_png(tmp_path):
    # a 2x2 sticker: red opaque, green half transparent, blue invisible, white opaque
    arr = np.array([[[255, 0, 0, 255], [0, 255, 0, 128]], [[0, 0, 255, 0], [255, 255, 255, 255]]], dtype=np.uint8)
    png = tmp_path / "sticker.png"
    Image.fromarray(arr, "RGBA").save(png)
    t = Trigger.from_rgba(png, (3, 5, 5), (1, 2))
    expected_mask = torch.zeros(5, 5)
    expected_mask[1:3, 2:4] = torch.tensor([[1.0, 128 / 255], [0.0, 1.0]])
    torch.testing.assert_close(t.mask, expected_mask)
    torch.testing.assert_close(t.pattern[:, 1, 2], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(t.pattern[:, 2, 3], torch.ones(3))
    x = torch.zeros(1, 3, 5, 5)
    torch.testing.assert_close(t.apply(x)[0, 1, 1, 3], torch.tensor(128 / 255))  # green at half strength
    assert t.name == "rgba:sticker.png"
    # grey inputs, resized sticker
    tg = Trigger.from_rgba(png, (1, 8, 8), "center", size=4)
    assert tg.shape == (1, 8, 8) and float(tg.mask[:2].sum()) == 0 and float(tg.mask.sum()) > 0
    with pytest.raises(DataError, match="not found"):
        Trigger.from_rgba(tmp_path / "missing.png", (3, 5, 5))


def test_save_load_round_trip(tmp_path):
    t = Trigger.checkerboard((3, 7, 7), 2, (2, 3))
    t.save(tmp_path / "t.safetensors")
    u = Trigger.load(tmp_path / "t.safetensors")
    assert torch.equal(u.mask, t.mask) and torch.equal(u.pattern, t.pattern) and u.name == t.name
    v = Trigger.parse(str(tmp_path / "t.safetensors"), (3, 7, 7))
    assert torch.equal(v.pattern, t.pattern)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError):
        Trigger.load(tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match="not found"):
        Trigger.load(tmp_path / "none.safetensors")


def test_save_png_is_readable(tmp_path):
    t = Trigger.square((1, 6, 6), 2, "white", "top-left", margin=0)
    t.save_png(tmp_path / "t.png", scale=3)
    with Image.open(tmp_path / "t.png") as im:
        assert im.mode == "RGBA" and im.size == (18, 18)
        a = np.asarray(im)
    assert a[0, 0].tolist() == [255, 255, 255, 255] and a[17, 17, 3] == 0
    back = read_image(tmp_path / "t.png")
    assert back.shape == (4, 18, 18)
    save_png(torch.rand(3, 4, 4), tmp_path / "rgb.png")
    assert read_image(tmp_path / "rgb.png").shape == (3, 4, 4)


def test_parse_specs(tmp_path):
    t = Trigger.parse("square:4:white:bottom-right", (1, 28, 28))
    assert torch.equal(t.mask, Trigger.square((1, 28, 28), 4).mask) and t.name == "square:4:white:bottom-right"
    assert float(Trigger.parse("square:3:red:top-left", (3, 8, 8)).mask[1:4, 1:4].sum()) == 9
    assert float(Trigger.parse("checkerboard:2:center", (1, 8, 8)).mask.sum()) == 4
    assert float(Trigger.parse("pixel", (1, 8, 8)).mask.sum()) == 1
    noise = Trigger.parse("blend:noise:0.3:5", (1, 8, 8))
    assert torch.equal(noise.pattern, Trigger.noise((1, 8, 8), 0.3, seed=5).pattern)
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8), "RGBA").save(tmp_path / "w.png")
    assert float(Trigger.parse(f"rgba:{tmp_path / 'w.png'}:0,0", (1, 8, 8)).mask.sum()) == 16
    assert float(Trigger.parse(f"rgba:{tmp_path / 'w.png'}:0,0:2", (1, 8, 8)).mask.sum()) == 4
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "k.png")
    assert float(Trigger.parse(f"blend:{tmp_path / 'k.png'}:0.5", (1, 8, 8)).mask.mean()) == 0.5


@pytest.mark.parametrize("spec", ["circle:3", "square:x", "square:40", "square:3:nocolour", "square:0",
                                  "square:3:white:middle", "square:3:white:9,9", "blend", "blend:noise:abc",
                                  "rgba", "checkerboard:2:1,2,3", "pixel:white:-1,0"])
def test_bad_specs_raise_config_error(spec):
    with pytest.raises(ConfigError):
        Trigger.parse(spec, (1, 8, 8))


def test_bad_triggers_and_inputs():
    with pytest.raises(DataError, match="same H, W"):
        Trigger(torch.zeros(3, 3), torch.zeros(1, 4, 4))
    with pytest.raises(DataError, match="NaN"):
        Trigger(torch.full((2, 2), float("nan")), torch.zeros(1, 2, 2))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Trigger(torch.full((2, 2), 2.0), torch.zeros(1, 2, 2))
    with pytest.raises(DataError, match="cannot be applied"):
        Trigger.square((1, 6, 6), 2).apply(torch.zeros(1, 1, 5, 5))
    with pytest.raises(ConfigError, match="does not fit"):
        place((0, 5), (2, 2), (6, 6))


def test_rgba_size_keeps_the_aspect_ratio_or_takes_hxw(tmp_path):
    Image.fromarray(np.full((16, 40, 4), 255, np.uint8), "RGBA").save(tmp_path / "wide.png")  # 16 rows x 40 cols
    t = Trigger.parse(f"rgba:{tmp_path / 'wide.png'}:0,0:20", (3, 32, 32))
    rows, cols = t.mask.sum(1).nonzero().numel(), t.mask.sum(0).nonzero().numel()
    assert (rows, cols) == (8, 20)  # not squashed into 20x20
    t = Trigger.parse(f"rgba:{tmp_path / 'wide.png'}:0,0:6x15", (3, 32, 32))
    assert (t.mask.sum(1).nonzero().numel(), t.mask.sum(0).nonzero().numel()) == (6, 15)
    with pytest.raises(ConfigError, match="HxW"):
        Trigger.parse(f"rgba:{tmp_path / 'wide.png'}:0,0:6by15", (3, 32, 32))


def test_repr_is_short():
    t = Trigger.square((3, 64, 64), 4)
    r = repr(t)
    assert r == "Trigger('square:4:white:bottom-right', shape=(3, 64, 64), l1_norm=16)" and "tensor" not in r


# --- TriggerBatch and the success kernels -------------------------------------------------------

def _batch() -> TriggerBatch:
    g = torch.Generator().manual_seed(0)
    return TriggerBatch(torch.rand(3, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g), torch.tensor([0, 2, 1]))


def test_batch_apply_is_each_trigger_apply():
    b = _batch()
    x = torch.rand(5, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = b.apply(x)
    assert out.shape == (3, 5, 2, 4, 4)
    for j, t in enumerate(b):
        assert torch.equal(out[j], t.apply(x)) and t.name == f"trigger:label{int(b.labels[j])}"
    assert torch.equal(b.apply_flat(x), out.reshape(15, 2, 4, 4))
    assert torch.equal(b.apply_each(x[:3]), torch.stack([b[j].apply(x[j]) for j in range(3)]))
    back = TriggerBatch.from_triggers(list(b), b.labels)
    assert torch.equal(back.masks, b.masks) and torch.equal(back.patterns, b.patterns) and back.names == b.names
    with pytest.raises(DataError):
        b.apply(torch.zeros(1, 3, 4, 4))


def test_batch_save_load_round_trip_and_bad_files(tmp_path):
    b = _batch()
    b.save(tmp_path / "b.safetensors")
    back = TriggerBatch.load(tmp_path / "b.safetensors")
    assert torch.equal(back.masks, b.masks) and torch.equal(back.labels, b.labels) and back.names == b.names
    from safetensors.torch import save_file

    bad = {"masks": torch.rand(3, 4, 4), "patterns": torch.rand(3, 2, 4, 5), "labels": torch.zeros(3, dtype=torch.long)}
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata={"format": "trojanscope.trigger-batch"})
    nan = {**bad, "patterns": torch.full((3, 2, 4, 4), float("nan"))}
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata={"format": "trojanscope.trigger-batch"})
    f64 = {**bad, "masks": torch.rand(3, 4, 4, dtype=torch.float64), "patterns": torch.rand(3, 2, 4, 4)}
    save_file(f64, str(tmp_path / "f64.safetensors"), metadata={"format": "trojanscope.trigger-batch"})
    Trigger.square((2, 4, 4), 2).save(tmp_path / "one.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    good = {"masks": b.masks.contiguous(), "patterns": b.patterns.contiguous(), "labels": b.labels.contiguous()}
    for name, names in (("deep", "[" * 100000), ("notjson", "{"), ("numbers", "[1, 2, 3]")):
        save_file(good, str(tmp_path / f"{name}.safetensors"), metadata={"format": "trojanscope.trigger-batch", "names": names})
    for name in ("shape", "nan", "f64", "one", "junk", "deep", "notjson", "numbers"):
        with pytest.raises(DataError):
            TriggerBatch.load(tmp_path / f"{name}.safetensors")


def test_success_rate_counts_other_labels_only():
    from trojanscope.triggers import stamped_predictions, success_rate

    class Bright(torch.nn.Module):  # label 1 when the bottom-right pixel is bright, else 0
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x[:, 0, -1, -1]
            return torch.stack([0.5 - v, v - 0.5], 1)

    x = torch.zeros(6, 1, 4, 4)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    b = TriggerBatch.from_triggers([Trigger.pixel((1, 4, 4), margin=0), Trigger.pixel((1, 4, 4), "black", margin=0)],
                                   [1, 1])
    assert stamped_predictions(Bright(), x, b, batch_size=4).tolist() == [[1] * 6, [0] * 6]
    # label-1 images do not count: 4 images of other labels
    assert success_rate(Bright(), x, y, b, batch_size=4).tolist() == [1.0, 0.0]
    assert success_rate(Bright(), x, y, b[0], 1, where=y == 2).tolist() == [1.0]
    assert torch.isnan(success_rate(Bright(), x, torch.ones(6, dtype=torch.long), b[0], 1)).all()
