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
in X's type (DESIGN.md "Arithmetic"): the ops are defined bit for bit by the ``bwta::`` torch ops.
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


def _schemas() -> list[OpSchema]:
    t = [("T", _FLOAT_TYPES, "activation type")]
    s = [("S", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "scale type")]
    return [
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
