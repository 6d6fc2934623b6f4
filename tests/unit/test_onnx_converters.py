"""Each converter against onnx.reference.ReferenceEvaluator on models built with onnx.helper."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bwta_compiler.onnx import import_model
from bwta_compiler.onnx.converters import CONVERTERS, register

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
NP_TO_ONNX = {np.dtype("float32"): F32, np.dtype("int64"): I64, np.dtype("bool"): TensorProto.BOOL,
              np.dtype("int32"): TensorProto.INT32}


def make_model(op, inputs, attrs=None, consts=None, n_out=1, opset=18, dyn=None):
    """One-node model: ``inputs`` are feeds (name -> array), ``consts`` initializers (name -> array or
    None for an omitted optional input); input order is the dict order of consts merged after feeds
    unless ``order`` is given."""
    consts = consts or {}
    attrs = dict(attrs or {})
    names = attrs.pop("_order", None) or list(inputs) + list(consts)
    node = helper.make_node(op, [n if (n in inputs or consts.get(n) is not None) else "" for n in names],
                            [f"y{i}" for i in range(n_out)], **attrs)
    graph_inputs = []
    for n, a in inputs.items():
        shape = list(a.shape) if dyn is None else [dyn.get((n, i), d) for i, d in enumerate(a.shape)]
        graph_inputs.append(helper.make_tensor_value_info(n, NP_TO_ONNX[a.dtype], shape))
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items() if a is not None]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.UNDEFINED, None) for i in range(n_out)]
    g = helper.make_graph([node], "t", graph_inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def check(model, feeds, atol=1e-6):
    ref = ReferenceEvaluator(model).run(None, feeds)
    gm = import_model(model)
    with torch.no_grad():
        out = gm(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
    out = list(out) if isinstance(out, tuple) else [out]
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        o = o.numpy()
        assert o.shape == r.shape, (o.shape, r.shape)
        assert o.dtype == r.dtype, (o.dtype, r.dtype)
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=atol)
    return gm


rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# (id, op, feeds, consts, attrs, n_out, opset)
CASES = [
    ("add_bcast", "Add", {"a": f32(2, 3, 4), "b": f32(4)}, {}, {}, 1, 18),
    ("add_bcast_left", "Add", {"a": f32(1, 4), "b": f32(3, 1)}, {}, {}, 1, 17),
    ("sub_const", "Sub", {"a": f32(2, 3)}, {"b": f32(1, 3)}, {}, 1, 18),
    ("mul_scalar", "Mul", {"a": f32(2, 3)}, {"b": np.float32(2.5)}, {}, 1, 18),
    ("div", "Div", {"a": f32(2, 3), "b": f32(2, 3) + 3}, {}, {}, 1, 18),
    ("div_int_trunc", "Div", {"a": np.array([7, -7, 9], np.int64)}, {"b": np.array([2, 2, -4], np.int64)}, {}, 1, 18),
    ("pow_bcast", "Pow", {"a": np.abs(f32(2, 3)) + 0.1}, {"b": np.array([2.0, 0.5, 3.0], np.float32)}, {}, 1, 18),
    ("sqrt", "Sqrt", {"a": np.abs(f32(3, 4))}, {}, {}, 1, 18),
    ("reciprocal", "Reciprocal", {"a": f32(3) + 5}, {}, {}, 1, 18),
    ("neg", "Neg", {"a": f32(3, 1)}, {}, {}, 1, 18),
    ("erf", "Erf", {"a": f32(5)}, {}, {}, 1, 17),
    ("tanh", "Tanh", {"a": f32(5)}, {}, {}, 1, 18),
    ("sigmoid", "Sigmoid", {"a": f32(5)}, {}, {}, 1, 18),
    ("relu", "Relu", {"a": f32(5)}, {}, {}, 1, 18),
    ("gelu", "Gelu", {"a": f32(2, 5)}, {}, {}, 1, 20),
    ("gelu_tanh", "Gelu", {"a": f32(2, 5)}, {}, {"approximate": "tanh"}, 1, 20),
    ("softmax_neg_axis", "Softmax", {"a": f32(2, 3, 4)}, {}, {"axis": -2}, 1, 18),
    ("softmax_default", "Softmax", {"a": f32(2, 3, 4)}, {}, {}, 1, 17),
    ("matmul_3d_2d", "MatMul", {"a": f32(2, 3, 4), "b": f32(4, 5)}, {}, {}, 1, 18),
    ("matmul_bcast_batch", "MatMul", {"a": f32(2, 1, 3, 4), "b": f32(3, 4, 2)}, {}, {}, 1, 18),
    ("matmul_1d", "MatMul", {"a": f32(4), "b": f32(4, 3)}, {}, {}, 1, 18),
    ("matmul_const_weight", "MatMul", {"a": f32(2, 3, 4)}, {"b": f32(4, 5)}, {}, 1, 18),
    ("gemm_transb_bias", "Gemm", {"a": f32(3, 4)}, {"b": f32(5, 4), "c": f32(5)}, {"transB": 1}, 1, 18),
    ("gemm_alpha_beta", "Gemm", {"a": f32(4, 3), "b": f32(4, 5)}, {"c": f32(1, 5)},
     {"transA": 1, "alpha": 0.5, "beta": 2.0}, 1, 18),
    ("layernorm", "LayerNormalization", {"x": f32(2, 3, 8)}, {"s": f32(8), "b": f32(8)}, {"epsilon": 1e-5}, 1, 17),
    ("layernorm_axis_m2", "LayerNormalization", {"x": f32(2, 3, 8)}, {"s": f32(3, 8), "b": None}, {"axis": -2}, 1, 18),
    ("layernorm_stats", "LayerNormalization", {"x": f32(2, 6)}, {"s": f32(6), "b": f32(6)}, {}, 3, 18),
    ("reshape_allowzero0", "Reshape", {"x": f32(2, 3, 4)}, {"s": np.array([0, -1], np.int64)}, {}, 1, 18),
    ("reshape_allowzero1", "Reshape", {"x": f32(2, 3, 4)}, {"s": np.array([6, 4], np.int64)}, {"allowzero": 1}, 1, 18),
    ("reshape_to_empty_dim", "Reshape", {"x": np.zeros((0, 4), np.float32)}, {"s": np.array([0, 2, 2], np.int64)},
     {"allowzero": 1}, 1, 18),
    ("transpose_perm", "Transpose", {"x": f32(2, 3, 4)}, {}, {"perm": [2, 0, 1]}, 1, 18),
    ("transpose_default", "Transpose", {"x": f32(2, 3, 4)}, {}, {}, 1, 18),
    ("squeeze_neg", "Squeeze", {"x": f32(1, 3, 1, 2)}, {"axes": np.array([-2], np.int64)}, {}, 1, 18),
    ("squeeze_all", "Squeeze", {"x": f32(1, 3, 1, 2)}, {}, {}, 1, 18),
    ("unsqueeze_neg", "Unsqueeze", {"x": f32(3, 2)}, {"axes": np.array([-1, 0], np.int64)}, {}, 1, 18),
    ("concat_neg_axis", "Concat", {"a": f32(2, 3), "b": f32(2, 1)}, {}, {"axis": -1}, 1, 18),
    ("slice_neg_step", "Slice", {"x": f32(5, 6)},
     {"st": np.array([-1, 1], np.int64), "en": np.array([-10, 5], np.int64), "ax": np.array([0, 1], np.int64),
      "sp": np.array([-2, 2], np.int64)}, {}, 1, 18),
    ("slice_int_max", "Slice", {"x": f32(4, 6)},
     {"st": np.array([2], np.int64), "en": np.array([np.iinfo(np.int64).max], np.int64),
      "ax": np.array([-1], np.int64)}, {}, 1, 18),
    ("slice_empty", "Slice", {"x": f32(4, 6)}, {"st": np.array([3], np.int64), "en": np.array([1], np.int64)}, {}, 1, 18),
    ("split_sizes", "Split", {"x": f32(2, 7)}, {"s": np.array([3, 4], np.int64)}, {"axis": -1}, 2, 18),
    ("split_num_outputs", "Split", {"x": f32(6, 2)}, {}, {"num_outputs": 3}, 3, 18),
    ("split_equal_op17", "Split", {"x": f32(6, 2)}, {}, {}, 2, 17),
    ("gather_neg_idx", "Gather", {"x": f32(5, 3)}, {"i": np.array([[0, -1], [2, 4]], np.int64)}, {"axis": 0}, 1, 18),
    ("gather_axis1_scalar", "Gather", {"x": f32(2, 5, 3)}, {"i": np.array(-2, np.int64)}, {"axis": -2}, 1, 18),
    ("gather_runtime_ids", "Gather", {"i": np.array([[1, 0, 3]], np.int64)}, {"w": f32(4, 6)}, {"_order": ["w", "i"]}, 1, 18),
    ("gather_elements_neg", "GatherElements", {"x": f32(3, 4)}, {"i": np.array([[0, -1, 1, 1], [2, 1, 0, 0], [3, 0, -2, 1]], np.int64)},
     {"axis": -1}, 1, 18),
    ("expand_bidir", "Expand", {"x": f32(3, 1)}, {"s": np.array([2, 1, 4], np.int64)}, {}, 1, 18),
    ("shape_start_end", "Shape", {"x": f32(2, 3, 4, 5)}, {}, {"start": 1, "end": -1}, 1, 18),
    ("cast_to_int", "Cast", {"x": f32(6) * 3}, {}, {"to": TensorProto.INT64}, 1, 18),
    ("cast_to_bool", "Cast", {"x": np.array([0.0, 1.0, -2.0], np.float32)}, {}, {"to": TensorProto.BOOL}, 1, 18),
    ("where_bcast", "Where", {"c": rng.random((2, 1, 4)) > 0.5, "a": f32(3, 4), "b": f32(1)}, {}, {}, 1, 18),
    ("equal", "Equal", {"a": np.array([1, 2, 3], np.int64), "b": np.array([1, 0, 3], np.int64)}, {}, {}, 1, 18),
    ("trilu_lower_k", "Trilu", {"x": f32(4, 5)}, {"k": np.array(1, np.int64)}, {"upper": 0}, 1, 18),
    ("trilu_upper", "Trilu", {"x": f32(2, 4, 4)}, {}, {}, 1, 18),
    ("reducemean_18", "ReduceMean", {"x": f32(2, 3, 4)}, {"ax": np.array([-1], np.int64)}, {"keepdims": 1}, 1, 18),
    ("reducemean_17_attr", "ReduceMean", {"x": f32(2, 3, 4)}, {}, {"axes": [0, -1], "keepdims": 0}, 1, 17),
    ("reducemean_all", "ReduceMean", {"x": f32(2, 3)}, {}, {}, 1, 18),
    ("reducesum", "ReduceSum", {"x": f32(2, 3, 4)}, {"ax": np.array([1], np.int64)}, {"keepdims": 0}, 1, 18),
    ("reducemax", "ReduceMax", {"x": f32(2, 3, 4)}, {"ax": np.array([-1], np.int64)}, {}, 1, 18),
    ("tile", "Tile", {"x": f32(2, 3)}, {"r": np.array([2, 1], np.int64)}, {}, 1, 18),
    ("onehot", "OneHot", {"i": np.array([0, 2, -1], np.int64)},
     {"d": np.array(4, np.int64), "v": np.array([0.0, 1.0], np.float32)}, {"axis": 0}, 1, 18),
    ("clip", "Clip", {"x": f32(6)}, {"lo": np.float32(-0.5), "hi": np.float32(0.5)}, {}, 1, 18),
    ("identity", "Identity", {"x": f32(3)}, {}, {}, 1, 18),
    ("max_variadic", "Max", {"a": f32(3), "b": f32(2, 1)}, {}, {}, 1, 18),
    ("round_half_even", "Round", {"x": np.array([0.5, 1.5, -2.5, 2.4], np.float32)}, {}, {}, 1, 18),
    ("sign", "Sign", {"x": np.array([-1.0, 0.0, 2.0], np.float32)}, {}, {}, 1, 18),
    ("flatten", "Flatten", {"x": f32(2, 3, 4)}, {}, {"axis": 2}, 1, 18),
    ("einsum", "Einsum", {"a": f32(2, 3), "b": f32(3, 4)}, {}, {"equation": "ij,jk->ik"}, 1, 18),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_converter_matches_reference(case):
    _, op, feeds, consts, attrs, n_out, opset = case
    check(make_model(op, feeds, attrs, consts, n_out, opset), feeds)


def test_every_listed_op_has_a_converter():
    needed = ["MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Softmax", "LayerNormalization", "Erf", "Gelu", "Tanh", "Sigmoid", "Relu", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Split", "Gather", "Expand", "Shape", "Cast", "Where", "Equal", "Constant", "ConstantOfShape", "Range", "Trilu", "ReduceMean", "Cos", "Sin", "Identity", "Tile", "OneHot", "Not"]
    assert [op for op in needed if ("", op) not in CONVERTERS] == []
    for op in ("TernaryCode", "BoolCode", "SignCode", "BinaryCode", "Linear"):
        assert ("ai.bwta", op) in CONVERTERS


def test_register_checks_the_op_name():
    with pytest.raises(ValueError, match="not an ONNX operator"):
        register("MatMull")(lambda *a: None)
    with pytest.raises(ValueError, match="already has a converter"):
        register("MatMul")(lambda *a: None)
    with pytest.raises(ValueError, match="not an ai.bwta operator"):
        register("TernaryCodes", domain="ai.bwta")(lambda *a: None)


def _chain_model():
    """Dynamic [batch, seq, 8] input; Shape -> Gather -> Concat -> Reshape, ConstantOfShape, Range,
    Trilu, Where, Equal, Expand: the shape arithmetic of an exported attention block."""
    n = helper.make_node
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)
    nodes = [
        n("Shape", ["x"], ["shp"]),
        n("Gather", ["shp", "i0"], ["b"], axis=0),
        n("Gather", ["shp", "i1"], ["t"], axis=0),
        n("Unsqueeze", ["b", "ax0"], ["b1"]),
        n("Unsqueeze", ["t", "ax0"], ["t1"]),
        n("Concat", ["b1", "t1", "two", "four"], ["newshape"], axis=0),
        n("Reshape", ["x", "newshape"], ["x4"]),
        n("Transpose", ["x4"], ["xt"], perm=[0, 2, 1, 3]),
        n("Concat", ["t1", "t1"], ["tt"], axis=0),
        n("ConstantOfShape", ["tt"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        n("Trilu", ["ones"], ["tri"], upper=0),
        n("Equal", ["tri", "zero"], ["masked"]),
        n("Where", ["masked", "ninf", "zerof"], ["mask"]),
        n("Transpose", ["xt"], ["xtT"], perm=[0, 1, 3, 2]),
        n("MatMul", ["xt", "xtT"], ["scores"]),
        n("Add", ["scores", "mask"], ["sm"]),
        n("Softmax", ["sm"], ["p"], axis=-1),
        n("Range", ["zero_i", "t", "one_i"], ["pos"]),
        n("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        n("Mul", ["posf", "half"], ["posh"]),
        n("Slice", ["shp", "s0", "s1"], ["shp3_0"]),
        n("Concat", ["shp3_0", "one64"], ["shp3"], axis=0),
        n("Expand", ["posh", "shp3"], ["posx"]),
        n("Reshape", ["p", "flat"], ["pf"]),
    ]
    inits = [c("i0", np.array(0, np.int64)), c("i1", np.array(1, np.int64)), c("ax0", np.array([0], np.int64)),
             c("two", np.array([2], np.int64)), c("four", np.array([4], np.int64)), c("zero", np.array(0.0, np.float32)),
             c("ninf", np.array(-1e9, np.float32)), c("zerof", np.array(0.0, np.float32)),
             c("zero_i", np.array(0, np.int64)), c("one_i", np.array(1, np.int64)), c("half", np.array(0.5, np.float32)),
             c("s0", np.array([0], np.int64)), c("s1", np.array([2], np.int64)), c("one64", np.array([1], np.int64)),
             c("flat", np.array([0, -1], np.int64))]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", F32, ["batch", "seq", 8])],
                          [helper.make_tensor_value_info("pf", F32, None), helper.make_tensor_value_info("posx", F32, None)],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return m


def test_shape_chain_dynamic_dims_one_graph():
    model = _chain_model()
    gm = None
    for b, t in ((2, 5), (3, 7)):
        feeds = {"x": f32(b, t, 8)}
        gm = check(model, feeds)
    # No shape tensors at run time: the reshape reads symbolic sizes, and Dynamo captures one graph.
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any("sym_tensor" in t or "tensor_to_list" in t for t in targets), targets
    torch._dynamo.reset()
    explain = torch._dynamo.explain(gm)(torch.randn(2, 5, 8))
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    from torch._dynamo.testing import CompileCounter
    cnt = CompileCounter()
    compiled = torch.compile(gm, backend=cnt, dynamic=True)
    for b, t in ((2, 5), (3, 7), (4, 3)):  # sizes 0 and 1 specialise in Dynamo
        x = torch.randn(b, t, 8)
        out = compiled(x)
        ref = gm(x)
        torch.testing.assert_close(out, ref)
    assert cnt.frame_count == 1


def test_constant_node_and_folding():
    n = helper.make_node
    nodes = [n("Constant", [], ["c"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
             n("Constant", [], ["f"], value_float=1.5),
             n("Mul", ["c", "c"], ["cc"]),            # folded at import: [4, 9]
             n("Cast", ["cc"], ["ccf"], to=TensorProto.FLOAT),
             n("Mul", ["x", "f"], ["xf"]),
             n("Add", ["xf", "ccf"], ["y"])]
    g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", F32, [2])],
                          [helper.make_tensor_value_info("y", F32, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=10)
    gm = check(m, {"x": f32(2)})
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == [torch.mul, torch.add]       # the int Mul and the Cast were folded


def test_multiple_outputs_and_names():
    m = make_model("Split", {"x": f32(4, 2)}, {"num_outputs": 2}, {}, n_out=2)
    gm = import_model(m)
    assert gm.onnx_input_names == ["x"] and gm.onnx_output_names == ["y0", "y1"]
    a, b = gm(torch.ones(4, 2))
    assert a.shape == b.shape == (2, 2)


def test_nodes_out_of_topological_order_are_sorted():
    m = _chain_model()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    gm = import_model(m)
    x = f32(2, 3, 8)
    ref = ReferenceEvaluator(_chain_model()).run(None, {"x": x})
    np.testing.assert_allclose(gm(torch.from_numpy(x))[0].numpy(), ref[0], rtol=1e-5, atol=1e-6)
