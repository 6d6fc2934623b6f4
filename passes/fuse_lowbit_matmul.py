"""Fuse activation quantize -> pack -> MatMul into one ``bwta::`` op.

A MatMul whose operands trace back, through layout-only ops, to quantizer code ops becomes:

* ``bwta::linear(x, s, b, act, w_packed, K)`` when the right operand is a folded binary weight
  (``t(unpack_binary(w_packed))``): binary weight x ternary/bool/binary activation;
* ``bwta::qbmm(a, act_a, ..., b, act_b, ..., b_kn=True)`` when both operands are quantized
  activations: ternary x ternary (Q·Kᵀ), bool x ternary (P·V), binary x binary.

Layout ops commute with element-wise quantization, so they are replayed on the float input
(dtype conversions of codes are dropped: the quantizer compares in the input's own dtype).
The fused node's output is the same integer accumulator, in the MatMul's float dtype, so the
epilogue (scales, bias) can stay as ordinary ops or be absorbed by ``fuse_epilogue``.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from bwta_compiler.reference import QBMM_VARIANTS

from .context import PassContext
from .patterns import (
    CONVERT_OPS,
    RESHAPE_OPS,
    act_kind,
    aten,
    bwta,
    code_levels,
    code_scale_args,
    is_call,
    meta_val,
    walk_layout,
)


@dataclass(frozen=True)
class FusedSpec:
    """Typed facts about a fused low-bit node (``node.meta["bwta"]``)."""

    op: str                       # "linear" | "qbmm"
    variant: str                  # bt | tt | ut | bb
    a_act: str
    b_act: str
    k: int                        # contraction length (0 if dynamic)
    n: int                        # output columns (0 if dynamic)
    in_dtype: str
    out_dtype: str
    b_kn: bool = False
    b_dtype: str = ""             # dtype of a quantized B activation ("" for packed weights)
    has_scale: bool = False
    scale_per_col: bool = False
    has_bias: bool = False
    source: str = ""              # the MatMul node it replaced

    def replace(self, **kw) -> FusedSpec:
        return dataclasses.replace(self, **kw)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _static(v) -> int:
    return int(v) if isinstance(v, int) else 0


def _replay(gm: GraphModule, src: Node, chain: list[Node], before: Node) -> Node:
    """Apply the layout ops of ``chain`` to ``src`` (a float tensor), skipping dtype converts."""
    cur = src
    with gm.graph.inserting_before(before):
        for op in chain:
            if op.target in CONVERT_OPS:
                continue
            target = aten.reshape.default if op.target in RESHAPE_OPS else op.target
            cur = gm.graph.call_function(target, (cur, *op.args[1:]), dict(op.kwargs))
            val = meta_val(op)
            src_val = meta_val(src)
            if val is not None and src_val is not None:
                cur.meta["val"] = val.to(src_val.dtype)
    return cur


_BROADCAST_OPS = (aten.expand.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                  aten.unsqueeze.default, aten.clone.default, aten.contiguous.default)


def _is_batch_broadcast(op: Node, kn: tuple) -> bool:
    """A layout op on the transposed weight that keeps its last two dims ``kn`` = (K, N): every
    [K, N] slice of the result is the weight (``linear`` on a non-contiguous 3-d input lowers to
    ``bmm(x, expand(t(W), [B, K, N]))``)."""
    val = meta_val(op)
    return op.target in _BROADCAST_OPS and val is not None and val.dim() >= 2 and tuple(val.shape[-2:]) == kn


def _batch_merge_tail(src: Node, chain: list[Node]) -> tuple[int, Node] | None:
    """(length, reshape node) of the ops ending ``chain`` that only fold two or more leading batch
    dims into one (``clone`` + ``reshape`` [B, H, R, C] -> [B*H, R, C]: how a 4-d matmul lowers to
    bmm).  The qbmm kernels read a two-level batch through its strides, so without this tail a
    head-split, permuted attention operand reaches them without the copy the clone makes."""
    if not chain or chain[-1].target not in RESHAPE_OPS:
        return None
    n = 2 if len(chain) >= 2 and chain[-2].target in (aten.clone.default, aten.contiguous.default) else 1
    before = meta_val(chain[-n - 1]) if len(chain) > n else meta_val(src)
    after = meta_val(chain[-1])
    if before is None or after is None or before.dim() < 4 or after.dim() != 3:
        return None
    folded = 1
    for d in before.shape[:-2]:
        folded = folded * d
    if not _same_dims((folded, *before.shape[-2:]), after.shape):
        return None
    return n, chain[-1]


def _same_dims(a, b) -> bool:
    """Equal sizes, provably so without adding guards (dims may be symbolic: a dynamic sequence)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _weight_of(b: Node) -> tuple[Node, int] | None:
    """(packed-words get_attr node, K) when ``b`` is ``t(unpack_binary(get_attr))``, optionally
    broadcast along leading batch dims."""
    src, chain = walk_layout(b)
    layout = [n for n in chain if n.target not in CONVERT_OPS]
    transposed = len(layout) >= 1 and (layout[0].target == aten.t.default or
                                       (layout[0].target == aten.transpose.int and
                                        sorted(a % 2 for a in layout[0].args[1:3]) == [0, 1]) or
                                       (layout[0].target == aten.permute.default and list(layout[0].args[1]) == [1, 0]))
    if not (is_call(src, bwta.unpack_binary.default) and src.args[0].op == "get_attr" and transposed):
        return None
    kn_val = meta_val(layout[0])
    if layout[1:] and (kn_val is None or not all(_is_batch_broadcast(op, tuple(kn_val.shape)) for op in layout[1:])):
        return None
    return src.args[0], int(src.args[1])


def _why_not(a_src: Node, b_src: Node, gm: GraphModule) -> str:
    if act_kind(a_src) is None:
        hint = " (a float layer: kept float by a quantize() rule, or not a BWTA module)" \
            if b_src.op in ("placeholder", "get_attr") else ""
        return f"left operand ({a_src.name}) is not a quantized activation{hint}"
    if is_call(b_src, operator.getitem) and is_call(b_src.args[0], bwta.binary_code.default):
        b_src = b_src.args[0]
    if is_call(b_src, bwta.binary_code.default):
        return f"weight {b_src.args[0].name} is not a frozen parameter (binary codes computed at run time)"
    if act_kind(b_src) is None and not is_call(b_src, bwta.unpack_binary.default):
        return f"right operand ({b_src.name}) is not quantized"
    return "operand layout not recognised"


def _fuse_one(gm: GraphModule, mm: Node, ctx: PassContext) -> str | None:
    """Rewrite one MatMul; returns the reason when it stays float, else None."""
    a, b = mm.args[:2]
    a_src, a_chain = walk_layout(a)
    b_src, b_chain = walk_layout(b)
    a_act = act_kind(a_src)
    if a_act is None:
        return _why_not(a_src, b_src, gm)
    if code_levels(a_src) != 1:
        return f"{a_src.name} has {2 * code_levels(a_src) + 1} levels (a training stage), not ternary"
    x = a_src.args[0]
    s, boff = code_scale_args(a_src)
    out_val = meta_val(mm)
    x_val = meta_val(x)
    weight = _weight_of(b)
    unfold = False
    if weight is not None:
        packed, k = weight
        xa = _replay(gm, x, a_chain, mm)
        n = int(meta_val(packed).shape[0]) if meta_val(packed) is not None else getattr(gm, packed.target).shape[0]
        with gm.graph.inserting_before(mm):
            fused = gm.graph.call_function(bwta.linear.default, (xa, s, boff, a_act, packed, k), {
                "out_dtype": out_val.dtype, "pad_bits": ctx.cfg.pad_bits})
        spec = FusedSpec("linear", "bb" if a_act == "binary" else "bt", a_act, "binary", k, n,
                         _dtype_name(x_val.dtype), _dtype_name(out_val.dtype), source=mm.name)
    else:
        b_act = act_kind(b_src)
        if b_act is None:
            return _why_not(a_src, b_src, gm)
        if code_levels(b_src) != 1:
            return f"{b_src.name} has {2 * code_levels(b_src) + 1} levels (a training stage), not ternary"
        variant = QBMM_VARIANTS.get((a_act, b_act))
        if variant is None:
            return f"no low-bit variant for {a_act} x {b_act}"
        a_tail, b_tail = _batch_merge_tail(a_src, a_chain), _batch_merge_tail(b_src, b_chain)
        # Both operands keep their batch dims (or neither): the kernel takes them strided, and the
        # fused result is folded back to the bmm's [B*H, M, N] by a reshape (a view: it is contiguous).
        unfold = a_tail is not None and b_tail is not None and \
            _same_dims(meta_val(a_tail[1].args[0]).shape[:-2], meta_val(b_tail[1].args[0]).shape[:-2])
        xa = _replay(gm, x, a_chain[:-a_tail[0]] if unfold else a_chain, mm)
        xb = _replay(gm, b_src.args[0], b_chain[:-b_tail[0]] if unfold else b_chain, mm)
        sb, bb = code_scale_args(b_src)
        with gm.graph.inserting_before(mm):
            fused = gm.graph.call_function(bwta.qbmm.default, (xa, a_act, s, boff, xb, b_act, sb, bb, True), {
                "out_dtype": out_val.dtype, "pad_bits": ctx.cfg.pad_bits})
            if unfold:
                # [-1, M, N] with M and N as the operands' own reshapes spelled them (ints or sizes)
                folded = gm.graph.call_function(aten.reshape.default, (
                    fused, [-1, a_tail[1].args[1][-2], b_tail[1].args[1][-1]]))
                folded.meta["val"] = out_val
        spec = FusedSpec("qbmm", variant, a_act, b_act, _static(meta_val(a).shape[-1]),
                         _static(out_val.shape[-1]), _dtype_name(x_val.dtype), _dtype_name(out_val.dtype),
                         b_kn=True, b_dtype=_dtype_name(meta_val(b_src.args[0]).dtype), source=mm.name)
    result = fused
    if spec.op == "qbmm" and unfold:
        batch = meta_val(a_tail[1].args[0]).shape[:-2]
        fused.meta["val"] = out_val.new_empty((*batch, *out_val.shape[-2:]))
        result = folded
    else:
        fused.meta["val"] = out_val
    fused.meta["bwta"] = spec
    mm.replace_all_uses_with(result)
    gm.graph.erase_node(mm)
    ctx.record(mm.name, lowbit=True, variant=spec.variant, reason="")
    ctx.counters[f"fuse_lowbit_matmul.{spec.variant}"] += 1
    return None


def fuse_lowbit_matmul(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.mm.default, aten.bmm.default):
            continue
        reason = _fuse_one(gm, node, ctx)
        if reason is not None:
            ctx.record(node.name, reason=reason)
        else:
            ctx.counters["fuse_lowbit_matmul"] += 1
    gm.graph.eliminate_dead_code()
    return gm
