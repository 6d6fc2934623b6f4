"""Quantizers written in standard ONNX ops (Round/Clip chains, Sign) imported as bwta code ops."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bwta_compiler.errors import OnnxImportError
from bwta_compiler.onnx import import_model

F32 = TensorProto.FLOAT
rng = np.random.default_rng(2)


def fake_quant_model(with_sign=False, with_bare_round=False):
    n = helper.make_node
    nodes = [
        # ternary fake quantization of x, then a MatMul
        n("Div", ["x", "s"], ["xs"]), n("Round", ["xs"], ["xr"], name="round_t"),
        n("Clip", ["xr", "m1", "p1"], ["xc"], name="clip_t"), n("Mul", ["xc", "s"], ["xq"]),
        n("MatMul", ["xq", "w"], ["h"]),
        # bool (2-level) fake quantization of a softmax, with an offset
        n("Softmax", ["h"], ["p"], axis=-1), n("Sub", ["p", "b"], ["pb"]), n("Div", ["pb", "sp"], ["ps"]),
        n("Round", ["ps"], ["pr"], name="round_b"), n("Clip", ["pr", "zero", "two"], ["pc"], name="clip_b"),
        n("Mul", ["pc", "sp"], ["y"]),
    ]
    outputs = ["y"]
    if with_sign:
        nodes.append(n("Sign", ["h"], ["hs"], name="sign_h"))
        outputs.append("hs")
    if with_bare_round:
        nodes.append(n("Round", ["h"], ["hr"], name="bare_round"))
        outputs.append("hr")
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)
    inits = [c("s", 0.8), c("m1", -1.0), c("p1", 1.0), c("w", rng.standard_normal((16, 8))), c("b", 0.01),
             c("sp", 0.2), c("zero", 0.0), c("two", 2.0)]
    g = helper.make_graph(nodes, "fq", [helper.make_tensor_value_info("x", F32, ["batch", 16])],
                          [helper.make_tensor_value_info(o, F32, ["batch", 8]) for o in outputs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def bwta_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "bwta" in str(n.target)]


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_round_clip_chains_become_code_ops(mode):
    m = fake_quant_model()
    gm = import_model(m, quantizers=mode)
    assert bwta_targets(gm) == ["bwta.ternary_code.default", "bwta.bool_code.default"]
    x = rng.standard_normal((5, 16)).astype(np.float32)
    ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    with torch.no_grad():
        out = gm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert bwta_targets(import_model(m)) == []          # "off" by default


def test_lenient_rewrites_sign():
    m = fake_quant_model(with_sign=True)
    gm = import_model(m, quantizers="lenient")
    assert "bwta.sign_code.default" in bwta_targets(gm)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    ref = ReferenceEvaluator(m).run(None, {"x": x})
    with torch.no_grad():
        out = gm(torch.from_numpy(x))
    np.testing.assert_array_equal(out[1].numpy(), ref[1])       # no exact zeros in h


def test_strict_lists_every_unrecognised_quantizer():
    with pytest.raises(OnnxImportError) as info:
        import_model(fake_quant_model(with_sign=True, with_bare_round=True), quantizers="strict")
    msg = str(info.value)
    assert "2 quantizer-like node(s)" in msg and "'sign_h'" in msg and "'bare_round'" in msg


def test_bad_mode():
    with pytest.raises(ValueError, match="quantizers must be one of"):
        import_model(fake_quant_model(), quantizers="maybe")
