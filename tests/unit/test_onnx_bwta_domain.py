"""The ai.bwta domain: one-node models checked by onnx.checker, imported to bwta:: torch ops and
compared bit for bit with the NumPy reference ops (a second, torch-independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import torch
from onnx import TensorProto, helper, numpy_helper

from bwta_compiler import formats, ops
from bwta_compiler.onnx import import_model, schemas
from bwta_compiler.onnx.reference_ops import evaluator

F32 = TensorProto.FLOAT
rng = np.random.default_rng(1)


def bwta_model(op, inputs, consts, attrs=None, n_out=1):
    schemas.register()
    names = list(inputs) + list(consts)
    node = helper.make_node(op, [n if (n in inputs or consts[n] is not None) else "" for n in names],
                            [f"y{i}" for i in range(n_out)], domain="ai.bwta", **(attrs or {}))
    g = helper.make_graph([node], "b", [helper.make_tensor_value_info(n, F32, ["batch", a.shape[-1]])
                                        for n, a in inputs.items()],
                          [helper.make_tensor_value_info(f"y{i}", F32, ["d0", "d1"][: 2 - i]) for i in range(n_out)],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items() if a is not None])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.bwta", 1)],
                          ir_version=10)
    onnx.checker.check_model(m)
    return m


def run_both(m, feeds, **kw):
    ref = evaluator(m).run(None, feeds)
    gm = import_model(m, **kw)
    with torch.no_grad():
        out = gm(*[torch.from_numpy(v) for v in feeds.values()])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))], ref


@pytest.mark.parametrize("levels", [1, 3])
def test_ternary_and_bool_codes_exact(levels):
    x = rng.standard_normal((5, 37)).astype(np.float32)
    s = np.array(0.7, np.float32)
    # Values exactly on thresholds: a tie must stay at the lower code.
    x[0, :4] = [0.35, -0.35, 1.05, -1.05]
    (out,), (ref,) = run_both(bwta_model("TernaryCode", {"x": x}, {"s": s}, {"levels": levels}), {"x": x})
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, ops.ternary_code(torch.from_numpy(x), torch.from_numpy(s), levels).numpy())
    p = np.abs(x)
    b = np.array(0.1, np.float32)
    (out,), (ref,) = run_both(bwta_model("BoolCode", {"p": p}, {"s": s, "b": b}, {"levels": levels}), {"p": p})
    np.testing.assert_array_equal(out, ref)


def test_sign_and_binary_codes():
    x = rng.standard_normal((4, 9)).astype(np.float32)
    x[0, 0] = 0.0
    (out,), (ref,) = run_both(bwta_model("SignCode", {"x": x}, {"s": np.array(1.0, np.float32)}), {"x": x})
    np.testing.assert_array_equal(out, ref)
    assert out[0, 0] == 1.0
    w = rng.standard_normal((6, 33)).astype(np.float32)
    (codes, alpha), (rc, ra) = run_both(bwta_model("BinaryCode", {"w": w}, {}, n_out=2), {"w": w})
    np.testing.assert_array_equal(codes, rc)
    np.testing.assert_allclose(alpha, ra, rtol=1e-6)


@pytest.mark.parametrize("act", ["ternary", "bool", "binary"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_exact(act, fused, bias):
    k, n = 70, 5                         # K not a multiple of the 64-bit padding
    x = rng.standard_normal((3, k)).astype(np.float32)
    if act == "bool":
        x = np.abs(x)
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    codes, alpha = ops.binary_code(w)
    s = torch.tensor(0.6)
    consts = {"s": s.numpy(), "b": np.array(0.05, np.float32) if act == "bool" else None,
              "wp": formats.pack_binary_codes(codes).numpy(), "scale": (alpha * s).numpy(),
              "bias": rng.standard_normal(n).astype(np.float32) if bias else None}
    m = bwta_model("Linear", {"x": x}, consts, {"act": act, "k": k})
    (out,), (ref,) = run_both(m, {"x": x}, fused_linear=fused)
    np.testing.assert_array_equal(out, ref)
    # and the eager bwta::linear reference op agrees
    t = torch.ops.bwta.linear(torch.from_numpy(x), s, None if consts["b"] is None else torch.from_numpy(consts["b"]),
                              act, torch.from_numpy(consts["wp"]), k, torch.from_numpy(consts["scale"]),
                              None if not bias else torch.from_numpy(consts["bias"]), None, 64, "")
    np.testing.assert_array_equal(out, t.numpy())


def test_linear_imports_as_the_form_the_backend_fuses():
    k, n = 64, 4
    w = torch.randn(n, k)
    codes, alpha = ops.binary_code(w)
    consts = {"s": np.array(0.5, np.float32), "b": None, "wp": formats.pack_binary_codes(codes).numpy(),
              "scale": (alpha * 0.5).numpy()}
    gm = import_model(bwta_model("Linear", {"x": np.zeros((1, k), np.float32)}, consts, {"act": "ternary", "k": k}))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.bwta.ternary_code.default in targets and torch.ops.bwta.unpack_binary.default in targets
    assert torch.nn.functional.linear in targets
    gm = import_model(bwta_model("Linear", {"x": np.zeros((1, k), np.float32)}, consts, {"act": "ternary", "k": k}),
                      fused_linear=True)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.bwta.linear.default]
