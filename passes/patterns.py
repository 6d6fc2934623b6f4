"""Small graph-matching helpers shared by the passes (which ops are layout-only, which nodes are
quantizer code ops, walking back through layout chains)."""

from __future__ import annotations

import re

import torch
from torch.fx import Node

aten = torch.ops.aten
bwta = torch.ops.bwta

# Ops that only move or copy elements: they commute with element-wise quantization, so a code
# op can be moved past them (and they can be replayed on the float input instead).
LAYOUT_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.clone.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.slice.Tensor,
    aten.select.int, aten.repeat_interleave.self_int, aten.repeat.default,
}
# dtype conversions: codes are exact integers in any float dtype, so converting them is a no-op
# on values; when replaying on the float input they are dropped (the quantizer compares in the
# input's own dtype).
CONVERT_OPS = {aten._to_copy.default, aten.to.dtype, aten._to_copy,
               torch.ops.prims.convert_element_type.default}   # what inductor's decompositions emit

ACT_CODE_OPS = {
    bwta.ternary_code.default: "ternary",
    bwta.bool_code.default: "bool",
    bwta.sign_code.default: "binary",
}

# Ops that only reshape (a view when the strides allow it).
RESHAPE_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)

MATMUL_OPS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default, aten.baddbmm.default}

# Other MatMul ops a graph can hold (grouped MoE expert MatMuls: ``aten._grouped_mm``,
# transformers' ``grouped_mm_fallback``; ``_int_mm``, ``_scaled_mm``, ...): bwta has no low-bit
# form for them, but the report must count them as float MatMuls.  Matched by op name.
_OTHER_MATMUL_NAME = re.compile(r"(^|_)(grouped_mm|mm|bmm|matmul|gemm|scaled_mm|int_mm)(_|$)")


# Fused float attention ops (F.scaled_dot_product_attention: ``aten._scaled_dot_product_flash_attention_for_cpu``
# on CPU, the flash / efficient / cuDNN kernels on CUDA): two MatMuls (Q·Kᵀ, P·V) each, which a
# graph holds when an attention was kept float (a quantize() rule, a module that was not routed).
_FLOAT_ATTENTION_NAME = re.compile(r"scaled_dot_product|(^|_)(flash|efficient|cudnn)_attention")


def is_float_attention(node: object) -> bool:
    """A fused float attention op (counts as two float MatMuls: Q·Kᵀ and P·V)."""
    return (isinstance(node, Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace != "bwta" and _FLOAT_ATTENTION_NAME.search(node.target._opname) is not None
            and "backward" not in node.target._opname)


def is_other_matmul(node: object) -> bool:
    """A MatMul op outside ``MATMUL_OPS`` and ``aten.linear`` (matched by its op name), fused float
    attention ops included."""
    if not (isinstance(node, Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)):
        return False
    if node.target in MATMUL_OPS or node.target == aten.linear.default or node.target.namespace == "bwta":
        return False
    return _OTHER_MATMUL_NAME.search(node.target._opname) is not None or is_float_attention(node)


def matmul_op_name(node: Node) -> str:
    """Short op name for the report: ``mm``, ``bmm``, ``_grouped_mm``, ``grouped_mm_fallback``."""
    return node.target._opname if isinstance(node.target, torch._ops.OpOverload) else str(node.target)


def is_call(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def act_kind(node: Node) -> str | None:
    return ACT_CODE_OPS.get(node.target) if node.op == "call_function" else None


def walk_layout(node: Node) -> tuple[Node, list[Node]]:
    """Follow ``node`` back through layout/convert ops: (source node, chain from source to node)."""
    chain: list[Node] = []
    cur = node
    while cur.op == "call_function" and (cur.target in LAYOUT_OPS or cur.target in CONVERT_OPS):
        chain.append(cur)
        cur = cur.args[0]
        if not isinstance(cur, Node):
            break
    chain.reverse()
    return cur, chain


def code_levels(code_node: Node) -> int:
    kind = act_kind(code_node)
    if kind == "ternary":
        return int(_arg(code_node, 2, "levels", 1))
    if kind == "bool":
        return int(_arg(code_node, 3, "levels", 1))
    return 1


def _arg(node: Node, idx: int, name: str, default):
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(name, default)


def code_scale_args(code_node: Node) -> tuple[Node, Node | None]:
    """(s, b) of an activation code op (b is None unless it is a bool quantizer)."""
    kind = act_kind(code_node)
    s = _arg(code_node, 1, "s", None)
    b = _arg(code_node, 2, "b", None) if kind == "bool" else None
    return s, b


def meta_val(node: object):
    return node.meta.get("val") if isinstance(node, Node) else None
