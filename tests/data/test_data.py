"""Data: bundled splits, bring-your-own formats, and a clear DataError for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import trojanscope as ts
from trojanscope.data import ImageDataset, from_tensors, load_data, load_image_folder, load_npz, save_npz
from trojanscope.errors import DataError


def _rows(d: ImageDataset) -> set[bytes]:
    return {r.numpy().tobytes() for r in d.x.flatten(1)}


def test_mnist5k_splits(mnist):
    sizes = {s: len(d) for s, d in mnist.items()}
    assert sizes == {"train": 4000, "val": 500, "test": 500}
    for s, per in (("train", 400), ("val", 50), ("test", 50)):
        d = mnist[s]
        assert d.image_shape == (1, 28, 28) and d.num_classes == 10 and d.x.dtype == torch.float32
        assert d.y.bincount(minlength=10).tolist() == [per] * 10  # stratified
        assert 0.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    tr, va, te = (_rows(mnist[s]) for s in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(load_data("mnist5k:all")) == 5000
    # the split is fixed: loading again gives the same images in the same order
    assert torch.equal(load_data("mnist5k:test").x, mnist["test"].x)


def test_digits_splits(digits):
    n = {s: len(d) for s, d in digits.items()}
    assert sum(n.values()) == 1797
    assert n["train"] == pytest.approx(0.7 * 1797, abs=10) and n["test"] == pytest.approx(0.15 * 1797, abs=10)
    for d in digits.values():
        assert d.image_shape == (1, 8, 8) and float(d.x.max()) <= 1.0
        counts = d.y.bincount(minlength=10).float()
        assert float(counts.min()) / float(counts.max()) > 0.9  # stratified
    all_rows = [_rows(d) for d in digits.values()]
    assert sum(map(len, all_rows)) == len(set().union(*all_rows))  # disjoint (digits has no duplicate images)
    assert load_data("digits", "val").name == "digits:val"


def test_npz_uint8_nhw(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "a.npz", x=x, y=y)
    d = load_data(tmp_path / "a.npz")
    assert d.image_shape == (1, 5, 4) and d.num_classes == 3 and len(d) == 6
    torch.testing.assert_close(d.x[:, 0], torch.from_numpy(x.astype(np.float32) / 255))
    assert d.y.dtype == torch.long and d.y.tolist() == y.tolist()


def test_npz_uint8_nhwc(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", x=x, y=np.arange(4))
    d = load_npz(tmp_path / "b.npz")
    assert d.image_shape == (3, 5, 6)
    torch.testing.assert_close(d.x[2, 1], torch.from_numpy(x[2, :, :, 1].astype(np.float32) / 255))


def test_npz_float_nchw_round_trip(tmp_path, digits):
    small = digits["test"].subset(torch.arange(20))
    small = ImageDataset(small.x, small.y, 10, None, "s", torch.arange(20) % 3)
    save_npz(small, tmp_path / "c.npz")
    d = load_npz(tmp_path / "c.npz", num_classes=10)
    assert torch.equal(d.x, small.x) and torch.equal(d.y, small.y) and torch.equal(d.groups, small.groups)
    assert d.num_classes == 10


def test_from_tensors_and_image_folder(tmp_path):
    d = from_tensors(np.zeros((3, 4, 4), np.uint8), np.array([0, 1, 1]))
    assert d.image_shape == (1, 4, 4) and d.num_classes == 2
    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 5), 40 * (k + 1) + i, np.uint8), "L").save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    f = load_data(tmp_path / "imgs")
    assert f.class_names == ["cat", "dog"] and f.y.tolist() == [0, 0, 1, 1] and f.image_shape == (1, 6, 5)
    assert float(f.x[2, 0, 0, 0]) == pytest.approx(80 / 255)
    rgb = load_image_folder(tmp_path / "imgs", size=(3, 3), grayscale=False)
    assert rgb.image_shape == (3, 3, 3)


def test_split_and_subset(digits):
    a, b = digits["train"].split(0.2, seed=1)
    assert len(a) + len(b) == len(digits["train"]) and not (_rows(a) & _rows(b))
    a2, _ = digits["train"].split(0.2, seed=1)
    assert torch.equal(a.x, a2.x)
    assert len(digits["train"].subset([0, 5, 7])) == 3


# --- bad inputs: one DataError each ------------------------------------------------------------

def _npz(tmp_path, name="bad.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN"),
    ("empty", "empty"),
    ("wrong_shape", "must be"),
    ("channels_last_float", "channels-first"),
    ("negative_label", "negative label"),
    ("label_out_of_range", "out of range"),
    ("length_mismatch", "samples"),
    ("missing_keys", "'x' and 'y'"),
    ("float_labels", "integers"),
    ("range", r"\[0, 1\]"),
    ("dtype", "uint8 or float"),
])
def test_bad_npz(tmp_path, case, match):
    x = np.random.default_rng(0).random((4, 1, 5, 5)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    kwargs = {}
    if case == "nan":
        x[1, 0, 2, 2] = np.nan
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "wrong_shape":
        x = x.reshape(4, 25)
    elif case == "channels_last_float":
        x = np.random.default_rng(0).random((4, 5, 5, 3)).astype(np.float32)
    elif case == "negative_label":
        y = np.array([0, -1, 0, 1])
    elif case == "label_out_of_range":
        y = np.array([0, 5, 0, 1])
        kwargs = {"num_classes": 3}
    elif case == "length_mismatch":
        y = y[:3]
    elif case == "float_labels":
        y = np.array([0.0, 0.5, 1.0, 1.0])
    elif case == "range":
        x = x * 255
    elif case == "dtype":
        x = (x * 100).astype(np.int32)
    arrays = {"x": x, "y": y} if case != "missing_keys" else {"images": x, "labels": y}
    with pytest.raises(DataError, match=match):
        load_npz(_npz(tmp_path, **arrays), **kwargs)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "none.npz")
    with pytest.raises(DataError, match="no such data"):
        load_data("mnist6k")
    with pytest.raises(DataError, match="unknown split"):
        load_data("digits:holdout")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_data(corrupt)
    text = tmp_path / "text.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(DataError):
        load_data(text)
    pickled = tmp_path / "pickled.npz"  # object arrays need pickle: refused
    np.savez(pickled, x=np.array([object()] * 2, dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError):
        load_data(pickled)


def test_bad_image_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_image_folder(tmp_path / "broken")


def test_dataset_checks():
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match="shape"):
        ImageDataset(torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="class names"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 2, ["only one"])
    with pytest.raises(DataError, match="empty"):
        ts.clean_accuracy(torch.nn.Flatten(), ImageDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long), 2))
