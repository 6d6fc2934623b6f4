"""Converters: one function per ONNX op type, registered with :func:`register`.

A converter ``fn(ctx, inputs, attrs, node)`` receives the input values (``fx.Node``, ``Const``,
``Sym`` or ``None`` for an omitted optional input) and the decoded attributes, and returns the
output value(s).  ``ctx.call`` folds an op whose inputs are all known at import time; ops on
``Sym`` shape data are evaluated on Python ints / symbolic sizes so shape arithmetic never becomes
tensors.  The run-time helpers below (``onnx_*``) implement ONNX semantics that need a tensor's
rank or sizes (negative axes, Slice clamping, bidirectional Expand); Dynamo traces through them.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import OnnxImportError
from . import schemas
from .importer import ONNX_TO_TORCH, Const, Ctx, Sym


@dataclass(frozen=True)
class Converter:
    fn: Callable
    fold: bool = True                   # fold when every input is known at import time
    rank: Callable | None = None     # rank of the output when shape inference did not give it


CONVERTERS: dict[tuple[str, str], Converter] = {}


def register(*op_types: str, domain: str = "", fold: bool = True, rank: Callable | None = None):
    """Register a converter for ``op_types`` of ``domain``; every name must be an op the domain defines."""
    def deco(fn: Callable) -> Callable:
        for op_type in op_types:
            if domain == "":
                if not onnx.defs.has(op_type):
                    raise ValueError(f"register({op_type!r}): not an ONNX operator (typo?)")
            elif domain == schemas.DOMAIN:
                if op_type not in schemas.OP_TYPES:
                    raise ValueError(f"register({op_type!r}): not an {schemas.DOMAIN} operator; known: {schemas.OP_TYPES}")
            else:
                raise ValueError(f"register: unknown domain {domain!r}")
            if (domain, op_type) in CONVERTERS:
                raise ValueError(f"register: {domain or 'ai.onnx'}.{op_type} already has a converter")
            CONVERTERS[(domain, op_type)] = Converter(fn, fold, rank)
        return fn
    return deco


def _max_rank(ctx: Ctx, inputs: list, attrs: dict) -> int | None:
    ranks = [ctx.rank(v) for v in inputs if v is not None]
    return None if not ranks or any(r is None for r in ranks) else max(ranks)


def _same_rank(ctx: Ctx, inputs: list, attrs: dict) -> int | None:
    return ctx.rank(inputs[0])


# ---- run-time helpers (ONNX semantics in torch; traced by Dynamo) -------------------------------


def onnx_reshape(x: Tensor, shape: list, allowzero: bool) -> Tensor:
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def onnx_unsqueeze(x: Tensor, axes: list) -> Tensor:
    r = x.dim() + len(axes)
    for a in sorted(a % r for a in axes):
        x = x.unsqueeze(a)
    return x


def onnx_squeeze(x: Tensor, axes: list | None) -> Tensor:
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x


def onnx_slice(x: Tensor, starts: list, ends: list, axes: list | None, steps: list | None) -> Tensor:
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    idx: list[Any] = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a % x.dim()
        if st > 0:
            idx[a] = slice(s, e, st)
            continue
        dim = x.shape[a]
        s = s + dim if s < 0 else s
        s = max(0, min(s, dim - 1))
        e = e + dim if e < 0 else e
        e = max(-1, min(e, dim - 1))
        x = x.index_select(a, torch.arange(s, e, st, device=x.device))
    return x[tuple(idx)]


def onnx_gather(x: Tensor, idx: Tensor, axis: int) -> Tensor:
    axis = axis % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def onnx_gather_elements(x: Tensor, idx: Tensor, axis: int) -> Tensor:
    axis = axis % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


def onnx_embedding(weight: Tensor, idx: Tensor) -> Tensor:
    idx = torch.where(idx < 0, idx + weight.shape[0], idx)
    return F.embedding(idx, weight)


def onnx_expand(x: Tensor, shape: list) -> Tensor:
    return x.expand(torch.broadcast_shapes(x.shape, tuple(shape)))


def onnx_layer_norm(x: Tensor, scale: Tensor, bias: Tensor | None, axis: int, eps: float) -> Tensor:
    axis = axis % x.dim()
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    y = F.layer_norm(x, shape, None, None, eps) * scale
    return y + bias if bias is not None else y


def onnx_layer_norm_stats(x: Tensor, axis: int, eps: float) -> tuple[Tensor, Tensor]:
    axis = axis % x.dim()
    dims = tuple(range(axis, x.dim()))
    xf = x.float()
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).pow(2).mean(dims, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def onnx_one_hot(idx: Tensor, depth: Any, values: Tensor, axis: int) -> Tensor:
    depth = int(depth)
    idx = torch.where(idx < 0, idx + depth, idx)
    hot = idx.unsqueeze(-1) == torch.arange(depth, device=idx.device, dtype=idx.dtype)
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, axis % out.dim())


def onnx_split(x: Tensor, sizes: list | None, axis: int, n: int) -> tuple:
    if sizes is None:
        dim = x.shape[axis]
        return torch.split(x, (dim + n - 1) // n, dim=axis)
    return torch.split(x, list(sizes), dim=axis)


def onnx_flatten(x: Tensor, axis: int) -> Tensor:
    axis = axis + x.dim() if axis < 0 else axis      # -1 is the last dim (not "after the last")
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def onnx_reduce(kind: str, x: Tensor, axes: list | None, keepdims: bool) -> Tensor:
    """Reduce* keep the input's type: torch sums integers into int64 and has no integer mean (ONNX's
    is the float mean truncated, as the reference computes it)."""
    if x.is_floating_point() or x.dtype == torch.bool:
        return _reduce_same_type(kind, x, axes, keepdims)
    xf = x.to(torch.float64) if kind == "mean" else x
    return _reduce_same_type(kind, xf, axes, keepdims).to(x.dtype)


def _reduce_same_type(kind: str, x: Tensor, axes: list | None, keepdims: bool) -> Tensor:
    if axes is None:
        axes = list(range(x.dim()))
    dims = tuple(a % x.dim() for a in axes) if x.dim() else ()
    if kind == "mean":
        return x.mean(dims, keepdim=keepdims) if dims else x
    if kind == "sum":
        return x.sum(dims, keepdim=keepdims) if dims else x
    if kind == "prod":
        for d in sorted(dims, reverse=True):
            x = x.prod(d, keepdim=keepdims)
        return x
    if kind in _NORM_REDUCE:
        return _NORM_REDUCE[kind](x, dims or None, keepdims)
    fn = torch.amax if kind == "max" else torch.amin
    return fn(x, dims, keepdim=keepdims) if dims else x


# ReduceL1/L2/SumSquare/LogSum/LogSumExp; ``dims`` None means a 0-d input (reduce nothing but the map).
_NORM_REDUCE: dict[str, Callable] = {
    "l1": lambda x, d, k: x.abs().sum(d, keepdim=k) if d else x.abs(),
    "l2": lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt() if d else x.abs(),
    "sumsquare": lambda x, d, k: (x * x).sum(d, keepdim=k) if d else x * x,
    "logsum": lambda x, d, k: x.sum(d, keepdim=k).log() if d else x.log(),
    "logsumexp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k) if d else x,
}


def onnx_gemm(a: Tensor, b: Tensor, c: Tensor | None, alpha: float, beta: float, trans_a: int, trans_b: int) -> Tensor:
    a = a.transpose(0, 1) if trans_a else a
    b = b.transpose(0, 1) if trans_b else b
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def onnx_softmax_2d(log: bool, x: Tensor, axis: int) -> Tensor:
    """Softmax/LogSoftmax of opset < 13: over all dims from ``axis`` on (the 2-D coercion)."""
    fn = torch.log_softmax if log else torch.softmax
    if x.dim() == 0:
        return fn(x.reshape(1), -1).reshape(())
    axis = axis % x.dim()
    return fn(x.flatten(axis), -1).reshape(x.shape)


def onnx_cumsum(x: Tensor, axis: Any, exclusive: int, reverse: int) -> Tensor:
    axis = int(axis) % x.dim()
    if reverse:
        x = x.flip(axis)
    # dtype=x.dtype: torch promotes an int32 cumsum to int64, ONNX keeps the input's type.
    y = torch.cumsum(x, axis, dtype=x.dtype)
    if exclusive and y.shape[axis] > 0:
        # Shift by one instead of y - x: exact for floats too, like the reference.
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if reverse else y


def onnx_pow(a: Tensor, b: Tensor) -> Tensor:
    """ONNX Pow keeps the base's type (torch promotes ``int ** float`` and ``f16 ** f32[N]``)."""
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


def _same_pads(x: Tensor, w: Tensor, strides: list, dilations: list, upper: bool) -> list:
    """auto_pad SAME_UPPER/SAME_LOWER: output size ceil(in / stride), the odd pad at the end (upper)
    or the beginning (lower); ONNX order [begin..., end...]."""
    begins, ends = [], []
    for i, (st, d) in enumerate(zip(strides, dilations)):
        size, k = x.shape[2 + i], w.shape[2 + i]
        total = max(0, (-(-size // st) - 1) * st + (k - 1) * d + 1 - size)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def onnx_conv(x: Tensor, w: Tensor, b: Tensor | None, strides: list, pads: list | None, dilations: list,
              group: int, auto_pad: str) -> Tensor:
    nd = w.dim() - 2
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x, w, strides, dilations, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID" or pads is None:
        pads = [0] * (2 * nd)
    begin, end = list(pads[:nd]), list(pads[nd:])
    if begin != end:
        # torch pads both sides alike: pad the input explicitly (F.pad lists the last dim first).
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        begin = [0] * nd
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, tuple(strides), tuple(begin), tuple(dilations), group)


def onnx_pool(kind: str, x: Tensor, kernel: list, strides: list, pads: list | None, dilations: list,
              auto_pad: str, ceil_mode: bool, count_include_pad: bool) -> Tensor:
    """MaxPool / AveragePool (1-D..3-D): explicit or auto pads; asymmetric pads are applied first
    (-inf for max; for average as zeros counted only with count_include_pad)."""
    nd = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        w = x.new_empty((1, 1, *[(k - 1) * d + 1 for k, d in zip(kernel, dilations)]))
        pads = _same_pads(x, w, strides, [1] * nd, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID" or pads is None:
        pads = [0] * (2 * nd)
    begin, end = list(pads[:nd]), list(pads[nd:])
    if kind == "max":
        if begin != end or any(2 * b > k for b, k in zip(begin, kernel)):
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])], value=-math.inf)
            begin = [0] * nd
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return fn(x, kernel, strides, begin, dilations, ceil_mode)
    if begin != end or any(2 * b > k for b, k in zip(begin, kernel)):
        if not count_include_pad:
            # Average over the real elements only: pool a ones mask the same way.
            ones = torch.ones_like(x[:1, :1])
            pad = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]
            num = onnx_pool("avg", F.pad(x, pad), kernel, strides, None, [1] * nd, "VALID", ceil_mode, True)
            den = onnx_pool("avg", F.pad(ones, pad), kernel, strides, None, [1] * nd, "VALID", ceil_mode, True)
            return num / den
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        begin = [0] * nd
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return fn(x, kernel, strides, begin, ceil_mode, count_include_pad)


def onnx_pad(x: Tensor, pads: list, value: Any, mode: str, axes: list | None) -> Tensor:
    r = x.dim()
    axes = list(range(r)) if axes is None else [a % r for a in axes]
    n = len(axes)
    begin, end = [0] * r, [0] * r
    for a, pb, pe in zip(axes, pads[:n], pads[n:]):
        begin[a], end[a] = pb, pe
    mode = {"edge": "replicate", "wrap": "circular"}.get(mode, mode)
    if mode == "constant":
        # F.pad takes (begin, end) pairs from the last dim backwards.
        return F.pad(x, [p for i in reversed(range(r)) for p in (begin[i], end[i])], "constant", value)
    # reflect/replicate/circular pad only the last 1..3 dims of a batched input in torch: pad one
    # axis at a time as the last dim of a [1, rest, size] view (what numpy.pad does axis by axis).
    for a in range(r):
        if begin[a] or end[a]:
            y = x.movedim(a, -1)
            shape = y.shape
            y = F.pad(y.reshape(1, -1, shape[-1]), [begin[a], end[a]], mode)
            x = y.reshape(*shape[:-1], y.shape[-1]).movedim(-1, a)
    return x


def onnx_shape(x: Tensor, start: int, end: int | None) -> Tensor:
    # Python slicing clamps start/end (negative ones count from the end) exactly as ONNX Shape does.
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def onnx_trunc_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="trunc")


def onnx_range(start: Any, limit: Any, delta: Any, dtype: torch.dtype) -> Tensor:
    return torch.arange(start, limit, delta, dtype=dtype)


def onnx_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype)


# ---- elementwise --------------------------------------------------------------------------------

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _trunc_div_int(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _sym_broadcast(ctx: Ctx, op: Callable, a: Any, b: Any) -> Any:
    ia, ib = ctx.sym(a), ctx.sym(b)
    if ia is None or ib is None:
        return None
    sa = isinstance(a, Sym) and a.scalar or isinstance(a, Const) and a.t.dim() == 0
    sb = isinstance(b, Sym) and b.scalar or isinstance(b, Const) and b.t.dim() == 0
    if len(ia) == 1 and len(ib) > 1:
        ia = ia * len(ib)
    if len(ib) == 1 and len(ia) > 1:
        ib = ib * len(ia)
    if len(ia) != len(ib):
        return None
    return ctx.make_sym([op(x, y) for x, y in zip(ia, ib)], scalar=sa and sb)


def _binary(name: str, torch_fn: Callable, sym_fn: Callable | None):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        a, b = inputs
        if sym_fn is not None and (isinstance(a, Sym) or isinstance(b, Sym)):
            out = _sym_broadcast(ctx, lambda x, y: ctx.sym_op(sym_fn, x, y)
                                 if not (isinstance(x, int) and isinstance(y, int)) else _int_op(name, x, y), a, b)
            if out is not None:
                return out
        fn = torch_fn
        if name == "Div" and ctx.dtype(a) in _INT_DTYPES:
            fn = onnx_trunc_div
        return ctx.call(fn, a, b)
    return conv


def _int_op(name: str, x: int, y: int) -> Any:
    return {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _trunc_div_int,
            "Equal": operator.eq, "Max": max, "Min": min}[name](x, y)


for _name, _fn, _sym in (("Add", torch.add, operator.add), ("Sub", torch.sub, operator.sub),
                         ("Mul", torch.mul, operator.mul), ("Div", torch.div, operator.floordiv),
                         ("Pow", onnx_pow, None), ("Less", torch.lt, None), ("Greater", torch.gt, None),
                         ("LessOrEqual", torch.le, None), ("GreaterOrEqual", torch.ge, None),
                         ("And", torch.logical_and, None), ("Or", torch.logical_or, None),
                         ("Xor", torch.logical_xor, None)):
    register(_name, rank=_max_rank)(_binary(_name, _fn, _sym))


@register("Equal", rank=_max_rank)
def convert_equal(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    a, b = inputs
    if isinstance(a, Sym) or isinstance(b, Sym):
        def eq(x: Any, y: Any) -> Any:
            if isinstance(x, int) and isinstance(y, int):
                return x == y
            other = x if isinstance(x, int) else y if isinstance(y, int) else None
            if other is not None and other < 0:
                return False          # a size is never negative
            return ctx.sym_op(operator.eq, x, y)
        out = _sym_broadcast(ctx, eq, a, b)
        if out is not None:
            return out
    out = ctx.call(torch.eq, a, b)
    if isinstance(out, torch.fx.Node):
        out.meta["dtype"] = torch.bool
    return out


def _unary(fn: Callable):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        return ctx.call(fn, inputs[0])
    return conv


for _name, _fn in (("Sqrt", torch.sqrt), ("Reciprocal", torch.reciprocal), ("Neg", torch.neg), ("Erf", torch.erf),
                   ("Tanh", torch.tanh), ("Sigmoid", torch.sigmoid), ("Relu", torch.relu), ("Exp", torch.exp),
                   ("Log", torch.log), ("Abs", torch.abs), ("Cos", torch.cos), ("Sin", torch.sin),
                   ("Floor", torch.floor), ("Ceil", torch.ceil), ("Round", torch.round), ("Sign", torch.sign),
                   ("Not", torch.logical_not), ("IsNaN", torch.isnan), ("Softplus", F.softplus),
                   ("Tan", torch.tan), ("Atan", torch.atan), ("Asin", torch.asin), ("Acos", torch.acos),
                   ("Sinh", torch.sinh), ("Cosh", torch.cosh), ("Softsign", F.softsign), ("Mish", F.mish),
                   ("HardSwish", F.hardswish)):
    register(_name, rank=_same_rank)(_unary(_fn))


def onnx_elu(x: Tensor, kind: str, alpha: float, gamma: float) -> Tensor:
    """Elu/Selu/Celu/ThresholdedRelu with ONNX's attribute defaults (torch's Selu has fixed constants)."""
    if kind == "elu":
        return torch.where(x > 0, x, alpha * torch.expm1(x))
    if kind == "selu":
        return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))
    if kind == "celu":
        return torch.clamp(x, min=0) + torch.clamp(alpha * torch.expm1(x / alpha), max=0)
    return torch.where(x > alpha, x, torch.zeros_like(x))


def _elu(kind: str, alpha: float, gamma: float = 1.0):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        return ctx.call(onnx_elu, inputs[0], kind, attrs.get("alpha", alpha), attrs.get("gamma", gamma))
    return conv


register("Elu", rank=_same_rank)(_elu("elu", 1.0))
register("Celu", rank=_same_rank)(_elu("celu", 1.0))
register("Selu", rank=_same_rank)(_elu("selu", 1.67326319217681884765625, 1.05070102214813232421875))
register("ThresholdedRelu", rank=_same_rank)(_elu("thresholded", 1.0))


@register("PRelu", rank=_max_rank)
def convert_prelu(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, slope = inputs       # slope broadcasts unidirectionally (F.prelu wants it per channel only)
    return ctx.call(torch.where, ctx.call(torch.lt, x, 0), ctx.call(torch.mul, x, slope), x)


@register("IsInf", rank=_same_rank)
def convert_is_inf(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    fn = torch.isinf if pos and neg else torch.isposinf if pos else torch.isneginf
    if not pos and not neg:
        return ctx.call(torch.zeros_like, inputs[0], dtype=torch.bool)
    return ctx.call(fn, inputs[0])


@register("Mod", rank=_max_rank)
def convert_mod(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    # fmod=0 (integers): the result takes the divisor's sign (Python's %); fmod=1: C's fmod.
    return ctx.call(torch.fmod if attrs.get("fmod", 0) else torch.remainder, inputs[0], inputs[1])


def onnx_arg(x: Tensor, axis: int, keepdims: bool, largest: bool, last: bool) -> Tensor:
    fn = torch.argmax if largest else torch.argmin
    if not last:
        return fn(x, axis, keepdim=keepdims)      # torch returns the first extreme index, like ONNX
    axis = axis % x.dim()
    return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keepdims)


def _arg(largest: bool):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        out = ctx.call(onnx_arg, inputs[0], attrs.get("axis", 0), bool(attrs.get("keepdims", 1)), largest,
                       bool(attrs.get("select_last_index", 0)))
        if isinstance(out, torch.fx.Node):
            out.meta["dtype"] = torch.int64
        return out
    return conv


register("ArgMax")(_arg(True))
register("ArgMin")(_arg(False))


@register("Identity", rank=_same_rank)
def convert_identity(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    return inputs[0]


@register("Dropout", rank=_same_rank)
def convert_dropout(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    if len(node.output) > 1 and node.output[1]:
        return [x, ctx.call(torch.ones_like, x, dtype=torch.bool)]
    return x


@register("Gelu", rank=_same_rank)
def convert_gelu(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    approx = attrs.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise OnnxImportError(f"Gelu approximate={approx!r} is not supported")
    return ctx.call(F.gelu, inputs[0], approximate=approx)


@register("LeakyRelu", rank=_same_rank)
def convert_leaky_relu(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    return ctx.call(F.leaky_relu, inputs[0], attrs.get("alpha", 0.01))


@register("HardSigmoid", rank=_same_rank)
def convert_hard_sigmoid(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = ctx.call(torch.mul, inputs[0], attrs.get("alpha", 0.2))
    return ctx.call(torch.clamp, ctx.call(torch.add, x, attrs.get("beta", 0.5)), 0.0, 1.0)


@register("Clip", rank=_same_rank)
def convert_clip(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 else None
    hi = inputs[2] if len(inputs) > 2 else None
    return ctx.call(torch.clamp, x, lo, hi)


@register("Where", rank=_max_rank)
def convert_where(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    c, a, b = inputs
    ic, ia, ib = None, ctx.sym(a), ctx.sym(b)
    if isinstance(c, Const) and c.t.dtype == torch.bool and c.t.dim() <= 1 and c.t.numel() <= 64:
        ic = [bool(v) for v in c.t.reshape(-1).tolist()]
    if isinstance(c, Sym):
        ic = c.items
    if ic is not None and ia is not None and ib is not None and (isinstance(a, Sym) or isinstance(b, Sym) or isinstance(c, Sym)):
        n = max(len(ic), len(ia), len(ib))
        ic, ia, ib = (v * n if len(v) == 1 else v for v in (ic, ia, ib))
        if len(ic) == len(ia) == len(ib):
            items = [x if cc is True else y if cc is False else ctx.graph.call_function(torch.sym_ite, (cc, x, y))
                     for cc, x, y in zip(ic, ia, ib)]
            return ctx.make_sym(items, scalar=all(ctx.rank(v) == 0 for v in (c, a, b)))
    return ctx.call(torch.where, c, a, b)


def _variadic(fn: Callable, sym_name: str | None = None):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        out = inputs[0]
        for v in inputs[1:]:
            if sym_name and (isinstance(out, Sym) or isinstance(v, Sym)):
                r = _sym_broadcast(ctx, lambda x, y: _int_op(sym_name, x, y) if isinstance(x, int) and isinstance(y, int)
                                   else ctx.graph.call_function(torch.sym_max if sym_name == "Max" else torch.sym_min, (x, y)),
                                   out, v)
                if r is not None:
                    out = r
                    continue
            out = ctx.call(fn, out, v)
        return out
    return conv


register("Max", rank=_max_rank)(_variadic(torch.maximum, "Max"))
register("Min", rank=_max_rank)(_variadic(torch.minimum, "Min"))
register("Sum", rank=_max_rank)(_variadic(torch.add))


@register("Mean", rank=_max_rank)
def convert_mean(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    total = _variadic(torch.add)(ctx, inputs, attrs, node)
    dt = ctx.dtype(inputs[0])
    if dt is not None and not dt.is_floating_point:      # an integer mean stays an integer (truncated)
        return ctx.call(onnx_cast, ctx.call(torch.div, total, len(inputs), rounding_mode="trunc"), dt)
    return ctx.call(torch.div, total, float(len(inputs)))


# ---- MatMul-like --------------------------------------------------------------------------------


def _scope_name(ctx: Ctx, node, weight_name: str) -> str:
    """A module name for a linear layer: the exporter's module scope, the node name's path, or the weight's."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:  # a list literal of strings; never eval() text from a model file
                value = ast.literal_eval(p.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = []
            scopes = [s for s in value if isinstance(s, str) and s] if isinstance(value, list) else []
            if len(scopes) >= 2:
                return scopes[-2]
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return ".".join(node.name.strip("/").split("/")[:-1])
    if weight_name.endswith(".weight"):
        return weight_name[: -len(".weight")]
    ctx.linear_count += 1
    return f"linear_{ctx.linear_count}"


def _linear(ctx: Ctx, x: Any, w_kn: Tensor, bias: Tensor | None, name: str) -> Any:
    lin = nn.Linear(w_kn.shape[0], w_kn.shape[1], bias=bias is not None, dtype=w_kn.dtype)
    with torch.no_grad():
        lin.weight.copy_(w_kn.t())
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return ctx.module(name, lin, x)


@register("MatMul", rank=_max_rank)
def convert_matmul(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    a, b = inputs
    # Any rank of A: matmul(A, W) with a 2-D W is linear(A, W^T) for 1-D and N-D A alike, so a
    # model without shape information still gets its linear layers (quantize=True counts them).
    if isinstance(a, torch.fx.Node) and isinstance(b, Const) and b.t.dim() == 2 and b.t.is_floating_point():
        return _linear(ctx, a, b.t, None, _scope_name(ctx, node, node.input[1]))
    return ctx.call(torch.matmul, a, b)


@register("Gemm", rank=lambda ctx, i, a: 2)
def convert_gemm(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    ta, tb = attrs.get("transA", 0), attrs.get("transB", 0)
    if isinstance(a, torch.fx.Node) and isinstance(b, Const) and b.t.dim() == 2 and b.t.is_floating_point():
        w_kn = b.t.t() if tb else b.t
        bias = _gemm_bias(c, beta, w_kn.shape[1])
        if bias is not False:
            # A linear layer (so quantize=True sees it): alpha folds into the weight, beta into the
            # bias; a binarized alpha*W is alpha times the binarized W (the sign and mean|W| scale).
            x = ctx.call(torch.transpose, a, 0, 1) if ta else a
            w_kn = w_kn * alpha if alpha != 1.0 else w_kn
            return _linear(ctx, x, w_kn, bias, _scope_name(ctx, node, node.input[1]))
    return ctx.call(onnx_gemm, a, b, c, alpha, beta, ta, tb)


def _gemm_bias(c: Any, beta: float, n: int) -> Tensor | None | bool:
    """Gemm's ``beta * C`` as a linear bias of ``n`` entries: None without C, False when C is not a
    constant broadcast along the rows (shape [], [1], [N] or [1, N])."""
    if c is None:
        return None
    if not isinstance(c, Const) or tuple(c.t.shape) not in ((), (1,), (n,), (1, n)) \
            or not c.t.is_floating_point():
        return False
    bias = c.t * beta if beta != 1.0 else c.t
    return bias.reshape(-1).expand(n).clone()


@register("Conv", rank=_same_rank)
def convert_conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd = ctx.rank(w)
    if nd is None and "kernel_shape" in attrs:
        nd = len(attrs["kernel_shape"]) + 2
    if nd is None or not 3 <= nd <= 5:
        raise OnnxImportError(f"Conv needs a weight of rank 3..5 (1-D to 3-D convolution), got rank {nd}")
    k = nd - 2
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise OnnxImportError(f"Conv auto_pad={auto_pad!r} is not supported")
    return ctx.call(onnx_conv, x, w, b, list(attrs.get("strides", [1] * k)), attrs.get("pads"),
                    list(attrs.get("dilations", [1] * k)), attrs.get("group", 1), auto_pad)


def _pool(kind: str):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        if len([o for o in node.output if o]) > 1:
            raise OnnxImportError("MaxPool's Indices output is not supported")
        if attrs.get("storage_order", 0):
            raise OnnxImportError("MaxPool storage_order=1 is not supported")
        kernel = list(attrs["kernel_shape"])
        k = len(kernel)
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise OnnxImportError(f"auto_pad={auto_pad!r} is not supported")
        if kind == "avg" and any(d != 1 for d in attrs.get("dilations", [])):
            raise OnnxImportError("AveragePool with dilations is not supported")
        return ctx.call(onnx_pool, kind, inputs[0], kernel, list(attrs.get("strides", [1] * k)), attrs.get("pads"),
                        list(attrs.get("dilations", [1] * k)), auto_pad, bool(attrs.get("ceil_mode", 0)),
                        bool(attrs.get("count_include_pad", 0)))
    return conv


register("MaxPool", rank=_same_rank)(_pool("max"))
register("AveragePool", rank=_same_rank)(_pool("avg"))


def onnx_global_pool(kind: str, x: Tensor) -> Tensor:
    """Over every spatial dim (2..), keeping them as size 1."""
    return onnx_reduce(kind, x, list(range(2, x.dim())), True)


@register("GlobalAveragePool", "GlobalMaxPool", rank=_same_rank)
def convert_global_pool(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    return ctx.call(onnx_global_pool, "mean" if node.op_type == "GlobalAveragePool" else "max", inputs[0])


@register("Pad", rank=_same_rank)
def convert_pad(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise OnnxImportError(f"Pad mode={mode!r} is not supported")
    pads = _as_list(ctx.ints(inputs[1], "Pad pads")) if len(inputs) > 1 and inputs[1] is not None \
        else list(attrs.get("pads", []))
    value: Any = attrs.get("value", 0.0)
    if len(inputs) > 2 and inputs[2] is not None:
        v = inputs[2]
        value = v.t.reshape(()).item() if isinstance(v, Const) else ctx.graph.call_method("item", (v,))
    axes = ctx.ints(inputs[3], "Pad axes") if len(inputs) > 3 and inputs[3] is not None else None
    return ctx.call(onnx_pad, x, pads, value, mode, axes)


@register("Einsum")
def convert_einsum(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    eq = attrs["equation"]
    if len(inputs) == 2 and isinstance(inputs[0], torch.fx.Node) and isinstance(inputs[1], Const) \
            and inputs[1].t.dim() == 2 and inputs[1].t.is_floating_point():
        w_kn = _einsum_weight(eq, inputs[1].t)
        if w_kn is not None:    # a projection (TF/JAX exports write them as Einsum): a linear layer
            return _linear(ctx, inputs[0], w_kn, None, _scope_name(ctx, node, node.input[1]))
    return ctx.call(torch.einsum, eq, *inputs)


def _einsum_weight(equation: str, w: Tensor) -> Tensor | None:
    """The [K, N] weight when ``equation`` contracts the last dim of operand 0 with a 2-D constant
    and puts the other weight dim last ("bsd,dh->bsh", "...d,hd->...h"), else None."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if len(b) != 2 or b[0] == b[1] or not a or a[-1] not in b:
        return None
    k = a[-1]
    n = b[1] if b[0] == k else b[0]
    if n in a or out != a[:-1] + n or a.count(k) != 1:
        return None
    return w if b[0] == k else w.t()


# ---- normalization / softmax / reductions -------------------------------------------------------


def _softmax(fn: Callable):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        axis, r = attrs.get("axis", -1 if ctx.opset >= 13 else 1), ctx.rank(inputs[0])
        if ctx.opset >= 13 or (r is not None and r > 0 and axis % r == r - 1):
            # Over the last dim the old and new semantics agree: emit the plain op either way.
            return ctx.call(fn, inputs[0], axis)
        # Softmax-1/11 (and LogSoftmax): default axis 1, and the input is coerced to 2-D
        # [prod(d[:axis]), prod(d[axis:])], so the normalization runs over every dim from axis on.
        return ctx.call(onnx_softmax_2d, fn is torch.log_softmax, inputs[0], axis)
    return conv


register("Softmax", rank=_same_rank)(_softmax(torch.softmax))
register("LogSoftmax", rank=_same_rank)(_softmax(torch.log_softmax))


@register("LayerNormalization", rank=_same_rank)
def convert_layer_norm(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis, eps = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    y = ctx.call(onnx_layer_norm, x, scale, bias, axis, eps)
    if len(node.output) > 1 and any(node.output[1:]):
        stats = ctx.call(onnx_layer_norm_stats, x, axis, eps)
        if isinstance(stats, list):
            return [y, *stats]
        return [y, ctx.graph.call_function(operator.getitem, (stats, 0)),
                ctx.graph.call_function(operator.getitem, (stats, 1))]
    return y


@register("BatchNormalization", rank=_same_rank)
def convert_batch_norm(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    if attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise OnnxImportError("BatchNormalization in training mode (running statistics as outputs) is not "
                              "supported; export the model in eval mode")
    x, scale, bias, mean, var = inputs[:5]
    return ctx.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


@register("InstanceNormalization", rank=_same_rank)
def convert_instance_norm(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, scale, bias = inputs
    return ctx.call(F.instance_norm, x, None, None, scale, bias, True, 0.0, attrs.get("epsilon", 1e-5))


def onnx_group_norm(x: Tensor, scale: Tensor, bias: Tensor, groups: int, eps: float, per_group: bool) -> Tensor:
    """GroupNormalization; opset 18's scale/bias have one entry per group (opset 21: per channel)."""
    if per_group:
        c = x.shape[1]
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    return F.group_norm(x, groups, scale, bias, eps)


@register("GroupNormalization", rank=_same_rank)
def convert_group_norm(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, scale, bias = inputs
    return ctx.call(onnx_group_norm, x, scale, bias, attrs["num_groups"], attrs.get("epsilon", 1e-5),
                    ctx.opset < 21)


def _axes(ctx: Ctx, inputs: list, attrs: dict, pos: int = 1) -> list | None:
    if len(inputs) > pos and inputs[pos] is not None:
        return ctx.ints(inputs[pos], "axes")
    return attrs.get("axes")


def _reduce(kind: str):
    def conv(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
        axes = _axes(ctx, inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return inputs[0]
            axes = None
        return ctx.call(onnx_reduce, kind, inputs[0], axes, keep)
    return conv


def _reduce_rank(ctx: Ctx, inputs: list, attrs: dict) -> int | None:
    r = ctx.rank(inputs[0])
    if r is None or attrs.get("keepdims", 1):
        return r
    return None


for _name, _kind in (("ReduceMean", "mean"), ("ReduceSum", "sum"), ("ReduceMax", "max"), ("ReduceMin", "min"),
                     ("ReduceProd", "prod"), ("ReduceL1", "l1"), ("ReduceL2", "l2"),
                     ("ReduceSumSquare", "sumsquare"), ("ReduceLogSum", "logsum"),
                     ("ReduceLogSumExp", "logsumexp")):
    register(_name, rank=_reduce_rank)(_reduce(_kind))


# ---- shapes -------------------------------------------------------------------------------------


@register("Shape", rank=lambda ctx, i, a: 1)
def convert_shape(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    if isinstance(x, (Const, Sym)):
        dims = ctx.static_dims(x)
        items = dims
    else:
        r = ctx.rank(x)
        if r is None:
            # Rank unknown (no shape information): slice the shape at run time, start/end included.
            out = ctx.call(onnx_shape, x, attrs.get("start", 0), attrs.get("end"))
            out.meta.update(dtype=torch.int64, rank=1)
            return out
        items = [ctx.size(x, i) for i in range(r)]
    r = len(items)
    start, end = attrs.get("start", 0), attrs.get("end", r)
    start, end = (max(0, min(r, v + r if v < 0 else v)) for v in (start, end))
    return ctx.make_sym(items[start:end])


@register("Size", rank=lambda ctx, i, a: 0)
def convert_size(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    if isinstance(x, Const):
        return Const(torch.tensor(x.t.numel()))
    # A 0-d int64 value (torch.numel returns a Python int, which as a graph output is no tensor).
    n = ctx.graph.call_method("numel", (x,))
    n.meta.update(dtype=torch.int64, rank=0)
    return Sym([n], scalar=True)


def _as_list(items: Any) -> Any:
    return items if isinstance(items, torch.fx.Node) else list(items)


def _shape_items(ctx: Ctx, v: Any, what: str) -> list:
    return ctx.ints(v, what)


@register("Reshape")
def convert_reshape(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, shape = inputs
    items = _shape_items(ctx, shape, "Reshape's shape")
    if isinstance(items, torch.fx.Node):
        return ctx.call(onnx_reshape, x, items, bool(attrs.get("allowzero", 0)))
    items = list(items)
    if not attrs.get("allowzero", 0):
        for i, s in enumerate(items):
            if isinstance(s, int) and s == 0:
                if isinstance(x, Sym):
                    items[i] = len(x.items)
                elif isinstance(x, Const):
                    items[i] = x.t.shape[i]
                else:
                    items[i] = ctx.size(x, i)
    if isinstance(x, Sym):
        n = len(x.items)
        if items in ([], [1], [-1], [n]) or (len(items) == 1 and items[0] == n):
            return Sym(x.items, scalar=not items)
    out = ctx.call(torch.reshape, x, items)
    if isinstance(out, torch.fx.Node):
        out.meta["rank"] = len(items)
    return out


@register("Transpose", rank=_same_rank)
def convert_transpose(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    perm = attrs.get("perm")
    if perm is None:
        r = ctx.rank(x)
        if r is None:
            return ctx.call(lambda t: t.permute(*reversed(range(t.dim()))), x)
        perm = list(reversed(range(r)))
    return ctx.call(torch.permute, x, list(perm))


def _unsqueeze_rank(ctx: Ctx, inputs: list, attrs: dict) -> int | None:
    axes = ctx.sym(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    r = ctx.rank(inputs[0])
    return None if r is None or axes is None else r + len(axes)


@register("Unsqueeze", rank=_unsqueeze_rank)
def convert_unsqueeze(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    axes = _as_list(_axes(ctx, inputs, attrs))       # a list, or an FX node for run-time axes
    if isinstance(x, Sym) and x.scalar and isinstance(axes, list) and len(axes) == 1:
        return Sym(x.items)
    return ctx.call(onnx_unsqueeze, x, axes)


@register("Squeeze")
def convert_squeeze(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    axes = _axes(ctx, inputs, attrs)
    axes = _as_list(axes) if axes is not None else None     # a list, or an FX node for run-time axes
    if isinstance(x, Sym) and not x.scalar and len(x.items) == 1:
        return Sym(x.items, scalar=True)
    out = ctx.call(onnx_squeeze, x, axes)
    if isinstance(out, torch.fx.Node) and isinstance(axes, list) and ctx.rank(x) is not None:
        out.meta["rank"] = ctx.rank(x) - len(axes)
    return out


@register("Concat", rank=_max_rank)
def convert_concat(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    inputs = [v for v in inputs if v is not None]
    if any(isinstance(v, Sym) for v in inputs):
        parts = [ctx.sym(v) for v in inputs]
        if all(p is not None for p in parts):
            return ctx.make_sym([i for p in parts for i in p])
    return ctx.call(torch.cat, inputs, attrs.get("axis", 0))


@register("Slice", rank=_same_rank)
def convert_slice(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    starts = ctx.ints(inputs[1], "Slice starts")
    ends = ctx.ints(inputs[2], "Slice ends")
    axes = ctx.ints(inputs[3], "Slice axes") if len(inputs) > 3 and inputs[3] is not None else \
        (list(range(len(starts))) if isinstance(starts, list) else None)
    steps = ctx.ints(inputs[4], "Slice steps") if len(inputs) > 4 and inputs[4] is not None else None
    if any(isinstance(v, torch.fx.Node) for v in (starts, ends, axes, steps)):
        # Omitted axes/steps take their defaults at run time, when the number of starts is known.
        return ctx.call(onnx_slice, x, starts, ends, axes, steps)
    steps = steps if steps is not None else [1] * len(starts)
    if any(not isinstance(s, int) for s in steps):
        raise OnnxImportError("Slice steps must be known at import time")
    big = 1 << 31
    ends = [None if isinstance(e, int) and st > 0 and e >= big else
            -big if isinstance(e, int) and e < -big else e for e, st in zip(ends, steps)]
    starts = [max(-big, min(big, s)) if isinstance(s, int) else s for s in starts]
    if isinstance(x, Sym) and all(isinstance(v, int) or v is None for v in (*starts, *ends)):
        return ctx.make_sym(x.items[slice(starts[0], ends[0], steps[0])])
    return ctx.call(onnx_slice, x, starts, ends, list(axes), steps)


@register("Split")
def convert_split(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x = inputs[0]
    axis = attrs.get("axis", 0)
    sizes = ctx.ints(inputs[1], "Split sizes") if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    n = attrs.get("num_outputs", len(node.output))
    parts = ctx.call(onnx_split, x, sizes, axis, n)
    if isinstance(parts, list):
        return parts
    outs = []
    for i in range(len(node.output)):
        o = ctx.graph.call_function(operator.getitem, (parts, i))
        o.meta["rank"] = ctx.rank(x)
        outs.append(o)
    return outs


@register("Gather", rank=lambda ctx, i, a: None if ctx.rank(i[0]) is None or ctx.rank(i[1]) is None
          else ctx.rank(i[0]) + ctx.rank(i[1]) - 1)
def convert_gather(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, idx = inputs
    axis = attrs.get("axis", 0)
    if isinstance(x, Sym):
        ii = ctx.sym(idx)
        if ii is not None and all(isinstance(i, int) for i in ii):
            items = [x.items[i] for i in ii]
            scalar = (isinstance(idx, Const) and idx.t.dim() == 0) or (isinstance(idx, Sym) and idx.scalar)
            return ctx.make_sym(items, scalar=scalar)
    if axis == 0 and isinstance(x, Const) and x.t.dim() == 2 and isinstance(idx, torch.fx.Node):
        return ctx.call(onnx_embedding, x, idx)
    return ctx.call(onnx_gather, x, idx, axis)


@register("GatherElements", rank=lambda ctx, i, a: ctx.rank(i[1]))
def convert_gather_elements(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, idx = inputs
    return ctx.call(onnx_gather_elements, x, idx, attrs.get("axis", 0))


@register("Expand")
def convert_expand(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, shape = inputs
    return ctx.call(onnx_expand, x, _as_list(ctx.ints(shape, "Expand shape")))


@register("Tile", rank=_same_rank)
def convert_tile(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    return ctx.call(torch.tile, inputs[0], _as_list(ctx.ints(inputs[1], "Tile repeats")))


@register("Flatten", rank=lambda ctx, i, a: 2)
def convert_flatten(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    return ctx.call(onnx_flatten, inputs[0], attrs.get("axis", 1))


@register("Cast", rank=_same_rank)
def convert_cast(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    to = attrs["to"]
    if to not in ONNX_TO_TORCH:
        raise OnnxImportError(f"Cast to {onnx.TensorProto.DataType.Name(to)} is not supported")
    dt = ONNX_TO_TORCH[to]
    x = inputs[0]
    if isinstance(x, Sym) and dt in (torch.int64, torch.int32):
        return x
    out = ctx.call(onnx_cast, x, dt)
    if isinstance(out, torch.fx.Node):
        out.meta["dtype"] = dt
    return out


@register("CastLike", rank=_same_rank)
def convert_cast_like(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    dt = ctx.dtype(inputs[1])
    if dt is None:
        raise OnnxImportError("CastLike: the target's type is unknown")
    if isinstance(inputs[0], Sym) and dt in (torch.int64, torch.int32):
        return inputs[0]
    out = ctx.call(onnx_cast, inputs[0], dt)
    if isinstance(out, torch.fx.Node):
        out.meta["dtype"] = dt
    return out


@register("Constant")
def convert_constant(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    if "value" in attrs:
        return Const(attrs["value"])
    if "value_float" in attrs:
        return Const(torch.tensor(attrs["value_float"], dtype=torch.float32))
    if "value_floats" in attrs:
        return Const(torch.tensor(list(attrs["value_floats"]), dtype=torch.float32))
    if "value_int" in attrs:
        return Const(torch.tensor(attrs["value_int"], dtype=torch.int64))
    if "value_ints" in attrs:
        return Const(torch.tensor(list(attrs["value_ints"]), dtype=torch.int64))
    raise OnnxImportError(f"Constant with attribute(s) {sorted(attrs)} is not supported (only numeric tensors)")


@register("ConstantOfShape")
def convert_constant_of_shape(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32))
    items = _as_list(ctx.ints(inputs[0], "ConstantOfShape shape"))
    out = ctx.call(torch.full, items, value.reshape(()).item(), dtype=value.dtype)
    if isinstance(out, torch.fx.Node):
        out.meta.update(dtype=value.dtype, rank=len(items) if isinstance(items, list) else None)
    return out


@register("Range", rank=lambda ctx, i, a: 1)
def convert_range(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    dt = ctx.dtype(inputs[0]) or torch.int64
    vals = []
    for v in inputs:
        s = ctx.sym(v)
        if s is not None and len(s) == 1:
            vals.append(s[0])
        elif isinstance(v, Const) and v.t.numel() == 1:
            vals.append(v.t.reshape(()).item())
        else:
            vals.append(ctx.graph.call_method("item", (ctx.tensor(v),)))
    out = ctx.call(onnx_range, *vals, dt)
    if isinstance(out, torch.fx.Node):
        out.meta.update(dtype=dt, rank=1)
    return out


@register("Trilu", rank=_same_rank)
def convert_trilu(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    k = 0
    if len(inputs) > 1 and inputs[1] is not None:
        items = ctx.ints(inputs[1], "Trilu k")
        k = items[0] if not isinstance(items, torch.fx.Node) else \
            ctx.graph.call_function(operator.getitem, (items, 0))      # read at run time
    fn = torch.triu if attrs.get("upper", 1) else torch.tril
    return ctx.call(fn, inputs[0], k)


def onnx_scatter_nd(data: Tensor, idx: Tensor, updates: Tensor, reduction: str) -> Tensor:
    k = idx.shape[-1]
    idx = idx.reshape(-1, k)
    updates = updates.reshape(idx.shape[0], *data.shape[k:])
    # Negative indices count from the end (index_put does the same).
    keys = tuple(idx[:, j] for j in range(k))
    if reduction in ("none", "add"):
        return data.index_put(keys, updates, accumulate=reduction == "add")
    # mul/max/min: scatter_reduce over the rows of a [prod(data.shape[:k]), rest] view.
    flat_idx = torch.zeros(idx.shape[0], dtype=torch.int64, device=idx.device)
    for j in range(k):
        flat_idx = flat_idx * data.shape[j] + torch.where(idx[:, j] < 0, idx[:, j] + data.shape[j], idx[:, j])
    view = data.reshape(-1, *data.shape[k:]).clone()
    rows = flat_idx.reshape(-1, *([1] * (view.dim() - 1))).expand_as(updates)
    red = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return view.scatter_reduce(0, rows, updates, red, include_self=True).reshape(data.shape)


def onnx_scatter_elements(data: Tensor, idx: Tensor, updates: Tensor, axis: int, reduction: str) -> Tensor:
    axis = axis % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    if reduction == "none":
        return torch.scatter(data, axis, idx, updates)
    red = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return torch.scatter_reduce(data, axis, idx, updates, red, include_self=True)


@register("ScatterND", rank=_same_rank)
def convert_scatter_nd(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    red = attrs.get("reduction", "none")
    if red not in ("none", "add", "mul", "max", "min"):
        raise OnnxImportError(f"ScatterND reduction={red!r} is not supported")
    return ctx.call(onnx_scatter_nd, *inputs[:3], red)


@register("ScatterElements", rank=_same_rank)
def convert_scatter_elements(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    red = attrs.get("reduction", "none")
    if red not in ("none", "add", "mul", "max", "min"):
        raise OnnxImportError(f"ScatterElements reduction={red!r} is not supported")
    return ctx.call(onnx_scatter_elements, *inputs[:3], attrs.get("axis", 0), red)


@register("TopK", rank=_same_rank)
def convert_topk(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, k = inputs
    items = ctx.sym(k)
    kk = items[0] if items is not None else ctx.graph.call_method("item", (ctx.tensor(k),))
    out = ctx.call(torch.topk, x, kk, attrs.get("axis", -1), bool(attrs.get("largest", 1)),
                   bool(attrs.get("sorted", 1)))
    if isinstance(out, list):
        return [out[0], out[1]]
    values = ctx.graph.call_function(operator.getitem, (out, 0))
    indices = ctx.graph.call_function(operator.getitem, (out, 1))
    values.meta.update(dtype=ctx.dtype(x), rank=ctx.rank(x))
    indices.meta.update(dtype=torch.int64, rank=ctx.rank(x))
    return [values, indices]


def _per_axis(p: Tensor, x: Tensor, axis: int) -> Tensor:
    """A 1-D per-axis quantization parameter shaped to broadcast along ``axis`` of ``x``."""
    if p.dim() == 0 or p.numel() == 1 and x.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return p.reshape(shape)


def onnx_dequantize(x: Tensor, scale: Tensor, zero: Tensor | None, axis: int) -> Tensor:
    xf = x.to(scale.dtype)
    if zero is not None:
        xf = xf - _per_axis(zero, x, axis).to(scale.dtype)
    return xf * _per_axis(scale, x, axis)


def onnx_quantize(x: Tensor, scale: Tensor, zero: Tensor | None, axis: int, dtype: torch.dtype) -> Tensor:
    info = torch.iinfo(dtype)
    # torch.round rounds half to even, like ONNX; the add and clamp run in float, then saturate.
    q = torch.round(x / _per_axis(scale, x, axis).to(x.dtype))
    if zero is not None:
        q = q + _per_axis(zero, x, axis).to(q.dtype)
    return q.clamp(info.min, info.max).to(dtype)


def _qdq_check(ctx: Ctx, inputs: list, attrs: dict) -> None:
    if attrs.get("block_size", 0):
        raise OnnxImportError("blocked quantization (block_size) is not supported")
    for v in inputs[1:3]:
        if v is not None and ctx.rank(v) not in (0, 1, None):
            raise OnnxImportError("only per-tensor and per-axis quantization (scale of rank 0 or 1) is supported")


@register("DequantizeLinear", rank=_same_rank)
def convert_dequantize(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    _qdq_check(ctx, inputs, attrs)
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 else None
    out = ctx.call(onnx_dequantize, x, scale, zero, attrs.get("axis", 1))
    if isinstance(out, torch.fx.Node):
        out.meta["dtype"] = ctx.dtype(scale)
    return out


@register("QuantizeLinear", rank=_same_rank)
def convert_quantize(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    _qdq_check(ctx, inputs, attrs)
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 else None
    dtype = ctx.dtype(zero) if zero is not None else ONNX_TO_TORCH.get(attrs.get("output_dtype", 0), torch.uint8)
    if dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32):
        raise OnnxImportError(f"QuantizeLinear to {dtype} is not supported (8/16/32-bit integers only)")
    out = ctx.call(onnx_quantize, x, scale, zero, attrs.get("axis", 1), dtype)
    if isinstance(out, torch.fx.Node):
        out.meta["dtype"] = dtype
    return out


@register("CumSum", rank=_same_rank)
def convert_cumsum(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, axis = inputs
    items = ctx.sym(axis)
    if items is not None and len(items) == 1 and isinstance(items[0], int):
        ax = items[0]
    elif isinstance(axis, torch.fx.Node):
        ax = ctx.graph.call_method("item", (axis,))             # read at run time
    else:
        raise OnnxImportError(f"CumSum axis must be one int, got {axis!r}")
    return ctx.call(onnx_cumsum, x, ax, attrs.get("exclusive", 0), attrs.get("reverse", 0))


@register("If")
def convert_if(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    """An If whose condition is known at import time (a constant, or shape arithmetic on static
    sizes) is inlined: the taken branch is converted in place.  A run-time condition would need
    both branches traced (torch.cond) and is reported as unsupported."""
    from .importer import convert_subgraph

    cond = inputs[0]
    items = ctx.sym(cond) if not isinstance(cond, Const) or cond.t.numel() == 1 else None
    if isinstance(cond, Const) and cond.t.numel() == 1:
        items = [bool(cond.t.reshape(()).item())]
    if items is None or len(items) != 1 or not isinstance(items[0], (bool, int)):
        raise OnnxImportError("If with a condition computed at run time is not supported (only a condition "
                              "known at import time, which selects one branch); export the model with "
                              "the branch fixed")
    branch = attrs["then_branch"] if items[0] else attrs["else_branch"]
    outs = convert_subgraph(ctx, branch)
    return outs[0] if len(outs) == 1 else outs


@register("OneHot")
def convert_one_hot(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    idx, depth, values = inputs
    d = ctx.sym(depth)
    depth_v = d[0] if d is not None else (depth.t.reshape(()).item() if isinstance(depth, Const) else
                                          ctx.graph.call_method("item", (depth,)))
    return ctx.call(onnx_one_hot, idx, depth_v, values, attrs.get("axis", -1))


# ---- ai.bwta ------------------------------------------------------------------------------------

B = schemas.DOMAIN


@register("TernaryCode", domain=B, fold=False, rank=_same_rank)
def convert_ternary_code(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, s = inputs
    return ctx.call(torch.ops.bwta.ternary_code.default, x, s, attrs.get("levels", 1))


@register("BoolCode", domain=B, fold=False, rank=_same_rank)
def convert_bool_code(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, s, b = inputs
    return ctx.call(torch.ops.bwta.bool_code.default, x, s, b, attrs.get("levels", 1))


@register("SignCode", domain=B, fold=False, rank=_same_rank)
def convert_sign_code(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, s = inputs
    return ctx.call(torch.ops.bwta.sign_code.default, x, s)


@register("BinaryCode", domain=B, fold=False, rank=_same_rank)
def convert_binary_code(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    out = ctx.call(torch.ops.bwta.binary_code.default, inputs[0])
    codes = ctx.graph.call_function(operator.getitem, (out, 0))
    alpha = ctx.graph.call_function(operator.getitem, (out, 1))
    codes.meta.update(dtype=ctx.dtype(inputs[0]), rank=ctx.rank(inputs[0]))
    alpha.meta.update(dtype=torch.float32, rank=None if ctx.rank(inputs[0]) is None else ctx.rank(inputs[0]) - 1)
    return [codes, alpha]


@register("Linear", domain=B, fold=False, rank=_same_rank)
def convert_bwta_linear(ctx: Ctx, inputs: list, attrs: dict, node) -> Any:
    x, s, b, wp, scale = inputs[:5]
    bias = inputs[5] if len(inputs) > 5 else None
    act, k = attrs.get("act"), attrs.get("k")
    if act not in ("ternary", "bool", "binary"):
        raise OnnxImportError(f"ai.bwta.Linear: act must be ternary, bool or binary, got {act!r}")
    if not isinstance(k, int) or k <= 0:
        raise OnnxImportError(f"ai.bwta.Linear: attribute k must be a positive int, got {k!r}")
    if isinstance(wp, Const) and wp.t.dtype != torch.int32:
        raise OnnxImportError(f"ai.bwta.Linear: packed weight must be int32, got {wp.t.dtype}")
    od = attrs.get("out_dtype", onnx.TensorProto.FLOAT)
    out_dtype = None if od == onnx.TensorProto.FLOAT else ONNX_TO_TORCH.get(od)
    pad = attrs.get("pad_bits", 64)
    if ctx.fused_linear:
        out = ctx.call(torch.ops.bwta.linear.default, x, s, b, act, wp, k, scale, bias, out_dtype, pad, "")
    else:
        # The form BWTALinear has after weight folding, which the backend's passes fuse into one
        # bwta::linear with a generated kernel: codes(x) @ unpack(Wp)^T * scale + bias, in fp32.
        codes = _act_codes(ctx, act, x, s, b)
        w = ctx.call(torch.ops.bwta.unpack_binary.default, wp, k, torch.float32)
        acc = ctx.call(F.linear, ctx.call(onnx_cast, codes, torch.float32), w)
        out = ctx.call(torch.mul, acc, scale)
        if bias is not None:
            out = ctx.call(torch.add, out, bias)
        if out_dtype is not None:
            out = ctx.call(onnx_cast, out, out_dtype)
    out.meta["dtype"] = out_dtype or torch.float32
    return out


def _act_codes(ctx: Ctx, act: str, x: Any, s: Any, b: Any) -> Any:
    if act == "ternary":
        return ctx.call(torch.ops.bwta.ternary_code.default, x, s, 1)
    if act == "bool":
        if b is None:
            raise OnnxImportError("ai.bwta.Linear with act='bool' needs the offset input B")
        return ctx.call(torch.ops.bwta.bool_code.default, x, s, b, 1)
    return ctx.call(torch.ops.bwta.sign_code.default, x, s)


__all__ = ["CONVERTERS", "Converter", "register"]
