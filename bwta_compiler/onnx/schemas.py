"""The ``ai.bwta`` ONNX operator domain (version 1): one table, used by the exporter, the importer
and ``onnx.checker``.

Ops (inputs in order; ``?`` = optional; attributes after ``;``):

* ``TernaryCode(X, S; levels=1) -> Y``      codes ``sum_j [x > t_j] - [x < -t_j]``, ``t_j = (j-1/2)*s``
* ``BoolCode(X, S, B; levels=1) -> Y``      codes ``sum_j [x > b + (j-1/2)*s]``
* ``SignCode(X, S) -> Y``                   ``+1 if x >= 0 else -1``
* ``BinaryCode(W) -> (Codes, Alpha)``       ``sign(w - mean_row w)`` (0 -> +1), ``alpha = mean_row |w - mean|``
* ``Linear(X, S, B?, Wp, Scale, Bias?; act, k, pad_bits=64, out_dtype=1) -> Y``
  the fused low-bit linear layer: quantize ``X`` [..., K] (``act`` = ternary | bool | binary),
  MatMul with the packed binary weight ``Wp`` (int32 [N, Kw], LSB-first, bit 1 = -1, K padded to
  ``pad_bits``), then ``float(acc) * Scale + Bias`` in fp32 and a cast to ``out_dtype``.

Codes are integer values stored in X's float type.  Thresholds are computed in fp32 and compared
in X's type (bwta_compiler/ops.py): the ops are defined bit for bit by the ``bwta::`` torch ops.

Each schema has a type and shape inference function: the code ops give ``Y`` the type and shape
of ``X`` (``Codes`` those of ``W``, ``Alpha`` fp32 ``W.shape[:-1]``), ``Linear`` gives ``Y`` the
element type ``out_dtype`` and the shape ``X.shape[:-1] + [Wp.shape[0]]``.  ``Linear`` needs it
most: its output type ``U`` is bound by an attribute, not by an input, so without the function
shape inference (and the onnxscript optimizer the torch exporter runs, which rewrites each output's
type from it) leaves ``Y`` untyped, which ``onnx.checker`` rejects on a graph output.
"""

from __future__ import annotations

import functools

import onnx
from onnx.defs import OpSchema

DOMAIN = "ai.bwta"
VERSION = 1

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


def _p(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    opt = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=opt)


def _int_attr(name: str, default: int) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), "")


def _tensor_type(ctx, i: int):
    """Input ``i``'s tensor TypeProto, or None when the input is absent or its type unknown."""
    if i >= ctx.get_num_inputs() or not ctx.has_input(i):
        return None
    t = ctx.get_input_type(i)
    return t if t is not None and t.HasField("tensor_type") else None


def _same_as_input(ctx) -> None:
    """Y: X's element type and shape (the code ops)."""
    x = _tensor_type(ctx, 0)
    if x is not None:
        ctx.set_output_type(0, x)


def _infer_binary_code(ctx) -> None:
    """Codes: W's element type and shape; Alpha: fp32, W.shape[:-1] (the per-row scale)."""
    w = _tensor_type(ctx, 0)
    alpha = onnx.TypeProto()
    alpha.tensor_type.elem_type = onnx.TensorProto.FLOAT
    if w is not None:
        ctx.set_output_type(0, w)
        if w.tensor_type.HasField("shape") and len(w.tensor_type.shape.dim) >= 1:
            alpha.tensor_type.shape.dim.extend(w.tensor_type.shape.dim[:-1])
    if ctx.get_num_outputs() > 1:
        ctx.set_output_type(1, alpha)


_OUT_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _infer_linear(ctx) -> None:
    """Y: element type ``out_dtype`` (default FLOAT), shape X.shape[:-1] + [N] with N = Wp.shape[0]
    (a dim left unknown where Wp's first dim is unknown; no shape where X's rank is unknown).

    Never raises: a Python exception here escapes ``onnx.shape_inference`` even in its non-strict
    mode (the importer's) and would lose the inference of the whole model, so an ``out_dtype`` that
    is not a float type only leaves Y untyped."""
    a = ctx.get_attribute("out_dtype")
    out_dtype = a.i if a is not None else onnx.TensorProto.FLOAT
    if out_dtype not in _OUT_DTYPES:
        return
    y = onnx.TypeProto()
    y.tensor_type.elem_type = out_dtype
    x, wp = _tensor_type(ctx, 0), _tensor_type(ctx, 3)
    if x is not None and x.tensor_type.HasField("shape") and len(x.tensor_type.shape.dim) >= 1:
        dims = y.tensor_type.shape.dim
        dims.extend(x.tensor_type.shape.dim[:-1])
        n = dims.add()
        if wp is not None and wp.tensor_type.HasField("shape") and len(wp.tensor_type.shape.dim) == 2:
            n.CopyFrom(wp.tensor_type.shape.dim[0])
    ctx.set_output_type(0, y)


def _schemas() -> list[OpSchema]:
    t = [("T", _FLOAT_TYPES, "activation type")]
    s = [("S", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "scale type")]
    schemas = [
        OpSchema("TernaryCode", DOMAIN, VERSION, "ternary codes of X with per-tensor scale S",
                 inputs=[_p("X", "T"), _p("S", "S")], outputs=[_p("Y", "T")], type_constraints=t + s,
                 attributes=[_int_attr("levels", 1)]),
        OpSchema("BoolCode", DOMAIN, VERSION, "bool codes of X with scale S and offset B",
                 inputs=[_p("X", "T"), _p("S", "S"), _p("B", "S")], outputs=[_p("Y", "T")], type_constraints=t + s,
                 attributes=[_int_attr("levels", 1)]),
        OpSchema("SignCode", DOMAIN, VERSION, "binary activation codes (+1 if x >= 0 else -1)",
                 inputs=[_p("X", "T"), _p("S", "S")], outputs=[_p("Y", "T")], type_constraints=t + s),
        OpSchema("BinaryCode", DOMAIN, VERSION, "binary weight codes and per-row scale",
                 inputs=[_p("W", "T")], outputs=[_p("Codes", "T"), _p("Alpha", "tensor(float)")], type_constraints=t),
        OpSchema("Linear", DOMAIN, VERSION, "fused low-bit linear with a packed binary weight",
                 inputs=[_p("X", "T"), _p("S", "S"), _p("B", "S", optional=True), _p("Wp", "tensor(int32)"),
                         _p("Scale", "tensor(float)"), _p("Bias", "tensor(float)", optional=True)],
                 outputs=[_p("Y", "U")],
                 type_constraints=t + s + [("U", _FLOAT_TYPES, "output type")],
                 attributes=[OpSchema.Attribute("act", OpSchema.AttrType.STRING, "ternary | bool | binary"),
                             OpSchema.Attribute("k", OpSchema.AttrType.INT, "true K (in_features)"),
                             _int_attr("pad_bits", 64), _int_attr("out_dtype", onnx.TensorProto.FLOAT)]),
    ]
    infer = {"TernaryCode": _same_as_input, "BoolCode": _same_as_input, "SignCode": _same_as_input,
             "BinaryCode": _infer_binary_code, "Linear": _infer_linear}
    for schema in schemas:
        schema.set_type_and_shape_inference_function(infer[schema.name])
    return schemas


OP_TYPES = ("TernaryCode", "BoolCode", "SignCode", "BinaryCode", "Linear")


@functools.lru_cache(maxsize=1)
def register() -> None:
    """Register the ``ai.bwta`` schemas with onnx (once per process), so ``onnx.checker`` and
    onnxscript know the ops."""
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
