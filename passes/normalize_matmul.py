"""Bring the many spellings of a MatMul into one form: ``mm`` / ``bmm`` plus a separate bias ``add``
(``addmm``, ``baddbmm`` and ``linear`` are split), and record every MatMul for the low-bit report
(grouped / special MatMul ops too, as float)."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from .context import MatmulRecord, PassContext
from .patterns import MATMUL_OPS, aten, is_call, is_float_attention, is_other_matmul, matmul_op_name, meta_val

# Recorded for MatMul ops outside mm/bmm/addmm/baddbmm/linear (aten._grouped_mm, transformers'
# grouped_mm_fallback, ...), which no pass rewrites.
OTHER_MATMUL_REASON = ("grouped or special MatMul op (e.g. MoE experts' stacked 3-d weights): "
                       "bwta has no low-bit form for it, it runs in float")
# Recorded twice (its Q·Kᵀ and its P·V) for a fused float attention op left in the graph.
FLOAT_ATTENTION_REASON = ("float scaled-dot-product attention op: this attention was kept float (a quantize() "
                          "rule, or code quantize() did not route to BWTA attention)")
PLAIN_MATMUL_REASON = "operands are not quantized (float MatMul)"


def float_matmul_records(node: Node, reason: str = "", plain_ops=MATMUL_OPS) -> list[MatmulRecord]:
    """``node``'s report records as a float MatMul: one for a MatMul op (``plain_ops`` or a grouped /
    special one), two (Q·Kᵀ, P·V) for a fused float attention op, none for any other node.
    ``reason`` replaces the per-kind reason (a graph that runs without bwta gives its own)."""
    if is_call(node, *plain_ops):
        return [MatmulRecord(node.name, matmul_op_name(node), reason=reason or PLAIN_MATMUL_REASON)]
    if is_float_attention(node):
        return [MatmulRecord(f"{node.name} ({part})", matmul_op_name(node), reason=reason or FLOAT_ATTENTION_REASON)
                for part in ("Q·Kᵀ", "P·V")]
    if is_other_matmul(node):
        return [MatmulRecord(node.name, matmul_op_name(node), reason=reason or OTHER_MATMUL_REASON)]
    return []


def _split_with_bias(gm: GraphModule, node: Node, mm_op) -> Node:
    bias, a, b = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        return node
    with gm.graph.inserting_before(node):
        mm = gm.graph.call_function(mm_op, (a, b))
        mm.meta["val"] = meta_val(node)
        add = gm.graph.call_function(aten.add.Tensor, (mm, bias))
        add.meta["val"] = meta_val(node)
    node.replace_all_uses_with(add)
    gm.graph.erase_node(node)
    return mm


def _split_linear(gm: GraphModule, node: Node) -> Node:
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    xv = meta_val(x)
    with gm.graph.inserting_before(node):
        x2 = gm.graph.call_function(aten.reshape.default, (x, [-1, xv.shape[-1]]))
        wt = gm.graph.call_function(aten.t.default, (w,))
        mm = gm.graph.call_function(aten.mm.default, (x2, wt))
        out = gm.graph.call_function(aten.reshape.default, (mm, list(meta_val(node).shape)))
        if bias is not None:
            out = gm.graph.call_function(aten.add.Tensor, (out, bias))
    for n in (mm, out):
        n.meta["val"] = meta_val(node)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return mm


def normalize_matmul(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if is_call(node, aten.addmm.default):
            node = _split_with_bias(gm, node, aten.mm.default)
            ctx.counters["normalize_matmul"] += 1
        elif is_call(node, aten.baddbmm.default):
            node = _split_with_bias(gm, node, aten.bmm.default)
            ctx.counters["normalize_matmul"] += 1
        elif is_call(node, aten.linear.default) and meta_val(node.args[0]) is not None:
            node = _split_linear(gm, node)
            ctx.counters["normalize_matmul"] += 1
        for record in float_matmul_records(node):
            ctx.matmuls[record.node] = record
    return gm

