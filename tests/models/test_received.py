"""Every verb on a model the user received (.pt2, TorchScript, ONNX): the trainable surface, the
write-back in the input's format, and inspect-data / repair / pipeline through the CLI on tiny models
defined here, outside the project (exit codes, output format, the output reloading, the caller's
file untouched)."""

from __future__ import annotations

import math

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import fx, nn

import trojanscope as ts
from trojanscope._utils.hooks import output_layer, resolve_layer
from trojanscope.cli import cli
from trojanscope.data import save_npz
from trojanscope.defenses import list_defenses
from trojanscope.models import load_model
from trojanscope.models.io import detect_format
from trojanscope.models.surface import (FrozenStatsBatchNorm2d, model_surface, reinitialised_copy,
                                        rebuild_graph)
from trojanscope.models.writeback import FILE_NAMES, write_back
from trojanscope.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

TRIGGER = "square:2:white:bottom-right"


class TinyCNN(nn.Module):
    """A plain CNN as a vendor would write it (not a trojanscope architecture)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))))


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block with BatchNorms, global pooling, a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn1(self.conv1(h)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _save(model: nn.Module, path: Path, fmt: str) -> Path:
    model = model.eval()
    x = torch.zeros(2, 1, 8, 8)
    if fmt == "pt2":
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    elif fmt == "ts":
        torch.jit.script(model).save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def _onnx_loader() -> bool:
    """Whether the project's safe loader reads ONNX (the hostile-files issue adds it)."""
    import typing

    from trojanscope.models import LoadedModel

    return "onnx" in typing.get_args(typing.get_type_hints(LoadedModel)["format"])


FORMATS = ["pt2", "ts"] + (["onnx"] if _onnx_loader() else [])
WRITE_FORMATS = FORMATS
SUFFIX = {"pt2": ".pt2", "ts": ".ts.pt", "onnx": ".onnx"}
FMT_NAME = {"pt2": "export", "ts": "torchscript", "onnx": "onnx"}


@pytest.fixture(scope="module")
def received(tmp_path_factory, digits):
    """A BadNets-poisoned digits training set, and both tiny networks trained on it, in every format."""
    d = tmp_path_factory.mktemp("received")
    trig = ts.Trigger.parse(TRIGGER, (1, 8, 8))
    poisoned = ts.BadNets(trig, 0, rate=0.1, seed=0).poison(digits["train"])
    save_npz(poisoned, d / "train.npz")
    save_npz(digits["val"], d / "val.npz")
    save_npz(digits["test"], d / "test.npz")
    files = {}
    for name, cls in (("cnn", TinyCNN), ("resnet", TinyResNet)):
        torch.manual_seed(0)
        net = cls()
        train(net, poisoned, epochs=3, lr=0.01, seed=0)
        net.eval()
        for fmt in ("pt2", "ts", "onnx"):
            files[name, fmt] = _save(net, d / f"{name}{SUFFIX[fmt]}", fmt)
        files[name, "module"] = net
    return d, files


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- the surface ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "resnet"])
@pytest.mark.parametrize("fmt", ["pt2", "ts"])
def test_surface_is_a_graph_of_standard_named_layers(received, name, fmt):
    _, files = received
    lm = load_model(files[name, fmt], default_input_shape=(1, 8, 8))
    s = model_surface(lm)
    assert s.rebuilt and s.received and isinstance(s.module, fx.GraphModule)
    kinds = {type(m) for m in s.module.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds
    expected = {"cnn": {"conv": "Conv2d", "head.1": "Linear", "head.3": "Linear"},
                "resnet": {"stem": "Conv2d", "bn": "BatchNorm2d", "conv1": "Conv2d", "bn1": "BatchNorm2d", "fc": "Linear"}}
    assert s.layers == expected[name]
    x = torch.rand(5, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(s.module(x), files[name, "module"](x), atol=1e-5)
    # the surface trains: gradients reach every layer
    s.module.train()
    s.module(x).sum().backward()
    assert all(p.grad is not None for p in s.module.parameters())


def test_batchnorm_statistics_stay_frozen_unless_asked(received):
    _, files = received
    lm = load_model(files["resnet", "pt2"])
    s = model_surface(lm)
    bn = s.module.get_submodule("bn")
    assert isinstance(bn, FrozenStatsBatchNorm2d) and isinstance(bn, nn.BatchNorm2d)
    before = bn.running_mean.clone()
    s.module.train()
    assert not bn.training and s.module.training
    s.module(torch.rand(16, 1, 8, 8) * 3)
    assert torch.equal(bn.running_mean, before)
    free = model_surface(lm, freeze_bn=False).module
    free.train()
    free(torch.rand(16, 1, 8, 8) * 3)
    assert not torch.equal(free.get_submodule("bn").running_mean, before)


def test_penultimate_is_found_from_the_graph_output(received):
    _, files = received
    s = model_surface(load_model(files["cnn", "pt2"]))
    name, module = output_layer(s.module)
    assert name == "head.3" and isinstance(module, nn.Linear)
    assert resolve_layer(s.module, "penultimate")[0::2] == ("head.3", "input")
    assert output_layer(files["cnn", "module"]) is None  # not a graph: the class rule applies


@pytest.mark.parametrize("fmt", FORMATS)
def test_global_pooling_becomes_a_layer_whose_map_the_sanitisers_read(received, fmt):
    from trojanscope._utils.batching import activations
    from trojanscope._utils.hooks import global_pool
    from trojanscope.defenses.data._common import resolve_feature_layer

    _, files = received
    s = model_surface(load_model(files["resnet", fmt], default_input_shape=(1, 8, 8)))
    name, pool = global_pool(s.module)
    assert isinstance(pool, nn.AdaptiveAvgPool2d)
    x = torch.rand(5, 1, 8, 8)
    assert resolve_feature_layer(s.module, x, "auto", device=None) == "pool_input"
    net = files["resnet", "module"]
    with torch.inference_mode():  # the map TinyResNet averages, computed by hand
        h = torch.relu(net.bn(net.stem(x)))
        h = torch.relu(h + net.bn1(net.conv1(h)))
        torch.testing.assert_close(s.module(x), net(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(activations(s.module, x, "pool_input", flatten=False), h, atol=1e-5, rtol=1e-5)
    # the CNN has no global pooling: the sanitisers keep its penultimate layer
    c = model_surface(load_model(files["cnn", fmt], default_input_shape=(1, 8, 8)))
    assert global_pool(c.module) is None and resolve_feature_layer(c.module, x, "auto", device=None) == "penultimate"


class ShrinkingResNet(TinyResNet):
    """TinyResNet with a last stage that turns its 8x8 map into a 1x1 one before the pooling (as
    resnet18 does on 8x8 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(8, 8, 8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn1(self.conv1(h)))
        h = torch.relu(self.down(h))
        return self.fc(torch.flatten(self.pool(h), 1))


class ShrinkingCNN(nn.Module):
    """A vendor's plain CNN that max-pools its 8x8 input down to a 1x1 map before a dense head
    (as ``gtsrb_cnn`` does on 8x8 digits), with the pools as functions, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # 4x4
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)  # 2x2
        h = nn.functional.max_pool2d(torch.relu(self.conv3(h)), 2)  # 1x1
        return self.fc2(torch.relu(self.fc1(torch.flatten(h, 1))))


def _resnet_block_output(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ShrinkingResNet's residual block output: the map its 1x1-making convolution reads."""
    h = torch.relu(net.bn(net.stem(x)))
    return torch.relu(h + net.bn1(net.conv1(h)))


def _cnn_second_stage(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ShrinkingCNN's second stage output, the 2x2 map its last stage reads."""
    h = nn.functional.max_pool2d(torch.relu(net.conv1(x)), 2)
    return nn.functional.max_pool2d(torch.relu(net.conv2(h)), 2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make, name, by_hand", [(lambda: ShrinkingResNet(), "down:input", _resnet_block_output),
                                                 (lambda: ShrinkingCNN(), "conv3:input", _cnn_second_stage)],
                         ids=["pooled-1x1", "dense-head-on-1x1"])
def test_a_1x1_map_moves_auto_to_the_last_stage_input_in_every_format(tmp_path, fmt, make, name, by_hand):
    """Where the map the penultimate layer is made from is 1x1 (a global pooling of a 1x1 map, or
    a dense head on a flattened 1x1 map), ``"auto"`` reads the input of the last stage: the same
    map in the module and in every received graph, where the residual sum or the pools before it
    are operators."""
    from trojanscope._utils.batching import activations
    from trojanscope.defenses.data._common import resolve_feature_layer

    torch.manual_seed(0)
    net = make().eval()
    x = torch.rand(5, 1, 8, 8)
    assert resolve_feature_layer(net, x, "auto", device=None) == name
    s = model_surface(load_model(_save(net, tmp_path / f"net{SUFFIX[fmt]}", fmt), default_input_shape=(1, 8, 8)))
    layer = resolve_feature_layer(s.module, x, "auto", device=None)
    assert layer.endswith(":input")
    with torch.inference_mode():
        h = by_hand(net, x)
    assert h.shape[2] * h.shape[3] > 1
    torch.testing.assert_close(activations(s.module, x, layer, flatten=False), h, atol=1e-5, rtol=1e-5)


def test_reinitialised_copy_resets_every_layer_and_keeps_the_graph(received):
    _, files = received
    s = model_surface(load_model(files["resnet", "ts"], default_input_shape=(1, 8, 8)))
    a, b = reinitialised_copy(s.module, seed=1), reinitialised_copy(s.module, seed=1)
    for (n, p), (_, q), (_, r) in zip(s.module.named_parameters(), a.named_parameters(), b.named_parameters()):
        assert not torch.equal(p, q), n
        assert torch.equal(q, r), n  # seeded
    assert torch.equal(a.get_submodule("bn").running_mean, torch.zeros(8))
    assert a.reinit_report["kept"] == []
    assert str(a.graph) == str(s.module.graph)


def test_reinitialised_copy_with_he_init_on_a_received_graph(received):
    _, files = received
    s = model_surface(load_model(files["cnn", "ts"], default_input_shape=(1, 8, 8)))
    he, again = reinitialised_copy(s.module, seed=1, init="he"), reinitialised_copy(s.module, seed=1, init="he")
    layers = [(n, m) for n, m in he.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) >= 2 and isinstance(layers[-1][1], torch.nn.Linear)
    for i, (n, m) in enumerate(layers):
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)
        # He-uniform bound sqrt(6 / fan_in) (gain sqrt(2) for ReLU); the output layer Glorot-uniform
        bound = math.sqrt(6.0 / (fan_in + fan_out)) if i == len(layers) - 1 else math.sqrt(6.0 / fan_in)
        assert float(m.weight.abs().max()) <= bound + 1e-6, n
        assert float(m.weight.abs().max()) > 0.8 * bound, n  # drawn from the whole range
        assert m.bias is None or float(m.bias.abs().max()) == 0.0, n
    assert all(torch.equal(p, q) for p, q in zip(he.parameters(), again.parameters()))  # seeded
    assert he.reinit_report["init"] == "he" and reinitialised_copy(s.module, seed=1).reinit_report["init"] == "default"
    assert str(he.graph) == str(s.module.graph)
    from trojanscope.errors import ConfigError

    with pytest.raises(ConfigError):
        reinitialised_copy(s.module, seed=1, init="lecun")


def test_rebuild_refuses_a_graph_it_cannot_reproduce(received):
    _, files = received
    lm = load_model(files["cnn", "pt2"])
    lm.model = TinyCNN().eval()  # a different network than the program in the file
    from trojanscope.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="does not compute"):
        model_surface(lm)


# --- write-back -----------------------------------------------------------------------------------

@pytest.mark.parametrize("out_fmt", ["export", "torchscript", "onnx"])
def test_write_back_reloads_and_computes_the_same(received, tmp_path, out_fmt):
    _, files = received
    s = model_surface(load_model(files["resnet", "pt2"]))
    s.format = out_fmt  # write the same surface in each format
    net = reinitialised_copy(s.module, seed=3)
    with torch.no_grad():
        net.get_submodule("conv1").weight[:2] = 0  # a pruned unit: zeroed weights, same graph
    path = write_back(s, net, tmp_path / out_fmt)
    assert path.name == FILE_NAMES[out_fmt]
    if out_fmt != "onnx":
        assert detect_format(path) == ("export" if out_fmt == "export" else "torchscript")
        back = load_model(path, default_input_shape=(1, 8, 8))
        x = torch.rand(9, 1, 8, 8)  # another batch size than written with
        with torch.inference_mode():
            assert torch.allclose(back.model(x), net.eval()(x), atol=1e-5)
    else:
        import onnx

        m = onnx.load(str(path))
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert json.loads((tmp_path / out_fmt / "model.json").read_text())["written_as"] == out_fmt


def test_rebuilt_graph_of_a_flat_program():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.flatten(1))))

    net = Net().eval()
    ep = torch.export.export(net, (torch.zeros(2, 1, 2, 2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    gm, layers = rebuild_graph(ep.module())
    assert layers == {"a": "Linear", "b": "Linear"}
    x = torch.rand(6, 1, 2, 2)
    assert torch.allclose(gm(x), net(x))


def test_rebuilt_graph_of_a_sequential_program_with_global_pooling():
    """Layers named ``0``, ``4`` (an ``nn.Sequential``) get stable names; the pooling becomes a layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    ep = torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    gm, layers = rebuild_graph(ep.module())
    assert layers == {"layer_0": "Conv2d", "layer_4": "Linear"}
    assert isinstance(gm.get_submodule("global_pool"), nn.AdaptiveAvgPool2d)
    x = torch.rand(6, 1, 8, 8)
    assert torch.allclose(gm(x), net(x))


# --- the CLI on every format ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", ["clustering", "spectral"])
def test_inspect_data_on_received_models(received, tmp_path, fmt, method):
    d, files = received
    f = files["resnet", fmt]
    before = _digest(f)
    js = tmp_path / "r.json"
    r = run("inspect-data", f, "--data", d / "train.npz", "--method", method, "--retrain-epochs", "1",
            "--json", js)
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["format"] == FMT_NAME[fmt]
    assert rep["fresh_model"] == f"re-initialised copy of the received {FMT_NAME[fmt]} graph"
    assert len(rep["flagged_indices"]) <= rep["n"]
    assert _digest(f) == before


def test_inspect_data_retrain_writes_back_in_the_format(received, tmp_path):
    d, files = received
    r = run("inspect-data", files["cnn", "ts"], "--data", d / "train.npz", "--method", "spectral", "--mode", "paper",
            "--retrain", "--epochs", "1", "--test", d / "test.npz", "--trigger", TRIGGER, "--target", "0",
            "--out", tmp_path / "o", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["retrain"]["fresh_model"] == "re-initialised copy of the received torchscript graph"
    written = Path(rep["summary"]["retrained_model"])
    assert written.name == "model.ts.pt"
    assert load_model(written, default_input_shape=(1, 8, 8)).format == "torchscript"


REPAIR_PARAMS = {"fine-prune": ["-p", "epochs=1"], "unlearn": [], "nc-prune": [], "prune": [],
                 "distribution-unlearn": ["-p", "target=0", "-p", "steps=20", "-p", "epochs=1"]}


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
@pytest.mark.parametrize("method", list_defenses("repair"))
def test_repair_writes_back_in_the_input_format(received, tmp_path, fmt, method):
    d, files = received
    f = files["resnet" if method in ("fine-prune", "prune") else "cnn", fmt]
    before = _digest(f)
    out = tmp_path / "rep"
    r = run("repair", f, "--method", method, "--data", d / "val.npz", "--out", out, "--json", tmp_path / "r.json",
            *REPAIR_PARAMS.get(method, []))
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    written = Path(rep["written"])
    assert written == out / FILE_NAMES[FMT_NAME[fmt]] and rep["format"] == FMT_NAME[fmt] and rep["reloaded"]
    e = run("evaluate", written, "--data", d / "test.npz", "--trigger", TRIGGER, "--target", "0",
            "--json", tmp_path / "e.json")
    assert e.exit_code == 0, e.output
    assert json.loads((tmp_path / "e.json").read_text())["format"] == FMT_NAME[fmt]
    assert _digest(f) == before


def test_pruned_units_are_zeroed_weights_in_the_written_program(received, tmp_path):
    d, files = received
    out = tmp_path / "rep"
    r = run("repair", files["resnet", "pt2"], "--method", "prune", "--data", d / "val.npz", "--out", out,
            "-p", "layer=conv1", "-p", "ratio=0.5", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    back = load_model(out / "model.pt2")
    s = model_surface(back)
    w = s.module.get_submodule("conv1").weight
    zero = (w.flatten(1).abs().sum(1) == 0)
    assert int(zero.sum()) == 4  # half of the 8 channels
    assert torch.all(s.module.get_submodule("bn1").weight[zero] == 0)
    orig = model_surface(load_model(files["resnet", "pt2"]))
    assert [n.target for n in orig.module.graph.nodes] == [n.target for n in s.module.graph.nodes]


def test_repair_train_bn_stats_flag(received, tmp_path):
    d, files = received
    r = run("repair", files["resnet", "pt2"], "--method", "fine-prune", "--data", d / "val.npz", "--out",
            tmp_path / "o", "-p", "epochs=1", "--train-bn-stats", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["surface"]["bn_stats_frozen"] is False


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
def test_pipeline_on_received_models(received, tmp_path, fmt):
    d, files = received
    f = files["cnn", fmt]
    before = _digest(f)
    r = run("pipeline", f, "--step", "fine-prune:epochs=1", "--fit", d / "val.npz", "--test", d / "test.npz",
            "--trigger", TRIGGER, "--target", "0", "--out", tmp_path / "o", "--json", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    written = tmp_path / "o" / FILE_NAMES[FMT_NAME[fmt]]
    assert load_model(written, default_input_shape=(1, 8, 8)).format == FMT_NAME[fmt]
    assert _digest(f) == before


def test_torchscript_takes_the_input_shape_from_the_data(received, tmp_path):
    d, files = received
    r = run("inspect-data", files["cnn", "ts"], "--data", d / "train.npz", "--method", "spectral", "--mode", "paper")
    assert r.exit_code == 0, r.output
    assert "--input-shape" not in r.output


def test_bench_takes_received_model_files_as_victims(received, tmp_path):
    from trojanscope.bench import parse_config, run_bench

    d, files = received
    trig = ts.Trigger.parse(TRIGGER, (1, 8, 8))
    poisoned = ts.BadNets(trig, 0, rate=0.1, seed=0).poison(ts.load_data("digits", "train"))
    (tmp_path / "poison.json").write_text(json.dumps({"poison_indices": poisoned.poison_indices.tolist()}))
    cfg = parse_config({"dataset": "digits", "epochs": 1, "defenses": ["prune", "spectral"],
                        "params": {"spectral": {"mode": "paper"}},
                        "victim": [{"name": "vendor-resnet", "model": str(files["resnet", "pt2"]), "trigger": TRIGGER,
                                    "target": 0, "train": str(d / "train.npz"), "poison": str(tmp_path / "poison.json")},
                                   {"name": "vendor-cnn-ts", "model": str(files["cnn", "ts"]), "trigger": TRIGGER,
                                    "target": 0}]})
    before = _digest(files["resnet", "pt2"])
    res = run_bench(cfg, tmp_path / "run", progress=False)
    assert not res.failed, res.failed
    rows = {(r["attack"], r["defense"]): r for r in res.rows}
    # the data sanitiser needs the victim's training set: not run on the victim without one
    assert set(rows) == {("vendor-resnet", "prune"), ("vendor-resnet", "spectral"), ("vendor-cnn-ts", "prune")}
    assert res.trained == []  # received models are never trained
    for r in rows.values():
        assert 0 <= r["ca_before"] <= 1 and r["asr_before"] is not None and r["ca_after"] is not None
    sp = rows["vendor-resnet", "spectral"]
    assert sp["poison_removed"] is not None and sp["asr_after"] is not None
    assert _digest(files["resnet", "pt2"]) == before
    from trojanscope.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        parse_config({"victim": [{"name": "x", "model": str(tmp_path / "missing.pt2")}]})
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"victim": [{"name": "x", "model": str(files["cnn", "ts"]), "trigger": TRIGGER}]})


def test_reinitialised_copy_learns_batchnorm_statistics(received):
    _, files = received
    s = model_surface(load_model(files["resnet", "pt2"]))
    fresh = reinitialised_copy(s.module)
    bn = fresh.get_submodule("bn")
    assert type(bn) is nn.BatchNorm2d
    fresh.train()
    fresh(torch.rand(16, 1, 8, 8) * 3)
    assert not torch.equal(bn.running_mean, torch.zeros(8))
