"""Colour sets (signs43, cmnist), torchvision layouts read from fake files, the new architectures,
the CPU training recipe and colour triggers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from trojanscope import Trigger
from trojanscope._utils.hooks import resolve_layer
from trojanscope.data import load_data
from trojanscope.data import synthetic
from trojanscope.data.torchvision_sets import read_official
from trojanscope.errors import ConfigError, DataError
from trojanscope.models import create_model
from trojanscope.training import RECIPES, _lr_factor, random_crop_flip, train, train_new


# --- signs43 / cmnist ------------------------------------------------------------------------
def test_signs43_is_deterministic_and_balanced():
    x1, y1 = synthetic.render_signs43(3, seed=5)
    x2, y2 = synthetic.render_signs43(3, seed=5)
    x3, _ = synthetic.render_signs43(3, seed=6)
    assert x1.dtype == np.uint8 and x1.shape == (129, 32, 32, 3)
    assert x1.tobytes() == x2.tobytes() and np.array_equal(y1, y2)
    assert x1.tobytes() != x3.tobytes()
    assert np.bincount(y1, minlength=43).tolist() == [3] * 43
    # every class looks different from every other on average (no two classes rendered alike)
    means = np.stack([x1[y1 == k].reshape(3, -1).mean(0) for k in range(43)])
    assert len({m.tobytes() for m in means}) == 43


def test_signs43_cache_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("TROJANSCOPE_CACHE", str(tmp_path))
    x, y = synthetic.signs43_arrays(6, seed=0)
    files = list(tmp_path.glob("signs43-*.npz"))
    assert len(files) == 1
    x2, y2 = synthetic.signs43_arrays(6, seed=0)  # read back from the cache
    assert x.tobytes() == x2.tobytes() and np.array_equal(y, y2)
    full = synthetic.load_signs43_full(6, seed=0)
    assert full.image_shape == (3, 32, 32) and full.num_classes == 43 and len(full.class_names) == 43
    assert 0.0 <= float(full.x.min()) and float(full.x.max()) <= 1.0
    from trojanscope.data.loaders import _split

    parts = [_split(full, s, [4, 1, 1]) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [172, 43, 43]
    for p in parts:
        assert torch.bincount(p.y, minlength=43).unique().numel() == 1


def test_cmnist_colours_and_labels():
    c = load_data("cmnist:val")
    m = load_data("mnist5k:val")
    assert c.image_shape == (3, 32, 32) and len(c) == len(m) and torch.equal(c.y, m.y)
    # the digit's strokes and the background take different colours, varying between images
    fg = c.x[:, :, 16, 16]
    corner = c.x[:, :, 0, 0]
    assert float((corner.std(0)).min()) > 0.1
    assert float((fg - corner).norm(dim=1).median()) > 0.3


# --- torchvision layouts (fake files) --------------------------------------------------------
def _cifar_batch(path, n, label_key, k, seed):
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     label_key: [int(v) for v in rng.integers(0, k, n)], "batch_label": "fake"}, f, protocol=2)


def test_fake_cifar10_layout_loads(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _cifar_batch(d / f"data_batch_{i}", 20, "labels", 10, i)
    _cifar_batch(d / "test_batch", 10, "labels", 10, 9)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    tr = load_data(f"cifar10@{tmp_path}")
    va = load_data(f"cifar10:val@{tmp_path}")
    te = load_data(f"cifar10:test@{tmp_path}")
    assert len(tr) + len(va) == 100 and len(te) == 10 and tr.image_shape == (3, 32, 32)
    assert tr.num_classes == 10 and tr.class_names == [f"c{i}" for i in range(10)]
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(te.x[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)).float() / 255)


def test_fake_cifar100_layout_loads(tmp_path, monkeypatch):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _cifar_batch(d / "train", 30, "fine_labels", 100, 1)
    _cifar_batch(d / "test", 5, "fine_labels", 100, 2)
    monkeypatch.setenv("TROJANSCOPE_DATA", str(tmp_path))
    te = load_data("cifar100:test")
    assert len(te) == 5 and te.num_classes == 100


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(DataError, match="not allowed"):
        read_official("cifar10", tmp_path, train=False)


def test_fake_svhn_layout_loads(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    y = np.array([[10], [1], [2], [10]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8), "y": y})
    te = load_data(f"svhn:test@{tmp_path}")
    assert te.y.tolist() == [0, 1, 2, 0] and te.image_shape == (3, 32, 32)


def test_fake_gtsrb_layout_loads(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    base = tmp_path / "gtsrb"
    for c in (0, 1, 2):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 35, 3), dtype=np.uint8)).save(folder / f"00000_{i:05d}.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate((2, 0, 42)):
        Image.fromarray(rng.integers(0, 256, (30, 31, 3), dtype=np.uint8)).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;31;30;1;1;29;28;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    tr = load_data(f"gtsrb:all@{tmp_path}")
    assert len(tr) == 9 and tr.num_classes == 43 and tr.image_shape == (3, 32, 32)
    te = load_data(f"gtsrb:test@{tmp_path}")
    assert te.y.tolist() == [2, 0, 42]


def test_missing_torchvision_files_give_one_clear_error(tmp_path):
    for name in ("cifar10", "cifar100", "svhn", "gtsrb"):
        with pytest.raises(DataError) as e:
            load_data(f"{name}@{tmp_path}")
        msg = str(e.value)
        assert "\n" not in msg and "not found" in msg and "trojanscope[vision]" in msg


# --- architectures ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kw", [("gtsrb_cnn", {"hidden": 16}), ("resnet18", {"width": 4}),
                                     ("preact_resnet18", {"width": 4}), ("vgg11_bn", {"width": 4}),
                                     ("bn_resnet", {"width": 4}), ("vgg_dropout", {"width": 4})])
@pytest.mark.parametrize("shape,k", [((3, 8, 8), 43), ((1, 6, 10), 5)])
def test_architectures_forward_backward_on_cpu(arch, kw, shape, k):
    m = create_model(arch, input_shape=shape, num_classes=k, seed=0, **kw)
    m2 = create_model(arch, input_shape=shape, num_classes=k, seed=0, **kw)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    x = torch.rand(2, *shape)
    out = m(x)
    assert out.shape == (2, k)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert isinstance(resolve_layer(m, "penultimate")[1], torch.nn.Linear)
    assert isinstance(resolve_layer(m, "last_conv")[1], torch.nn.Conv2d)


def test_gtsrb_cnn_starts_from_glorot_weights_and_zero_biases():
    """The paper's Keras initialisation: with PyTorch's default one the 8-layer plain ReLU stack
    sat at chance (loss ln 43) on signs43."""
    m = create_model("gtsrb_cnn", input_shape=(3, 32, 32), num_classes=43, seed=0)
    layers = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 8
    for mod in layers:
        w = mod.weight
        fan_in = w.shape[1] * w[0, 0].numel()
        fan_out = w.shape[0] * w[0, 0].numel()
        bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
        assert torch.count_nonzero(mod.bias) == 0
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        # the uniform law's standard deviation is bound / sqrt(3)
        assert float(w.std()) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    # the sanitisers' "fresh model of the same architecture" gets the same initialisation
    from trojanscope.models.surface import reinitialised_copy

    fresh = reinitialised_copy(m, seed=1)
    again = reinitialised_copy(m, seed=1)
    for a, b, c in zip(fresh.modules(), m.modules(), again.modules()):
        if isinstance(a, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(a.bias) == 0 and not torch.equal(a.weight, b.weight)
            assert torch.equal(a.weight, c.weight)
            bound = float(np.sqrt(6.0 / (a.weight[0].numel() + a.weight.shape[0] * a.weight[0, 0].numel())))
            assert float(a.weight.abs().max()) <= bound


def test_gtsrb_cnn_he_initialisation():
    """init="he": He-uniform (bound sqrt(6 / fan_in)) before each ReLU, Glorot for the output
    layer; reinitialised_copy keeps the choice."""
    from trojanscope.errors import ConfigError
    from trojanscope.models.surface import reinitialised_copy

    m = create_model("gtsrb_cnn", input_shape=(3, 32, 32), num_classes=43, seed=0, init="he")
    for net in (m, reinitialised_copy(m, seed=2)):
        layers = [mod for mod in net.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
        for mod in layers:
            w = mod.weight
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
            bound = np.sqrt(6.0 / (fan_in + fan_out)) if mod is layers[-1] else np.sqrt(6.0 / fan_in)
            assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / np.sqrt(3), rel=0.1)
            assert torch.count_nonzero(mod.bias) == 0
    with pytest.raises(ConfigError, match="init"):
        create_model("gtsrb_cnn", input_shape=(3, 32, 32), num_classes=43, init="lecun")


# --- training recipe -------------------------------------------------------------------------
def test_random_crop_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, g, padding=2)
    assert out.shape == x.shape
    # each crop is a shifted window of the zero-padded image: its non-zero values are the image's
    for i in range(2):
        vals = set(out[i][out[i] != 0].tolist())
        assert vals <= set(x[i].flatten().tolist())
    same = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, same)
    flipped = random_crop_flip(x, torch.Generator().manual_seed(1), crop=False, flip=True)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


def test_lr_schedules():
    assert _lr_factor("constant", 5, 10) == 1.0
    assert _lr_factor("cosine", 0, 11) == pytest.approx(1.0) and _lr_factor("cosine", 10, 11) == pytest.approx(0.0)
    assert _lr_factor("cosine", 5, 11) == pytest.approx(0.5)
    oc = [_lr_factor("onecycle", s, 101) for s in range(101)]
    assert oc[0] == pytest.approx(0.04) and max(oc) == pytest.approx(1.0, abs=0.02) and oc[-1] < 1e-3
    assert int(np.argmax(oc)) == 30
    with pytest.raises(ConfigError):
        _lr_factor("linear", 0, 2)


def test_sgd_recipe_trains_and_is_deterministic():
    from trojanscope.data import from_tensors

    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = torch.rand(64, 3, 16, 16, generator=g) * 0.2
    x[torch.arange(64), y % 3, :8, :8] += 0.8  # the label is in a coloured quadrant
    x[y == 3, :, 8:, 8:] = 1.0
    data = from_tensors(x.clamp(0, 1), y)
    a = train_new("resnet18", data, seed=0, epochs=8, recipe="sgd", lr=0.01, arch_kwargs={"width": 4}, batch_size=8,
                  threads=1)
    with torch.no_grad():
        acc = (a(x.clamp(0, 1)).argmax(1) == y).float().mean()
    b1, b2 = (train_new("resnet18", data, seed=3, epochs=1, recipe="sgd", arch_kwargs={"width": 4},
                        batch_size=32, threads=1) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(b1.state_dict().values(), b2.state_dict().values()))
    assert acc > 0.9
    m = create_model("gtsrb_cnn", input_shape=(3, 16, 16), num_classes=4, hidden=8)
    res = train(m, data, epochs=1, **{**RECIPES["sgd"], "lr": 0.01})
    assert res.images_per_second > 0 and res.seconds > 0 and res.params["schedule"] == "onecycle"
    with pytest.raises(ConfigError):
        train(m, data, epochs=1, augment="rotate")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        train_new("gtsrb_cnn", data, recipe="nope")


# --- colour triggers -------------------------------------------------------------------------
def test_colour_triggers_on_three_channels(tmp_path):
    shape = (3, 16, 16)
    sq = Trigger.parse("square:4:#ff00ff:bottom-right", shape)
    assert sq.mask.sum() == 16 and sq.pattern[:, 14, 14].tolist() == [1.0, 0.0, 1.0]
    x = torch.full((2, *shape), 0.5)
    out = sq.apply(x)
    assert out[:, :, 14, 14].tolist() == [[1.0, 0.0, 1.0]] * 2 and torch.equal(out[:, :, 0, 0], x[:, :, 0, 0])
    from PIL import Image

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 1] = 255  # green
    rgba[..., 3] = 128  # half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "s.png")
    st = Trigger.parse(f"rgba:{tmp_path / 's.png'}:top-left", shape)
    assert float(st.mask.max()) == pytest.approx(128 / 255, abs=1e-3)
    assert st.pattern[1, :4, :4].min() == 1.0 and st.pattern[0, :4, :4].max() == 0.0
    bl = Trigger.parse("blend:noise:0.1", shape)
    assert bl.pattern.shape == shape and float(bl.mask.mean()) == pytest.approx(0.1)
    assert not torch.equal(bl.pattern[0], bl.pattern[1])  # colour noise, not grey


# --- a collapsed reclassification model is detected, reported and not trusted ---------------
def test_reclassifier_collapse_rule():
    from trojanscope.defenses.data._common import reclassifier_collapsed

    assert reclassifier_collapsed(0.2, 0.1, 43)  # did not learn its own training data
    assert reclassifier_collapsed(0.9, 0.8, 43)  # one label takes most predictions
    assert not reclassifier_collapsed(0.95, 0.03, 43)
    assert not reclassifier_collapsed(0.85, 0.67, 4)  # few labels: a useful model may lean on one
    assert reclassifier_collapsed(0.63, 0.2, 10)  # half-fitted: it misses clean held-out samples too
    assert not reclassifier_collapsed(float("nan"), float("nan"), 43)


@pytest.fixture
def blind_arch():
    """A registered architecture whose output ignores its input (a collapsed classifier); it is
    removed from the registry afterwards, so no other test sees it."""
    from trojanscope.models import MODELS, register_model

    name = "_test_blind"

    class Blind(torch.nn.Module):
        """A classifier blind to its input."""

        def __init__(self, *, input_shape=(1, 1, 16), num_classes=4):
            super().__init__()
            self.fc = torch.nn.Linear(1, num_classes)

        def forward(self, x):
            return self.fc(torch.zeros(x.shape[0], 1, device=x.device))

    register_model(name)(Blind)
    try:
        yield name
    finally:
        del MODELS._items[name]


@pytest.mark.parametrize("cls", ["clustering", "spectral"])
def test_a_collapsed_reclassifier_flags_nothing_and_says_so(cls, blind_arch):
    import sanitizer_data as sd
    from trojanscope.defenses import ActivationClustering, SpectralSignatures

    data = sd.make(poison_share=0.1)
    model = sd.linear_model(data)
    make = ActivationClustering if cls == "clustering" else SpectralSignatures
    fit = {"retrain_epochs": 20, "retrain_lr": 0.05 if cls == "clustering" else 0.1}  # as their own tests
    good = make(**fit).inspect(model, data)
    assert good.details["reclassification_collapsed"] is False and good.flagged.any()
    # a reclassifier that cannot see its input learns the majority label and nothing else, and
    # training it for longer (to the fit target's cap) does not change that
    bad = make(arch=blind_arch, **fit).inspect(model, data)
    assert bad.details["reclassifier_epochs"] == [160, 160]
    assert bad.details["reclassification_collapsed"] is True
    assert not bad.flagged.any() and bad.attacked_labels == []
    assert min(bad.details["reclassifier_fit_accuracy"]) < 0.5 or max(bad.details["reclassifier_top_share"]) > 0.5
