"""Export a BWTA-quantized model to ONNX with the ``ai.bwta`` operator domain.

``export(model, example_inputs, path)`` runs ``torch.onnx.export`` (the dynamo exporter) with
translation functions for the ``bwta::`` custom ops:

* every :class:`~bwta_compiler.modules.BWTALinear` becomes one ``ai.bwta.Linear`` node whose binary
  weight is stored **packed** (an int32 initializer [N, Kw] in the format of
  :mod:`bwta_compiler.formats`), with the per-row epilogue scale ``alpha * s`` and the bias as
  fp32 initializers (``packed=False`` keeps ``ai.bwta.BinaryCode`` on the float weight instead);
* the attention quantizers become ``ai.bwta.TernaryCode`` / ``ai.bwta.BoolCode`` /
  ``ai.bwta.SignCode`` nodes feeding standard ``MatMul`` nodes.

:func:`bwta_compiler.onnx.import_model` maps these nodes back to the same ``bwta::`` torch ops, so
the imported model reproduces the torch model's low-bit arithmetic bit for bit.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import onnx
import torch
from torch import Tensor, nn

from .. import formats, ops
from ..modules import BWTALinear, _ScaleQuantizer
from . import schemas

_TORCH_TO_ONNX = {
    torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
}


class PackedBWTALinear(nn.Module):
    """Inference form of :class:`BWTALinear` with the weight quantized and packed ahead of time.

    ``forward`` is one ``bwta::linear`` call: the same arithmetic as ``BWTALinear.forward``
    (``float(acc) * (alpha * s) + bias`` in fp32, cast to the input dtype), bit for bit.
    """

    def __init__(self, lin: BWTALinear, pad_bits: int = formats.DEFAULT_PAD_BITS) -> None:
        super().__init__()
        self.in_features, self.out_features, self.pad_bits = lin.in_features, lin.out_features, pad_bits
        self.act_kind = lin.act.kind
        with torch.no_grad():
            codes, alpha = ops.binary_code(lin.weight.detach())
            s = lin.act.scale.detach()
            self.register_buffer("w_packed", formats.pack_binary_codes(codes, pad_bits))
            self.register_buffer("s", s.clone())
            self.register_buffer("b", lin.act.offset.detach().clone() if self.act_kind == "bool" else None)
            # The same expression BWTALinear evaluates: alpha (fp32) * s.float().
            self.register_buffer("scale", alpha * s.float())
            self.register_buffer("bias", lin.bias.detach().float().clone() if lin.bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = None if x.dtype == torch.float32 else x.dtype
        return torch.ops.bwta.linear(x, self.s, self.b, self.act_kind, self.w_packed, self.in_features,
                                     self.scale, self.bias, out_dtype, self.pad_bits, "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act_kind}"


# ---- translation functions: bwta:: torch ops -> ai.bwta ONNX nodes ----------------------------


def _translation_table() -> dict:
    from onnxscript import opset18 as op
    from onnxscript import values

    schemas.register()
    bw = values.Opset(schemas.DOMAIN, schemas.VERSION)

    def ternary_code(x, s, levels: int = 1):
        return bw.TernaryCode(x, s, levels=levels)

    def bool_code(x, s, b, levels: int = 1):
        return bw.BoolCode(x, s, b, levels=levels)

    def sign_code(x, s):
        return bw.SignCode(x, s)

    def binary_code(w):
        return bw.BinaryCode(w)

    def grad_scale(x, g: float = 1.0):
        return op.Identity(x)

    def linear(x, s, b, act: str, w_packed, k: int, scale=None, bias=None, out_dtype=None,
               pad_bits: int = formats.DEFAULT_PAD_BITS, kernel: str = ""):
        if scale is None:
            raise NotImplementedError("ai.bwta.Linear export needs the epilogue scale")
        # The exporter hands a dtype argument over as an onnx_ir DataType (an IntEnum of the
        # TensorProto codes), not a torch.dtype.
        if out_dtype is None:
            dt = onnx.TensorProto.FLOAT
        elif isinstance(out_dtype, torch.dtype):
            dt = _TORCH_TO_ONNX[out_dtype]
        else:
            dt = int(out_dtype)
        return bw.Linear(x, s, b, w_packed, scale, bias, act=act, k=k, pad_bits=pad_bits, out_dtype=dt)

    b = torch.ops.bwta
    return {b.ternary_code.default: ternary_code, b.bool_code.default: bool_code, b.sign_code.default: sign_code,
            b.binary_code.default: binary_code, b.grad_scale.default: grad_scale, b.linear.default: linear}


def prepare_for_export(model: nn.Module, packed: bool = True, pad_bits: int = formats.DEFAULT_PAD_BITS) -> nn.Module:
    """A copy of ``model`` in inference form: BWTALinear -> :class:`PackedBWTALinear` (if ``packed``),
    quantizer step sizes without the LSQ gradient-scale op (an identity in the forward pass)."""
    model = copy.deepcopy(model).eval()
    for name, mod in list(model.named_modules()):
        if packed and isinstance(mod, BWTALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not name:
                return PackedBWTALinear(mod, pad_bits)
            setattr(parent, child, PackedBWTALinear(mod, pad_bits))
    for mod in model.modules():
        if isinstance(mod, _ScaleQuantizer):
            mod.step_size = _plain_step_size(mod)
    return model


def _plain_step_size(q: _ScaleQuantizer):
    def step_size(x: Tensor) -> Tensor:
        return q.scale
    return step_size


def _auto_dynamic_shapes(example_inputs: Sequence[Any]) -> tuple:
    auto = torch.export.Dim.AUTO
    out = []
    for x in example_inputs:
        if isinstance(x, Tensor) and x.dim() >= 1:
            out.append({i: auto for i in range(min(x.dim(), 2))})
        else:
            out.append(None)
    return tuple(out)


def export(model: nn.Module, example_inputs: Tensor | Sequence[Any], path: str | os.PathLike, *,
           opset_version: int = 18, dynamic_shapes: Any = "auto", external_data: bool = False,
           packed: bool = True, pad_bits: int = formats.DEFAULT_PAD_BITS, check: bool = True,
           verbose: bool = False, **export_kwargs: Any) -> onnx.ModelProto:
    """Write ``model`` (typically from :func:`bwta_compiler.quantize`) to ``path`` as ONNX with the
    ``ai.bwta`` domain and return the (weight-less if ``external_data``) ModelProto.

    ``example_inputs``: a tensor or a tuple of positional inputs.  ``dynamic_shapes="auto"`` marks
    dims 0 and 1 of each tensor input (batch, sequence) dynamic; pass ``None`` for static shapes or
    a ``torch.onnx.export`` ``dynamic_shapes`` value.  Quantizers that were never calibrated are
    LSQ-initialised from ``example_inputs`` (one eager forward on a copy).  ``external_data=True``
    writes the weights to ``<path>.data`` next to the model.  ``onnx.checker`` runs on the result
    unless ``check=False``.
    """
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        model(*args)     # calibrates uninitialised quantizers, exactly as the first eager call would
    model = prepare_for_export(model, packed=packed, pad_bits=pad_bits)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        dynamic_shapes = _auto_dynamic_shapes(args)
    path = os.fspath(path)
    # The exporter's onnxscript optimizer replaces each node output's type by the one onnx shape
    # inference gives it; the ai.bwta schemas' inference functions (schemas.py) keep every ai.bwta
    # output typed through that, Linear's Y included (its type is the out_dtype attribute).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, opset_version=opset_version, dynamic_shapes=dynamic_shapes,
                          external_data=external_data, custom_translation_table=_translation_table(),
                          verbose=verbose, **export_kwargs)
    if check:
        schemas.register()
        onnx.checker.check_model(path, full_check=False)
    return onnx.load(path, load_external_data=False)


def has_bwta_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == schemas.DOMAIN for n in model.graph.node)


def bwta_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each ``ai.bwta`` op type the model has."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == schemas.DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


__all__ = ["PackedBWTALinear", "bwta_op_counts", "export", "has_bwta_ops", "prepare_for_export"]
_ = Optional
