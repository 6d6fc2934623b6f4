"""ONNX files written the way other tools and people write them: older opsets (11..16), ops the
TorchScript exporter emits (CumSum, Conv, Pad), Gemm forms, and run-time shape inputs.  Each case
is checked against onnx.reference.ReferenceEvaluator (or a numpy reference where the evaluator
does not implement the old semantics) on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bwta_compiler.onnx import import_model

F32 = TensorProto.FLOAT
NP_TO_ONNX = {np.dtype("float32"): F32, np.dtype("float16"): TensorProto.FLOAT16, np.dtype("int64"): TensorProto.INT64,
              np.dtype("int32"): TensorProto.INT32, np.dtype("bool"): TensorProto.BOOL}
N = helper.make_node
rng = np.random.default_rng(7)


def f32(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def graph_model(nodes, feeds: dict, outputs: list, inits=(), opset: int = 18, shapes: dict | None = None):
    """A model of ``nodes`` with graph inputs ``feeds`` (name -> example array; ``shapes`` overrides
    a declared shape, None = unknown) and untyped outputs, as hand-written files often have."""
    shapes = shapes or {}
    ins = [helper.make_tensor_value_info(k, NP_TO_ONNX[v.dtype], shapes.get(k, list(v.shape))) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
    g = helper.make_graph(nodes, "sweep", ins, outs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run(model, feeds: dict) -> list:
    gm = import_model(model)
    with torch.no_grad():
        out = gm(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def check(model, feeds: dict, ref: list | None = None, atol: float = 1e-5) -> None:
    ref = ReferenceEvaluator(model).run(None, feeds) if ref is None else ref
    got = run(model, feeds)
    assert len(got) == len(ref)
    for o, r in zip(got, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, o.dtype, r.shape, r.dtype)
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=atol)


# ---- opsets 11..16 ------------------------------------------------------------------------------


def np_softmax_2d(x: np.ndarray, axis: int, log: bool) -> np.ndarray:
    """Softmax-1/11 semantics (ReferenceEvaluator applies opset 13's): coerce to 2-D at ``axis``."""
    y = x.reshape(int(np.prod(x.shape[: axis % x.ndim])), -1).astype(np.float64)
    y = y - y.max(1, keepdims=True)
    p = np.exp(y) / np.exp(y).sum(1, keepdims=True)
    return (np.log(p) if log else p).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_softmax_opset11_coerces_to_2d(op, axis):
    x = f32(2, 3, 4)
    attrs = {} if axis is None else {"axis": axis}
    m = graph_model([N(op, ["x"], ["y"], **attrs)], {"x": x}, ["y"], opset=11)
    check(m, {"x": x}, [np_softmax_2d(x, 1 if axis is None else axis, op == "LogSoftmax")])


def test_softmax_opset11_last_axis_is_the_plain_op():
    # The attention softmax of a legacy export: same semantics either way, so the graph keeps the
    # torch.softmax the backend's passes know.
    x = f32(2, 3, 4)
    m = graph_model([N("Softmax", ["x"], ["y"], axis=2)], {"x": x}, ["y"], opset=11)
    check(m, {"x": x})
    assert [n.target for n in import_model(m).graph.nodes if n.op == "call_function"] == [torch.softmax]


def test_softmax_opset13_is_one_axis():
    x = f32(2, 3, 4)
    check(graph_model([N("Softmax", ["x"], ["y"], axis=1)], {"x": x}, ["y"], opset=13), {"x": x})


def test_opset11_attribute_forms():
    """Split's ``split``, Squeeze/Unsqueeze's and ReduceSum's ``axes`` are attributes before opset 13."""
    x = f32(1, 3, 7)
    nodes = [N("Squeeze", ["x"], ["s"], axes=[0]),
             N("Split", ["s"], ["a", "b"], axis=1, split=[3, 4]),
             N("ReduceSum", ["b"], ["r"], axes=[-1], keepdims=1),
             N("Unsqueeze", ["r"], ["y"], axes=[0, -1]),
             N("Clip", ["a", "lo"], ["c"])]
    check(graph_model(nodes, {"x": x}, ["y", "c"], [const("lo", np.float32(-0.2))], opset=11), {"x": x})


def test_unsqueeze_attribute_axes_without_shape_info():
    # No shape information: the output rank comes from the converter's rank rule, which read a
    # second input that opset 11 does not have.
    x = f32(2, 3)
    g = helper.make_graph([N("Unsqueeze", ["x"], ["u"], axes=[0]), N("Transpose", ["u"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", F32, None)], [helper.make_tensor_value_info("y", F32, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)
    del m.graph.value_info[:]
    check(m, {"x": x})


# ---- ops -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, -1])
def test_cumsum(exclusive, reverse, axis):
    x = f32(3, 5)
    m = graph_model([N("CumSum", ["x", "ax"], ["y"], exclusive=exclusive, reverse=reverse)], {"x": x}, ["y"],
                    [const("ax", np.array(axis))])
    check(m, {"x": x})


def test_cumsum_int32_keeps_its_type():
    # RoBERTa/OPT position ids: CumSum of an int32 mask (torch's cumsum would return int64).
    x = (rng.random((2, 6)) > 0.3).astype(np.int32)
    m = graph_model([N("CumSum", ["x", "ax"], ["y"])], {"x": x}, ["y"], [const("ax", np.array(1, np.int32))])
    check(m, {"x": x})


def test_pow_keeps_the_base_type():
    x = np.array([[1, 2, 3]], np.int64)
    check(graph_model([N("Pow", ["x", "e"], ["y"])], {"x": x}, ["y"], [const("e", np.float32(2.0))]), {"x": x})
    h = (np.abs(f32(2, 3)) + 0.5).astype(np.float16)
    m = graph_model([N("Pow", ["h", "e"], ["y"])], {"h": h}, ["y"], [const("e", np.array([2.0, 0.5, 1.0], np.float32))])
    check(m, {"h": h}, atol=1e-2)


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"])
@pytest.mark.parametrize("opset", [13, 18])
def test_norm_reductions(op, opset):
    x = np.abs(f32(2, 3, 4)) + 0.1
    if opset < 18:
        m = graph_model([N(op, ["x"], ["y"], axes=[1], keepdims=0)], {"x": x}, ["y"], opset=opset)
    else:
        m = graph_model([N(op, ["x", "ax"], ["y"], keepdims=1)], {"x": x}, ["y"], [const("ax", np.array([-1]))])
    check(m, {"x": x})


def test_slice_runtime_starts_without_axes_or_steps():
    x = f32(5, 6)
    feeds = {"x": x, "st": np.array([1, -4]), "en": np.array([4, np.iinfo(np.int64).max])}
    check(graph_model([N("Slice", ["x", "st", "en"], ["y"])], feeds, ["y"]), feeds)


# ---- Gemm ----------------------------------------------------------------------------------------


GEMM_CASES = [((), 1, 1.0, 1.0), ((1,), 0, 0.5, 2.0), ((1, 5), 1, 1.0, -1.0), ((5,), 1, -0.25, 1.0), (None, 0, 2.0, 1.0)]


@pytest.mark.parametrize("c_shape,trans_b,alpha,beta", GEMM_CASES)
def test_gemm_constant_weight_is_a_linear_layer(c_shape, trans_b, alpha, beta):
    """Every Gemm with a constant weight and a row-broadcast C imports as nn.Linear (alpha in the
    weight, beta in the bias), so quantize=True sees it; the float result equals the reference."""
    x = f32(3, 4)
    w = f32(5, 4) if trans_b else f32(4, 5)
    inits = [const("w", w)] + ([const("c", f32(*c_shape))] if c_shape is not None else [])
    ins = ["x", "w"] + (["c"] if c_shape is not None else [])
    m = graph_model([N("Gemm", ins, ["y"], transB=trans_b, alpha=alpha, beta=beta)], {"x": x}, ["y"], inits)
    check(m, {"x": x})
    gm = import_model(m)
    assert sum(isinstance(mod, torch.nn.Linear) for mod in gm.modules()) == 1


def test_gemm_full_c_stays_a_matmul():
    x = f32(3, 4)
    m = graph_model([N("Gemm", ["x", "w", "c"], ["y"], transA=0, alpha=0.5, beta=2.0)], {"x": x}, ["y"],
                    [const("w", f32(4, 5)), const("c", f32(3, 5))])
    check(m, {"x": x})


def test_gemm_trans_a_with_constant_weight():
    x = f32(4, 3)
    m = graph_model([N("Gemm", ["x", "w", "c"], ["y"], transA=1, transB=1)], {"x": x}, ["y"],
                    [const("w", f32(5, 4)), const("c", f32(5))])
    check(m, {"x": x})


# ---- Conv / Pad (ViT patch embeddings, CNN front ends) ---------------------------------------


CONV_CASES = [
    (2, {"strides": [8, 8]}),                                   # ViT patch embedding
    (2, {"pads": [0, 1, 1, 2], "strides": [2, 1]}),             # asymmetric pads
    (2, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (2, {"auto_pad": "SAME_LOWER", "dilations": [2, 1]}),
    (1, {"group": 2, "pads": [1, 1]}),
    (3, {"auto_pad": "VALID"}),
]


@pytest.mark.parametrize("nd,attrs", CONV_CASES, ids=[f"{c[0]}d-{'-'.join(c[1])}" for c in CONV_CASES])
def test_conv(nd, attrs):
    x = f32(2, 4, *[16, 9, 6][:nd])
    k = [8, 8] if attrs.get("strides") == [8, 8] else [3] * nd
    w = f32(6, 4 // attrs.get("group", 1), *k)
    m = graph_model([N("Conv", ["x", "w", "b"], ["y"], **attrs)], {"x": x}, ["y"], [const("w", w), const("b", f32(6))])
    check(m, {"x": x}, atol=1e-4)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_any_axis(mode):
    # ONNX pads any axis; torch's reflect/replicate/circular only the last 1..3 of a batched input.
    x = f32(2, 3, 5, 4)
    pads = [0, 0, 1, 2, 0, 0, 2, 1] if mode != "constant" else [1, 0, 0, 2, 0, 1, 1, 0]
    m = graph_model([N("Pad", ["x", "p", "v"], ["y"], mode=mode)], {"x": x}, ["y"],
                    [const("p", np.array(pads)), const("v", np.float32(1.5))], opset=19)
    check(m, {"x": x})
    # one middle axis only: the case torch's F.pad rejects for non-constant modes
    m = graph_model([N("Pad", ["x", "p"], ["y"], mode=mode)], {"x": x}, ["y"],
                    [const("p", np.array([0, 0, 0, 1, 0, 0, 0, 0]))], opset=19)
    check(m, {"x": x})


def test_pad_opset11_and_axes_input():
    x = f32(2, 3, 4)
    check(graph_model([N("Pad", ["x", "p"], ["y"])], {"x": x}, ["y"], [const("p", np.array([0, 1, 0, 0, 2, 1]))],
                      opset=11), {"x": x})
    check(graph_model([N("Pad", ["x", "p", "", "ax"], ["y"])], {"x": x}, ["y"],
                      [const("p", np.array([1, 2, 0, 1])), const("ax", np.array([-1, 0]))], opset=18), {"x": x})


# ---- quantize on import --------------------------------------------------------------------------


def test_matmul_without_shape_info_is_quantized_and_counted():
    """A model whose input has no shape (hand-written or stripped files): its constant-weight MatMuls
    are still linear layers, so quantize=True quantizes them and the report counts them (it said
    "0 of 0" and left them float)."""
    import bwta_compiler as bc

    g = helper.make_graph([N("MatMul", ["x", "w"], ["h"]), N("Relu", ["h"], ["h2"]), N("MatMul", ["h2", "w2"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", F32, None)],
                          [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
                          [const("w", f32(16, 32)), const("w2", f32(32, 8))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    x = f32(2, 3, 16)
    check(m, {"x": x})
    check(m, {"x": f32(16)})          # 1-D A: matmul and linear agree
    gm = import_model(m, quantize=True)
    assert sum(isinstance(mod, bc.BWTALinear) for mod in gm.modules()) == 2
    assert bc.report_lines(gm)[0].startswith("2 of 2")


# ---- If ------------------------------------------------------------------------------------------


def _if_model(cond_nodes: list, cond_inits: list, feeds: dict, then_op: str = "Add") -> onnx.ModelProto:
    then_g = helper.make_graph([N(then_op, ["x", "one"], ["t"]), N("MatMul", ["t", "w"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", F32, None)], [const("one", np.float32(1))])
    else_g = helper.make_graph([N("Sub", ["x", "two"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", F32, None)], [const("two", np.float32(2))])
    nodes = cond_nodes + [N("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    return graph_model(nodes, feeds, ["y"], cond_inits + [const("w", f32(3, 3))])


@pytest.mark.parametrize("flag", [True, False])
def test_if_with_constant_condition_is_inlined(flag):
    x = f32(2, 3)
    check(_if_model([], [const("c", np.array(flag))], {"x": x}), {"x": x})


def test_if_on_static_shape_arithmetic():
    # Exporters write `if x.size(0) == 2` as Shape -> Gather -> Equal -> If.
    x = f32(2, 3)
    cond = [N("Shape", ["x"], ["s"]), N("Gather", ["s", "i0"], ["b"], axis=0), N("Equal", ["b", "k"], ["c"])]
    m = _if_model(cond, [const("i0", np.array(0)), const("k", np.array(2))], {"x": x})
    check(m, {"x": x})
    gm = import_model(m)
    assert sum(isinstance(mod, torch.nn.Linear) for mod in gm.modules()) == 1      # the branch's MatMul


def test_if_errors_name_the_node():
    x = f32(2, 3)
    m = _if_model([], [], {"x": x, "c": np.array(True)})
    with pytest.raises(Exception, match=r"node #0 .*\(If\): If with a condition computed at run time"):
        import_model(m)
    m = _if_model([], [const("c", np.array(True))], {"x": x}, then_op="BitShift")
    with pytest.raises(Exception, match=r"unsupported op type.*BitShift"):
        import_model(m)


# ---- commonly exported ops that had no converter ---------------------------------------------


UNARY_CASES = [("Tan", {}), ("Atan", {}), ("Sinh", {}), ("Cosh", {}), ("Softsign", {}), ("Mish", {}), ("HardSwish", {}),
               ("Elu", {"alpha": 0.5}), ("Selu", {}), ("Celu", {"alpha": 2.0}), ("ThresholdedRelu", {"alpha": 0.3}),
               ("ArgMax", {"axis": -1, "keepdims": 0}), ("ArgMin", {"axis": 1, "select_last_index": 1})]


@pytest.mark.parametrize("op,attrs", UNARY_CASES, ids=[c[0] for c in UNARY_CASES])
def test_unary_ops(op, attrs):
    x = f32(2, 3, 4)
    check(graph_model([N(op, ["x"], ["y"], **attrs)], {"x": x}, ["y"]), {"x": x})


def test_argmax_ties_and_elementwise_ops():
    ties = np.array([[1, 2, 2, 0], [3, 3, 1, 3]], np.float32)
    for last in (0, 1):
        check(graph_model([N("ArgMax", ["x"], ["y"], axis=1, select_last_index=last)], {"x": ties}, ["y"]), {"x": ties})
    x = f32(2, 3, 4)
    check(graph_model([N("PRelu", ["x", "s"], ["y"])], {"x": x}, ["y"], [const("s", f32(3, 1))]), {"x": x})
    inf = np.array([np.inf, -np.inf, 1.0, np.nan], np.float32)
    check(graph_model([N("IsInf", ["x"], ["y"], detect_positive=0)], {"x": inf}, ["y"]), {"x": inf})
    a, b = np.array([5, -5, 7, -7], np.int64), np.array([3, 3, -2, -2], np.int64)
    check(graph_model([N("Mod", ["a", "b"], ["y"])], {"a": a, "b": b}, ["y"]), {"a": a, "b": b})
    feeds = {"a": x, "b": f32(4), "c": f32(3, 1)}
    check(graph_model([N("Mean", ["a", "b", "c"], ["y"])], feeds, ["y"]), feeds)


def test_normalizations():
    x = f32(2, 6, 5, 4)
    stats = [const("s", f32(6)), const("b", f32(6)), const("m", f32(6)), const("v", np.abs(f32(6)) + 0.1)]
    check(graph_model([N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)], {"x": x}, ["y"],
                      stats, opset=15), {"x": x})
    check(graph_model([N("InstanceNormalization", ["x", "s", "b"], ["y"])], {"x": x}, ["y"], stats[:2]), {"x": x},
          atol=1e-4)
    for opset, n in ((18, 3), (21, 6)):   # opset 18: scale/bias per group; 21: per channel
        m = graph_model([N("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3)], {"x": x}, ["y"],
                        [const("s", f32(n)), const("b", f32(n))], opset=opset)
        check(m, {"x": x}, atol=1e-4)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter(reduction):
    idx = np.array([[0, 1], [2, -1], [0, 1]]) if reduction != "none" else np.array([[0, 1], [2, -1], [3, 0]])
    feeds = {"d": f32(4, 5, 3), "i": idx, "u": f32(3, 3)}
    check(graph_model([N("ScatterND", ["d", "i", "u"], ["y"], reduction=reduction)], feeds, ["y"]), feeds)
    feeds = {"d": f32(3, 3), "i": np.array([[1, 0, 2], [0, -1, 1]]), "u": f32(2, 3)}
    check(graph_model([N("ScatterElements", ["d", "i", "u"], ["y"], axis=0, reduction=reduction)], feeds, ["y"]), feeds)


def test_topk():
    x = f32(2, 3, 4)
    check(graph_model([N("TopK", ["x", "k"], ["v", "i"], axis=1, largest=0)], {"x": x}, ["v", "i"],
                      [const("k", np.array([2]))]), {"x": x})
    feeds = {"x": x, "k": np.array([3])}
    check(graph_model([N("TopK", ["x", "k"], ["v", "i"])], feeds, ["v", "i"]), feeds)


@pytest.mark.parametrize("zero_type", [np.uint8, np.int8, None])
def test_quantize_dequantize_linear(zero_type):
    """QDQ files (onnxruntime's quantization tools): per-tensor and per-axis, with and without zero point."""
    x = f32(2, 3, 4) * 3
    ins = ["x", "s", "z"] if zero_type else ["x", "s"]
    for axis_scale, axis in ((np.float32(0.05), {}), (np.array([0.01, 0.02, 0.05], np.float32), {"axis": 1})):
        zero = np.full(np.shape(axis_scale), 3 if zero_type == np.uint8 else -2, zero_type) if zero_type else None
        inits = [const("s", axis_scale)] + ([const("z", zero)] if zero_type else [])
        nodes = [N("QuantizeLinear", ins, ["q"], **axis), N("DequantizeLinear", ["q"] + ins[1:], ["y"], **axis)]
        check(graph_model(nodes, {"x": x}, ["y", "q"], inits, opset=19), {"x": x})


def test_dequantized_int8_weight_is_a_linear_layer():
    import bwta_compiler as bc

    x = f32(2, 3, 4)
    nodes = [N("DequantizeLinear", ["wq", "ws"], ["w"], axis=1), N("MatMul", ["x", "w"], ["y"])]
    m = graph_model(nodes, {"x": x}, ["y"], [const("wq", rng.integers(-127, 127, (4, 5)).astype(np.int8)),
                                             const("ws", np.abs(f32(5)) / 100)], opset=19)
    check(m, {"x": x})
    assert sum(isinstance(mod, bc.BWTALinear) for mod in import_model(m, quantize=True).modules()) == 1


EINSUM_CASES = [("bsd,dh->bsh", (2, 3, 4), (4, 5), True), ("bsd,hd->bsh", (2, 3, 4), (5, 4), True),
                ("...d,dh->...h", (2, 3, 4), (4, 5), True), ("bsd,dh->bhs", (2, 3, 4), (4, 5), False),
                ("bsd,sd->bs", (2, 3, 4), (3, 4), False), ("bd,dd->bd", (2, 4), (4, 4), False)]


@pytest.mark.parametrize("equation,x_shape,w_shape,linear", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum_projection_is_a_linear_layer(equation, x_shape, w_shape, linear):
    """TF/JAX-style Einsum projections with a constant weight import as nn.Linear (quantize=True
    saw and counted none of them); other equations stay einsum."""
    x = f32(*x_shape)
    m = graph_model([N("Einsum", ["x", "w"], ["y"], equation=equation)], {"x": x}, ["y"], [const("w", f32(*w_shape))])
    check(m, {"x": x})
    assert sum(isinstance(mod, torch.nn.Linear) for mod in import_model(m).modules()) == int(linear)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "Mean"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_reductions_keep_their_type(op, dtype):
    # torch sums int32 into int64 and has no integer mean; ONNX keeps the type (mean truncated).
    x = rng.integers(-5, 6, (2, 3, 4)).astype(dtype)
    if op == "Mean":
        m = graph_model([N("Mean", ["x", "x2"], ["y"])], {"x": x, "x2": x[::-1].copy()}, ["y"])
        check(m, {"x": x, "x2": x[::-1].copy()})
        return
    m = graph_model([N(op, ["x", "a"], ["y"], keepdims=0)], {"x": x}, ["y"], [const("a", np.array([1]))])
    check(m, {"x": x})


# ---- no shape information ------------------------------------------------------------------------


def test_shape_start_end_of_an_input_without_shape():
    """Dynamo exports read sizes with Shape(start, end); with the input's shape stripped, the rank is
    unknown at import and start/end were ignored (the whole shape came back: wrong Slice/Range
    bounds downstream)."""
    x = f32(2, 5, 3)
    nodes = [N("Shape", ["x"], ["s1"], start=1, end=2), N("Shape", ["x"], ["s2"], start=-2),
             N("Shape", ["x"], ["s3"]), N("Slice", ["pos", "zero", "s1"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, None)],
                          [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in ("y", "s2", "s3")],
                          [const("pos", np.arange(10)), const("zero", np.array([0]))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    check(m, {"x": x})


@pytest.mark.parametrize("axis", [-1, -3, 0, 3])
def test_flatten_negative_axis(axis):
    # Flatten's axis -1 is "before the last dim" ([6, 4] for [2, 3, 4]); it flattened to [24, 1].
    x = f32(2, 3, 4)
    check(graph_model([N("Flatten", ["x"], ["y"], axis=axis)], {"x": x}, ["y"]), {"x": x})


def test_size_is_a_tensor():
    # Size of a run-time value returned torch.numel's Python int, not a 0-d int64 tensor.
    x = f32(2, 3, 4)
    check(graph_model([N("Size", ["x"], ["n"]), N("Mul", ["n", "two"], ["y"])], {"x": x}, ["n", "y"],
                      [const("two", np.array(2))]), {"x": x})


RUNTIME_INT_CASES = [("Trilu", {"k": np.array(1)}), ("Unsqueeze", {"a": np.array([0, -1])}),
                     ("Squeeze", {"a": np.array([1])}), ("CumSum", {"a": np.array(1)})]


@pytest.mark.parametrize("op,extra", RUNTIME_INT_CASES, ids=[c[0] for c in RUNTIME_INT_CASES])
def test_int_operands_given_at_run_time(op, extra):
    # An axis or k fed as a graph input is read at run time (the converters indexed an FX node).
    x = f32(4, 1, 5) if op == "Squeeze" else f32(4, 5)
    feeds = {"x": x, **extra}
    check(graph_model([N(op, ["x", *extra], ["y"])], feeds, ["y"]), feeds)


@pytest.mark.parametrize("command", ["compile", "bench"])
def test_cli_input_without_shape_is_one_error_line(tmp_path, capsys, command):
    """``bwta compile`` on a file whose input has no shape: it generated a 0-d example input and
    failed with a traceback inside the compiled graph; now one ``bwta:`` line names the input."""
    from bwta_compiler.cli import main

    g = helper.make_graph([N("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", F32, None)],
                          [helper.make_tensor_value_info("y", F32, None)], [const("w", f32(4, 3))])
    path = tmp_path / "noshape.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), path)
    rc = main([command, str(path), "--target", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bwta: ") and "'x' has no shape" in last and str(path) in last


POOL_CASES = [("MaxPool", 2, {"strides": [2, 2]}), ("MaxPool", 2, {"pads": [0, 0, 1, 1], "strides": [2, 2]}),
              ("MaxPool", 2, {"auto_pad": "SAME_UPPER", "ceil_mode": 1, "strides": [2, 2]}),
              ("MaxPool", 2, {"dilations": [2, 1], "pads": [1, 1, 1, 1]}),
              ("AveragePool", 1, {"pads": [1, 1]}), ("AveragePool", 2, {"pads": [0, 1, 1, 0], "count_include_pad": 1}),
              ("AveragePool", 2, {"pads": [0, 1, 1, 0]}), ("AveragePool", 3, {"ceil_mode": 1, "strides": [2, 2, 2]}),
              ("AveragePool", 2, {"auto_pad": "SAME_LOWER"})]


@pytest.mark.parametrize("op,nd,attrs", POOL_CASES, ids=[f"{c[0]}{c[1]}d-{'-'.join(c[2])}" for c in POOL_CASES])
def test_pooling(op, nd, attrs):
    x = f32(2, 3, *[9, 8, 7][:nd])
    check(graph_model([N(op, ["x"], ["y"], kernel_shape=[3] * nd, **attrs)], {"x": x}, ["y"], opset=19), {"x": x})


def test_global_pooling():
    x = f32(2, 3, 5, 4)
    check(graph_model([N("GlobalAveragePool", ["x"], ["a"]), N("GlobalMaxPool", ["x"], ["m"])], {"x": x}, ["a", "m"]),
          {"x": x})
