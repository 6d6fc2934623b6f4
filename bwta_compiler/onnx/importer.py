"""ONNX -> ``torch.fx.GraphModule``: ``import_model(path_or_proto, quantize=None)``.

The importer walks the ONNX graph once, in topological order, and calls one converter per node
(``converters.CONVERTERS``, keyed by (domain, op_type)).  Values flow between converters as:

* ``torch.fx.Node``: a tensor computed at run time;
* :class:`Const`: a tensor known at import time (initializers, ``Constant`` nodes, and anything
  computed only from them: such ops are folded while importing; a constant becomes a buffer of the
  module only when a run-time op consumes it);
* :class:`Sym`: a small int64 0-d/1-d value (a shape, a dimension) whose entries are Python ints or
  FX nodes holding symbolic sizes (``x.size(i)``).  ``Shape -> Gather -> Concat -> Reshape`` chains
  therefore become ``x.reshape(x.size(0), x.size(1), 4, 16)``: no tensors holding shapes, so
  ``torch.compile`` captures one graph with the batch and sequence dims still dynamic.

Errors: everything wrong with the input (not a file, not ONNX, truncated, opset out of range,
unknown domain, missing initializer or input, unsupported ops) raises one
:class:`~bwta_compiler.errors.OnnxImportError` that names the file and the node(s); unsupported
ops are collected first and reported together.
"""

from __future__ import annotations

import operator
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from ..errors import OnnxImportError
from . import schemas

# 11..16 are what the TorchScript exporter and most models on model hubs carry; the converters read
# the older attribute forms (Split/Squeeze/Unsqueeze/Reduce* axes) and Softmax-11's 2-D coercion.
OPSET_MIN, OPSET_MAX = 11, 21
DEFAULT_DOMAINS = ("", "ai.onnx")
# A folded int tensor this small is kept as Python data (a shape, axes, a slice bound).
SMALL_INT = 64

ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}
TORCH_TO_ONNX = {v: k for k, v in ONNX_TO_TORCH.items()}


class Const:
    """A tensor known at import time."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __repr__(self) -> str:
        return f"Const({tuple(self.t.shape)}, {self.t.dtype})"


class Sym:
    """int64 shape data with at least one run-time (symbolic) entry; ``scalar`` means 0-d."""

    __slots__ = ("items", "scalar")

    def __init__(self, items: list, scalar: bool = False) -> None:
        self.items, self.scalar = list(items), scalar

    def __repr__(self) -> str:
        return f"Sym({self.items}, scalar={self.scalar})"


Value = Union[fx.Node, Const, Sym, None]  # noqa: UP007 - a runtime alias


@dataclass
class TypeInfo:
    dtype: torch.dtype | None
    dims: list | None          # per dim: int (static) or None (dynamic); None = rank unknown


def _sanitize(name: str, taken: set) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or "v"
    if base[0].isdigit():
        base = "v_" + base
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def sym_tensor(items: list, scalar: bool) -> torch.Tensor:
    """Run-time materialization of :class:`Sym` data as an int64 tensor."""
    t = torch.tensor([int(i) if not isinstance(i, torch.SymInt) else i for i in items], dtype=torch.int64)
    return t.reshape(()) if scalar else t


def tensor_to_list(t: torch.Tensor) -> list:
    """Run-time read of a shape held in a tensor (only for shapes no import-time analysis resolved)."""
    return [int(v) for v in t.reshape(-1).tolist()]


class Ctx:
    """What converters see: the FX graph under construction plus helpers to fold constants."""

    def __init__(self, path: str, opset: int, types: dict[str, TypeInfo]) -> None:
        self.path = path
        self.opset = opset
        self.types = types
        self.graph = fx.Graph()
        self.root = nn.Module()
        self._buffers: dict[int, fx.Node] = {}
        self._names: set = set()
        self.node: onnx.NodeProto | None = None
        self.fold = True
        self.linear_count = 0
        self.fused_linear = False
        self.env: dict[str, Value] = {}

    # -- value helpers --------------------------------------------------------------------------

    def dtype(self, v: Value) -> torch.dtype | None:
        if isinstance(v, Const):
            return v.t.dtype
        if isinstance(v, Sym):
            return torch.int64
        if isinstance(v, fx.Node):
            return v.meta.get("dtype")
        return None

    def rank(self, v: Value) -> int | None:
        if isinstance(v, Const):
            return v.t.dim()
        if isinstance(v, Sym):
            return 0 if v.scalar else 1
        if isinstance(v, fx.Node):
            return v.meta.get("rank")
        return None

    def static_dims(self, v: Value) -> list | None:
        if isinstance(v, Const):
            return list(v.t.shape)
        if isinstance(v, Sym):
            return [] if v.scalar else [len(v.items)]
        if isinstance(v, fx.Node):
            return v.meta.get("dims")
        return None

    def buffer(self, t: torch.Tensor, hint: str = "const") -> fx.Node:
        key = id(t)
        if key not in self._buffers:
            name = _sanitize(hint, self._names)
            self.root.register_buffer(name, t)
            with self.graph.inserting_after(self._last_placeholder()):
                node = self.graph.get_attr(name)
            node.meta.update(dtype=t.dtype, rank=t.dim(), dims=list(t.shape))
            self._buffers[key] = (node, t)
        return self._buffers[key][0]

    def _last_placeholder(self):
        last = None
        for n in self.graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                last = n
        return last

    def sym(self, v: Value) -> list | None:
        """Python-level int items of small int64/int32 0-d or 1-d data, or None."""
        if isinstance(v, Sym):
            return v.items
        if isinstance(v, Const) and not v.t.is_floating_point() and v.t.dim() <= 1 and v.t.numel() <= SMALL_INT \
                and v.t.dtype != torch.bool:
            return [int(i) for i in v.t.reshape(-1).tolist()]
        return None

    def ints(self, v: Value, what: str) -> list:
        """Items of an input that must be known at import time up to symbolic sizes."""
        items = self.sym(v)
        if items is None:
            if isinstance(v, fx.Node) and self.rank(v) in (0, 1, None) and self.dtype(v) in (torch.int64, torch.int32, None):
                # Data-dependent shape: read it at run time (a graph break under torch.compile).
                n = self.graph.call_function(tensor_to_list, (v,))
                return n
            raise OnnxImportError(f"{what} must be a constant or a shape computation, got {v!r}")
        return items

    def make_sym(self, items: list, scalar: bool = False) -> Value:
        if all(isinstance(i, (int, bool)) for i in items):
            t = torch.tensor(items, dtype=torch.bool if items and all(isinstance(i, bool) for i in items)
                             else torch.int64)
            return Const(t.reshape(()) if scalar else t)
        return Sym(items, scalar)

    def size(self, x: fx.Node, i: int) -> Any:
        dims = x.meta.get("dims")
        if dims is not None and i < len(dims) and isinstance(dims[i], int):
            return dims[i]
        n = self.graph.call_method("size", (x, i))
        n.meta.update(dtype=torch.int64, rank=0)
        return n

    def sym_op(self, fn: Callable, a: Any, b: Any) -> Any:
        if isinstance(a, (int, bool)) and isinstance(b, (int, bool)):
            return fn(a, b)
        return self.graph.call_function(fn, (a, b))

    def tensor(self, v: Value) -> Any:
        """A converter's tensor argument: an FX node, or a torch tensor when known at import."""
        if isinstance(v, Sym):
            n = self.graph.call_function(sym_tensor, (v.items, v.scalar))
            n.meta.update(dtype=torch.int64, rank=0 if v.scalar else 1)
            return n
        if isinstance(v, Const):
            return v.t
        return v

    def call(self, fn: Callable, *args: Any, method: bool = False, **kwargs: Any) -> Value:
        """Call ``fn`` on tensor/scalar arguments: at import time when every tensor is known (folding),
        else emit an FX node (known tensors become buffers)."""
        args, kwargs = fx.node.map_aggregate(
            (args, kwargs), lambda x: self.tensor(x) if isinstance(x, (Const, Sym)) else x)
        dynamic = []
        fx.node.map_aggregate((args, kwargs), lambda x: dynamic.append(x) if isinstance(x, fx.Node) else x)
        if not dynamic and self.fold:
            fn_ = getattr(torch.Tensor, fn) if method else fn
            with torch.no_grad():
                out = fn_(*args, **kwargs)
            return _wrap_const(out)
        hint = self._hint()
        args, kwargs = fx.node.map_aggregate(
            (args, kwargs), lambda x: self.buffer(x, hint) if isinstance(x, torch.Tensor) else x)
        if method:
            return self.graph.call_method(fn, args, kwargs)
        return self.graph.call_function(fn, args, kwargs)

    def _hint(self) -> str:
        if self.node is not None:
            return "c_" + (self.node.output[0] if self.node.output else self.node.op_type)
        return "const"

    def _path_of(self, target: nn.Module) -> list:
        for n, m in self.root.named_modules():
            if m is target:
                return [(p, None) for p in n.split(".")] if n else []
        return []

    def module(self, name: str, mod: nn.Module, *args: Any) -> fx.Node:
        # Keep the dotted module path (``layers.0.attention.q_proj``) so quantize()'s name rules apply.
        parts = [re.sub(r"\W", "_", p) or "m" for p in name.split(".")]
        parent = self.root
        for p in parts[:-1]:
            child = getattr(parent, p, None) if p in parent._modules else None
            if child is None:
                if hasattr(parent, p):
                    p = _sanitize(p, set(dir(parent)))
                child = nn.Module()
                parent.add_module(p, child)
            parent = child
        leaf, i = parts[-1], 1
        while hasattr(parent, leaf) or (parent is self.root and leaf in self._names):
            leaf, i = f"{parts[-1]}_{i}", i + 1
        parent.add_module(leaf, mod)
        if parent is self.root:
            self._names.add(leaf)
        name = ".".join(n for n, _ in self._path_of(parent)) + ("." if parent is not self.root else "") + leaf
        args = tuple(self.buffer(a, self._hint()) if isinstance(a, torch.Tensor) else a
                     for a in (self.tensor(x) if isinstance(x, (Const, Sym)) else x for x in args))
        return self.graph.call_module(name, args)


def _wrap_const(out: Any) -> Value:
    if isinstance(out, torch.Tensor):
        return Const(out)
    if isinstance(out, (tuple, list)):
        return [_wrap_const(o) for o in out]
    if isinstance(out, (int, float, bool)):
        return Const(torch.tensor(out))
    return out


# ---- loading and validation ----------------------------------------------------------------------


def _load(model: str | os.PathLike | onnx.ModelProto | bytes) -> tuple[onnx.ModelProto, str, str | None]:
    """(model, display name, base dir for external data)."""
    if isinstance(model, onnx.ModelProto):
        return model, "<ModelProto>", None
    if isinstance(model, (bytes, bytearray)):
        return _parse(bytes(model), "<bytes>"), "<bytes>", None
    path = Path(os.fspath(model))
    if not path.exists():
        raise OnnxImportError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxImportError(f"{path}: is a directory, not an ONNX file")
    data = path.read_bytes()
    return _parse(data, str(path)), str(path), str(path.parent)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise OnnxImportError(f"{where}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise OnnxImportError(f"{where}: not a valid ONNX file (truncated or not a protobuf ModelProto: "
                              f"{type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise OnnxImportError(f"{where}: not an ONNX model (no graph, IR version or opset); "
                              f"the file may be truncated or of another format")
    return proto


def _load_external(model: onnx.ModelProto, where: str, base_dir: str | None) -> None:
    from onnx import external_data_helper as edh
    for t in edh._get_all_tensors(model):
        if not edh.uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if base_dir is None:
            raise OnnxImportError(f"{where}: initializer {t.name!r} keeps its data in external file {loc!r}; "
                                  f"pass the model's path (not a ModelProto) so it can be found")
        full = Path(base_dir) / loc
        if not full.is_file():
            raise OnnxImportError(f"{where}: initializer {t.name!r}: external data file {str(full)!r} not found")
        try:
            edh.load_external_data_for_tensor(t, base_dir)
        except Exception as e:  # noqa: BLE001 - reported as OnnxImportError
            raise OnnxImportError(f"{where}: initializer {t.name!r}: cannot read external data {str(full)!r}: "
                                  f"{type(e).__name__}: {e}") from None
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
        expected = _numel(t) * _itemsize(t)
        if expected and len(t.raw_data) < expected:
            raise OnnxImportError(f"{where}: initializer {t.name!r}: external data {str(full)!r} is truncated "
                                  f"({len(t.raw_data)} of {expected} bytes)")


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _itemsize(t: onnx.TensorProto) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001 - reported as OnnxImportError
        return 0


def _opsets(model: onnx.ModelProto, where: str) -> tuple[int, dict]:
    domains = {}
    for o in model.opset_import:
        domains[o.domain if o.domain != "ai.onnx" else ""] = o.version
    opset = domains.get("")
    if opset is None:
        raise OnnxImportError(f"{where}: the model imports no default ONNX opset")
    if not OPSET_MIN <= opset <= OPSET_MAX:
        raise OnnxImportError(f"{where}: ONNX opset {opset} is not supported (supported: {OPSET_MIN}..{OPSET_MAX}); "
                              f"convert it with onnx.version_converter.convert_version(model, 18)")
    if schemas.DOMAIN in domains and domains[schemas.DOMAIN] != schemas.VERSION:
        raise OnnxImportError(f"{where}: {schemas.DOMAIN} version {domains[schemas.DOMAIN]} is not supported "
                              f"(this bwta knows version {schemas.VERSION})")
    return opset, domains


def _node_label(n: onnx.NodeProto, i: int) -> str:
    return repr(n.name) if n.name else f"#{i} (output {n.output[0]!r})" if n.output else f"#{i}"


def _check_nodes(model: onnx.ModelProto, where: str, domains: dict, converters: dict) -> None:
    unknown_domain: dict[str, list] = defaultdict(list)
    unsupported: dict[str, list] = defaultdict(list)
    for i, n in _all_nodes(model.graph):
        dom = "" if n.domain in DEFAULT_DOMAINS else n.domain
        label = _node_label(n, i)
        if dom and dom != schemas.DOMAIN:
            unknown_domain[dom].append(f"{n.op_type} {label}")
            continue
        if dom and dom not in domains:
            unknown_domain[dom + " (not in the model's opset_import)"].append(f"{n.op_type} {label}")
            continue
        if (dom, n.op_type) not in converters:
            key = n.op_type if not dom else f"{dom}.{n.op_type}"
            unsupported[key].append(label)
    parts = []
    if unknown_domain:
        parts.append("unknown operator domain(s): " + "; ".join(
            f"{d!r} used by {_short(v)}" for d, v in sorted(unknown_domain.items())))
    if unsupported:
        parts.append(f"{sum(map(len, unsupported.values()))} node(s) of {len(unsupported)} unsupported op type(s): "
                     + "; ".join(f"{k} ({len(v)}: {_short(v)})" for k, v in sorted(unsupported.items())))
    if parts:
        raise OnnxImportError(f"{where}: cannot import: " + "; ".join(parts))


def _all_nodes(graph: onnx.GraphProto) -> list[tuple[int, onnx.NodeProto]]:
    """(index in its graph, node) for every node, those of If branches (subgraphs) included."""
    out = []
    for i, n in enumerate(graph.node):
        out.append((i, n))
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out.extend(_all_nodes(sub))
    return out


def _short(items: list, n: int = 6) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _type_info(vi: onnx.ValueInfoProto) -> TypeInfo | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    dtype = ONNX_TO_TORCH.get(tt.elem_type)
    dims = None
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    return TypeInfo(dtype, dims)


def _infer_types(model: onnx.ModelProto) -> dict[str, TypeInfo]:
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - reported as OnnxImportError
        inferred = model
    types: dict[str, TypeInfo] = {}
    graphs = [inferred.graph]
    while graphs:
        g = graphs.pop()
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            ti = _type_info(vi)
            if ti is not None:
                types.setdefault(vi.name, ti)
        for n in g.node:        # If branches: their values get types too
            for a in n.attribute:
                graphs.extend([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))
    return types


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without big initializer payloads (shape inference needs their shapes only),
    built field by field so the weights are never copied."""
    m = onnx.ModelProto(ir_version=model.ir_version)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        if _numel(t) <= SMALL_INT and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _topo_order(graph: onnx.GraphProto, known: set, where: str) -> list[tuple[int, onnx.NodeProto]]:
    producers = {}
    for i, n in enumerate(graph.node):
        for o in n.output:
            if o:
                producers[o] = i
    order, state = [], {}
    missing: list[str] = []

    def visit(i: int) -> None:
        stack = [(i, 0)]
        while stack:
            j, k = stack.pop()
            n = graph.node[j]
            if k == 0:
                if state.get(j) == 2:
                    continue
                state[j] = 1
            inputs = [x for x in n.input if x]
            if k < len(inputs):
                stack.append((j, k + 1))
                name = inputs[k]
                if name in known:
                    continue
                p = producers.get(name)
                if p is None:
                    missing.append(f"node {_node_label(n, j)} ({n.op_type}) input {name!r}")
                elif state.get(p) == 1:
                    raise OnnxImportError(f"{where}: the graph has a cycle through node {_node_label(n, j)}")
                elif state.get(p) is None:
                    stack.append((p, 0))
                continue
            state[j] = 2
            order.append((j, n))

    for i in range(len(graph.node)):
        if state.get(i) is None:
            visit(i)
    if missing:
        raise OnnxImportError(f"{where}: {len(missing)} input(s) are neither a graph input, an initializer nor "
                              f"a node output (missing initializer?): " + _short(missing))
    return order


# ---- the driver ---------------------------------------------------------------------------------


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto as a torch tensor (bf16 included: numpy has no bfloat16, so its bits are
    read as uint16 and viewed as torch's bfloat16)."""
    arr = numpy_helper.to_array(t)
    if t.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(arr.view("uint16").copy()).view(torch.bfloat16)
    if arr.dtype.kind not in "biuf":
        raise OnnxImportError(f"has non-numeric type {arr.dtype} (not supported)")
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def import_model(model: str | os.PathLike | onnx.ModelProto | bytes, quantize: Any = None, *,
                 fused_linear: bool = False, quantizers: str = "off") -> fx.GraphModule:
    """Import an ONNX model as a ``torch.fx.GraphModule``.

    ``model``: a path (external data files are resolved relative to it), a ``ModelProto`` or the
    serialized bytes.  The module's ``forward`` takes the graph inputs positionally (named after
    them) and returns the single output, or a tuple of the outputs.

    ``quantize``: ``None`` keeps the model as it is; ``True`` or a
    :class:`~bwta_compiler.QuantConfig` applies :func:`bwta_compiler.quantize` to the imported
    module: every MatMul/Gemm with a constant 2-D weight is imported as an ``nn.Linear`` named after
    the ONNX module scope (``layers.0.attention.q_proj``), so the same name rules decide which ones
    become BWTA (the result carries ``bwta_report``).  Attention MatMuls of a float ONNX model
    stay float.

    ``ai.bwta`` nodes become the ``bwta::`` torch ops.  ``ai.bwta.Linear`` becomes, by default, the
    form a ``BWTALinear`` has after weight folding (``codes(x) @ unpack_binary(Wp)^T * scale + bias``),
    which the ``bwta`` backend fuses into one kernel like any quantized torch model;
    ``fused_linear=True`` emits one ``bwta::linear`` call instead (same results, bit for bit).

    ``quantizers``: ``"off"`` (default), ``"lenient"`` or ``"strict"``: recognise quantizers written
    in standard ONNX ops (``Clip(Round(Div(x, s)))`` chains, ``Sign``) and import them as ``bwta::``
    code ops; see :mod:`bwta_compiler.onnx.quantizers` for the patterns and what strict means.

    Raises :class:`~bwta_compiler.errors.OnnxImportError` for anything it cannot import.
    """
    from .converters import CONVERTERS

    proto, where, base_dir = _load(model)
    opset, domains = _opsets(proto, where)
    if proto.functions:
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as e:  # noqa: BLE001 - reported as OnnxImportError
            raise OnnxImportError(f"{where}: cannot inline the model's local functions: {e}") from None
    if quantizers != "off":
        from .quantizers import rewrite_quantizers
        proto, _ = rewrite_quantizers(proto, quantizers, where)
        opset, domains = _opsets(proto, where)
    _check_nodes(proto, where, domains, CONVERTERS)
    if schemas.DOMAIN in domains:
        schemas.register()
    types = _infer_types(proto)
    # Only a model this function parsed itself can hold external references (a ModelProto given
    # without a path fails on the first one before anything is changed), so loading in place is safe.
    _load_external(proto, where, base_dir)
    g = proto.graph
    ctx = Ctx(where, opset, types)
    ctx.fused_linear = fused_linear
    env: dict[str, Value] = ctx.env
    inits = {t.name for t in g.initializer}
    for t in g.initializer:
        try:
            value = tensor_from_proto(t)
        except OnnxImportError as e:
            raise OnnxImportError(f"{where}: initializer {t.name!r} {e}") from None
        except Exception as e:  # noqa: BLE001 - reported as OnnxImportError
            raise OnnxImportError(f"{where}: initializer {t.name!r} cannot be read: {type(e).__name__}: {e}") from None
        env[t.name] = Const(value)
    for vi in g.input:
        if vi.name in inits:
            continue
        ti = types.get(vi.name) or _type_info(vi) or TypeInfo(None, None)
        ph = ctx.graph.placeholder(_sanitize(vi.name, ctx._names))
        ph.meta.update(dtype=ti.dtype, rank=None if ti.dims is None else len(ti.dims), dims=ti.dims, onnx_name=vi.name)
        env[vi.name] = ph
    order = _topo_order(g, set(env), where)
    for i, n in order:
        _convert_node(ctx, env, n, i, CONVERTERS, where)
    outs = []
    for o in g.output:
        if o.name not in env:
            raise OnnxImportError(f"{where}: graph output {o.name!r} is not produced by any node")
        v = env[o.name]
        ctx.fold = False
        outs.append(ctx.tensor(v) if not isinstance(v, Const) else ctx.buffer(v.t, "out_" + o.name))
    ctx.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    gm = fx.GraphModule(ctx.root, ctx.graph, class_name="OnnxModule")
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in [b for b, _ in gm.named_buffers(recurse=False) if b not in used]:
        delattr(gm, name)
    gm.recompile()
    gm.onnx_input_names = [vi.name for vi in g.input if vi.name not in inits]
    gm.onnx_output_names = [o.name for o in g.output]
    gm.onnx_path = where
    gm.onnx_opset = opset
    if quantize is not None and quantize is not False:
        from ..quantize import QuantConfig
        from ..quantize import quantize as _quantize
        cfg = quantize if isinstance(quantize, QuantConfig) else None
        qgm = _quantize(gm, cfg)
        for k in ("onnx_input_names", "onnx_output_names", "onnx_path", "onnx_opset"):
            setattr(qgm, k, getattr(gm, k))
        return qgm
    return gm


def convert_subgraph(ctx: Ctx, graph: onnx.GraphProto) -> list[Value]:
    """Convert the nodes of a subgraph (an If branch) inline, in the scope of the graph being
    imported, and return its output values."""
    from .converters import CONVERTERS

    env = dict(ctx.env)      # outer-scope values are visible; the branch's own names stay local
    for t in graph.initializer:
        env[t.name] = Const(tensor_from_proto(t))
    outer, ctx.env = ctx.env, env
    try:
        for i, n in _topo_order(graph, set(env), ctx.path):
            _convert_node(ctx, env, n, i, CONVERTERS, ctx.path)
    finally:
        ctx.env = outer
    missing = [o.name for o in graph.output if o.name not in env]
    if missing:
        raise OnnxImportError(f"subgraph {graph.name!r}: output(s) {missing} not produced by any node")
    return [env[o.name] for o in graph.output]


def _convert_node(ctx: Ctx, env: dict, n: onnx.NodeProto, i: int, converters: dict, where: str) -> None:
    dom = "" if n.domain in DEFAULT_DOMAINS else n.domain
    conv = converters[(dom, n.op_type)]
    inputs = [env[x] if x else None for x in n.input]
    try:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    except Exception as e:  # noqa: BLE001 - reported as OnnxImportError
        raise OnnxImportError(f"{where}: node {_node_label(n, i)} ({n.op_type}): bad attribute: {e}") from None
    for k, v in list(attrs.items()):
        if isinstance(v, bytes):
            attrs[k] = v.decode()
        elif isinstance(v, onnx.TensorProto):
            attrs[k] = tensor_from_proto(v)
    ctx.node, ctx.fold = n, conv.fold
    try:
        out = conv.fn(ctx, inputs, attrs, n)
    except OnnxImportError as e:
        raise OnnxImportError(f"{where}: node {_node_label(n, i)} ({n.op_type}): {e}") from None
    except Exception as e:  # noqa: BLE001 - reported as OnnxImportError
        raise OnnxImportError(f"{where}: node {_node_label(n, i)} ({n.op_type}) cannot be converted: "
                              f"{type(e).__name__}: {e}") from None
    finally:
        ctx.fold = True
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    names = [o for o in n.output]
    for j, name in enumerate(names):
        if not name:
            continue
        if j >= len(outs):
            raise OnnxImportError(f"{where}: node {_node_label(n, i)} ({n.op_type}): output {j} ({name!r}) "
                                  f"is not supported")
        v = outs[j]
        if isinstance(v, fx.Node):
            ti = ctx.types.get(name)
            if ti is not None:
                if ti.dtype is not None:
                    v.meta["dtype"] = ti.dtype
                if ti.dims is not None:
                    v.meta["rank"], v.meta["dims"] = len(ti.dims), ti.dims
            first = next((x for x in inputs if x is not None), None)
            v.meta.setdefault("dtype", ctx.dtype(first))
            if "rank" not in v.meta or v.meta["rank"] is None:
                v.meta["rank"] = conv.rank(ctx, inputs, attrs) if conv.rank else None
            v.meta.setdefault("onnx_name", name)
        env[name] = v


__all__ = ["OPSET_MAX", "OPSET_MIN", "Const", "Ctx", "Sym", "convert_subgraph", "import_model", "operator"]
_ = (Sequence,)
