"""ONNX models (``.onnx``): protobuf, no code, rebuilt as a torch module from allowed operators.

Needs the ``onnx`` extra (``pip install 'trojanscope[onnx]'``); the core never imports it. Reading:

1. The file is a regular file within the memory budget; ``onnx`` parses it *without* external
   data, and any tensor that refers to external data is refused (a model must be one file: an
   external reference could name any path).
2. Only the default operator domain, opset 7 to :data:`MAX_OPSET`, no model-local functions and no
   sub-graphs; every node's operator must be in :data:`CONVERTERS`, the allow-list of operators
   this module rebuilds.
3. Every initializer (and ``Constant`` value) is checked before it is decoded: a known dtype,
   non-negative dims, a declared size within the budget, and a payload of exactly that size.
4. The graph is rebuilt as :class:`OnnxModule`: convolutions, linear layers (``Gemm``) and batch
   norms become ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` holding the file's weights, so
   forward hooks, layer names (``penultimate``, ``last_conv``) and gradients work exactly as on a
   native model; the rest are torch functions. The module interprets the node list in order; no
   source code is generated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..._utils.limits import check_alloc, human
from ...errors import ModelLoadError, UnsafeModelError
from ._common import LoadedModel, _first_line, _infer_spec

MAX_OPSET = 23
_DTYPES = {1: (np.float32, 4), 2: (np.uint8, 1), 3: (np.int8, 1), 5: (np.int16, 2), 6: (np.int32, 4),
           7: (np.int64, 8), 9: (np.bool_, 1), 10: (np.float16, 2), 11: (np.float64, 8)}
_FIELD = {1: "float_data", 2: "int32_data", 3: "int32_data", 5: "int32_data", 6: "int32_data", 7: "int64_data",
          9: "int32_data", 10: "int32_data", 11: "double_data"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelLoadError("reading ONNX models needs the onnx package: pip install 'trojanscope[onnx]'") from None
    return onnx


# --- tensors -----------------------------------------------------------------------------------

def _tensor(t: Any, where: str, p: Path) -> torch.Tensor:
    """A TensorProto as a torch tensor, its declared size checked before anything is decoded."""
    onnx = _onnx()
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
        raise UnsafeModelError(f"{p}: refusing to load: {where} refers to external data; ONNX models must be "
                               f"one self-contained file")
    if t.data_type not in _DTYPES:
        raise ModelLoadError(f"{p}: {where} has an unsupported data type ({t.data_type})")
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims) or len(dims) > 8:
        raise ModelLoadError(f"{p}: {where} has invalid dims {dims[:8]}")
    np_dtype, size = _DTYPES[t.data_type]
    numel = math.prod(dims)
    check_alloc(numel * size, f"{p.name}: {where} ({'x'.join(map(str, dims)) or 'scalar'})")
    if t.raw_data:
        if len(t.raw_data) != numel * size:
            raise ModelLoadError(f"{p}: {where} declares {'x'.join(map(str, dims))} ({human(numel * size)}) but "
                                 f"holds {human(len(t.raw_data))}")
        arr = np.frombuffer(t.raw_data, dtype=np_dtype).reshape(dims)
    else:
        values = getattr(t, _FIELD[t.data_type])
        if len(values) != numel:
            raise ModelLoadError(f"{p}: {where} declares {numel} values but holds {len(values)}")
        if t.data_type == 10:
            arr = np.array(values, dtype=np.uint16).view(np.float16).reshape(dims)
        else:
            arr = np.array(values, dtype=np_dtype).reshape(dims)
    return torch.from_numpy(arr.copy())


def _attrs(node: Any, p: Path) -> dict[str, Any]:
    onnx = _onnx()
    A = onnx.AttributeProto
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type == A.INT:
            out[a.name] = int(a.i)
        elif a.type == A.FLOAT:
            out[a.name] = float(a.f)
        elif a.type == A.INTS:
            out[a.name] = [int(v) for v in a.ints]
        elif a.type == A.FLOATS:
            out[a.name] = [float(v) for v in a.floats]
        elif a.type == A.STRING:
            out[a.name] = a.s.decode("utf-8", errors="replace")
        elif a.type == A.TENSOR:
            out[a.name] = _tensor(a.t, f"the attribute {a.name!r} of node {node.name[:40]!r}", p)
        else:  # graphs, sparse tensors, type protos: nothing this reader rebuilds
            raise UnsafeModelError(f"{p}: refusing to load: node {node.name[:40]!r} ({node.op_type}) has an attribute "
                                   f"of a kind this reader does not accept (sub-graphs, sparse tensors)")
    return out


# --- operators ---------------------------------------------------------------------------------

class _Refuse(Exception):
    pass


def _pads2d(a: dict, k: int) -> tuple[int, int]:
    pads = a.get("pads", [0] * (2 * k))
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise _Refuse("auto_pad")
    if len(pads) != 2 * k or pads[:k] != pads[k:]:
        raise _Refuse("asymmetric padding")
    return tuple(pads[:k])  # type: ignore[return-value]


def _conv(a: dict, inits: list, n_in: int) -> nn.Module:
    w = inits[1]
    if w is None or w.ndim != 4:
        raise _Refuse("Conv needs a 4-D weight initializer")
    b = inits[2] if n_in > 2 else None
    if n_in > 2 and b is None:
        raise _Refuse("Conv bias must be an initializer")
    groups = a.get("group", 1)
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", [1, 1])),
                     padding=_pads2d(a, 2), dilation=tuple(a.get("dilations", [1, 1])), groups=groups,
                     bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(w.float())
        if b is not None:
            conv.bias.copy_(b.float())
    return conv


def _gemm(a: dict, inits: list, n_in: int) -> nn.Module:
    w, b = inits[1], (inits[2] if n_in > 2 else None)
    if w is None or w.ndim != 2 or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        raise _Refuse("Gemm is rebuilt as a linear layer: weight initializer, transA=0, alpha=beta=1")
    if n_in > 2 and b is None:
        raise _Refuse("Gemm bias must be an initializer")
    weight = w if a.get("transB", 0) else w.t()
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(weight.float())
        if b is not None:
            if b.numel() != weight.shape[0]:
                raise _Refuse("Gemm bias of the wrong size")
            lin.bias.copy_(b.float().reshape(-1))
    return lin


def _batchnorm(a: dict, inits: list, n_in: int) -> nn.Module:
    if any(t is None for t in inits[1:5]):
        raise _Refuse("BatchNormalization parameters must be initializers")
    scale, bias, mean, var = inits[1:5]
    bn = nn.BatchNorm2d(scale.numel(), eps=a.get("epsilon", 1e-5))
    with torch.no_grad():
        bn.weight.copy_(scale.float())
        bn.bias.copy_(bias.float())
        bn.running_mean.copy_(mean.float())
        bn.running_var.copy_(var.float())
    return bn.eval()


def _maxpool(a: dict, inits: list, n_in: int) -> nn.Module:
    k = a.get("kernel_shape")
    if not k or len(k) != 2:
        raise _Refuse("MaxPool must be 2-D")
    return nn.MaxPool2d(tuple(k), stride=tuple(a.get("strides", k)), padding=_pads2d(a, 2),
                        dilation=tuple(a.get("dilations", [1, 1])), ceil_mode=bool(a.get("ceil_mode", 0)))


def _avgpool(a: dict, inits: list, n_in: int) -> nn.Module:
    k = a.get("kernel_shape")
    if not k or len(k) != 2:
        raise _Refuse("AveragePool must be 2-D")
    return nn.AvgPool2d(tuple(k), stride=tuple(a.get("strides", k)), padding=_pads2d(a, 2),
                        ceil_mode=bool(a.get("ceil_mode", 0)), count_include_pad=bool(a.get("count_include_pad", 0)))


def _reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    target = [int(v) for v in shape.tolist()]
    target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # adaptive_avg_pool2d re-exports as GlobalAveragePool (a mean over dims exports as ReduceMean).
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, 1)
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


class _GlobalAveragePool(nn.AdaptiveAvgPool2d):
    """ONNX GlobalAveragePool as a layer: an ``nn.AdaptiveAvgPool2d(1)`` on 4-D inputs (so that the
    map it averages can be hooked, see :func:`~trojanscope._utils.hooks.global_pool`), the mean over
    the spatial dims otherwise."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_avg_pool(x)


def _flatten(axis: int) -> Callable:
    def f(x: torch.Tensor) -> torch.Tensor:
        ax = axis if axis >= 0 else x.ndim + axis
        # Written with torch.flatten (not reshape of read sizes) so that a re-export of the
        # converted module is an ONNX Flatten again, inside the operator allow-list.
        if ax == 1:
            return torch.flatten(x, 1)
        if 1 < ax < x.ndim:
            return torch.flatten(torch.flatten(x, 0, ax - 1), 1)
        return x.reshape(math.prod(x.shape[:ax]), -1)
    return f


#: Operators that become a layer holding weights: op -> builder(attrs, initializers, n_inputs).
LAYERS: dict[str, Callable[[dict, list, int], nn.Module]] = {
    "Conv": _conv, "Gemm": _gemm, "BatchNormalization": _batchnorm, "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": lambda a, inits, n: _GlobalAveragePool(),
}
#: Operators that are a torch function of their inputs: op -> factory(attrs) -> function.
FUNCTIONS: dict[str, Callable[[dict], Callable]] = {
    "Relu": lambda a: F.relu,
    "LeakyRelu": lambda a: (lambda x: F.leaky_relu(x, a.get("alpha", 0.01))),
    "Sigmoid": lambda a: torch.sigmoid,
    "Tanh": lambda a: torch.tanh,
    "Softmax": lambda a: (lambda x: torch.softmax(x, a.get("axis", -1))),
    "LogSoftmax": lambda a: (lambda x: torch.log_softmax(x, a.get("axis", -1))),
    "Flatten": lambda a: _flatten(a.get("axis", 1)),
    "Reshape": lambda a: _reshape,
    "Add": lambda a: torch.add, "Sub": lambda a: torch.sub, "Mul": lambda a: torch.mul, "Div": lambda a: torch.div,
    "MatMul": lambda a: torch.matmul,
    "Concat": lambda a: (lambda *xs: torch.cat(xs, a["axis"])),
    "Identity": lambda a: (lambda x: x),
    "Dropout": lambda a: (lambda x, *rest: x),
}
#: Every operator an ONNX model may use (``Constant`` is folded into a buffer).
CONVERTERS: frozenset[str] = frozenset(LAYERS) | frozenset(FUNCTIONS) | {"Constant"}


class OnnxModule(nn.Module):
    """An ONNX graph rebuilt from allowed operators; ``forward`` runs its nodes in order."""

    def __init__(self, steps: list[tuple[str, str, tuple[str, ...], str]], functions: dict[str, Callable],
                 input_name: str, output_name: str) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self._steps = steps  # (kind: "layer" / "fn", key, input value names, output value name)
        self._functions = functions
        self._buffer_of: dict[str, str] = {}
        self._input, self._output = input_name, output_name

    def add_constant(self, value_name: str, t: torch.Tensor) -> None:
        key = f"const_{len(self._buffer_of)}"
        self.register_buffer(key, t)
        self._buffer_of[value_name] = key

    def alias_constant(self, value_name: str, of: str) -> None:
        if of not in self._buffer_of:
            raise _Refuse(f"{of!r} is not a constant")
        self._buffer_of[value_name] = self._buffer_of[of]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self._input: x}

        def get(name: str) -> torch.Tensor:
            if name in env:
                return env[name]
            return getattr(self, self._buffer_of[name])

        for kind, key, inputs, out in self._steps:
            if kind == "layer":
                env[out] = self.layers[key](get(inputs[0]))
            else:
                env[out] = self._functions[key](*(get(n) for n in inputs if n))
        return env[self._output]


def _key(name: str, op: str, i: int, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")[:60] or f"{op.lower()}_{i}"
    if not base[0].isalpha():
        base = f"{op.lower()}_{base}"
    key, n = base, 1
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def convert(model: Any, p: Path) -> tuple[OnnxModule, tuple[int, ...] | None]:
    """The torch module of a checked ``ModelProto`` and its input shape (1, C, H, W) if static."""
    g = model.graph
    inits = {t.name: _tensor(t, f"initializer {t.name[:40]!r}", p) for t in g.initializer}
    if len(g.sparse_initializer):
        raise UnsafeModelError(f"{p}: refusing to load: sparse initializers are not accepted")
    inputs = [v for v in g.input if v.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelLoadError(f"{p}: the ONNX graph must have one input and one output (got {len(inputs)} and "
                             f"{len(g.output)})")
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    sample = (1, *dims[1:]) if len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]) else None
    steps: list[tuple[str, str, tuple[str, ...], str]] = []
    functions: dict[str, Callable] = {}
    used: set[str] = set()
    module = OnnxModule(steps, functions, inp.name, g.output[0].name)
    consts: dict[str, torch.Tensor] = dict(inits)
    for name, t in inits.items():
        module.add_constant(name, t)
    produced = {inp.name} | set(inits)
    for i, node in enumerate(g.node):
        op = node.op_type
        where = f"node {i} ({op} {node.name[:40]!r})"
        if len(node.output) < 1 or (op != "Dropout" and len(node.output) != 1):
            raise ModelLoadError(f"{p}: {where} must have one output")
        missing = [n for n in node.input if n and n not in produced]
        if missing:
            raise ModelLoadError(f"{p}: {where} reads {missing[0][:40]!r}, which no earlier node produces "
                                 f"(the nodes must be in order)")
        a = _attrs(node, p)
        out = node.output[0]
        try:
            if op == "Constant":
                if "value" not in a:
                    raise _Refuse("Constant without a tensor value")
                consts[out] = a["value"]
                module.add_constant(out, a["value"])
            elif op == "Identity" and node.input[0] in consts:  # an alias of a constant stays one
                consts[out] = consts[node.input[0]]
                module.alias_constant(out, node.input[0])
            elif op in LAYERS:
                layer = LAYERS[op](a, [consts.get(n) for n in node.input], len(node.input))
                key = _key(node.name, op, i, used)
                module.layers[key] = layer
                steps.append(("layer", key, (node.input[0],), out))
            else:
                key = f"fn_{i}"
                functions[key] = FUNCTIONS[op](a)
                steps.append(("fn", key, tuple(node.input), out))
        except _Refuse as e:
            raise ModelLoadError(f"{p}: {where}: {e}") from None
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise ModelLoadError(f"{p}: {where} cannot be rebuilt ({_first_line(e)})") from None
        produced.update(o for o in node.output if o)
    if g.output[0].name not in produced:
        raise ModelLoadError(f"{p}: the graph output {g.output[0].name[:40]!r} is never produced")
    return module.eval(), sample


def check_model(model: Any, p: Path) -> None:
    """Opset, domains, functions and the operator allow-list."""
    if len(model.functions):
        raise UnsafeModelError(f"{p}: refusing to load: the model defines its own functions")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if set(opsets) - {"ai.onnx"}:
        raise UnsafeModelError(f"{p}: refusing to load: operator domain(s) {sorted(set(opsets) - {'ai.onnx'})[:3]} "
                               f"(custom operators); only the default ONNX operators are accepted")
    v = opsets.get("ai.onnx", 0)
    if not 7 <= v <= MAX_OPSET:
        raise ModelLoadError(f"{p}: ONNX opset {v} is not supported (7 to {MAX_OPSET})")
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise UnsafeModelError(f"{p}: refusing to load: node {i} uses the custom operator domain "
                                   f"{node.domain[:40]!r}")
        if node.op_type not in CONVERTERS:
            raise UnsafeModelError(f"{p}: refusing to load: node {i} is the operator {node.op_type[:40]!r}, which is "
                                   f"not in the allow-list of {len(CONVERTERS)} tensor operators")


def load_onnx(p: Path, input_shape: tuple[int, int, int] | None, num_classes: int | None,
              default_input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    onnx = _onnx()
    check_alloc(p.stat().st_size, f"model file {p.name}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a corrupt file
        raise ModelLoadError(f"{p}: not a readable ONNX model ({_first_line(e)})") from None
    if not len(model.graph.node):
        raise ModelLoadError(f"{p}: not an ONNX model (no graph nodes)")
    check_model(model, p)
    module, sample = convert(model, p)
    if sample is None and default_input_shape:
        sample = (1, *default_input_shape)
    spec = _infer_spec(module, p, input_shape, num_classes, sample)
    return LoadedModel(module, spec, "onnx", p)
