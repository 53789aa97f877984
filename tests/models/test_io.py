"""Model files: round trips of every accepted format, and refusal of every file that would run code."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import trojanscope as ts
from trojanscope._utils.hooks import capture
from trojanscope.errors import ModelLoadError, UnsafeModelError, UnsupportedModelError
from trojanscope.models import ModelSpec, detect_format, load_model, save_model
from trojanscope.models.io import pickle_globals


class OutsideNet(nn.Module):
    """A model trojanscope has never seen (defined here, not in the registry)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * 4 * 4, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.head(self.features(x).flatten(1))))


def _outside(seed: int = 0) -> OutsideNet:
    torch.manual_seed(seed)
    return OutsideNet().eval()


def _export(model: nn.Module, path: Path, batch: int = 2, dynamic: bool = True) -> Path:
    x = torch.rand(batch, 1, 8, 8)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))
    return path


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    return _export(_outside(), tmp_path_factory.mktemp("pt2") / "outside.pt2")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the zip ``src`` to ``dst`` with ``edit(files)`` applied to {member: bytes}."""
    with zipfile.ZipFile(src) as z:
        files = {i.filename: z.read(i) for i in z.infolist()}
    edit(files)
    with zipfile.ZipFile(dst, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return dst


def _member(files: dict[str, bytes], suffix: str) -> str:
    (name,) = [n for n in files if n.endswith(suffix)]
    return name


class Boom:
    """Unpickling this creates ``path`` (what a malicious model file does)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _text_pickle(path: Path) -> bytes:
    """A protocol-0 pickle (no \\x80 header) that creates ``path`` with os.system."""
    return f"cposix\nsystem\n(S'touch {path}'\ntR.".encode()


x8 = torch.rand(5, 1, 8, 8)


# --- formats that load -----------------------------------------------------------------------

def test_a_received_directory_with_a_bad_spec_is_refused(tmp_path):
    """A trojanscope directory is a format users receive too: its model.json, broken, deeply
    nested, a list or over the 16 MiB cap, is one ModelLoadError (exit 2), never a traceback."""
    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=3, hidden=32).eval()
    d = save_model(model, tmp_path / "m", ModelSpec("mnist_cnn", (1, 8, 8), 10, arch_kwargs={"hidden": 32}))
    for text in ("{broken", "[" * 100000, "[1]", " " * (17 << 20)):
        (d / "model.json").write_text(text)
        with pytest.raises(ModelLoadError):
            load_model(d)


def test_trojanscope_dir_round_trip(tmp_path, digits):
    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=3, hidden=32).eval()
    spec = ModelSpec("mnist_cnn", (1, 8, 8), 10, arch_kwargs={"hidden": 32}, class_names=list("abcdefghij"),
                     extra={"note": "x"})
    d = save_model(model, tmp_path / "m", spec)
    assert (d / "model.safetensors").is_file() and json.loads((d / "model.json").read_text())["arch"] == "mnist_cnn"
    lm = load_model(d)
    assert lm.format == "trojanscope" and lm.spec == spec and lm.supports_hooks
    torch.testing.assert_close(lm.model(x8), model(x8))
    # the .safetensors file alone carries its spec in its metadata
    lm2 = load_model(d / "model.safetensors")
    torch.testing.assert_close(lm2.model(x8), model(x8))


def test_pt2_of_outside_model_round_trip_with_hooks(pt2):
    lm = load_model(pt2)
    ref = _outside()
    assert lm.format == "export" and lm.spec.arch is None
    assert lm.spec.input_shape == (1, 8, 8) and lm.spec.num_classes == 10
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x8), ref(x8))
    # layer names and forward hooks survive: "penultimate" is the input of the last Linear
    with torch.inference_mode(), capture(lm.model, "penultimate") as acts:
        lm.model(x8)
    with torch.inference_mode():
        expected = torch.relu(ref.head(ref.features(x8).flatten(1)))
    torch.testing.assert_close(acts.value, expected)
    with torch.inference_mode(), capture(lm.model, "last_conv") as conv:
        lm.model(x8)
    assert tuple(conv.value.shape) == (5, 4, 8, 8)
    assert "head" in dict(lm.model.named_modules())


def test_format_is_detected_by_content_not_name(tmp_path, pt2):
    named_pt = tmp_path / "model.pt"
    named_pt.write_bytes(pt2.read_bytes())
    assert detect_format(named_pt) == "export"
    assert load_model(named_pt).format == "export"
    ts_file = tmp_path / "weights.pt2"  # TorchScript under a misleading name
    torch.jit.save(torch.jit.script(_outside()), str(ts_file))
    assert detect_format(ts_file) == "torchscript"


def test_pt2_with_static_batch_is_refused_with_the_fix(tmp_path):
    p = _export(_outside(), tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(ModelLoadError, match="fixed batch size of 2.*dynamic"):
        load_model(p)


def test_torchscript_round_trip_and_hooks_refused(tmp_path):
    ref = _outside()
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(ref), str(p))
    with pytest.raises(ModelLoadError, match="input shape"):
        load_model(p)
    lm = load_model(p, input_shape=(1, 8, 8))
    assert lm.format == "torchscript" and not lm.supports_hooks and lm.spec.num_classes == 10
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x8), ref(x8))
    with torch.inference_mode():
        want = float((ref(x8).argmax(1) == 0).float().mean())
    assert ts.clean_accuracy(lm.model, ts.data.from_tensors(x8, torch.zeros(5, dtype=torch.long), num_classes=10)) == want
    with pytest.raises(UnsupportedModelError, match="TorchScript.*hooks|hooks.*TorchScript"):
        with capture(lm.model, "penultimate"):
            pass


def test_torchscript_that_touches_files_is_refused(tmp_path):
    class Writer(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.from_file("/tmp/trojanscope-never", shared=True, size=4)
            return x.flatten(1)[:, :2] + t.sum()

    p = tmp_path / "writer.pt"
    torch.jit.save(torch.jit.script(Writer()), str(p))
    with pytest.raises(UnsafeModelError, match="from_file"):
        load_model(p, input_shape=(1, 8, 8))


def test_state_dict_needs_arch_and_loads_weights_only(tmp_path):
    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=1).eval()
    p = tmp_path / "sd.bin"
    torch.save(model.state_dict(), p)
    assert detect_format(p) == "torch_zip"
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(p)
    lm = load_model(p, arch="mnist_cnn", input_shape=(1, 8, 8), num_classes=10)
    assert lm.format == "state_dict"
    torch.testing.assert_close(lm.model(x8), model(x8))
    with pytest.raises(ModelLoadError, match="shape|match"):
        load_model(p, arch="mnist_cnn", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        load_model(p, arch="no_such_net", input_shape=(1, 8, 8), num_classes=10)


def test_nan_weights_are_refused(tmp_path):
    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=1)
    with torch.no_grad():
        model.fc2.bias[3] = float("nan")
    d = save_model(model, tmp_path / "nan", ModelSpec("mnist_cnn", (1, 8, 8), 10))
    with pytest.raises(ModelLoadError, match="NaN"):
        load_model(d)


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nothing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 definitely not a model")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_model(junk)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError):
        load_model(bad_st)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(tmp_path / "emptydir")


# --- files that would run code ---------------------------------------------------------------

def test_full_module_pickle_is_refused(tmp_path):
    p = tmp_path / "full.pt"
    torch.save(_outside(), p)  # torch.save of a whole module object: a pickle of arbitrary classes
    with pytest.raises(UnsafeModelError, match="could run arbitrary code"):
        load_model(p)
    with pytest.raises(UnsafeModelError):
        load_model(p, arch="mnist_cnn", input_shape=(1, 8, 8), num_classes=10)


def test_raw_pickle_is_refused_and_runs_nothing(tmp_path):
    flag = tmp_path / "pwned_raw"
    p = tmp_path / "model.pt"
    p.write_bytes(pickle.dumps(Boom(flag)))
    with pytest.raises(UnsafeModelError, match="plain pickle.*arbitrary code"):
        load_model(p)
    assert not flag.exists()
    p0 = tmp_path / "model0.pt"  # a text-protocol pickle: no \x80 header
    p0.write_bytes(_text_pickle(flag))
    with pytest.raises(ModelLoadError):
        load_model(p0)
    assert not flag.exists()
    # the same pickle inside a torch.save zip (data.pkl)
    z = tmp_path / "zipped.pt"
    torch.save({"w": torch.zeros(1), "boom": Boom(flag)}, z)
    with pytest.raises(UnsafeModelError, match="open|arbitrary code"):
        load_model(z, arch="mnist_cnn", input_shape=(1, 8, 8), num_classes=10)
    assert not flag.exists()


@pytest.mark.parametrize("where", ["sample_inputs", "weight", "sample_inputs_text", "constant_opaque",
                                   "constant_tensor_pickle"])
def test_pt2_with_malicious_pickle_is_refused(tmp_path, pt2, where):
    flag = tmp_path / f"pwned_{where}"

    def edit(files: dict[str, bytes]) -> None:
        if where == "sample_inputs":
            files[_member(files, "data/sample_inputs/model.pt")] = pickle.dumps(Boom(flag), protocol=2)
        elif where == "sample_inputs_text":
            files[_member(files, "data/sample_inputs/model.pt")] = _text_pickle(flag)
        elif where == "weight":  # a weight marked as pickled, whose bytes are a malicious pickle
            cfg_name = _member(files, "model_weights_config.json")
            cfg = json.loads(files[cfg_name])
            fqn = next(iter(cfg["config"]))
            cfg["config"][fqn]["use_pickle"] = True
            files[cfg_name] = json.dumps(cfg).encode()
            files[_member(files, "data/weights/" + cfg["config"][fqn]["path_name"])] = _text_pickle(flag)
        else:  # constants: an opaque Python object (pickle.loads in torch) or a pickled "tensor"
            cfg_name = _member(files, "model_constants_config.json")
            root = cfg_name.split("/")[0]
            name = "opaque_obj_0" if where == "constant_opaque" else "tensor_0"
            files[cfg_name] = json.dumps({"config": {"c": {"path_name": name, "is_param": False, "use_pickle": True,
                                                           "tensor_meta": None}}}).encode()
            files[f"{root}/data/constants/{name}"] = _text_pickle(flag)

    bad = _rewrite(pt2, tmp_path / f"{where}.pt2", edit)
    with pytest.raises(UnsafeModelError, match="refusing") as info:
        load_model(bad)
    assert not flag.exists()
    assert "pickle" in str(info.value) or "unpickling" in str(info.value)


def test_pt2_with_native_code_or_foreign_calls_is_refused(tmp_path, pt2):
    aoti = _rewrite(pt2, tmp_path / "aoti.pt2",
                    lambda f: f.__setitem__(next(iter(f)).split("/")[0] + "/data/aotinductor/model/m.so", b"\x7fELF"))
    with pytest.raises(UnsafeModelError, match="compiled code"):
        load_model(aoti)

    flag = tmp_path / "pwned_graph"

    def call_system(files: dict[str, bytes]) -> None:
        name = _member(files, "models/model.json")
        prog = json.loads(files[name])
        node = prog["graph_module"]["graph"]["nodes"][1]
        node["target"] = "torch.serialization.os.system"  # resolves to os.system through torch's modules
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {flag}"}, "kind": 1}]
        prog["verifiers"] = []  # the file chooses its own verifier: do not rely on it
        files[name] = json.dumps(prog).encode()

    bad = _rewrite(pt2, tmp_path / "system.pt2", call_system)
    with pytest.raises(UnsafeModelError, match="torch.serialization.os.system"):
        load_model(bad)
    assert not flag.exists()

    def code_in_a_name(files: dict[str, bytes]) -> None:  # value names become generated source code
        name = _member(files, "models/model.json")
        inj = json.dumps(f"relu\n    __import__('os').system('touch {flag}')\n    relu")
        files[name] = files[name].decode().replace('"relu"', inj).encode()

    bad = _rewrite(pt2, tmp_path / "name.pt2", code_in_a_name)
    with pytest.raises(UnsafeModelError, match="not an identifier"):
        load_model(bad)
    assert not flag.exists()


def test_pickle_scanner_sees_through_stack_global_decoys():
    # memoised "posix"/"system", then decoy strings "torch"/"Tensor" popped, then STACK_GLOBAL on the memo
    decoy = (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x8c\x05torch\x8c\x06Tensor00h\x00h\x01\x93"
             b"\x8c\x04true\x85R.")
    assert ("torch", "Tensor") not in pickle_globals(decoy)
    assert ("?", "STACK_GLOBAL") in pickle_globals(decoy)
    plain = pickle.dumps(Boom(Path("x")), protocol=4)
    assert ("builtins", "open") in pickle_globals(plain) or ("io", "open") in pickle_globals(plain)
    assert pickle_globals(pickle.dumps({"a": [1, 2.0]}, protocol=4)) == []


def test_corrupt_pt2_is_a_clean_error(tmp_path, pt2):
    trunc = tmp_path / "trunc.pt2"
    trunc.write_bytes(pt2.read_bytes()[: len(pt2.read_bytes()) // 2])
    with pytest.raises(ModelLoadError):
        load_model(trunc)
    nojson = _rewrite(pt2, tmp_path / "nojson.pt2",
                      lambda f: f.__setitem__(_member(f, "models/model.json"), b"{broken"))
    with pytest.raises(ModelLoadError):
        load_model(nojson)


# --- structural gates (issue 12) ---------------------------------------------------------------

def test_symbolic_size_parser_reemits_only_its_own_grammar():
    from trojanscope.models.io._symexpr import SymExprError, canonical

    assert canonical("Symbol('s77', positive=True, integer=True)") == "Symbol('s77', integer=True, positive=True)"
    assert canonical("2*s0 + s1 // 3 - 1") == ("Add(Add(Mul(Integer(2), Symbol('s0')), FloorDiv(Symbol('s1'), "
                                                "Integer(3))), Mul(Integer(-1), Integer(1)))")
    assert canonical("Max(s0, Integer(-4)) <= 7") == "LessThan(Max(Symbol('s0'), Integer(-4)), Integer(7))"
    import sympy

    assert sympy.sympify(canonical("Mul(Integer(2), Symbol('s3', integer=True))")) == 2 * sympy.Symbol("s3",
                                                                                                    integer=True)
    for bad in ("__import__('os')", "s0.__class__", "Symbol('s0', evaluate=exec('x'))", "Integer(9)**9",
                "Symbol('x; import os')", "lambda: 0", "Min(s0)", "(" * 100 + "s0" + ")" * 100, "s0\rprint(1)",
                "1" * 30, "ｓ0"):
        with pytest.raises(SymExprError):
            canonical(bad)


def test_torchscript_graph_gate_refuses_what_the_source_gate_might_miss(tmp_path):
    """Gate 2 alone: a scripted module whose graph prints (prim::Print) is refused before any forward."""
    from trojanscope.models.io._torchscript import check_graphs

    class Printer(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print("side effect")
            return x.flatten(1)

    with pytest.raises(UnsafeModelError, match="prim::Print"):
        check_graphs(torch.jit.script(Printer()), tmp_path / "printer.pt")
    check_graphs(torch.jit.script(_outside()), tmp_path / "outside.pt")  # a plain model passes


def test_bare_safetensors_weights_load_with_arch(tmp_path):
    from safetensors.torch import save_file

    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=4).eval()
    p = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p))
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(p)
    lm = load_model(p, arch="mnist_cnn", input_shape=(1, 8, 8), num_classes=10)
    assert lm.spec.arch == "mnist_cnn"
    torch.testing.assert_close(lm.model(x8), model(x8))


onnx = pytest.importorskip("onnx", reason="the onnx extra (make test installs it)")


def _onnx_export(model: nn.Module, shape: tuple[int, ...], path: Path, **kw) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, *shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, **kw)
    return path


@pytest.mark.parametrize("folding", [True, False])
def test_onnx_of_batchnorm_resnet_matches_with_hooks_and_gradients(tmp_path, folding):
    """With constant folding the exporter fuses BatchNorm into the convolutions; without it, the
    BatchNormalization nodes are rebuilt as nn.BatchNorm2d."""
    ref = ts.create_model("resnet18", input_shape=(3, 16, 16), num_classes=10, seed=1, width=4).eval()
    with torch.no_grad():  # non-trivial running statistics
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    p = _onnx_export(ref, (3, 16, 16), tmp_path / "resnet.onnx", do_constant_folding=folding)
    lm = load_model(p)
    assert lm.format == "onnx" and lm.supports_hooks and lm.spec.input_shape == (3, 16, 16)
    assert any(isinstance(m, nn.BatchNorm2d) for m in lm.model.modules()) == (not folding)
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    torch.testing.assert_close(lm.model(x), ref(x), atol=1e-5, rtol=1e-4)
    lm.model(x).sum().backward()  # gradient-based defences need input gradients
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad(), capture(lm.model, "penultimate") as acts:
        lm.model(x)
    assert tuple(acts.value.shape) == (6, 32)


def test_onnx_export_gives_the_same_evaluate_and_scan_results(tmp_path):
    """`evaluate` and `scan` on an ONNX export of mnist_cnn agree with the original module."""
    from click.testing import CliRunner

    from trojanscope.cli import cli

    model = ts.create_model("mnist_cnn", input_shape=(1, 8, 8), num_classes=10, seed=2, hidden=32).eval()
    d = save_model(model, tmp_path / "m", ModelSpec("mnist_cnn", (1, 8, 8), 10, arch_kwargs={"hidden": 32}))
    p = _onnx_export(model, (1, 8, 8), tmp_path / "m.onnx")
    results = {}
    for name, path in (("native", d), ("onnx", p)):
        ev = CliRunner().invoke(cli, ["evaluate", str(path), "--data", "digits:test", "--trigger",
                                      "square:2:white:bottom-right", "--target", "0", "--json",
                                      str(tmp_path / f"{name}.json"), "--device", "cpu"], catch_exceptions=False)
        assert ev.exit_code == 0, ev.output
        sc = CliRunner().invoke(cli, ["scan", str(path), "--data", "digits:val", "--epochs", "2", "--n-samples",
                                      "32", "--out", str(tmp_path / f"scan_{name}"), "--device", "cpu"],
                                catch_exceptions=False)
        scan = json.loads((tmp_path / f"scan_{name}" / "scan.json").read_text())
        assert sc.exit_code == (1 if scan["infected"] else 0), sc.output
        results[name] = (json.loads((tmp_path / f"{name}.json").read_text()), sc.exit_code, scan)
    (ev_n, code_n, scan_n), (ev_o, code_o, scan_o) = results["native"], results["onnx"]
    numbers = [k for k in ev_n if isinstance(ev_n[k], (int, float))]
    assert numbers and all(ev_n[k] == pytest.approx(ev_o[k], abs=1e-9) for k in numbers)  # accuracy, ASR
    assert code_n == code_o  # the same verdict
    labels_n, labels_o = scan_n["labels"], scan_o["labels"]
    assert len(labels_n) == 10 and [r["flagged"] for r in labels_n] == [r["flagged"] for r in labels_o]
    assert [r["l1_norm"] for r in labels_n] == pytest.approx([r["l1_norm"] for r in labels_o], rel=1e-3)
