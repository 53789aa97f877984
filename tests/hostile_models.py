"""The hostile model-file corpus: every class of bad model file, several variants each.

``cases(root)`` builds the files under ``root`` (from tiny models made here, never from files made
elsewhere) and returns one :class:`corpus.Case` per file: a ``trojanscope evaluate`` run whose
payload, if it ran, would create the case's canary file. Run by
``tests/models/test_hostile_models.py`` and ``benchmarks/hostile_corpus.py`` through ``tests/corpus.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from corpus import Case

SHAPE = (1, 8, 8)


class Tiny(nn.Module):
    """A model trojanscope has never seen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def read_zip(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of some cases
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members:
                z.writestr(name, data)
    return path


def _edit(src: Path, dst: Path, suffix: str, fn) -> Path:
    """Copy zip ``src`` to ``dst`` with the member ending in ``suffix`` replaced by ``fn(bytes)``."""
    return write_zip(dst, [(n, fn(d) if n.endswith(suffix) else d) for n, d in read_zip(src)])


def _edit_json(src: Path, dst: Path, fn) -> Path:
    def f(data: bytes) -> bytes:
        obj = json.loads(data)
        fn(obj)
        return json.dumps(obj).encode()
    return _edit(src, dst, "models/model.json", f)


def _first(seq, pred):
    return next(x for x in seq if pred(x))


def _build_base(root: Path) -> dict[str, Path]:
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    m = _tiny()
    x = torch.rand(4, *SHAPE)
    out = {"data": base / "data.npz"}
    g = np.random.default_rng(0)
    np.savez(out["data"], x=g.random((20, *SHAPE), dtype=np.float32), y=np.arange(20) % 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["pt2"] = base / "tiny.pt2"
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, str(out["pt2"]))
        out["ts"] = base / "tiny_ts.pt"
        torch.jit.save(torch.jit.script(m), str(out["ts"]))
        out["sd"] = base / "mnist_sd.pt"
        import trojanscope as ts

        torch.save(ts.create_model("mnist_cnn", input_shape=SHAPE, num_classes=10).state_dict(), out["sd"])
        out["st"] = base / "mnist.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ts.create_model("mnist_cnn", input_shape=SHAPE,
                                                                 num_classes=10).state_dict().items()}, out["st"])
        try:
            import onnx  # noqa: F401

            out["onnx"] = base / "tiny.onnx"
            torch.onnx.export(m, (x,), str(out["onnx"]), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        except ImportError:
            pass
    return out


# --- pt2 ------------------------------------------------------------------------------------

def _pt2_cases(root: Path, b: dict[str, Path]) -> list[tuple[str, str, Path, str | None, Path]]:
    """(id, kind, file, match, canary)."""
    out = []
    d = root / "pt2"
    d.mkdir(exist_ok=True)

    def tv(obj):
        return obj["graph_module"]["graph"]["tensor_values"]

    def sym_size(obj):
        for meta in tv(obj).values():
            for s in meta["sizes"]:
                if "as_expr" in s:
                    return s["as_expr"]
        raise AssertionError("no symbolic size")

    def add(cid, kind, fn, match, canary):
        out.append((cid, kind, _edit_json(b["pt2"], d / f"{cid}.pt2", fn), match, canary))

    # class 1: expression text that sympy would evaluate
    for i, payload in enumerate([
        "__import__('os').system('touch {c}')",
        "Symbol('s77', positive=True, integer=True) + __import__('pathlib').Path('{c}').touch()",
        "Symbol('s77', integer=exec(\"open('{c}','w')\"))",
        "Max(Symbol('s77'), (lambda: open('{c}', 'w'))())",
        "Symbol('s77').__class__.__init__.__globals__['__builtins__']['open']('{c}','w')",
        "Integer(9)**Integer(9)**Integer(9)",
    ]):
        c = d / f"canary_expr_{i}"
        add(f"pt2-expr-{i}", "pt2-expression", lambda o, p=payload, c=c: sym_size(o).__setitem__(
            "expr_str", p.format(c=c)), "expr_str", c)
    c = d / "canary_range"
    add("pt2-range-key", "pt2-expression", lambda o, c=c: o.__setitem__("range_constraints", {
        f"__import__('os').system('touch {c}')": {"min_val": 2, "max_val": 100}}), "range_constraints", c)

    # class 2: names that torch.fx would splice into generated code
    def node0(o):
        return o["graph_module"]["graph"]["nodes"][0]

    def rename_node(o, new):
        n = node0(o)
        old = n["outputs"][0]["as_tensor"]["name"]
        n["name"] = new
        n["outputs"][0]["as_tensor"]["name"] = new
        tv(o)[new] = tv(o).pop(old)

    names = [
        ("node-cr", lambda o, c: rename_node(o, f"conv\r__import__('os').system('touch {c}')")),
        ("node-newline", lambda o, c: rename_node(o, f"conv\nopen('{c}', 'w')\nx")),
        ("node-space-quote", lambda o, c: rename_node(o, f"a = open('{c}', 'w'); b")),
        ("node-unicode", lambda o, c: rename_node(o, "ｃｏｎｖ")),
        ("param", lambda o, c: _first(o["graph_module"]["signature"]["input_specs"], lambda s: "parameter" in s)[
            "parameter"].__setitem__("parameter_name", f"conv.weight\nopen('{c}','w')")),
        ("input", lambda o, c: _first(o["graph_module"]["signature"]["input_specs"], lambda s: "user_input" in s)[
            "user_input"]["arg"]["as_tensor"].__setitem__("name", f"x):\n    open('{c}','w')#")),
        ("output", lambda o, c: o["graph_module"]["signature"]["output_specs"][0]["user_output"]["arg"][
            "as_tensor"].__setitem__("name", f"y\rimport os; os.system('touch {c}')")),
        ("kwarg", lambda o, c: node0(o)["inputs"][0].__setitem__("name", f"input=open('{c}','w'),x")),
        ("module-fqn", lambda o, c: o["graph_module"]["module_call_graph"][-1].__setitem__(
            "fqn", f"conv\nopen('{c}','w')")),
        ("module-stack", lambda o, c: node0(o)["metadata"].__setitem__(
            "nn_module_stack", f"L__self__,conv;open('{c}','w'),torch.nn.Conv2d")),
        ("tensor-values-key", lambda o, c: tv(o).__setitem__(f"z\nopen('{c}','w')", next(iter(tv(o).values()))))
    ]
    for cid, fn in names:
        c = d / f"canary_{cid}"
        add(f"pt2-name-{cid}", "pt2-names", lambda o, fn=fn, c=c: fn(o, c), "refusing", c)
    # operators outside the allow-list and unknown fields
    add("pt2-target-exec", "pt2-operator", lambda o: node0(o).__setitem__("target", "builtins.exec"),
        "operator", None)
    add("pt2-target-from-file", "pt2-operator", lambda o: node0(o).__setitem__(
        "target", "torch.ops.aten.from_file.default"), "operator", None)
    add("pt2-custom-obj", "pt2-operator", lambda o: o["graph_module"]["graph"].__setitem__(
        "custom_obj_values", {"obj": {"name": "obj", "class_fqn": "__torch__.torch.classes.os.System"}}),
        "custom", None)

    # huge declared weight, payload of a few bytes
    def huge(cfg: bytes) -> bytes:
        obj = json.loads(cfg)
        meta = next(iter(obj["config"].values()))["tensor_meta"]
        meta["sizes"] = [{"as_int": 22000}, {"as_int": 22000}]
        meta["strides"] = [{"as_int": 22000}, {"as_int": 1}]
        return json.dumps(obj).encode()
    out.append(("pt2-huge-weight", "huge-declared-size",
                _edit(b["pt2"], d / "huge.pt2", "model_weights_config.json", huge), "declares", None))

    def huge_empty(members):
        cfg_name = _first([n for n, _ in members], lambda n: n.endswith("model_weights_config.json"))
        obj = json.loads(dict(members)[cfg_name])
        key, meta = next(iter(obj["config"].items()))
        meta["tensor_meta"]["sizes"] = [{"as_int": 100000}, {"as_int": 100000}]
        meta["tensor_meta"]["strides"] = [{"as_int": 100000}, {"as_int": 1}]
        payload = _first([n for n, _ in members], lambda n: n.endswith("data/weights/" + meta["path_name"]))
        return [(n, json.dumps(obj).encode() if n == cfg_name else (b"" if n == payload else v)) for n, v in members]
    out.append(("pt2-huge-empty-payload", "huge-declared-size",
                write_zip(d / "huge_empty.pt2", huge_empty(read_zip(b["pt2"]))), "budget", None))
    # duplicate program entry: a malicious copy first, the benign one last
    members = read_zip(b["pt2"])
    prog = _first(members, lambda m: m[0].endswith("models/model.json"))
    bad = json.loads(prog[1])
    bad["graph_module"]["graph"]["nodes"][0]["name"] = "x\r__import__('os')"
    out.append(("pt2-duplicate-entry", "zip-duplicate",
                write_zip(d / "dup.pt2", [(prog[0], json.dumps(bad).encode())] + members), "two members", None))
    # NaN weights, truncated archive
    members = read_zip(b["pt2"])
    w = _first(members, lambda m: "/data/weights/weight_" in m[0])
    nan = np.frombuffer(w[1], dtype=np.float32).copy()
    nan[0] = np.nan
    out.append(("pt2-nan-weight", "nan-weights", write_zip(d / "nan.pt2", [
        (n, nan.tobytes() if n == w[0] else v) for n, v in members]), "nan", None))
    raw = b["pt2"].read_bytes()
    (d / "truncated.pt2").write_bytes(raw[: len(raw) // 2])
    out.append(("pt2-truncated", "corrupt", d / "truncated.pt2", None, None))
    return out


# --- TorchScript ------------------------------------------------------------------------------

def _ts_code_member(members) -> str:
    return _first([n for n, v in members], lambda n: n.endswith(".py") and b"class Tiny(Module)" in dict(members)[n])


def _ts_inject(src: Path, dst: Path, lines: list[str], before: str = "    return ") -> Path:
    """TorchScript archive ``src`` with ``lines`` inserted in the root module's forward."""
    members = read_zip(src)
    name = _ts_code_member(members)
    text = dict(members)[name].decode()
    i = text.index(before)
    text = text[:i] + "".join(f"    {ln}\n" for ln in lines) + text[i:]
    return write_zip(dst, [(n, text.encode() if n == name else v) for n, v in members])


def _ts_cases(root: Path, b: dict[str, Path]) -> list[tuple[str, str, Path, str | None, Path]]:
    out = []
    d = root / "ts"
    d.mkdir(exist_ok=True)
    hide = {
        "space": ['_p = torch .save(x, "{c}")'],
        "newline-in-parens": ['_p = (torch\n      .save)(x, "{c}")'],
        "alias": ['s = torch.save', '_p = s(x, "{c}")'],
        "getattr": ['_p = getattr(torch, "save")(x, "{c}")'],
        "ops-aten": ['_p = torch.ops.aten.save(x, "{c}")'],
        "bare-ops": ['_p = ops.aten.save(x, "{c}")'],
        "from-file": ['_t = torch.from_file("{c}", True, 4)'],
        "import": ['_p = __import__("os").system("touch {c}")'],
        "fullwidth": ['_p = ｔｏｒｃｈ.save(x, "{c}")'],
        "tab": ['_p = torch\t.save(x, "{c}")'],
        "unknown-method": ['_p = (x).save_to("{c}")'],
        "print": ['print("{c}")'],
        "fork": ['_f = torch.jit._fork(torch.relu, x)'],
    }
    for cid, lines in hide.items():
        c = d / f"canary_{cid}"
        out.append((f"ts-hide-{cid}", "torchscript-call-hiding",
                    _ts_inject(b["ts"], d / f"{cid}.pt", [ln.format(c=c) for ln in lines]), "refusing", c))
    # __setstate__ runs while loading
    for i, (indent_def, body) in enumerate([
        ("  def __setstate__(self: __torch__.hostile_models.Tiny, state: Tuple[bool]) -> None:",
         '    _p = torch.save(torch.zeros(1), "{c}")\n    return None\n'),
        ("  def  __setstate__ (self: __torch__.hostile_models.Tiny, state: Tuple[bool]) -> None:",
         "    self.training = state[0]\n    return None\n"),
        ("  def __setstate__(self: __torch__.hostile_models.Tiny,\n    state: Tuple[bool]) -> None:",
         '    _0 = torch.ones(1)\n    return None\n'),
    ]):
        c = d / f"canary_setstate_{i}"
        members = read_zip(b["ts"])
        name = _ts_code_member(members)
        text = dict(members)[name].decode()
        qual = text.split("def forward(self: ", 1)[1].split(",", 1)[0]
        j = text.index("  def forward")
        text = text[:j] + indent_def.replace("__torch__.hostile_models.Tiny", qual) + "\n" + body.format(c=c) + text[j:]
        out.append((f"ts-setstate-{i}", "torchscript-setstate",
                    write_zip(d / f"setstate_{i}.pt", [(n, text.encode() if n == name else v) for n, v in members]),
                    "__setstate__", c))
    # duplicate code entry: malicious first (torch reads it), benign last (zipfile reads it)
    c = d / "canary_dup"
    evil = read_zip(_ts_inject(b["ts"], d / "evil_tmp.pt", [f'_p = torch.save(x, "{c}")']))
    (d / "evil_tmp.pt").unlink()
    members = read_zip(b["ts"])
    name = _ts_code_member(members)
    out.append(("ts-duplicate-entry", "zip-duplicate",
                write_zip(d / "dup.pt", [(name, dict(evil)[name])] + members), "two members", c))
    raw = b["ts"].read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) * 2 // 3])
    out.append(("ts-truncated", "corrupt", d / "truncated.pt", None, None))
    return out


# --- state dicts, pickles, zips ----------------------------------------------------------------

class _Boom:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sd_cases(root: Path, b: dict[str, Path]) -> list[tuple[str, str, Path, str | None, Path, list[str]]]:
    out = []
    d = root / "sd"
    d.mkdir(exist_ok=True)
    arch = ["--arch", "mnist_cnn"]
    members = read_zip(b["sd"])
    pkl = _first([n for n, _ in members], lambda n: n.endswith("data.pkl"))

    def with_pkl(dst: Path, data: bytes) -> Path:
        return write_zip(dst, [(n, data if n == pkl else v) for n, v in members])

    c = d / "canary_global"
    out.append(("sd-pickle-system", "pickle-globals", with_pkl(d / "system.pt", f"cposix\nsystem\n(S'touch {c}'\ntR."
                                                                                 .encode()), "posix.system", c, arch))
    c = d / "canary_open"
    out.append(("sd-pickle-open", "pickle-globals", with_pkl(d / "open.pt", pickle.dumps(_Boom(c), protocol=4)),
                "would import", c, arch))
    c = d / "canary_memo"
    memo = (b"\x80\x04\x8c\x08builtins\x94\x8c\x04exec\x94\x93\x94h\x00h\x01\x93"
            + pickle.dumps(f"open('{c}','w')", protocol=4)[2:-1] + b"\x85R.")
    out.append(("sd-pickle-memo-stack-global", "pickle-globals", with_pkl(d / "memo.pt", memo), "refusing", c, arch))
    c = d / "canary_raw"
    (d / "raw.pkl").write_bytes(pickle.dumps(_Boom(c)))
    out.append(("raw-pickle", "pickle-globals", d / "raw.pkl", "pickle", c, arch))
    torch.save(_tiny(), d / "module.pt")
    out.append(("full-module-pickle", "pickle-globals", d / "module.pt", "refusing", None, arch))
    # duplicate data.pkl: a malicious one first
    c = d / "canary_dup"
    out.append(("sd-duplicate-entry", "zip-duplicate", write_zip(d / "dup.pt", [
        (pkl, f"cposix\nsystem\n(S'touch {c}'\ntR.".encode())] + members), "two members", c, arch))
    # zip structure
    prefix = pkl.partition("/")[0]
    out.append(("zip-traversal", "zip-structure", write_zip(d / "traversal.pt", members + [
        (f"{prefix}/../../evil.py", b"x")]), "unsafe path", None, arch))
    out.append(("zip-absolute", "zip-structure", write_zip(d / "absolute.pt", members + [
        ("/etc/cron.d/evil", b"x")]), "unsafe path", None, arch))
    link = d / "symlink.pt"
    with zipfile.ZipFile(link, "w") as z:
        for n, v in members:
            z.writestr(n, v)
        info = zipfile.ZipInfo(f"{prefix}/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    out.append(("zip-symlink", "zip-structure", link, "symbolic link", None, arch))
    bomb = d / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, v in members:
            z.writestr(n, v)
        z.writestr(f"{prefix}/data/99", bytes(64 << 20))
    out.append(("zip-bomb", "zip-structure", bomb, "zip bomb", None, arch))
    # a storage that declares 2 G elements over a 16-byte member
    small = torch.save({"w": torch.zeros(4)}, d / "small.pt")
    del small
    sm = read_zip(d / "small.pt")
    spkl = _first([n for n, _ in sm], lambda n: n.endswith("data.pkl"))
    data = dict(sm)[spkl]
    data = data.replace(b"X\x03\x00\x00\x00cpuq\x06K\x04", b"X\x03\x00\x00\x00cpuq\x06J\x00\x94\x35\x77")
    data = data.replace(b"K\x00K\x04\x85", b"K\x00J\x00\x94\x35\x77\x85")
    (d / "small.pt").unlink()
    out.append(("sd-huge-storage", "huge-declared-size", write_zip(d / "huge.pt", [
        (n, data if n == spkl else v) for n, v in sm]), None, None, arch))
    # safetensors: NaN, bare without --arch, truncated
    from safetensors.torch import load_file, save_file

    st = load_file(str(b["st"]))
    k = next(iter(st))
    st[k] = st[k].clone()
    st[k].view(-1)[0] = float("nan")
    save_file(st, str(d / "nan.safetensors"))
    out.append(("safetensors-nan", "nan-weights", d / "nan.safetensors", "nan", None, arch + ["--input-shape", "1,8,8"]))
    out.append(("safetensors-bare-no-arch", "missing-arch", b["st"], "--arch", None, []))
    raw = b["st"].read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    out.append(("safetensors-truncated", "corrupt", d / "truncated.safetensors", None, None, arch))
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}).encode()
    (d / "huge.safetensors").write_bytes(len(hdr).to_bytes(8, "little") + hdr + bytes(16))
    out.append(("safetensors-huge-declared", "huge-declared-size", d / "huge.safetensors", None, None, arch))
    (d / "empty.pt").write_bytes(b"")
    out.append(("empty-file", "corrupt", d / "empty.pt", None, None, arch))
    (d / "random.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    out.append(("random-bytes", "corrupt", d / "random.bin", None, None, arch))
    return out


# --- ONNX -----------------------------------------------------------------------------------

def _onnx_cases(root: Path, b: dict[str, Path]) -> list[tuple[str, str, Path, str | None, Path]]:
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return []
    out = []
    d = root / "onnx"
    d.mkdir(exist_ok=True)

    def edited(cid: str, fn) -> Path:
        m = onnx.load(str(b["onnx"]))
        fn(m)
        p = d / f"{cid}.onnx"
        p.write_bytes(m.SerializeToString())
        return p

    def external(location: str):
        def fn(m):
            t = m.graph.initializer[0]
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=location)
            t.external_data.add(key="length", value="64")
        return fn

    out.append(("onnx-external-outside", "onnx-external-data", edited("ext_out", external("../../../etc/passwd")),
                "external data", None))
    out.append(("onnx-external-absolute", "onnx-external-data", edited("ext_abs", external("/dev/zero")),
                "external data", None))
    out.append(("onnx-external-beside", "onnx-external-data", edited("ext_side", external("weights.bin")),
                "external data", None))

    def add_node(op, domain=""):
        def fn(m):
            m.graph.node.insert(0, helper.make_node(op, ["x"], ["unused"], domain=domain))
            if domain:
                m.opset_import.append(helper.make_opsetid(domain, 1))
        return fn
    out.append(("onnx-op-if", "onnx-operator", edited("op_if", add_node("If")), "operator", None))
    out.append(("onnx-op-custom-domain", "onnx-operator", edited("op_custom", add_node("System", "com.evil")),
                "domain", None))
    out.append(("onnx-op-random", "onnx-operator", edited("op_rand", add_node("RandomNormalLike")), "operator", None))

    def opset(m):
        m.opset_import[0].version = 99
    out.append(("onnx-opset", "onnx-operator", edited("opset", opset), "opset", None))

    def huge_init(m):
        t = m.graph.initializer[0]
        t.ClearField("raw_data")
        del t.dims[:]
        t.dims.extend([22000, 22000])
    out.append(("onnx-huge-initializer", "huge-declared-size", edited("huge", huge_init), "declares", None))

    def short_init(m):
        t = m.graph.initializer[0]
        t.raw_data = t.raw_data[:8]
    out.append(("onnx-short-initializer", "huge-declared-size", edited("short", short_init), "declares", None))
    raw = b["onnx"].read_bytes()
    (d / "truncated.onnx").write_bytes(raw[: len(raw) // 3])
    out.append(("onnx-truncated", "corrupt", d / "truncated.onnx", None, None))
    (d / "garbage.onnx").write_bytes(b"\x08" + np.random.default_rng(2).bytes(2048))
    out.append(("onnx-garbage", "corrupt", d / "garbage.onnx", None, None))

    def nan(m):
        t = m.graph.initializer[0]
        arr = np.frombuffer(t.raw_data, dtype=np.float32).copy()
        arr[0] = np.nan
        t.raw_data = arr.tobytes()
    out.append(("onnx-nan-weight", "nan-weights", edited("nan", nan), "nan", None))
    return out


#: Every case id, in order (the corpus test checks that ``cases`` builds exactly these; the ONNX
#: cases need the ``onnx`` extra).
CASE_IDS: list[str] = [
    "pt2-expr-0", "pt2-expr-1", "pt2-expr-2", "pt2-expr-3", "pt2-expr-4", "pt2-expr-5", "pt2-range-key",
    "pt2-name-node-cr", "pt2-name-node-newline", "pt2-name-node-space-quote", "pt2-name-node-unicode",
    "pt2-name-param", "pt2-name-input", "pt2-name-output", "pt2-name-kwarg", "pt2-name-module-fqn",
    "pt2-name-module-stack", "pt2-name-tensor-values-key", "pt2-target-exec", "pt2-target-from-file",
    "pt2-custom-obj", "pt2-huge-weight", "pt2-huge-empty-payload", "pt2-duplicate-entry", "pt2-nan-weight",
    "pt2-truncated", "ts-hide-space", "ts-hide-newline-in-parens", "ts-hide-alias", "ts-hide-getattr",
    "ts-hide-ops-aten", "ts-hide-bare-ops", "ts-hide-from-file", "ts-hide-import", "ts-hide-fullwidth",
    "ts-hide-tab", "ts-hide-unknown-method", "ts-hide-print", "ts-hide-fork", "ts-setstate-0", "ts-setstate-1",
    "ts-setstate-2", "ts-duplicate-entry", "ts-truncated", "onnx-external-outside", "onnx-external-absolute",
    "onnx-external-beside", "onnx-op-if", "onnx-op-custom-domain", "onnx-op-random", "onnx-opset",
    "onnx-huge-initializer", "onnx-short-initializer", "onnx-truncated", "onnx-garbage", "onnx-nan-weight",
    "sd-pickle-system", "sd-pickle-open", "sd-pickle-memo-stack-global", "raw-pickle", "full-module-pickle",
    "sd-duplicate-entry", "zip-traversal", "zip-absolute", "zip-symlink", "zip-bomb", "sd-huge-storage",
    "safetensors-nan", "safetensors-bare-no-arch", "safetensors-truncated", "safetensors-huge-declared",
    "empty-file", "random-bytes", "model-fifo", "model-device",
]


def cases(root: Path) -> list[Case]:
    """Build every hostile model file under ``root``; one ``evaluate`` case each."""
    root = Path(root)
    b = _build_base(root)
    data = ["--data", str(b["data"])]
    out: list[Case] = []
    for cid, kind, path, match, canary in _pt2_cases(root, b) + _ts_cases(root, b) + _onnx_cases(root, b):
        out.append(Case(cid, kind, ["evaluate", str(path), *data, "--device", "cpu"], match, canary))
    for cid, kind, path, match, canary, extra in _sd_cases(root, b):
        out.append(Case(cid, kind, ["evaluate", str(path), *data, "--device", "cpu", *extra], match, canary))
    fifo = root / "fifo.pt2"
    if not fifo.exists():
        os.mkfifo(fifo)
    out.append(Case("model-fifo", "not-a-regular-file", ["evaluate", str(fifo), *data, "--device", "cpu"], "FIFO"))
    out.append(Case("model-device", "not-a-regular-file", ["evaluate", "/dev/zero", *data, "--device", "cpu"],
                    "device"))
    return out


if __name__ == "__main__":  # pragma: no cover - a quick look at the corpus
    import sys
    import tempfile

    for case in cases(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())):
        print(case.id, case.kind, " ".join(case.argv[:2]))
