"""Recognise quantizers written in standard ONNX ops and rewrite them to ``ai.bwta`` code ops.

Patterns (``s``, ``b`` constant scalars, ``s > 0``, ``m`` a positive integer):

* ``Clip(Round(Div(x, s)), -m, m)``           -> ``ai.bwta.TernaryCode(x, s; levels=m)``
* ``Clip(Round(Div(Sub(x, b), s)), 0, m)``    -> ``ai.bwta.BoolCode(x, s, b; levels=m)``
  (``Clip(Round(Div(x, s)), 0, m)`` is the same with ``b = 0``)
* ``Sign(x)``                                 -> ``ai.bwta.SignCode(x, 1)`` (``lenient`` only)

The rewritten node produces the codes (the Clip's output), so a following ``Mul(codes, s)``
(fake quantization) keeps its meaning and the backend sees the code op it fuses.

Modes:

* ``"lenient"``: rewrite every match, Sign included (ONNX ``Sign(0) = 0`` becomes ``+1``, the
  bwta binary-activation convention); anything else stays as float ops.
* ``"strict"``: rewrite only the Round/Clip chains, whose meaning equals the bwta code ops except
  for inputs within half an ulp of a threshold (``round(x/s)`` rounds ``x/s`` first; bwta
  compares ``x`` with ``(j - 1/2) * s``), and raise one :class:`OnnxImportError` that lists every
  ``Round`` or ``Sign`` node that looks like a quantizer but is not one of the patterns.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import OnnxImportError
from . import schemas

MODES = ("off", "lenient", "strict")


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if _small(t)}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_float":
                    out[n.output[0]] = np.array(a.f, np.float32)
                elif a.name == "value_int":
                    out[n.output[0]] = np.array(a.i, np.int64)
    return out


def _small(t: onnx.TensorProto) -> bool:
    n = 1
    for d in t.dims:
        n *= d
    return n <= 1


def _scalar(consts: dict, name: str) -> float | None:
    v = consts.get(name)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


def rewrite_quantizers(model: onnx.ModelProto, mode: str, where: str = "<model>") -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with recognised quantizers replaced (see the module doc); returns
    (model, number of rewrites)."""
    if mode not in MODES:
        raise ValueError(f"quantizers must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return model, 0
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts = _consts(m)
    producer = {o: n for n in g.node for o in n.output}
    replaced: dict[int, onnx.NodeProto] = {}
    claimed: set[int] = set()        # Round nodes that are part of a recognised chain
    extra_inits = []

    def const_input(value: float, hint: str) -> str:
        name = f"{hint}__bwta_const"
        if name not in consts:
            extra_inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
            consts[name] = np.array(value, np.float32)
        return name

    for i, n in enumerate(g.node):
        if n.op_type != "Clip" or n.domain not in ("", "ai.onnx") or len(n.input) < 3:
            continue
        r = producer.get(n.input[0])
        d = producer.get(r.input[0]) if r is not None and r.op_type == "Round" else None
        if d is None or d.op_type != "Div":
            continue
        lo, hi, s = _scalar(consts, n.input[1]), _scalar(consts, n.input[2]), _scalar(consts, d.input[1])
        if lo is None or hi is None or s is None or s <= 0 or hi != int(hi) or hi < 1:
            continue
        levels = int(hi)
        x = d.input[0]
        if lo == -hi:
            new = helper.make_node("TernaryCode", [x, d.input[1]], [n.output[0]], name=(n.name or "clip") + "_bwta",
                                   domain=schemas.DOMAIN, levels=levels)
        elif lo == 0:
            sub = producer.get(x)
            b = _scalar(consts, sub.input[1]) if sub is not None and sub.op_type == "Sub" else None
            if b is not None:
                x, b_name = sub.input[0], sub.input[1]
            else:
                b_name = const_input(0.0, d.input[1] + "_zero")
            new = helper.make_node("BoolCode", [x, d.input[1], b_name], [n.output[0]],
                                   name=(n.name or "clip") + "_bwta", domain=schemas.DOMAIN, levels=levels)
        else:
            continue
        replaced[i] = new
        claimed.add(id(r))

    unrecognised = []
    for i, n in enumerate(g.node):
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Sign":
            if mode == "lenient":
                replaced[i] = helper.make_node("SignCode", [n.input[0], const_input(1.0, "sign_scale")],
                                               [n.output[0]], name=(n.name or "sign") + "_bwta", domain=schemas.DOMAIN)
            else:
                unrecognised.append(f"Sign {n.name or n.output[0]!r} (Sign(0) = 0 is not a binary code; "
                                    f"use quantizers='lenient')")
        elif n.op_type == "Round" and id(n) not in claimed:
            unrecognised.append(f"Round {n.name or n.output[0]!r} (not Clip(Round(Div(x, s)), lo, hi) with "
                                f"constant scalar s > 0 and integer bounds -m..m or 0..m)")
    if mode == "strict" and unrecognised:
        raise OnnxImportError(f"{where}: quantizers='strict': {len(unrecognised)} quantizer-like node(s) not "
                              f"recognised: " + "; ".join(unrecognised))
    if not replaced:
        return m, 0
    nodes = [replaced.get(i, n) for i, n in enumerate(g.node)]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(extra_inits)
    if not any(o.domain == schemas.DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(schemas.DOMAIN, schemas.VERSION))
    return m, len(replaced)


__all__ = ["MODES", "rewrite_quantizers"]
