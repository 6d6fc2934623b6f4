"""Drop ``bwta::grad_scale`` (an identity in the forward pass that only scales the LSQ gradient)."""

from __future__ import annotations

from torch.fx import GraphModule

from .context import PassContext
from .patterns import bwta, is_call


def remove_grad_scale(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if is_call(node, bwta.grad_scale.default):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            ctx.counters["remove_grad_scale"] += 1
    return gm
