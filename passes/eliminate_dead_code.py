"""Remove nodes whose results are unused (left behind by the rewrites), and unused constants."""

from __future__ import annotations

from torch.fx import GraphModule

from .context import PassContext


def eliminate_dead_code(gm: GraphModule, ctx: PassContext) -> GraphModule:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b, _ in gm.named_buffers() if b.startswith("_bwta_") and b not in used]:
        delattr(gm, name)
    ctx.counters["eliminate_dead_code"] += before - len(gm.graph.nodes)
    return gm
