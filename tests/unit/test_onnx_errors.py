"""Bad input: every failure is one OnnxImportError naming the file and the node, with no chained
traceback from inside the converter."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch
from onnx import TensorProto, helper, numpy_helper

from bwta_compiler.errors import OnnxImportError
from bwta_compiler.onnx import import_model

F32 = TensorProto.FLOAT


def small_model(opset=18, domain_ops=(), missing=False, extra_nodes=()):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h" if not missing else "nope"], ["y"], name="act")]
    nodes += list(extra_nodes)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["b", 4])],
                          [helper.make_tensor_value_info("y", F32, ["b", 3])], [w])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domain_ops]
    return helper.make_model(g, opset_imports=opsets, ir_version=10)


def raises(model, *fragments):
    with pytest.raises(OnnxImportError) as info:
        import_model(model)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    # One clear error: no exception chained from the converter's internals.
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return msg


def test_good_model_imports(tmp_path):
    p = tmp_path / "ok.onnx"
    onnx.save(small_model(), p)
    gm = import_model(p)
    torch.testing.assert_close(gm(torch.ones(2, 4)), torch.full((2, 3), 4.0))


def test_missing_file(tmp_path):
    raises(tmp_path / "nope.onnx", "nope.onnx", "no such file")


def test_truncated_file(tmp_path):
    p = tmp_path / "cut.onnx"
    data = small_model().SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    raises(p, str(p), "ONNX")


def test_not_onnx(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 10)
    raises(p, str(p), "ONNX")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    raises(p, str(p), "empty")


def test_missing_initializer(tmp_path):
    m = small_model()
    del m.graph.initializer[:]
    p = tmp_path / "noinit.onnx"
    onnx.save(m, p)
    raises(p, str(p), "'mm'", "'w'", "missing initializer")


def test_missing_node_input(tmp_path):
    p = tmp_path / "dangling.onnx"
    onnx.save(small_model(missing=True), p)
    raises(p, str(p), "'act'", "'nope'")


@pytest.mark.parametrize("opset", [10, 22])
def test_opset_out_of_range(tmp_path, opset):
    p = tmp_path / f"op{opset}.onnx"
    onnx.save(small_model(opset=opset), p)
    raises(p, str(p), f"opset {opset}", "11..21")


def test_unknown_domain(tmp_path):
    node = helper.make_node("FusedGelu", ["y"], ["z"], name="ms_gelu", domain="com.microsoft")
    p = tmp_path / "ms.onnx"
    onnx.save(small_model(domain_ops=["com.microsoft"], extra_nodes=[node]), p)
    raises(p, str(p), "com.microsoft", "FusedGelu", "'ms_gelu'")


def test_all_unsupported_ops_listed_at_once(tmp_path):
    extra = [helper.make_node("LpNormalization", ["y"], ["a"], name="lp1"),
             helper.make_node("LpNormalization", ["a"], ["b"], name="lp2"),
             helper.make_node("Hardmax", ["b"], ["c"], name="hm"),
             helper.make_node("NonZero", ["c"], ["d"], name="nz")]
    p = tmp_path / "unsup.onnx"
    onnx.save(small_model(extra_nodes=extra), p)
    msg = raises(p, str(p), "LpNormalization (2: 'lp1', 'lp2')", "Hardmax (1: 'hm')", "NonZero (1: 'nz')")
    assert "3 unsupported op type" in msg


def test_bad_bwta_attribute(tmp_path):
    from bwta_compiler.onnx import schemas
    schemas.register()
    nodes = [helper.make_node("Linear", ["x", "s", "", "wp", "sc"], ["y"], name="bad_lin", domain="ai.bwta",
                              act="quaternary", k=4)]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.zeros((3, 2), np.int32), "wp"),
             numpy_helper.from_array(np.ones(3, np.float32), "sc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 4])],
                          [helper.make_tensor_value_info("y", F32, [2, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.bwta", 1)], ir_version=10)
    raises(m, "'bad_lin'", "act must be ternary")


def test_bwta_domain_wrong_version():
    m = small_model(domain_ops=["ai.bwta"])
    m.opset_import[1].version = 7
    raises(m, "ai.bwta version 7")


def test_external_data_missing(tmp_path):
    m = small_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((64, 3), np.float32), "w"))
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", F32, ["b", 64]))
    p = tmp_path / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    raises(p, str(p), "'w'", "ext.onnx.data", "not found")


def test_external_data_needs_a_path(tmp_path):
    m = small_model()
    p = tmp_path / "ext2.onnx"
    onnx.save(m, p, save_as_external_data=True, location="w.bin", size_threshold=0)
    raises(onnx.load(p, load_external_data=False), "'w'", "w.bin")
