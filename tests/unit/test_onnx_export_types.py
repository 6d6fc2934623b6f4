"""Every value an ``ai.bwta`` op produces in an exported model carries its element type (and its
shape, with the export's dynamic dims kept symbolic), so the default ``onnx.checker`` run of
``export`` passes on models whose graph output comes straight from an ``ai.bwta.Linear``.  Before
the schemas had inference functions, the exporter's onnxscript optimizer reset the type of every
``ai.bwta.Linear`` output (bound by the ``out_dtype`` attribute, which nothing inferred) to none."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bwta_compiler as bc
from bwta_compiler.modules import BWTALinear
from bwta_compiler.onnx import bwta_op_counts, export, import_model, schemas

ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}

# Models whose graph output comes straight from a BWTA linear: (factory, in_features, out_features).
MLPS = {
    "linear-relu-linear": (lambda: nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)), 32, 16),
    # bc.quantize leaves a bare nn.Linear root as it is, so the single layer sits in a Sequential...
    "single-linear": (lambda: nn.Sequential(nn.Linear(33, 5)), 33, 5),
    # ...and a BWTALinear root (with a bool activation: the Linear node's optional B input) is built directly.
    "bare-bwta-linear-bool": (lambda: BWTALinear.from_linear(nn.Linear(33, 5), act="bool"), 33, 5),
    "odd-sizes": (lambda: nn.Sequential(nn.Linear(33, 47), nn.GELU(), nn.Linear(47, 19), nn.ReLU(),
                                        nn.Linear(19, 5)), 33, 5),
}


def quantized(name: str, dtype: torch.dtype = torch.float32, shape: tuple = (4,)):
    """The quantized model, calibrated with one eager call (LSQ init), and its example input."""
    make, k, _ = MLPS[name]
    torch.manual_seed(0)
    m = make().eval()
    q = (m if isinstance(m, BWTALinear) else bc.quantize(m)).to(dtype).eval()
    x = torch.randn(*shape, k).to(dtype)
    with torch.no_grad():
        q(x)
    return q, x


def dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in vi.type.tensor_type.shape.dim]


def assert_bwta_values_typed(proto: onnx.ModelProto, dtype: torch.dtype) -> None:
    """Every output of every ai.bwta node is declared (graph output or value_info) with a tensor
    type: a Linear's with the model's dtype, a code op's with its input's, BinaryCode's Alpha fp32."""
    declared = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)}
    n_checked = 0
    for node in proto.graph.node:
        if node.domain != schemas.DOMAIN:
            continue
        for i, name in enumerate(node.output):
            if not name:
                continue
            assert name in declared, f"{node.op_type} output {name!r} not declared"
            vi = declared[name]
            assert vi.type.HasField("tensor_type"), f"{node.op_type} output {name!r} has no type"
            want = TensorProto.FLOAT if (node.op_type == "BinaryCode" and i == 1) else ONNX_DTYPE[dtype]
            assert vi.type.tensor_type.elem_type == want, (node.op_type, name)
            assert vi.type.tensor_type.HasField("shape"), (node.op_type, name)
            n_checked += 1
    assert n_checked > 0


def check_and_roundtrip(path, q, dtype, batch_shapes, k) -> onnx.ModelProto:
    proto = onnx.load(str(path))
    schemas.register()
    onnx.checker.check_model(proto, full_check=True)      # strict shape inference as well
    for o in proto.graph.output:
        assert o.type.tensor_type.elem_type == ONNX_DTYPE[dtype]
    assert_bwta_values_typed(proto, dtype)
    gm = import_model(path)
    g = torch.Generator().manual_seed(123)
    for shape in batch_shapes:
        x = torch.randn(*shape, k, generator=g).to(dtype)
        with torch.no_grad():
            expected, got = q(x), gm(x)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
    return proto


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(MLPS))
def test_mlp_ending_in_bwta_linear_exports_typed(tmp_path, name, dtype):
    q, x = quantized(name, dtype)
    path = tmp_path / f"{name}.onnx"
    proto = export(q, (x,), path)                  # check=True (the default) runs onnx.checker
    assert bwta_op_counts(proto)["Linear"] == sum(isinstance(m, (nn.Linear, BWTALinear)) for m in q.modules())
    (out,) = proto.graph.output
    producer = next(n for n in proto.graph.node if out.name in n.output)
    assert (producer.domain, producer.op_type) == (schemas.DOMAIN, "Linear")
    d = dims(out)
    assert isinstance(d[0], str) and d[0] and d[1] == MLPS[name][2]    # dynamic batch kept symbolic
    check_and_roundtrip(path, q, dtype, [(5,), (3,)], MLPS[name][1])


def test_3d_input_keeps_both_dynamic_dims_symbolic(tmp_path):
    q, x = quantized("single-linear", shape=(2, 6))
    path = tmp_path / "seq.onnx"
    proto = export(q, (x,), path)
    (out,) = proto.graph.output
    d = dims(out)
    assert len(d) == 3 and all(isinstance(v, str) and v for v in d[:2]) and d[2] == 5
    assert d[:2] == dims(proto.graph.input[0])[:2]
    check_and_roundtrip(path, q, torch.float32, [(3, 4), (1, 7)], 33)


def test_static_export_has_static_output_shape(tmp_path):
    q, x = quantized("linear-relu-linear")
    path = tmp_path / "static.onnx"
    proto = export(q, (x,), path, dynamic_shapes=None)
    assert [dims(o) for o in proto.graph.output] == [[4, 16]]
    inner = {v.name: dims(v) for v in proto.graph.value_info}
    first = next(n for n in proto.graph.node if n.op_type == "Linear")
    assert inner[first.output[0]] == [4, 48]
    check_and_roundtrip(path, q, torch.float32, [(4,)], 32)


def test_unpacked_export_types_binary_code_outputs(tmp_path):
    q, x = quantized("odd-sizes")
    path = tmp_path / "unpacked.onnx"
    proto = export(q, (x,), path, packed=False)
    assert bwta_op_counts(proto).get("BinaryCode") == 3
    proto = onnx.load(str(path))
    schemas.register()
    onnx.checker.check_model(proto, full_check=True)
    assert_bwta_values_typed(proto, torch.float32)
    gm = import_model(path)
    x2 = torch.randn(6, 33, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = q(x2), gm(x2)
    # The unpacked form computes the linear as a float matmul of the codes (the e2e tests' tolerance).
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_bf16_export_is_typed_and_imports_back(tmp_path):
    q, x = quantized("odd-sizes", torch.bfloat16)
    path = tmp_path / "bf16.onnx"
    proto = export(q, (x,), path)
    assert all(a.i == TensorProto.BFLOAT16 for n in proto.graph.node if n.op_type == "Linear"
               for a in n.attribute if a.name == "out_dtype")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [TensorProto.BFLOAT16]
    assert_bwta_values_typed(proto, torch.bfloat16)
    # bf16 initializers import as torch bf16 (numpy has none): the model runs as the torch one.
    gm = import_model(path)
    x2 = torch.randn(5, 33, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(gm(x2), q(x2))


# ---- the schemas' inference on hand-built models (no torch export) -------------------------------


def _inferred(nodes, inputs, outputs, inits):
    schemas.register()
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(schemas.DOMAIN, 1)],
                          ir_version=10)
    out = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    return {v.name: (v.type.tensor_type.elem_type, dims(v))
            for v in list(out.graph.value_info) + list(out.graph.output)}


@pytest.mark.parametrize("out_dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_linear_inference_uses_out_dtype_and_weight_rows(out_dtype):
    k, n = 70, 5
    wp = np.zeros((n, 4), np.int32)               # K = 70 padded to 128 bits: 4 int32 words per row
    lin = helper.make_node("Linear", ["x", "s", "", "wp", "scale", "bias"], ["y"], domain=schemas.DOMAIN,
                           act="ternary", k=k, out_dtype=out_dtype)
    relu = helper.make_node("Relu", ["y"], ["z"])
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(wp, "wp"),
             numpy_helper.from_array(np.ones(n, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(n, np.float32), "bias")]
    types = _inferred([lin, relu], [helper.make_tensor_value_info("x", out_dtype, ["batch", "seq", k])],
                      [helper.make_tensor_value_info("z", out_dtype, None)], inits)
    assert types["y"] == (out_dtype, ["batch", "seq", n])
    assert types["z"] == (out_dtype, ["batch", "seq", n])


def test_linear_inference_without_known_weight_shape_leaves_that_dim_unknown():
    lin = helper.make_node("Linear", ["x", "s", "", "wp", "scale"], ["y"], domain=schemas.DOMAIN,
                           act="ternary", k=8)
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]),
           helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
           helper.make_tensor_value_info("wp", TensorProto.INT32, None),
           helper.make_tensor_value_info("scale", TensorProto.FLOAT, [3])]
    types = _inferred([lin], ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
    elem, (b, n) = types["y"]
    assert elem == TensorProto.FLOAT and b == "b"
    assert not isinstance(n, int) and n != "b"    # unknown (onnx may name it unk__N), never a guess


def test_code_ops_inference():
    nodes = [helper.make_node("TernaryCode", ["x", "s"], ["t"], domain=schemas.DOMAIN),
             helper.make_node("BoolCode", ["x", "s", "s"], ["bc"], domain=schemas.DOMAIN, levels=3),
             helper.make_node("SignCode", ["x", "s"], ["sc"], domain=schemas.DOMAIN),
             helper.make_node("BinaryCode", ["w"], ["codes", "alpha"], domain=schemas.DOMAIN)]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 4, 9]),
           helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
           helper.make_tensor_value_info("w", TensorProto.BFLOAT16, [6, 33])]
    outs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("t", "bc", "sc", "codes", "alpha")]
    types = _inferred(nodes, ins, outs, [])
    for name in ("t", "bc", "sc"):
        assert types[name] == (TensorProto.FLOAT16, ["b", 4, 9])
    assert types["codes"] == (TensorProto.BFLOAT16, [6, 33])
    assert types["alpha"] == (TensorProto.FLOAT, [6])


def test_bad_out_dtype_does_not_break_non_strict_inference():
    # A Python exception in an inference function escapes onnx's non-strict mode (the importer's),
    # so an out_dtype that is not a float type leaves Y untyped instead of raising.
    schemas.register()
    lin = helper.make_node("Linear", ["x", "s", "", "wp", "scale"], ["y"], domain=schemas.DOMAIN,
                           act="ternary", k=8, out_dtype=TensorProto.INT32)
    relu = helper.make_node("Relu", ["x"], ["r"])
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]),
           helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
           helper.make_tensor_value_info("wp", TensorProto.INT32, [3, 2]),
           helper.make_tensor_value_info("scale", TensorProto.FLOAT, [3])]
    g = helper.make_graph([lin, relu], "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                                                  helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(schemas.DOMAIN, 1)],
                          ir_version=10)
    out = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    assert {v.name: dims(v) for v in out.graph.output}["r"] == ["b", 8]
